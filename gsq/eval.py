"""WikiText-2 perplexity of a model directory, its fidelity to a reference model, and lm-eval tasks.

    python -m gsq.eval --model DIR [--reference DIR] [--data-file PATH] [--seqlen 2048]
                       [--max-windows N] [--device auto] [--json] [--tasks arc_easy,...]

Perplexity follows the protocol of GPTQ, AutoRound and llm-compressor: the test rows joined with
"\\n\\n", tokenized once without special tokens, cut into non-overlapping windows of `seqlen` tokens
(the last partial window dropped), exp of the mean next-token NLL over all windows.

Fidelity (`--reference`, the original model) is measured on the same windows: mean over predicted
positions of KL(reference || model) of the next-token distributions, and top-1 agreement (the
fraction of positions where both models' most likely next token is the same). At 2 bits these
rank quantizers where perplexity cannot.
"""

import json
import math
import sys
from pathlib import Path

from gsq.errors import ArgumentParser, InputError, quiet_start, run_cli

quiet_start(__name__)  # before the imports below take seconds
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402


WIKITEXT_HUB = ("wikitext", "wikitext-2-raw-v1", "test")


def wikitext_rows(data_file: str | None = None, flag: str = "--data-file") -> list[str]:
    """The WikiText-2 raw test split as the Hub's `text` rows, from the Hub or a local release file.

    A local file maps line by line: a blank (whitespace-only) line is the row "", any other line is
    the row `line + "\\n"`; this reproduces the Hub split exactly (4358 rows, 1467 empty).
    """
    if data_file is None:
        try:
            import datasets

            return list(datasets.load_dataset(*WIKITEXT_HUB[:2], split=WIKITEXT_HUB[2])["text"])
        except Exception as exc:  # offline, hub down, dataset renamed
            raise InputError(f"could not load {'/'.join(WIKITEXT_HUB)} from the Hub ({type(exc).__name__}); "
                             f"pass {flag} PATH to a local wiki.test.raw") from exc
    path = Path(data_file)
    if not path.is_file():
        raise InputError(f"data file not found: {data_file}")
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":  # the file's final newline ends the last line, it is not a row
        lines.pop()
    return ["" if not line.strip() else line + "\n" for line in lines]


def eval_windows(tokenizer, rows: list[str], seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Token windows `[n, seqlen]`: rows joined with "\\n\\n", tokenized once, non-overlapping."""
    ids = tokenizer("\n\n".join(rows), add_special_tokens=False, return_tensors="pt").input_ids[0]
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise InputError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


def window_sums(logits: torch.Tensor, ids: torch.Tensor, ref_logits: torch.Tensor | None = None) -> dict:
    """Sums over one window `ids [S]` with next-token `logits [S, V]`: NLL, and with the reference's
    logits, KL(reference || model) and top-1 agreement; `n` predicted positions (S - 1)."""
    logp = F.log_softmax(logits[:-1].float(), dim=-1)
    targets = ids[1:].to(logp.device)
    sums = {"nll": -logp.gather(1, targets[:, None]).sum().item(), "n": targets.numel()}
    if ref_logits is not None:
        ref_logp = F.log_softmax(ref_logits[:-1].float(), dim=-1)
        sums["kl"] = (ref_logp.exp() * (ref_logp - logp)).sum().item()
        sums["top1"] = (ref_logp.argmax(-1) == logp.argmax(-1)).sum().item()
    return sums


def summarize(sums: list) -> dict:
    """Perplexity (and mean KL, top-1) from the windows' sums: every predicted position weighs the same."""
    n = sum(s["n"] for s in sums)
    nll = sum(s["nll"] for s in sums) / n
    result = {"ppl": math.exp(nll), "nll": nll, "windows": len(sums), "tokens": n}
    if sums and "kl" in sums[0]:
        result.update(kl=sum(s["kl"] for s in sums) / n, top1=sum(s["top1"] for s in sums) / n)
    return result


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, reference=None, device="cpu", progress=True) -> dict:
    """Perplexity of `model` on `windows`; with `reference`, also mean KL(reference || model) and top-1.

    Every window predicts its tokens 1..seqlen-1 from the tokens before them.
    """
    sums = []
    for window in tqdm(windows, desc="eval", unit="window", disable=not progress, file=sys.stderr):
        ids = window[None].to(device)
        ref_logits = None if reference is None else reference(input_ids=ids).logits[0]
        sums.append(window_sums(model(input_ids=ids).logits[0], ids[0], ref_logits))
    return summarize(sums)


