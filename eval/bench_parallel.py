"""Benchmark: expert parallelism. The expert phase (init + GSQ + gather, summed over the MoE layers)
of `gsq.quantize` on 1 rank and on N ranks (`torchrun`, gloo) on this machine, side by side; and, on
a GPU, the GSQ optimisation throughput at a Kimi-K2.5 expert shape with the time it implies for
Kimi-K2.5 on 8 GPUs.

    python eval/bench_parallel.py [--ranks 2] [--model models/tiny-deepseek-v3] [--out PATH]
    python eval/bench_parallel.py --gpu [--experts 16] [--steps 20]      # needs CUDA

CPU runs: the model's preset (`--preset tiny` for the bundled model) with the perplexity watch off.
One rank uses the default intra-op threads (all cores); torchrun gives each rank one thread. The
single-process run with one thread is timed too, to separate threads from ranks.

GPU: one batch of `--experts` experts at hidden 7168 x intermediate 2048 (Kimi-K2.5), `batch_tokens`
and the other settings at gsq's defaults (the paper's), random weights and tokens; seconds per
expert-step. Kimi-K2.5's GSQ time on 8 GPUs = 60 MoE layers x 384 experts x steps per expert (from
the defaults: 4096 x 4096 calibration tokens, top-8 routing) x seconds per expert-step / 8. It leaves
out the GPTQ init, the layer forwards and I/O.
"""

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = (ROOT / "models" / "tiny-deepseek-v3").resolve()
KIMI = dict(hidden=7168, inter=2048, experts=384, moe_layers=60, top_k=8)


def quantize_run(model: str, ranks: int, threads: int | None, work: Path) -> dict:
    out = work / f"r{ranks}-t{threads or 'all'}"
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc-per-node={ranks}"]
    cmd = [*launcher, "-m", "gsq.quantize", "--model", model, "--out", str(out), "--overwrite", "--eval-every", "0"]
    if Path(model).resolve() == TINY:
        cmd += ["--preset", "tiny"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.time() - t0
    layers = [l for l in json.loads((out / "gsq_run.json").read_text())["layers"] if l.get("moe")]
    row = {"ranks": ranks, "threads_per_rank": threads or os.cpu_count(), "wall_s": round(wall, 1),
           "expert_phase_s": round(sum(l["expert_seconds"] for l in layers), 1)}
    print(f"{ranks} rank(s) x {row['threads_per_rank']} thread(s): expert phase {row['expert_phase_s']:.1f} s, "
          f"whole run {row['wall_s']:.1f} s", flush=True)
    return row


def cpu(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        rows = [quantize_run(args.model, 1, None, Path(tmp)), quantize_run(args.model, 1, 1, Path(tmp)),
                quantize_run(args.model, args.ranks, 1, Path(tmp))]
    base = rows[0]["expert_phase_s"]
    print(f"expert-phase speed-up, {args.ranks} ranks vs 1 rank (all threads): {base / rows[2]['expert_phase_s']:.2f}x; "
          f"vs 1 rank with 1 thread: {rows[1]['expert_phase_s'] / rows[2]['expert_phase_s']:.2f}x")
    return {"model": args.model, "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "runs": rows, "speedup": round(base / rows[2]["expert_phase_s"], 2)}


def gpu(args) -> dict:
    import torch

    from gsq.config import Config
    from gsq.quantizer import ExpertCodes, optimize

    cfg = Config()
    device, dtype, E = args.device, torch.bfloat16, args.experts
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    H, I = (int(v) for v in args.shape.split("x"))
    gen = torch.Generator(device=device).manual_seed(0)
    weights = tuple((0.02 * torch.randn(E, *shape, device=device, generator=gen)).to(dtype)
                    for shape in ((I, H), (I, H), (H, I)))
    codes = [torch.randint(-2, 2, w.shape, device=device, generator=gen, dtype=torch.int8) for w in weights]
    scales = [torch.full((E, w.shape[1], w.shape[2] // 128), 0.01, device=device) for w in weights]
    xs = [torch.randn(4 * cfg.batch_tokens, H, device=device, generator=gen).to(dtype) for _ in range(E)]
    from gsq.gptq import grid_levels

    def run(steps):
        module = ExpertCodes(codes, scales, grid_levels(2).to(device), cfg.init_sigma, cfg.init_alpha,
                             list(range(E)))
        sync()
        t0 = time.perf_counter()
        optimize(module, xs, weights, steps, cfg.batch_tokens, cfg, list(range(E)), dtype)
        sync()
        return time.perf_counter() - t0

    run(2)  # warm-up: kernels compiled, allocator primed
    per_expert_step = run(args.steps) / (args.steps * E)
    tokens = cfg.num_samples * cfg.seqlen * KIMI["top_k"] / KIMI["experts"]
    steps = max(cfg.min_steps, math.ceil(cfg.epochs * tokens / cfg.batch_tokens))
    hours = KIMI["moe_layers"] * KIMI["experts"] * steps * per_expert_step / 8 / 3600
    name = torch.cuda.get_device_name() if cuda else "CPU (a check that the path runs, not a figure)"
    print(f"{name}: {1 / per_expert_step:.1f} expert-steps/s at {H}x{I} "
          f"({E} experts per batch, {cfg.batch_tokens} tokens each); Kimi-K2.5: {steps} steps per expert -> "
          f"GSQ phase {hours:.1f} h on 8 such GPUs (the paper: 24 h on 8xH200, everything included)")
    return {"device": name, "shape": args.shape, "experts_per_batch": E,
            "batch_tokens": cfg.batch_tokens, "seconds_per_expert_step": per_expert_step,
            "kimi_steps_per_expert": steps, "kimi_gsq_hours_8_gpus": round(hours, 2),
            "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(TINY.relative_to(ROOT)))
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--gpu", action="store_true", help="GSQ throughput at a Kimi-K2.5 expert shape (CUDA)")
    ap.add_argument("--shape", default=f"{KIMI['hidden']}x{KIMI['inter']}", help="hidden x intermediate")
    ap.add_argument("--experts", type=int, default=16, help="experts per batch (gsq's default)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda", help="--gpu's device (cpu: only checks the path, tiny --shape)")
    ap.add_argument("--out", help="JSON record (default eval/results/bench-parallel-<cpu|gpu>-<date>.json)")
    args = ap.parse_args()
    if args.gpu:
        import torch

        if args.device.startswith("cuda") and not torch.cuda.is_available():
            sys.exit("error: --gpu needs a CUDA device")
    record = {"date": date.today().isoformat(), **(gpu(args) if args.gpu else cpu(args))}
    path = Path(args.out or f"eval/results/bench-parallel-{'gpu' if args.gpu else 'cpu'}-{date.today()}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"recorded {path}")


if __name__ == "__main__":
    main()
