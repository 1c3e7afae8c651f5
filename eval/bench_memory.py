"""Benchmark: peak host memory of `gsq.quantize` does not grow with the number of layers.

    python eval/bench_memory.py [--model models/tiny-deepseek-v3] [--out eval/results/bench-memory.json]

Builds a copy of the model with twice the decoder layers (layers 1..L-1 repeated after the last),
quantizes both with the same small budget in fresh processes, and prints each run's peak RSS
(getrusage of the quantizing process) and their ratio. Streaming keeps about one layer plus the
activations in memory, so the ratio should stay within 1.10.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

BUDGET = ["--preset", "tiny", "--num-samples", "64", "--seqlen", "256", "--min-steps", "20", "--epochs", "0",
          "--eval-every", "0"]


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


def peak_rss(model: Path, out: Path) -> tuple:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "gsq.quantize", "--model", str(model), "--out", str(out), *BUDGET],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(proc.stderr[-2000:])
    record = json.loads((out / "gsq_run.json").read_text())
    return record["peak_rss_mb"], record["seconds"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/tiny-deepseek-v3")
    ap.add_argument("--out", default="eval/results/bench-memory.json")
    args = ap.parse_args()
    src = Path(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
        layers2 = doubled(src, tmp / "doubled")
        rss1, t1 = peak_rss(src, tmp / "q1")
        rss2, t2 = peak_rss(tmp / "doubled", tmp / "q2")
    print(f"{'model':<28}{'layers':>8}{'peak RSS MB':>14}{'seconds':>10}")
    print(f"{'original':<28}{layers:>8}{rss1:>14.0f}{t1:>10.0f}")
    print(f"{'twice the layers':<28}{layers2:>8}{rss2:>14.0f}{t2:>10.0f}")
    print(f"peak RSS ratio (doubled / original): {rss2 / rss1:.3f} (target <= 1.10)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"budget": BUDGET, "layers": [layers, layers2], "peak_rss_mb": [rss1, rss2],
                                          "seconds": [t1, t2], "ratio": rss2 / rss1}, indent=2) + "\n")


if __name__ == "__main__":
    main()
