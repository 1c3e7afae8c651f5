"""Side by side: quantize one model with several methods (or settings) and evaluate each against it.

    python eval/compare.py --model models/tiny-deepseek-v3 [--run NAME=ARGS ...] [--nvfp4] [--record PATH] [--resume]

Each run is `python -m gsq.quantize --model MODEL --out WORK/NAME ARGS` (the bundled tiny model gets
`--preset tiny` first), then `python -m gsq.eval --model WORK/NAME --reference MODEL --json` on the
WikiText-2 test split: KL(original || quantized), top-1 agreement and perplexity. Without --run the
three methods are compared on equal terms: gsq, gptq, rtn (and again on the NVFP4 grid with --nvfp4, each
NVFP4 row's ratio taken against GPTQ on NVFP4); `--llmcompressor PYTHON` adds llm-compressor's
GPTQ W2A16 on the same experts and calibration tokens (eval/llmcompressor_gptq.py, run in its own
environment because it pins other transformers and compressed-tensors versions). Prints a Markdown table and writes a JSON
record (settings, git commit, device, per-method metrics, per-layer errors, wall time, peak memory; rewritten
after every run, so `--resume` goes on from a comparison cut short: eval/record.py),
the table beside it (.md) and two plots (.png, with matplotlib): perplexity as layers are quantized,
per method, and the distribution over experts of GSQ's reconstruction-error reduction against its init.
"""

import argparse
import json
import shlex
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from local_data import BUNDLED, CALIBRATION, ROOT, TINY, side_by_side_flags, tiny_flags
from record import Record
DEFAULT_RUNS = ["gsq=--method gsq", "gptq=--method gptq", "rtn=--method rtn"]


def run_one(name: str, extra: str, args) -> dict:
    out = Path(args.work) / name
    quantize = [sys.executable, "-m", "gsq.quantize", "--model", args.model, "--out", str(out), "--overwrite"]
    quantize += tiny_flags(args.model) + shlex.split(extra)
    seconds = timed(quantize, args.quiet)
    record = json.loads((out / "gsq_run.json").read_text())
    layers = [{k: l[k] for k in ("layer", "steps", "err_rtn", "err_init", "err_gsq", "err_per_expert", "seconds")}
              for l in record["layers"] if l.get("moe")]
    return evaluated(name, out, args, {"args": extra, "quantize_seconds": seconds, "peak_rss_mb": record["peak_rss_mb"],
                                       "ppl_watch": record["ppl"], "layers": layers})


def run_llmcompressor(python: str, args, scheme: str = "W2A16") -> dict:
    """llm-compressor's GPTQ W2A16 (or its NVFP4A16) on the same experts and calibration tokens
    (eval/llmcompressor_gptq.py, run by `python`, the interpreter of an environment where llm-compressor is installed)."""
    out = Path(args.work) / f"llmcompressor-{scheme}"
    cmd = [python, str(ROOT / "eval" / "llmcompressor_gptq.py"), "--model", args.model, "--out", str(out),
           "--scheme", scheme]
    if Path(args.model).resolve() in BUNDLED:
        cmd += ["--preset", "tiny", "--dataset", str(CALIBRATION)]
    seconds = timed(cmd, args.quiet)
    version = subprocess.run([python, "-c", "import llmcompressor; print(llmcompressor.__version__)"],
                             capture_output=True, text=True).stdout.strip()
    what = "GPTQ W2A16 g128" if scheme == "W2A16" else "NVFP4A16 (QuantizationModifier)"
    return evaluated(LLMC[scheme], out, args, {"args": f"llmcompressor {version}, {what}", "quantize_seconds": seconds})


LLMC = {"W2A16": "llm-compressor GPTQ W2A16", "NVFP4A16": "llm-compressor NVFP4A16"}


def timed(cmd: list, quiet: bool) -> float:
    t0 = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if quiet else None)
    return round(time.time() - t0, 1)


def evaluated(name: str, out: Path, args, row: dict) -> dict:
    """`row` with KL, top-1 and perplexity of the checkpoint in `out` against the original."""
    evaluate = [sys.executable, "-m", "gsq.eval", "--model", str(out), "--reference", args.model,
                "--data-file", args.data_file, "--seqlen", str(args.seqlen), "--json"]
    if args.max_windows:
        evaluate += ["--max-windows", str(args.max_windows)]
    metrics = json.loads(subprocess.run(evaluate, check=True, capture_output=True, text=True).stdout)
    row.update({k: metrics[k] for k in ("ppl", "kl", "top1", "windows")})
    print(f"{name}: KL {row['kl']:.5f}  top-1 {100 * row['top1']:.2f}%  ppl {row['ppl']:.3f}  "
          f"({row['quantize_seconds']:.0f}s)", flush=True)
    return row