def check_model_dir(path: str) -> Path:
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"model directory not found: {path}")
    if not (root / "config.json").is_file():
        raise InputError(f"not a model directory (no config.json): {path}")
    return root


def model_config(root: Path):
    """transformers' config of the model in `root`; an unreadable config.json is one line."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(root)
    except Exception as exc:  # transformers' config classes validate with errors of their own (huggingface_hub's)
        raise InputError(f"cannot read {root / 'config.json'}: {str(exc).splitlines()[0][:200]}") from exc


def check_weights(root: Path, config):
    """The checks every gsq tool makes on a model's weights before reading them (gsq.stream): shards whole,
    quantized formats known, packed bit widths as configured, shapes as config.json describes (for a supported
    architecture)."""
    from gsq import adapter, stream

    ckpt = stream.Checkpoint(root)
    try:
        arch = adapter.arch_of(config)
    except InputError:  # not a MoE gsq quantizes: transformers' loader checks the rest
        return
    stream.check_shapes(ckpt, stream.skeleton(adapter.text_config(config)), arch)


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def fails(model, device: str) -> Exception | None:
    """What one forward pass of two tokens raises (None: it runs)."""
    try:
        with torch.no_grad():
            model(torch.zeros(1, 2, dtype=torch.long, device=device))
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError, AttributeError, AssertionError) as exc:
        return exc
    return None


def load_model(path: str, device: str = "cpu", dtype: str = "auto", tokenizer: str | None = ""):
    """A causal LM and its tokenizer from a local directory (original or compressed-tensors); `tokenizer`: the
    directory of another tokenizer, or None for none (the tokenizer is read first: a missing one is said before
    the weights are loaded)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)

    root = check_model_dir(path)
    config = model_config(root)
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        auto = AutoModelForCausalLM
    elif config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and hasattr(config, "text_config"):
        auto = AutoModelForImageTextToText  # a multimodal wrapper (Kimi-K2.5): text-only input runs its language model
    else:
        raise InputError(f"{path} holds a '{config.model_type}' model, not a causal language model")
    check_weights(root, config)
    words = load_tokenizer(tokenizer or root, TOKENIZER_HINT) if tokenizer is not None else None
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    extra = {}
    if (getattr(config, "quantization_config", None) or {}).get("quant_method") == "mxfp4":
        from transformers import Mxfp4Config

        # loaded on the CPU, where transformers >= 5.25 would fetch MXFP4 kernels from the Hub: decode to bf16
        extra["quantization_config"] = Mxfp4Config(dequantize=True)
    why = misread_experts(getattr(config, "quantization_config", None) or {})
    if why:
        model = None
    else:
        try:
            model = auto.from_pretrained(root, dtype=torch_dtype, **extra).to(device).eval()
        except (OSError, ValueError) as exc:  # no or unreadable weights
            raise InputError(f"cannot load the model in {path}: {first_line(exc)}") from exc
        except RuntimeError as exc:  # transformers' own loader fails on it (its weight conversions)
            model, why = None, exc
        else:
            why = fails(model, device)
    if why is not None:  # a loader can accept a checkpoint its forward cannot run (its kernels, its shapes)
        from gsq import adapter, stream

        adapter.arch_of(config)  # a model gsq cannot read either: one line, not the traceback
        print(f"transformers cannot run {path} ({first_line(why)[:160]}); reading it with gsq's own streaming "
              "reader", file=sys.stderr)
        model = stream.dense_model(root, device, getattr(torch, dtype) if dtype != "auto" else
                                   stream.model_dtype(adapter.text_config(config)))
        why = fails(model, device)
        if why is not None:
            raise InputError(f"cannot run the model in {path}: {first_line(why)}") from why
    return model, words


def misread_experts(qc: dict) -> str | None:
    """Why transformers (5.25) would load a compressed-tensors checkpoint's routed experts wrongly, else None:
    it decodes every layer's experts with one config group's width (a --bits-budget checkpoint has one per
    width), and it loads NVFP4 experts without decoding them (tiny-deepseek-v3 read that way: perplexity 1020
    where the run measured 119)."""
    groups = [(g.get("weights") or {}, g.get("format") or qc.get("format")) for g in (qc.get("config_groups") or {}).values()]
    widths = {w["num_bits"] for w, fmt in groups if w.get("type") == "int" and fmt == "pack-quantized"}
    if len(widths) > 1:
        return f"its experts have widths {sorted(widths)} by layer, and transformers decodes them with one"
    if any(fmt == "nvfp4-pack-quantized" for _, fmt in groups):
        return "transformers does not decode NVFP4 experts into its fused expert tensors"
    return None


