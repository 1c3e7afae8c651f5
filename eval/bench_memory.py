"""Benchmark: peak memory of `gsq.quantize` does not grow with the calibration set (or the layers).

    python eval/bench_memory.py [--model models/tiny-deepseek-v3] [--windows 128,512] [--out PATH]
    python eval/bench_memory.py --layers            # the model vs a copy with twice the decoder layers

Runs `python -m gsq.quantize` in fresh processes, side by side, and samples each one's RssAnon (anonymous
resident memory, /proc/PID/status, every 50 ms): pages of files the kernel can drop (the safetensors
shards, activations written to disk) do not count. Windows mode: 128 vs 512 calibration windows of 256
tokens, with the layer inputs on disk (`--activations disk`: memory bounded by a minibatch and a group
of experts) and in host memory (they grow with windows x seqlen x hidden). Layers mode: the bundled model
vs a copy with layers 1..L-1 appended again. Same small step budget everywhere (the memory does not
depend on the step count).
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from local_data import tiny_flags
from safetensors.torch import load_file, save_file

BUDGET = ["--seqlen", "256", "--min-steps", "50", "--epochs", "0"]


def doubled(src: Path, dst: Path):
    """A copy of src with layers 1..L-1 appended again as layers L..2L-2."""
    config = json.loads((src / "config.json").read_text())
    n = config["num_hidden_layers"]
    tensors = load_file(src / "model.safetensors")
    extra = {}
    for key, value in tensors.items():
        m = re.match(r"model\.layers\.(\d+)\.(.*)", key)
        if m and int(m.group(1)) >= 1:
            extra[f"model.layers.{int(m.group(1)) + n - 1}.{m.group(2)}"] = value.clone()
    dst.mkdir(parents=True)
    save_file({**tensors, **extra}, dst / "model.safetensors", metadata={"format": "pt"})
    config["num_hidden_layers"] = 2 * n - 1
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name == "generation_config.json":
            shutil.copy(f, dst / f.name)
    return 2 * n - 1


def peak_anon(model: Path, out: Path, args: list) -> dict:
    """Run gsq.quantize; its peak RssAnon (MB, sampled), wall seconds and peak RSS (getrusage)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "gsq.quantize", "--model", str(model), "--out", str(out), *BUDGET, *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = []
    reader = threading.Thread(target=lambda: err.extend(proc.stderr))
    reader.start()
    peak, t0 = 0, time.time()
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                peak = max([peak] + [int(l.split()[1]) for l in f if l.startswith("RssAnon:")])
        except OSError:
            pass
        time.sleep(0.05)
    reader.join()
    if proc.returncode:
        sys.exit("".join(err)[-2000:])
    record = json.loads((out / "gsq_run.json").read_text())
    return {"rss_anon_mb": round(peak / 1024, 1), "seconds": round(time.time() - t0, 1),
            "peak_rss_mb": round(record["peak_rss_mb"], 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/tiny-deepseek-v3")
    ap.add_argument("--windows", default="128,512", help="calibration set sizes compared")
    ap.add_argument("--layers", action="store_true", help="compare the model with twice its layers instead")
    ap.add_argument("--out", help="JSON record (default eval/results/bench-memory[-layers].json)")
    args = ap.parse_args()
    src = Path(args.model)
    flags = tiny_flags(src)  # the bundled model's (and its doubled copy's) preset and data
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.layers:
            layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
            twice = doubled(src, tmp / "doubled")
            for name, model, n in (("original", src, layers), ("twice the layers", tmp / "doubled", twice)):
                rows.append({"run": f"{name} ({n} layers)", **peak_anon(model, tmp / name, [*flags, "--num-samples", "64"])})
        else:
            for where in ("disk", "host"):
                for n in args.windows.split(","):
                    rows.append({"run": f"{n} windows, --activations {where}", "activations": where, "windows": int(n),
                                 **peak_anon(src, tmp / f"{where}-{n}", [*flags, "--num-samples", n, "--activations", where])})
                    print(f"{rows[-1]['run']}: peak RssAnon {rows[-1]['rss_anon_mb']:.0f} MB", flush=True)
    print(f"\n{'run':<36}{'peak RssAnon MB':>16}{'peak RSS MB':>13}{'seconds':>9}")
    for r in rows:
        print(f"{r['run']:<36}{r['rss_anon_mb']:>16.0f}{r['peak_rss_mb']:>13.0f}{r['seconds']:>9.0f}")
    ratios = {}
    for k in range(0, len(rows), 2):
        label = rows[k]["run"].split(", ")[-1] if not args.layers else "layers"
        ratios[label] = round(rows[k + 1]["rss_anon_mb"] / rows[k]["rss_anon_mb"], 3)
        print(f"peak RssAnon ratio ({rows[k + 1]['run']} / {rows[k]['run']}): {ratios[label]:.3f}")
    path = Path(args.out or f"eval/results/bench-memory{'-layers' if args.layers else ''}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"budget": BUDGET, "runs": rows, "ratios": ratios}, indent=2) + "\n")


if __name__ == "__main__":
    main()
