"""The model card (`README.md`) written into every output, as compressed models on the Hub ship one.

Hub-style YAML front matter (base_model, tags, library_name, pipeline_tag, the source card's license), then
what was done: method, bits per weight, what was quantized and what was kept, the calibration data, the
perplexity measured while the run went on, the size on disk and the `vllm serve` command. `gsq.eval` adds
its measurements to the results table between the RESULTS markers (`add_result`), so the folder can be
uploaded as it is. The card holds nothing of where or how long the run went, so a resumed run writes the
same bytes as one that was not interrupted.
"""

import json
import os
import re
import sys
from pathlib import Path

from gsq.errors import write_text

RESULTS = ("<!-- gsq.eval results: python -m gsq.eval --model THIS --reference SOURCE adds a row -->",
           "<!-- end of gsq.eval results -->")
HEADER = "| reference | data | windows x tokens | KL(reference \\|\\| this) | top-1 agreement | perplexity | tasks |"


def source_card(src: Path) -> dict:
    """The front matter of the source's own card (its license, its base model), {} when it has none."""
    import yaml

    card = src / "README.md"
    text = card.read_text(errors="replace") if card.is_file() else ""
    match = re.match(r"---\n(.*?)\n---\n", text, re.S)
    try:
        meta = yaml.safe_load(match.group(1)) if match else {}
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def base_model(src: Path) -> str:
    """The source's Hub id where its path says it (the Hub cache's `models--ORG--NAME/snapshots/REV`), else its
    folder's name."""
    for part in reversed(src.resolve().parts):
        hub = re.fullmatch(r"models--([^/]+?)--(.+)", part)
        if hub:
            return f"{hub.group(1)}/{hub.group(2)}"
    return src.resolve().name


def front_matter(src: Path, tags: list) -> str:
    import yaml

    meta = source_card(src)
    out = {"base_model": base_model(src), "tags": tags, "library_name": "transformers",
           "pipeline_tag": "text-generation"}
    for key in ("license", "license_name", "license_link"):
        if key in meta:
            out[key] = meta[key]
    return "---\n" + yaml.safe_dump(out, sort_keys=False) + "---\n"


def size(path: Path) -> str:
    total = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    return f"{total / 2**30:.2f} GiB" if total >= 2**30 else f"{total / 2**20:.2f} MiB"


def serve_line(config: dict, tp: list) -> str:
    flags = f" --tensor-parallel-size {max(t for t in tp if t <= 8)}" if tp and max(tp) > 1 else ""
    trust = " --trust-remote-code" if "auto_map" in config else ""
    return f"vllm serve /path/to/this/folder{flags}{trust}"


def quantized_card(src: Path, config: dict, cfg, record: dict, tp: list, shards: Path) -> str:
    """The card of a gsq.quantize output, whose shards are still in `shards` (OUT.partial)."""
    bpw = cfg.bits + 16 / cfg.group_size
    stored = cfg.container + 16 / cfg.group_size
    codes = ",".join(map(str, range(-(1 << (cfg.bits - 1)), 1 << (cfg.bits - 1))))
    levels = f"levels {{{codes}}} x a signed scale per {cfg.group_size} inputs"
    width, grid = f"{cfg.bits} bits", f"{levels} ({bpw:.3f} bits per weight, stored in {cfg.container}-bit words: {stored:.3f})"
    serving = f"The\n{cfg.container}-bit container is served by " + (
        "vLLM's Humming MoE kernels (its humming-kernels dependency)" if cfg.container < 4 else
        "Humming on Hopper, Marlin elsewhere")
    loads = "transformers loads it too (dequantized,\nwith compressed-tensors installed)"
    if "bits" in record:  # a width per layer (--bits-budget, --target-size, --bits-plan)
        loads = ("transformers (5.25) decodes every layer's experts with one width, so it misreads this "
                 "checkpoint;\n`python -m gsq.eval` reads it with gsq's own streaming reader")
        alloc = record["bits"]
        counts = {b: sum(row["bits"] == b for row in alloc["layers"].values()) for b in (2, 3, 4)}
        width = f"{alloc['average_bits']:.3f} bits per weight on average"
        grid = (", ".join(f"{n} layer(s) at {b} bits" for b, n in counts.items() if n) + f" ({alloc['how']}; "
                f"per layer in `gsq_bits.json`), a signed scale per {cfg.group_size} inputs: {width}")
        serving = "Each\nlayer is served at its own width by vLLM's Humming MoE kernels (the only ones for 2 and 3 bits)"
    tp_line = (f"vLLM 0.33 loads it at tensor-parallel sizes {', '.join(map(str, tp)) or 'none (expert parallelism only)'} "
               f"(each rank's share of the expert width must be a multiple of\n{cfg.group_size}); expert parallelism "
               "(`--enable-expert-parallel`) does not split the experts. ")
    fmt = "pack-quantized"
    if cfg.format == "nvfp4":
        width, fmt, tp, tp_line = "NVFP4 (4.5 bits per weight)", "nvfp4-pack-quantized", [], ""
        grid = ("FP4 E2M1 values {0, +-0.5, +-1, +-1.5, +-2, +-3, +-4, +-6} x an FP8 E4M3 scale per 16 inputs x a "
                "float32 global scale per tensor (gate and up share one, as vLLM reads them): 4.5 bits per weight")
        serving = ("vLLM 0.33 serves NVFP4 experts with bf16 activations\n(NVFP4A16) with its Humming MoE kernels on "
                   "Hopper, else Marlin (Hopper and Blackwell): its FlashInfer and CUTLASS\nNVFP4 MoE kernels need "
                   "NVFP4 activations (eval/vllm/nvfp4.md in gsq)")
        loads = ("transformers (5.25) loads NVFP4 experts without decoding them; `python -m gsq.eval` reads it\nwith "
                 "gsq's own streaming reader")
    steps = "\n".join(f"| {p['layers_quantized']} | {p['ppl']:.3f} |" for p in record.get("ppl", []))
    if "ppl" in record.get("finetune", {}):
        steps += f"\n| all + scale fine-tune | {record['finetune']['ppl']:.3f} |"
    method = {"gsq": "GSQ (Gumbel-Softmax quantization, arXiv 2604.18556), GPTQ-initialised",
              "gptq": "GPTQ", "rtn": "round-to-nearest"}[cfg.method]
    tag = "nvfp4" if cfg.format == "nvfp4" else "mixed-precision" if "bits" in record else f"{cfg.bits}-bit"
    return f"""{front_matter(src, ["gsq", "compressed-tensors", tag, "mixture-of-experts"])}
# {src.resolve().name}, routed experts at {width} (gsq)

{src.resolve().name} with every routed expert's gate, up and down projection quantized to {width} by
{method}, written by gsq as a compressed-tensors `{fmt}` checkpoint.

| | |
|---|---|
| quantized | the routed experts of {len([layer for layer in record['layers'] if layer.get('moe')])} MoE layers: \
{grid} |
| kept as the source stores them | attention, routers, shared experts, dense layers, embeddings, LM head |
| calibration | {record.get('calibration', f"{cfg.num_samples} x {cfg.seqlen} tokens of {cfg.dataset}")} |
| GSQ settings | {cfg.epochs:g} epochs, batch {cfg.batch_size}, token weights {cfg.token_weights}, \
scale fine-tune {cfg.finetune_scales if cfg.method == 'gsq' else 0} steps (all settings: `gsq_config.json`) |
| size on disk | {size(shards)} (source: {size(src)}) |
| the run | per layer: tokens per expert, errors, time, memory in `gsq_run.json` |

## Perplexity while the run went on

WikiText-2 test windows, the first N layers quantized and the rest original (`gsq_run.json`):

| layers quantized | perplexity |
|---|---:|
{steps or "| (no perplexity watch in this run) | |"}

## Results

{RESULTS[0]}
{HEADER}
|---|---|---|---:|---:|---:|---|
{RESULTS[1]}

## Serve

```bash
{serve_line(config, tp)}
```

{tp_line}{serving}. {loads}.
"""