# what transformers reads a tokenizer from (one of them is enough)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "tiktoken.model", "vocab.json",
                   "spiece.model", "vocab.txt")
TOKENIZER_HINT = "; pass --tokenizer DIR to use the tokenizer of the model it came from"


def load_tokenizer(root, hint: str = ""):
    """The model's tokenizer, for whole corpora: texts are tokenized in one piece and then cut into
    windows, so its maximum length (and transformers' warning about it) does not apply. A folder without one,
    or one transformers cannot read, is one line (`hint`: what to do about it)."""
    from transformers import AutoTokenizer

    root = Path(root)
    if not root.is_dir():
        raise InputError(f"tokenizer directory not found: {root}")
    if not any((root / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(f"{root} has no tokenizer (looked for {', '.join(TOKENIZER_FILES)}){hint}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(root)
    except (OSError, ValueError, ImportError, TypeError, KeyError, AttributeError) as exc:
        raise InputError(f"cannot load the tokenizer in {root}: {first_line(exc)[:200]}{hint}") from exc
    tokenizer.model_max_length = sys.maxsize
    return tokenizer


def run_tasks(model, tokenizer, tasks: list[str], include_path: str | None = None,
              limit: float | None = None, batch_size: int = 1, device: str = "cpu") -> dict:
    """lm-eval tasks on an already loaded model, through lm-eval's own HF model class."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise InputError("--tasks needs lm-eval: pip install 'gsq[lm-eval]'") from exc
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise InputError(f"unknown lm-eval task(s): {', '.join(unknown)}")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False)
    return out["results"]


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name} asked for, but no CUDA device is available")
    return name


def parse_args(argv=None):
    ap = ArgumentParser(prog="python -m gsq.eval", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="model directory (original or compressed-tensors)")
    ap.add_argument("--reference", help="original model directory: adds KL(reference || model) and top-1")
    ap.add_argument("--tokenizer", help="tokenizer directory, where the model's folder has none")
    ap.add_argument("--data-file", help="local wiki.test.raw (default: the Hub's wikitext-2-raw-v1 test)")
    ap.add_argument("--seqlen", type=int, default=2048, help="window length in tokens")
    ap.add_argument("--max-windows", type=int, help="evaluate only the first N windows")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    ap.add_argument("--tasks", help="comma-separated lm-eval tasks, run after the perplexity")
    ap.add_argument("--tasks-include", help="directory of extra lm-eval task YAMLs")
    ap.add_argument("--tasks-limit", type=float, help="lm-eval examples per task (or fraction)")
    ap.add_argument("--skip-ppl", action="store_true", help="run only --tasks")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    ap.add_argument("--no-card", action="store_true", help="leave the model's card (README.md written by gsq) as it "
                    "is; by default the results are added to its table and to gsq_eval.json")
    args = ap.parse_args(argv)
    if args.seqlen < 2:
        ap.error("--seqlen must be at least 2")
    if args.max_windows is not None and args.max_windows < 1:
        ap.error("--max-windows must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    for path in filter(None, [args.model, args.reference]):
        check_model_dir(path)  # cheap checks before any data or weights are loaded
    rows = None if args.skip_ppl else wikitext_rows(args.data_file)
    model, tokenizer = load_model(args.model, device, args.dtype, args.tokenizer or "")
    result = {"model": args.model, "seqlen": args.seqlen}
    if rows is not None:
        reference = None
        if args.reference:
            reference, _ = load_model(args.reference, device, args.dtype, tokenizer=None)
            if reference.get_output_embeddings().weight.shape[0] != model.get_output_embeddings().weight.shape[0]:
                raise InputError(f"--reference {args.reference} has a different vocabulary than {args.model}")
            result["reference"] = args.reference
        windows = eval_windows(tokenizer, rows, args.seqlen, args.max_windows)
        result.update(evaluate(model, windows, reference, device, progress=not args.json))
    if args.tasks:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        result["tasks"] = run_tasks(model, tokenizer, tasks, args.tasks_include, args.tasks_limit, device=device)
    from gsq import card

    if not args.no_card and card.add_result(Path(args.model), result, args.data_file):
        print(f"added to the results of {Path(args.model) / 'README.md'}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, default=str))
        return
    if "ppl" in result:
        line = f"{args.model}: ppl {result['ppl']:.3f} ({result['windows']} windows x {args.seqlen} tokens)"
        if "kl" in result:
            line += f", KL {result['kl']:.5f}, top-1 {100 * result['top1']:.2f}% vs {args.reference}"
        print(line)
    for task, metrics in result.get("tasks", {}).items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        print(f"{task}: {shown}")


if __name__ == "__main__":
    run_cli(main)
