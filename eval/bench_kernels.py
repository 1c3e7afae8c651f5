"""Benchmark: fused Triton fake-quant (fwd+bwd) and pack kernels vs the eager torch references.

    python eval/bench_kernels.py [--shapes 2048x7168,7168x2048] [--out eval/results/bench-kernels-<device>.json]

At Kimi-K2.5 expert shapes (gate/up 2048 x 7168, down 7168 x 2048; group 128, 4 levels, bf16
logits) it prints time per call, the kernel's speed-up over the eager reference, and the bytes the
kernel must move divided by its time (GB/s), against the GPU's copy bandwidth measured in the same
run (a device-to-device `copy_` of 1 GiB) and its data-sheet peak. Without CUDA it says so and, with
TRITON_INTERPRET=1 and small `--shapes`, only checks that every path runs (no timing is meaningful; a record
is written only when `--out` asks for one, marked `"interpreter": true`).

Bytes counted (per weight, 4 levels, bf16 logits, 2-bit codes): fake-quant forward reads 8 (logits)
and writes 2 (soft weight); backward reads 8 + 2 (logits, upstream gradient) and writes 8
(dlogits); scales add 8 bytes per 128 weights each way. Pack reads 1 (int8 code), writes 0.25.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from datetime import date
from pathlib import Path

import torch

from gsq.kernels import fake_quant as FQ
from gsq.kernels import pack as P

PEAK_GBPS = {"H100": 3350, "H200": 4800, "A100": 2039}  # data-sheet HBM bandwidth (SXM parts)
GRID = torch.tensor([-2.0, -1.0, 0.0, 1.0])


def timed(fn, device, reps=20, warmup=3):
    """Median wall time of fn() in seconds (CUDA-synchronised)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device):
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / timed(lambda: dst.copy_(src), device) / 1e9


def bench_shape(out, inp, device, reps):
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(out, inp, 4, device=device, generator=gen).to(torch.bfloat16).requires_grad_(True)
    scales = (0.02 * torch.randn(out, inp // 128, device=device, generator=gen)).requires_grad_(True)
    upstream = torch.randn(out, inp, device=device, generator=gen).to(torch.bfloat16)
    grid = GRID.to(device)

    def fused():
        FQ.soft_weights(logits, scales, grid, 0.5, 200.0, 1234, out_dtype=torch.bfloat16).backward(upstream)

    def eager():  # the reference as a plain PyTorch implementation runs it: noise materialised
        u = torch.rand(logits.shape, device=device, generator=gen).clamp_(min=1e-20)
        noise = -torch.log(-torch.log(u))
        FQ.soft_weights_ref(logits[None], scales[None], grid, 0.5, 200.0, noise[None],
                            out_dtype=torch.bfloat16).backward(upstream[None])

    codes = torch.randint(-2, 2, (out, inp), device=device, dtype=torch.int8, generator=gen)
    weights = out * inp
    rows = {}
    for name, kernel, reference, nbytes in [
        ("fake-quant fwd+bwd", fused, eager, weights * (10 + 18) + 4 * out * inp // 128 * 4),
        ("pack 2-bit", lambda: P.pack(codes, 2), lambda: P.pack_ref(codes, 2), weights * 1.25),
    ]:
        t_kernel = timed(kernel, device, reps)
        t_ref = timed(reference, device, reps)
        rows[name] = {"shape": [out, inp], "kernel_ms": 1e3 * t_kernel, "eager_ms": 1e3 * t_ref,
                      "speedup": t_ref / t_kernel, "kernel_GBps": nbytes / t_kernel / 1e9}
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="2048x7168,7168x2048", help="comma-separated OUTxIN expert shapes")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", help="JSON record (default eval/results/bench-kernels-<gpu>-<date>.json)")
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device == "cpu" and not interpret:
        print("no CUDA device: the Triton kernels run only on a GPU (or, for correctness, under "
              "TRITON_INTERPRET=1 with small --shapes). Nothing to time here.")
        return
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU interpreter ({platform.processor()})"
    peak = next((v for k, v in PEAK_GBPS.items() if k in name), None)
    measured_bw = copy_bandwidth(device) if device == "cuda" else None
    reps = args.reps if device == "cuda" else 1
    results = []
    for shape in args.shapes.split(","):
        out, inp = map(int, shape.lower().split("x"))
        for op, row in bench_shape(out, inp, device, reps).items():
            results.append({"op": op, **row})

    print(f"device: {name}; copy bandwidth {measured_bw or 0:.0f} GB/s; data-sheet peak {peak or '?'} GB/s")
    print(f"{'op':<20}{'shape':>13}{'kernel ms':>11}{'eager ms':>10}{'speed-up':>10}{'GB/s':>8}"
          f"{'% copy':>8}{'% peak':>8}")
    for r in results:
        of_copy = f"{100 * r['kernel_GBps'] / measured_bw:.0f}" if measured_bw else "-"
        of_peak = f"{100 * r['kernel_GBps'] / peak:.0f}" if peak else "-"
        print(f"{r['op']:<20}{'x'.join(map(str, r['shape'])):>13}{r['kernel_ms']:>11.3f}{r['eager_ms']:>10.3f}"
              f"{r['speedup']:>9.1f}x{r['kernel_GBps']:>8.0f}{of_copy:>8}{of_peak:>8}")
    if device == "cpu":
        print("(interpreter run: checks that every path runs; the times mean nothing)")
        if not args.out:
            return
    try:
        commit = os.environ.get("GSQ_COMMIT") or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                                                text=True).stdout.strip()
    except OSError:  # a machine without git
        commit = ""
    record = {"device": name, "date": date.today().isoformat(), "commit": commit, "torch": torch.__version__,
              "interpreter": device == "cpu", "copy_GBps": measured_bw, "peak_GBps": peak, "results": results}
    out = Path(args.out or f"eval/results/bench-kernels-{name.replace(' ', '_')}-{date.today()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"recorded {out}")


if __name__ == "__main__":
    main()
