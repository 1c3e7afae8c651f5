"""Allocations of one bit budget, side by side: gsq's (from measured sensitivity) against fixed and random ones.

    python eval/budget_compare.py --model models/tiny-deepseek-v3 [--budget 2.625] [--args "--method gsq"]

Runs `gsq.quantize --bits-budget B` (its gsq_bits.json holds each MoE layer's sensitivities and the chosen
widths), then the same number of layers at each width placed otherwise, given back as `--bits-plan`: the first
layers, the last layers, alternating, and two seeded random placements; and uniform 2 bits. Each checkpoint
is evaluated against the original (eval/compare.py: KL, top-1, perplexity on WikiText-2 test windows). The
record is rewritten after every run (eval/record.py: `--resume` measures only the runs it lacks). The
table holds each allocation's predicted KL (from the chosen run's sensitivities) beside the measured one, and
the rank agreement of the two (Spearman) checks the predictor. JSON record and table under eval/results/.
"""

import argparse
import json
import random
from datetime import date
from pathlib import Path

from compare import run_one
from gsq import budget
from local_data import ROOT, TINY, side_by_side_flags
from record import Record


def placements(chosen: dict, seeds=(0, 1)) -> dict:
    """Allocations with the chosen one's widths (as a multiset) placed otherwise: {name: {layer: bits}}."""
    layers = sorted(chosen)
    widths = sorted(chosen.values(), reverse=True)  # widest first
    ordered = {"first layers wide": widths, "last layers wide": widths[::-1],
               "alternating": [widths[(k // 2) if k % 2 == 0 else len(widths) - 1 - k // 2] for k in range(len(widths))]}
    for seed in seeds:
        shuffled = list(widths)
        random.Random(seed).shuffle(shuffled)
        ordered[f"random (seed {seed})"] = shuffled
    return {name: dict(zip(layers, w)) for name, w in ordered.items()}


def spearman(a: list, b: list) -> float:
    def ranks(x):
        order = sorted(range(len(x)), key=lambda k: x[k])
        r = [0.0] * len(x)
        for position, k in enumerate(order):
            r[k] = float(position)
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else float("nan")


def table(runs: dict) -> str:
    lines = ["| allocation | widths (layer:bits) | bits/weight | predicted KL | KL to original | top-1 | perplexity |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, r in runs.items():
        widths = " ".join(f"{i}:{b}" for i, b in sorted(r["widths"].items(), key=lambda x: int(x[0])))
        lines.append(f"| {name} | {widths} | {r['average_bits']:.3f} | {r['predicted_kl']:.4f} | {r['kl']:.4f} | "
                     f"{100 * r['top1']:.2f}% | {r['ppl']:.2f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(TINY.relative_to(ROOT)))
    ap.add_argument("--budget", type=float, default=2.625, help="--bits-budget of gsq's allocation")
    ap.add_argument("--args", default="--method gsq", help="further gsq.quantize flags of every run")
    side_by_side_flags(ap, "out/budget-compare", "eval/results/<model>-budget-<budget>-<date>.json")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    path = Path(args.record or f"eval/results/{Path(args.model).name}-budget-{args.budget}-{date.today()}.json")
    record = Record(path, {"model": args.model, "budget": args.budget, "args": args.args,
                           "eval": {"data_file": args.data_file, "seqlen": args.seqlen, "max_windows": args.max_windows}},
                    "runs", args.resume)

    def chosen_run():
        run = run_one("chosen", f"--bits-budget {args.budget} {args.args}", args)
        plan = json.loads((work / "chosen" / "gsq_bits.json").read_text())
        return {**run, "widths": {int(i): row["bits"] for i, row in plan["layers"].items()},
                "average_bits": plan["average_bits"], "predicted_kl": plan["predicted_kl"],
                "sensitivity": {i: row["sensitivity"] for i, row in plan["layers"].items()},
                "weights_per_layer": {i: row["weights"] for i, row in plan["layers"].items()}}

    ours = record.row("gsq allocation", chosen_run)
    sens = {int(i): {int(b): s for b, s in row.items()} for i, row in ours["sensitivity"].items()}
    chosen = {int(i): b for i, b in ours["widths"].items()}

    def placed(name, widths):
        def run():
            file = work / f"{name.replace(' ', '-').replace('(', '').replace(')', '')}.json"
            file.write_text(json.dumps({"layers": {str(i): {"bits": b} for i, b in widths.items()}}))
            result = run_one(file.stem, f"--bits-plan {file} {args.args}", args)
            stored = json.loads((work / file.stem / "gsq_bits.json").read_text())
            return {**result, "widths": widths, "average_bits": stored["average_bits"]}
        return run

    # uniform 2 bits first: with the chosen allocation it gives the ratio that matters most if the rest is cut short
    for name, widths in {"uniform 2-bit": dict.fromkeys(chosen, 2), **placements(chosen)}.items():
        record.row(name, placed(name, widths))
    # every row predicted by this record's sensitivity pass (a resumed row may be from another allocation's record)
    runs = {n: {**r, "widths": {int(i): b for i, b in r["widths"].items()}} for n, r in record.rows.items()}
    runs = {n: {**r, "predicted_kl": budget.predicted(sens, r["widths"])}
            for n, r in sorted(runs.items(), key=lambda item: item[0] != "gsq allocation")}
    same = [n for n in runs if n != "uniform 2-bit"]
    rank = spearman([runs[n]["predicted_kl"] for n in runs], [runs[n]["kl"] for n in runs])
    # other allocations: a placement that happens to be the chosen one (or a resumed row of it) is not another
    others = [n for n in same if runs[n]["widths"] != runs["gsq allocation"]["widths"]]
    best_other = min(runs[n]["kl"] for n in others)
    summary = {"spearman_predicted_vs_measured": rank,
               "kl_over_best_other_allocation": runs["gsq allocation"]["kl"] / best_other,
               "kl_over_uniform_2bit": runs["gsq allocation"]["kl"] / runs["uniform 2-bit"]["kl"]}
    text = table(runs) + (f"\n\nSpearman rank correlation of predicted and measured KL: {rank:.2f}; gsq's allocation: "
                          f"{summary['kl_over_best_other_allocation']:.2f}x the best other allocation's KL, "
                          f"{summary['kl_over_uniform_2bit']:.2f}x uniform 2-bit's.\n")
    print(text)
    record.rows = runs
    record.save(complete=True, summary=summary)
    path.with_suffix(".md").write_text(text)
    print(f"recorded {path} and its table (.md)")


if __name__ == "__main__":
    main()
