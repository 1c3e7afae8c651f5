"""Benchmark: expert parallelism. The expert phase (init + GSQ + gather, summed over the MoE layers)
of `gsq.quantize` on 1 rank and on N ranks (`torchrun`, gloo) on this machine, side by side; and, on
a GPU, one rank's GSQ steps on its share of a Kimi-K2.5 MoE layer, with the time it implies for
Kimi-K2.5 on 8 GPUs.

    python eval/bench_parallel.py [--ranks 2] [--model models/tiny-deepseek-v3] [--out PATH]
    python eval/bench_parallel.py --gpu [--experts 16] [--steps 20]      # needs CUDA

CPU runs: the model's preset (`--preset tiny` for the bundled model) with the perplexity watch off.
One rank uses the default intra-op threads (all cores); torchrun gives each rank one thread. The
single-process run with one thread is timed too, to separate threads from ranks. Then what a GSQ step's
router input costs: recomputing the layer's attention, or the stored post-attention residual (gsq's way).

GPU: one rank of 8 at a Kimi-K2.5 MoE layer: 48 of its 384 experts (hidden 7168, intermediate 2048,
top-8), random weights; each step is the paper's minibatch of 64 x 4096 tokens routed at random over the
384 experts, of which this rank's experts train in groups of `--experts` (what the memory plan picks on
an H200). Seconds per step of one group; a layer is steps (gsq's defaults: 10 epochs of 4096/64
minibatches) x groups of them; Kimi-K2.5 on 8 GPUs = 60 MoE layers x that (the ranks work at once). It
leaves out the GPTQ init, the layer passes, the token exchange and I/O.
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
from dataclasses import replace
from datetime import date
from pathlib import Path

from local_data import ROOT, TINY, tiny_flags
KIMI = dict(hidden=7168, inter=2048, experts=384, moe_layers=60, top_k=8)
BATCHES = 3  # --gpu: distinct minibatches the steps cycle through


def quantize_run(model: str, ranks: int, threads: int | None, work: Path) -> dict:
    out = work / f"r{ranks}-t{threads or 'all'}"
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc-per-node={ranks}"]
    cmd = [*launcher, "-m", "gsq.quantize", "--model", model, "--out", str(out), "--overwrite", "--eval-every", "0"]
    cmd += tiny_flags(model)
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


def step_inputs(model: str) -> dict:
    """What a GSQ step's router input costs per block of windows: the attention recomputed from the layer's
    input, or the norm of the stored post-attention residual (what gsq does); layer 1 of `model`, CPU."""
    import torch
    from transformers import AutoConfig

    from gsq import adapter, stream
    from gsq.acts import BLOCK

    config = AutoConfig.from_pretrained(model)
    skeleton, ckpt, arch = stream.skeleton(adapter.text_config(config)), stream.Checkpoint(model), adapter.arch_of(config)
    stream.load_globals(ckpt, skeleton, arch, "cpu", torch.float32)
    layer = stream.load_layer(ckpt, skeleton, arch, 1, "cpu", torch.float32)
    h = torch.randn(BLOCK, 256, skeleton.config.hidden_size)

    def timed(f, n=50):
        f()
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        return (time.perf_counter() - t0) / n

    with torch.no_grad():
        residual = adapter.attention_residual(layer, h, **adapter.positions(skeleton, h))
        again = timed(lambda: adapter.route(layer, adapter.moe_input(
            layer, adapter.attention_residual(layer, h, **adapter.positions(skeleton, h)))))
        stored = timed(lambda: adapter.route(layer, adapter.moe_input(layer, residual)))
    print(f"router input of one block ({BLOCK} x 256 tokens): attention recomputed {1e3 * again:.2f} ms, "
          f"stored residual {1e3 * stored:.2f} ms ({again / stored:.1f}x)")
    return {"recompute_attention_ms": round(1e3 * again, 3), "stored_residual_ms": round(1e3 * stored, 3)}


def cpu(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        rows = [quantize_run(args.model, 1, None, Path(tmp)), quantize_run(args.model, 1, 1, Path(tmp)),
                quantize_run(args.model, args.ranks, 1, Path(tmp))]
    base = rows[0]["expert_phase_s"]
    print(f"expert-phase speed-up, {args.ranks} ranks vs 1 rank (all threads): {base / rows[2]['expert_phase_s']:.2f}x; "
          f"vs 1 rank with 1 thread: {rows[1]['expert_phase_s'] / rows[2]['expert_phase_s']:.2f}x")
    return {"model": args.model, "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "runs": rows, "speedup": round(base / rows[2]["expert_phase_s"], 2),
            "step_inputs": step_inputs(args.model)}


def gpu(args) -> dict:
    import torch

    from gsq.config import Config
    from gsq.gptq import Grid
    from gsq.quantizer import ExpertLogits, optimizer, step

    cfg = Config()
    device, dtype, E = args.device, torch.bfloat16, args.experts
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    H, I = (int(v) for v in args.shape.split("x"))
    experts, per_rank, tokens = KIMI["experts"], KIMI["experts"] // 8, cfg.batch_size * cfg.seqlen
    if not cuda:  # a check that the path runs, at a size a CPU does in seconds
        cfg = replace(cfg, seqlen=cfg.seqlen // 256)
        tokens = cfg.batch_size * cfg.seqlen
    gen = torch.Generator(device=device).manual_seed(0)
    weights = tuple((0.02 * torch.randn(E, *shape, device=device, generator=gen)).to(dtype)
                    for shape in ((I, H), (I, H), (H, I)))
    codes = [torch.randint(-2, 2, w.shape, device=device, generator=gen, dtype=torch.int8) for w in weights]
    scales = [torch.full((E, w.shape[1], w.shape[2] // 128), 0.01, device=device) for w in weights]
    module = ExpertLogits(codes, scales, Grid(2), cfg.init_sigma, cfg.init_alpha, [(0, 0, e) for e in range(E)])
    opt = optimizer(module, cfg)

    def minibatch(t):  # the tokens the router sends each of the group's experts: top-8 of 384 at random
        counts = torch.bincount(torch.randint(0, experts, (tokens * KIMI["top_k"],),
                                              generator=torch.Generator().manual_seed(t)), minlength=experts)
        return [torch.randn(int(n), H, device=device, generator=gen).to(dtype) for n in counts[:E]]

    batches = [minibatch(t) for t in range(BATCHES)]  # distinct routings, reused in turn (memory: BATCHES of them)
    held = sum(x.numel() * x.element_size() for b in batches for x in b)
    for t in range(2):  # warm-up: kernels compiled, allocator primed
        step(module, opt, batches[t % BATCHES], weights, t, args.steps, cfg, dtype)
    sync()
    t0 = time.perf_counter()
    for t in range(2, args.steps + 2):
        step(module, opt, batches[t % BATCHES], weights, t, args.steps + 2, cfg, dtype)
    sync()
    per_step = (time.perf_counter() - t0) / args.steps
    steps = max(cfg.min_steps, math.ceil(cfg.epochs * cfg.num_samples / cfg.batch_size))
    groups = math.ceil(per_rank / E)
    layer_s = steps * groups * per_step
    hours = KIMI["moe_layers"] * layer_s / 3600
    name = torch.cuda.get_device_name() if cuda else "CPU (a check that the path runs, not a figure)"
    print(f"{name}: {per_step:.3f} s per step of {E} experts ({tokens} tokens x top-{KIMI['top_k']} per minibatch); "
          f"a layer: {steps} steps x {groups} groups = {layer_s:.0f} s; Kimi-K2.5 GSQ on 8 such GPUs: {hours:.1f} h "
          f"(the paper: 24 h on 8xH200, everything included)")
    planned = planned_training(H, I, E, cfg, cuda)
    measured = torch.cuda.max_memory_allocated() if cuda else None
    if cuda:  # the plan's figure for this group next to what the steps took (they also hold the batches)
        print(f"memory: the plan's GSQ-training item for {E} experts {planned / 1e9:.1f} GB (the group's weights, "
              f"logits, optimizer state, one step's tokens), plus the {BATCHES} minibatches this benchmark keeps "
              f"{held / 1e9:.1f} GB; measured peak {measured / 1e9:.1f} GB")
    return {"device": name, "shape": args.shape, "experts_per_batch": E, "experts_per_rank": per_rank,
            "tokens_per_minibatch": tokens, "seconds_per_step": per_step, "steps_per_layer": steps,
            "groups": groups, "seconds_per_layer": round(layer_s, 1), "kimi_gsq_hours_8_gpus": round(hours, 2),
            "plan_training_bytes": planned, "batches_bytes": held,
            "peak_gpu_bytes": measured}


def planned_training(H: int, I: int, E: int, cfg, gpu: bool) -> int:
    """The memory plan's 'GSQ training' item for a group of E experts of a Kimi-K2.5-shaped layer (one rank of 8)."""
    from gsq import plan

    dims = dict(model_type="kimi_k25", layers=KIMI["moe_layers"] + 1, moe_layers=KIMI["moe_layers"],
                experts=KIMI["experts"], top_k=KIMI["top_k"], hidden=H, inter=I, vocab=0, layer_params=0, params=0,
                global_params=0)
    setup = plan.Setup(dims, 8, 8, 2**40 if gpu else None, 2**40, 2)
    items = plan.figures(setup, cfg, E, "host")
    return next(sizes[0 if gpu else 1] for name, sizes in items.items() if name.startswith("GSQ training"))


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