def table(runs: dict, base: str) -> str:
    lines = ["| method | KL to original | top-1 agreement | perplexity | KL / " + base + " | quantize time |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in runs.items():
        nvfp4 = "nvfp4" in name.lower() and "nvfp4" not in base
        same_grid = f"{base} nvfp4" if nvfp4 else base  # NVFP4 rows: against GPTQ on NVFP4
        ratio = r["kl"] / runs[same_grid]["kl"] if same_grid in runs else float("nan")
        lines.append(f"| {name} | {r['kl']:.4f} | {100 * r['top1']:.2f}% | {r['ppl']:.2f} | {ratio:.2f} | "
                     f"{r['quantize_seconds']:.0f} s |")
    return "\n".join(lines)


def plots(runs: dict, stem: Path) -> list:
    """PNG plots next to the record: perplexity watch per method; GSQ's per-expert error reduction."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install 'gsq[report]')")
        return []
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in runs.items():
        watch = r.get("ppl_watch", [])  # the external reference has no perplexity watch
        ax.plot([w["layers_quantized"] for w in watch], [w["ppl"] for w in watch], marker="o", label=name)
    ax.set(xlabel="decoder layers quantized (the rest original)", ylabel="WikiText-2 perplexity (held-out windows)",
           title="Perplexity while the run goes on")
    ax.legend()
    fig.tight_layout()
    paths = [stem.with_name(stem.name + "-ppl.png")]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)
    reductions = {}  # runs that learned codes: for gptq/rtn the final error is the init's
    for name, r in runs.items():
        per_expert = [1 - g / i for l in r.get("layers", [])
                      for g, i in zip(l["err_per_expert"]["gsq"], l["err_per_expert"]["init"]) if i > 0]
        if any(per_expert):
            reductions[name] = per_expert
    if reductions:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.hist(list(reductions.values()), bins=20, label=list(reductions), alpha=0.8)
        ax.set(xlabel="1 - err(GSQ) / err(init), per expert", ylabel="experts",
               title="GSQ's reconstruction-error reduction over its GPTQ init")
        ax.legend()
        fig.tight_layout()
        paths.append(stem.with_name(stem.name + "-experts.png"))
        fig.savefig(paths[1], dpi=120)
        plt.close(fig)
    return paths


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(TINY.relative_to(ROOT)))
    ap.add_argument("--run", action="append", help="NAME=QUANTIZE_ARGS (repeatable; default: gsq, gptq, rtn)")
    ap.add_argument("--nvfp4", action="store_true", help="add the three methods on the NVFP4 grid (--format nvfp4)")
    side_by_side_flags(ap, "out/compare", "eval/results/<model>-compare-<date>.json")
    ap.add_argument("--base", default="gptq", help="run whose KL the ratio column divides by (its NVFP4 run for "
                                                   "NVFP4 rows)")
    ap.add_argument("--llmcompressor", metavar="PYTHON",
                    help="interpreter of an environment with llm-compressor: adds its GPTQ W2A16 (and, when NVFP4 "
                         "runs are compared, its NVFP4A16) as a reference")
    args = ap.parse_args()
    specs = args.run or DEFAULT_RUNS
    if args.nvfp4:
        specs = [*specs, *(f"{spec.partition('=')[0]} nvfp4={spec.partition('=')[2]} --format nvfp4"
                           for spec in DEFAULT_RUNS)]
    path = Path(args.record or f"eval/results/{Path(args.model).name}-compare-{date.today()}.json")
    record = Record(path, {"model": args.model, "runs_asked": specs,
                           "eval": {"data_file": args.data_file, "seqlen": args.seqlen, "max_windows": args.max_windows}},
                    "runs", args.resume)

    runs = {}
    for spec in specs:
        name, _, extra = spec.partition("=")
        runs[name] = record.row(name, lambda: run_one(name, extra, args))
    if args.llmcompressor:
        nvfp4 = ["--format nvfp4" in spec for spec in specs]  # llm-compressor's row for each format compared
        for scheme in [s for s, wanted in (("W2A16", not all(nvfp4)), ("NVFP4A16", any(nvfp4))) if wanted]:
            runs[LLMC[scheme]] = record.row(LLMC[scheme], lambda: run_llmcompressor(args.llmcompressor, args, scheme))
    else:
        print("llm-compressor reference not run: pass --llmcompressor PYTHON (an environment with llmcompressor)")
    print(table(runs, args.base))
    record.save(complete=True)
    path.with_suffix(".md").write_text(table(runs, args.base) + "\n")
    print(f"recorded {path} and its table (.md)")
    for png in plots(runs, path.with_suffix("")):
        print(f"plotted {png}")

if __name__ == "__main__":
    main()
