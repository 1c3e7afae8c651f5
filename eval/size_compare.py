"""One checkpoint size reached by fewer bits, by fewer experts, or by some of each, side by side; and KL against
bits per weight: the picture to look at before cutting a model down.

    python eval/size_compare.py --model models/tiny-deepseek-v3 --size 9MB [--args "--method gsq"] [--no-curve]

At --size (the safetensors on disk), each quantized with ARGS:
    every expert      each MoE layer's width from `gsq.quantize --target-size SIZE` (needs SIZE >= the 2-bit model)
    REAP, 2 bits      REAP-pruned (gsq.prune) to the most experts per layer whose 2-bit checkpoint fits
    REAP, 4 bits      pruned to the most that fit at 4 bits
    a mix             pruned halfway between that and every expert, widths from `--target-size SIZE`
The curve: KL against stored bits per routed-expert weight, for gsq's `--bits-budget` from 2.125 to 4.125 (the
ends are uniform 2 and 4 bits) and uniform GPTQ at 2, 3 and 4 bits. Every checkpoint is evaluated against the
original (gsq.eval: KL, top-1, perplexity on WikiText-2 test windows). JSON record, table (.md) and plot (.png)
under eval/results/; the record is rewritten after every run (eval/record.py: `--resume` measures only the runs
it lacks).
"""

import argparse
import json
import shlex
import sys
from datetime import date
from pathlib import Path

import torch

from compare import evaluated, timed
from gsq import adapter, walk
from gsq.plan import gb, parse_size
from local_data import ROOT, TINY, side_by_side_flags, tiny_flags
from prune_compare import sh
from record import Record

CURVE = (2.125, 2.625, 3.125, 3.625, 4.125)


def on_disk(out: Path) -> int:
    return sum(p.stat().st_size for p in out.glob("*.safetensors"))


def quantized(record, name: str, model: str, extra: str, args, before=None) -> dict:
    """`gsq.quantize` of `model` into WORK/name with `extra` (after `before()`, if given), evaluated against the
    original; with its stored bits per expert weight (from gsq_bits.json) and size. Kept from a resumed record."""
    def measure():
        if before:
            before()
        out = Path(args.work) / name
        cmd = [sys.executable, "-m", "gsq.quantize", "--model", model, "--out", str(out), "--overwrite",
               *tiny_flags(args.model), *shlex.split(extra)]
        seconds = timed(cmd, args.quiet)
        bits = json.loads((out / "gsq_bits.json").read_text())
        row = {"args": extra, "source": model, "quantize_seconds": seconds, "bytes": on_disk(out),
               "average_bits": bits["average_bits"], "expert_bytes": bits["expert_bytes"],
               "weights": sum(r["weights"] for r in bits["layers"].values()),
               "widths": {i: r["bits"] for i, r in bits["layers"].items()}}
        return evaluated(name, out, args, row)
    return dict(record.row(name, measure))


def uniform(work: Path, model: str, bits: int) -> str:
    """--bits-plan flags putting every MoE layer of `model` at `bits` (its layers read from its config)."""
    source = walk.Source(model, torch.device("cpu"))
    layers = [i for i, layer in enumerate(source.model.model.layers) if adapter.is_moe(layer)]
    plan = work / f"{Path(model).name}-uniform-{bits}.json"
    plan.write_text(json.dumps({"layers": {str(i): {"bits": bits} for i in layers}}))
    return f"--bits-plan {plan}"


def experts_per_layer(model: str) -> tuple:
    """(routed experts per MoE layer, experts the router picks per token)."""
    config = json.loads((Path(model) / "config.json").read_text())
    config = config.get("text_config", config)
    return (next(config[k] for k in ("n_routed_experts", "num_experts", "num_local_experts") if k in config),
            config["num_experts_per_tok"])