def pruned_card(src: Path, config: dict, record: dict, shards: Path) -> str:
    """The card of a gsq.prune output, whose shards are still in `shards` (OUT.partial)."""
    cfg = record["config"]
    return f"""{front_matter(src, ["gsq", "reap", "pruned", "mixture-of-experts"])}
# {src.resolve().name}, REAP-pruned to {record['keep']} experts per layer (gsq)

{src.resolve().name} with the routed experts of every MoE layer pruned from {record['experts']} to {record['keep']}
by {record['criterion'].upper() if record['criterion'] == 'reap' else record['criterion']} \
(REAP: arXiv 2510.13999), written by gsq. Kept experts are renumbered and the routers sliced; every other
tensor is the source's, in its own format.

| | |
|---|---|
| calibration | {record['calibration']} |
| experts kept per layer | `gsq_prune.json` (with every expert's saliency) |
| size on disk | {size(shards)} (source: {size(src)}) |

## Results

{RESULTS[0]}
{HEADER}
|---|---|---|---:|---:|---:|---|
{RESULTS[1]}

## Serve

```bash
{serve_line(config, [])}
```
"""


def add_result(model: Path, result: dict, data: str) -> bool:
    """Add `result` (gsq.eval's JSON) to the results table of the card in `model`, written by gsq; False when
    the model has no such card (an original model's own card is never touched)."""
    card = Path(model) / "README.md"
    text = card.read_text() if card.is_file() else ""
    if RESULTS[0] not in text or RESULTS[1] not in text:
        return False
    if not os.access(card, os.W_OK) or not os.access(model, os.W_OK):  # a read-only model store
        print(f"{card} is read-only: the results are not added to it", file=sys.stderr)
        return False
    tasks = "; ".join(f"{task} " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
                      for task, metrics in result.get("tasks", {}).items())
    cells = [Path(result["reference"]).name if result.get("reference") else "-", Path(data).name if data else "-",
             f"{result['windows']} x {result['seqlen']}" if "windows" in result else "-",
             f"{result['kl']:.5f}" if "kl" in result else "-", f"{100 * result['top1']:.2f}%" if "top1" in result
             else "-", f"{result['ppl']:.3f}" if "ppl" in result else "-", tasks or "-"]
    row = "| " + " | ".join(cells) + " |\n"
    write_text(card, text.replace(RESULTS[1], row + RESULTS[1]))
    write_text(Path(model) / "gsq_eval.json", json.dumps([*previous(model), result], indent=2) + "\n")
    return True


def previous(model: Path) -> list:
    path = Path(model) / "gsq_eval.json"
    return json.loads(path.read_text()) if path.is_file() else []
