"""Expert pruning side by side: REAP against routing-frequency and random pruning at the same number of
kept experts and on the same calibration data, then REAP + GSQ 2-bit next to each step alone.

    python eval/prune_compare.py [--model models/tiny-deepseek-v3] [--keep 4] [--max-windows N]

Every model is evaluated with `python -m gsq.eval --reference MODEL` on the WikiText-2 test split
(KL to the original, top-1 agreement, perplexity). Writes a JSON record and its Markdown table
(eval/results/<model>-prune-<date>.json/.md).
"""

import argparse
import json
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from local_data import ROOT, TINY, WIKI_TEST, tiny_flags


def sh(module: str, *args) -> float:
    t0 = time.time()
    subprocess.run([sys.executable, "-m", module, *args], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return round(time.time() - t0, 1)


def evaluate(model: str, args) -> dict:
    original = model == args.model  # against itself: KL 0 and top-1 100% by definition, not measured
    cmd = [sys.executable, "-m", "gsq.eval", "--model", model, "--data-file", args.data_file, "--seqlen",
           str(args.seqlen), "--json"] + ([] if original else ["--reference", args.model])
    if args.max_windows:
        cmd += ["--max-windows", str(args.max_windows)]
    m = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout)
    return {"kl": m.get("kl", 0.0), "top1": m.get("top1", 1.0), "ppl": m["ppl"], "windows": m["windows"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(TINY.relative_to(ROOT)))
    ap.add_argument("--keep", type=int, default=4, help="routed experts kept per layer")
    ap.add_argument("--data-file", default=str(WIKI_TEST))
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--max-windows", type=int)
    ap.add_argument("--work", default="out/prune-compare")
    ap.add_argument("--record", help="JSON record (default eval/results/<model>-prune-<date>.json)")
    args = ap.parse_args()
    preset = tiny_flags(args.model, watch=False)
    work = Path(args.work)
    rows = {"original": {**evaluate(args.model, args), "seconds": 0.0}}
    for criterion in ("reap", "frequency", "random"):
        out = str(work / f"{criterion}{args.keep}")
        seconds = sh("gsq.prune", "--model", args.model, "--out", out, "--keep", str(args.keep),
                     "--criterion", criterion, "--overwrite", *preset)
        rows[f"prune {criterion} (keep {args.keep})"] = {**evaluate(out, args), "seconds": seconds}
        print(f"{criterion}: {rows[f'prune {criterion} (keep {args.keep})']}", flush=True)
    for name, src in (("GSQ 2-bit", args.model), (f"REAP keep {args.keep} + GSQ 2-bit", str(work / f"reap{args.keep}"))):
        out = str(work / (Path(src).name + "-gsq-w2"))
        seconds = sh("gsq.quantize", "--model", src, "--out", out, "--overwrite", *tiny_flags(args.model))
        rows[name] = {**evaluate(out, args), "seconds": seconds}
        print(f"{name}: {rows[name]}", flush=True)
    lines = ["| model | KL to original | top-1 agreement | perplexity | time |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {n} | {r['kl']:.4f} | {100 * r['top1']:.2f}% | {r['ppl']:.2f} | {r['seconds']:.0f} s |"
              for n, r in rows.items()]
    print("\n".join(lines))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    path = Path(args.record or f"eval/results/{Path(args.model).name}-prune-{date.today()}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"date": date.today().isoformat(), "commit": commit, "model": args.model,
                                "keep": args.keep, "eval": {"seqlen": args.seqlen, "max_windows": args.max_windows},
                                "rows": rows}, indent=2) + "\n")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"recorded {path} and its table (.md)")


if __name__ == "__main__":
    main()
