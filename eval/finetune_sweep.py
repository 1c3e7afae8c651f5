"""The scale fine-tune (gsq.finetune) at several learning rates, each applied to the same finished GSQ checkpoint
written without it (`--finetune-scales 0`), and evaluated against the original: the fine-tune's settings
measured on fixed codes, in minutes instead of a whole run per setting.

    python eval/finetune_sweep.py --model models/tiny-deepseek-v3 --quantized out/.../gsq --lr 1e-2,2e-3

Each learning rate trains the scales of every MoE layer from the checkpoint's own (the codes stay), with the
checkpoint's settings (gsq_config.json: calibration windows, batch, seed, grid) and `--steps` steps, exactly as
`gsq.quantize --finetune-scales STEPS --finetune-lr LR` trains them after its last layer (NVFP4 at 0.3x LR:
`Grid.finetune_lr`; the NVFP4 records of 2026-12-06 were made before that factor, their LR is the rate itself);
the layers are rewritten as that stage writes them, into WORK/<model>-lr-LR (a copy of the checkpoint), and
evaluated (gsq.eval: KL, top-1, perplexity on WikiText-2 test windows) with the checkpoint itself as the first
row. JSON record (rewritten after every run; `--resume`) and table under eval/results/.
"""

import argparse
import dataclasses
import json
import shutil
import time
from datetime import date
from pathlib import Path

import torch
from safetensors.torch import save_file

from compare import evaluated
from gsq import adapter, dist, export, finetune, walk
from gsq import calib as calibration
from gsq.config import Config
from gsq.eval import TOKENIZER_HINT, load_tokenizer
from local_data import side_by_side_flags
from record import Record


def finetuned(source, layers: dict, files: dict, ids, quantized: Path, out: Path, cfg: Config) -> dict:
    """Train the scales of `layers` (read from `quantized`'s `files`) with `cfg`, write the checkpoint with them to
    `out`; the training record."""
    t0 = time.time()
    arch = source.arch
    scales = finetune.Scales(layers, source.device)
    history = finetune.train(source.model, source.ckpt, arch, scales, ids, cfg, source.device, source.compute)
    index = json.loads((quantized / "model.safetensors.index.json").read_text())["weight_map"]
    shutil.copytree(quantized, out, dirs_exist_ok=True)
    for i in layers:
        trained = tuple(s.detach().to("cpu", finetune.held_dtype(cfg, source.dtype)) for s in scales.scales(i))
        tensors = export.layer_shard(source.ckpt, arch, i, finetune.layer_results(files[i], arch, i, trained, cfg),
                                     export.layout(cfg))
        if {k for k, f in index.items() if f == files[i][0].name} != set(tensors):
            raise SystemExit(f"error: layer {i} of {quantized} is not one file of its own")
        save_file(tensors, out / files[i][0].name, metadata={"format": "pt"})
    return {"steps": len(history), "kl_first": history[0], "kl_last": history[-1],
            "quantize_seconds": round(time.time() - t0, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="the original model")
    ap.add_argument("--quantized", required=True, help="its GSQ checkpoint written without the fine-tune")
    ap.add_argument("--lr", default="1e-2", help="learning rates, comma-separated")
    ap.add_argument("--steps", type=int, default=50)
    side_by_side_flags(ap, "out/finetune-sweep", "eval/results/<model>-finetune-sweep-<date>.json")
    args = ap.parse_args()
    quantized = Path(args.quantized)
    cfg = Config(**{**json.loads((quantized / "gsq_config.json").read_text()), "model": args.model})
    if cfg.finetune_scales:
        raise SystemExit(f"error: {quantized} was written with the fine-tune (--finetune-scales {cfg.finetune_scales})")
    path = Path(args.record or f"eval/results/{Path(args.model).name}-finetune-sweep-{date.today()}.json")
    record = Record(path, {"model": args.model, "quantized": str(quantized), "steps": args.steps,
                           "eval": {"data_file": args.data_file, "seqlen": args.seqlen, "max_windows": args.max_windows}},
                    "runs", args.resume)
    source = walk.Source(args.model, torch.device(dist.init("cpu")))
    source.open()
    source.load_globals()
    record.row("no fine-tune", lambda: evaluated("no fine-tune", quantized, args, {"quantize_seconds": 0.0}))
    model, arch = source.model, source.arch  # read once: the codes and initial scales every rate starts from
    tokenizer = load_tokenizer(cfg.tokenizer or source.path, TOKENIZER_HINT)
    ids, _ = calibration.calibration_ids(tokenizer, cfg.dataset, cfg.text_field, cfg.num_samples, cfg.seqlen, cfg.seed)
    index = json.loads((quantized / "model.safetensors.index.json").read_text())["weight_map"]
    moe = [i for i, layer in enumerate(model.model.layers) if adapter.is_moe(layer)]
    files = {i: [quantized / index[arch.expert_key(i, 0, 0) + ".weight_packed"]] for i in moe}  # a layer: one file
    layers = {i: finetune.read_layer(files[i], arch, i, adapter.num_experts(model.model.layers[i]), cfg) for i in moe}
    for lr in [float(x) for x in args.lr.split(",")]:
        out = Path(args.work) / f"{Path(args.model).name}-lr-{lr:g}"
        here = dataclasses.replace(cfg, finetune_scales=args.steps, finetune_lr=lr)
        record.row(f"lr {lr:g}", lambda: evaluated(f"lr {lr:g}", out, args,
                                                   finetuned(source, layers, files, ids, quantized, out, here)))
    lines = ["| fine-tune | calibration KL first -> last step | KL to original | top-1 | perplexity |",
             "|---|---:|---:|---:|---:|"]
    for name, r in record.rows.items():
        calib = f"{r['kl_first']:.4f} -> {r['kl_last']:.4f}" if "kl_first" in r else ""
        lines.append(f"| {name} | {calib} | {r['kl']:.5f} | {100 * r['top1']:.2f}% | {r['ppl']:.2f} |")
    text = "\n".join(lines) + f"\n\n`python eval/finetune_sweep.py --model {args.model} --quantized {quantized} " \
                              f"--lr {args.lr} --steps {args.steps}` ({args.max_windows} test windows of {args.seqlen})\n"
    print(text)
    record.save(complete=True)
    path.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