def fitting_keep(size: int, two_bit: dict, bits: int, experts: int) -> int:
    """The most experts per layer whose checkpoint at `bits` stays within `size`: the rest of the 2-bit
    checkpoint (all but the routed experts' codes and scales; its routers are the unpruned ones, a margin) plus
    that share of the experts at `bits` (codes of width b take b/8 bytes per weight: rows are whole words)."""
    rest = two_bit["bytes"] - two_bit["expert_bytes"]
    at_bits = two_bit["expert_bytes"] + two_bit["weights"] * (bits - 2) // 8
    return min(experts, (size - rest) * experts // at_bits)


def table(rows: dict) -> str:
    lines = ["| checkpoint | bits/weight | experts kept | size | KL to original | top-1 | perplexity |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['average_bits']:.3f} | {r.get('keep', '')} | {r['bytes'] / 1e6:.2f} MB | "
                     f"{r['kl']:.4f} | {100 * r['top1']:.2f}% | {r['ppl']:.2f} |")
    return "\n".join(lines)


def plot(curve: dict, at_size: dict, stem: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'gsq[report]')")
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted({r["method"] for r in curve.values()}):
        points = sorted((r["average_bits"], r["kl"]) for r in curve.values() if r["method"] == method)
        ax.plot(*zip(*points), marker="o", label=method)
    for name, r in at_size.items():
        ax.scatter([r["average_bits"] * r["keep_fraction"]], [r["kl"]], marker="x", label=f"{name} (at --size)")
    ax.set(xlabel="stored bits per routed-expert weight (pruned: x share kept)", ylabel="KL to the original",
           yscale="log", title="KL against bits per weight")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = stem.with_name(stem.name + ".png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(TINY.relative_to(ROOT)))
    ap.add_argument("--size", required=True, help="checkpoint size on disk, e.g. 9MB or 240GB")
    ap.add_argument("--args", default="--method gsq", help="further gsq.quantize flags of gsq's runs")
    ap.add_argument("--no-curve", action="store_true", help="only the three checkpoints at --size")
    side_by_side_flags(ap, "out/size-compare", "eval/results/<model>-size-<size>-<date>.json")
    args = ap.parse_args()
    size, work, (experts, top_k) = parse_size(args.size, "--size"), Path(args.work), experts_per_layer(args.model)
    work.mkdir(parents=True, exist_ok=True)
    path = Path(args.record or f"eval/results/{Path(args.model).name}-size-{args.size}-{date.today()}.json")
    record = Record(path, {"model": args.model, "size": size, "args": args.args,
                           "eval": {"data_file": args.data_file, "seqlen": args.seqlen, "max_windows": args.max_windows}},
                    "runs", args.resume)

    two_bit = quantized(record, "uniform-2", args.model, f"{uniform(work, args.model, 2)} {args.args}", args)
    curve = {}
    if not args.no_curve:
        method = shlex.split(args.args)[shlex.split(args.args).index("--method") + 1] if "--method" in args.args else "gsq"
        for b in CURVE:  # the ends: every layer at 2 and at 4 bits
            choice = {CURVE[0]: uniform(work, args.model, 2), CURVE[-1]: uniform(work, args.model, 4)}.get(b)
            row = two_bit if b == CURVE[0] else quantized(record, f"budget-{b}", args.model,
                                                           f"{choice or f'--bits-budget {b}'} {args.args}", args)
            curve[f"{method} budget {b}"] = {**row, "method": f"{method} (budget)"}
        for b in (2, 3, 4):
            curve[f"gptq {b}-bit"] = {**quantized(record, f"gptq-{b}", args.model,
                                                  f"{uniform(work, args.model, b)} --method gptq", args),
                                      "method": "gptq (uniform)"}
    at_size = {}
    if two_bit["bytes"] <= size:
        at_size["every expert"] = {**quantized(record, "every-expert", args.model, f"--target-size {size}B {args.args}",
                                               args), "keep": experts}
    else:
        print(f"--size {args.size} is below the 2-bit checkpoint of every expert ({gb(two_bit['bytes'])}): pruning only")
    keep4 = fitting_keep(size, two_bit, 4, experts)
    for name, keep, widths in (("REAP, 2 bits", fitting_keep(size, two_bit, 2, experts), 2),
                               ("REAP, 4 bits", keep4, 4), ("a mix", (keep4 + experts + 1) // 2, None)):
        if name == "a mix" and "every expert" not in at_size:
            continue
        if keep < top_k:
            print(f"{name}: --size {args.size} holds fewer than the {top_k} experts the router picks per token")
            continue
        if keep >= experts:  # fits without pruning
            at_size[name] = {**(two_bit if widths == 2 else at_size["every expert"]), "keep": experts}
            continue
        pruned = work / f"reap-keep-{keep}"

        def prune(pruned=pruned, keep=keep):
            if not pruned.exists():
                sh("gsq.prune", "--model", args.model, "--out", str(pruned), "--keep", str(keep), "--overwrite",
                   *tiny_flags(args.model, watch=False))

        # pruning keeps every MoE layer, so the original's layers name the pruned model's too
        extra = uniform(work, args.model, widths) if widths else f"--target-size {size}B"
        at_size[name] = {**quantized(record, name.replace(", ", "-").replace(" ", "-"), str(pruned),
                                     f"{extra} {args.args}", args, before=prune), "keep": keep}
    for r in at_size.values():
        r["keep_fraction"] = r["keep"] / experts
    text = (f"At {gb(size)} ({args.size}; the original's routed experts: {experts} per layer)\n\n{table(at_size)}\n"
            + (f"\nKL against bits per weight\n\n{table(curve)}\n" if curve else ""))
    print(text)
    record.save(complete=True, at_size=at_size, curve=curve)
    path.with_suffix(".md").write_text(text)
    png = plot(curve, at_size, path.with_suffix(""))
    print(f"recorded {path}, its table (.md){' and plot ' + str(png) if png else ''}")


if __name__ == "__main__":
    main()
