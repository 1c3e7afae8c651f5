"""One MoE layer's routed experts, trained on streamed minibatches: route, init, refine, measure.

    counts  = tokens the router sends each expert over all calibration windows (summed over the ranks)
    owners  = experts split over the ranks, balanced by count
    for each group of experts (every rank's next --experts-per-batch; all ranks step together):
        init     GPTQ from Hessians summed minibatch by minibatch over the first --gptq-samples windows
                 (H of x for gate/up, H of the SwiGLU intermediate for down); MSE-RTN below --min-tokens
        refine   GSQ: step t takes minibatch t (--batch-size windows, seeded epochs); every token goes to
                 the rank owning each of its top-k experts; every expert that received tokens steps
        measure  relative output error of RTN, init and result on the first MEASURE windows' tokens
    every rank gets every expert's codes back (packed)

The inputs are the layer's post-attention residuals in `calib` (gsq.acts); an expert's tokens are
`post_attention_layernorm(residual)`, in the storage dtype. Memory is bounded by one minibatch and one
group of experts, never by the calibration set.
"""

import math
import time
from typing import NamedTuple

import torch
from tqdm import tqdm

from gsq import adapter, dist, gptq
from gsq.acts import BLOCK
from gsq.config import derive_seed
from gsq.export import packed, unpacked
from gsq.quantizer import ExpertLogits, dequant, optimizer, output_errors, step

MEASURE = 64  # windows whose tokens measure each expert's error


class Tokens(NamedTuple):
    """An expert's tokens in a step: inputs `[n, H]`, router weights g_e(x) `[n]`, the same tokens' inputs
    in the original model `[n, H]` (--targets original) or None."""

    x: torch.Tensor
    g: torch.Tensor
    x_original: torch.Tensor | None


def uses_gptq(cfg) -> bool:
    """Whether the init (or, for --method gptq, the result) is GPTQ rather than RTN."""
    return cfg.init == "gptq" if cfg.method == "gsq" else cfg.method == "gptq"


def compute_dtype(layer):
    return next(layer.parameters()).dtype


@torch.no_grad()
def counts(layer, calib) -> list:
    """Routed tokens per expert over every calibration window (all ranks)."""
    total = torch.zeros(adapter.num_experts(layer), dtype=torch.int64, device=calib.device)
    for b in calib.blocks:
        _, idx = adapter.route(layer, adapter.moe_input(layer, calib.get(b, compute_dtype(layer))))
        total += torch.bincount(idx.flatten(), minlength=total.numel())
    return dist.all_sum(total).tolist()


@torch.no_grad()
def routed(layer, calib, batch: list, owner: dict, original=None) -> dict:
    """The tokens of the blocks `batch` that the router sends to the experts of `owner` (expert -> rank),
    delivered to their owners: {expert: Tokens} for this rank's experts (`original`: the original model's
    states, as `calib` holds the quantized model's). An expert's tokens come in the canonical order (block's
    position in `batch`, then token), whichever rank computed them. Ranks send in rounds of one block each
    (memory: one block's tokens out, the step's tokens in); a router weight travels exactly, as its float32
    bits in the integer metadata."""
    E, dev, W = adapter.num_experts(layer), calib.device, dist.world()
    H = layer.post_attention_layernorm.weight.shape[0]
    dest = torch.full((E,), -1, dtype=torch.int64, device=dev)
    dest[list(owner)] = torch.tensor(list(owner.values()), dtype=torch.int64, device=dev)
    per_block = BLOCK * calib.shape[1]
    held = [[pos for pos, b in enumerate(batch) if b % W == r] for r in range(W)]  # the same on every rank
    got_rows, got_meta = [], []
    for j in range(max(map(len, held))):
        rows = torch.empty(0, H * (1 if original is None else 2), dtype=calib.dtype, device=dev)
        meta = torch.empty(0, 4, dtype=torch.int64, device=dev)
        if j < len(held[dist.rank()]):
            pos = held[dist.rank()][j]
            x = adapter.moe_input(layer, calib.get(batch[pos], compute_dtype(layer)))
            g, idx = adapter.route(layer, x)
            tok, slot = (dest[idx] >= 0).nonzero(as_tuple=True)
            e = idx[tok, slot]
            order = torch.argsort(dest[e], stable=True)
            tok, slot, e = tok[order], slot[order], e[order]
            bits = g[tok, slot].float().view(torch.int32).long()
            rows, meta = x[tok].to(calib.dtype), torch.stack([dest[e], e, pos * per_block + tok, bits], 1)
            if original is not None:  # the original model's input of each token rides along in the same row
                x_orig = adapter.moe_input(layer, original.get(batch[pos], compute_dtype(layer)))
                rows = torch.cat([rows, x_orig[tok].to(calib.dtype)], 1)
        sizes = torch.bincount(meta[:, 0], minlength=W).tolist()
        rows, meta = dist.exchange(rows, meta[:, 1:], sizes)
        got_rows.append(rows)
        got_meta.append(meta)
    rows, meta = torch.cat(got_rows), torch.cat(got_meta)
    del got_rows
    order = torch.argsort(meta[:, 0] * (len(batch) * per_block) + meta[:, 1])
    rows, experts, g = rows[order], meta[order, 0], meta[order, 2].int().view(torch.float32)
    sizes = torch.bincount(experts, minlength=E).tolist()
    split, weights = rows.split(sizes), g.split(sizes)
    return {e: Tokens(split[e][:, :H], weights[e], None if original is None else split[e][:, H:])
            for e, r in owner.items() if r == dist.rank()}


def in_batches(blocks: list, per_batch: int) -> list:
    return [blocks[i : i + per_batch] for i in range(0, len(blocks), per_batch)]


def minibatches(n_blocks: int, per_batch: int, steps: int, seed: int) -> list:
    """Blocks of each of `steps` minibatches: consecutive seeded permutations of all blocks (epochs)."""
    gen = torch.Generator().manual_seed(seed)
    need = steps * per_batch
    perms = [torch.randperm(n_blocks, generator=gen) for _ in range(-(-need // n_blocks))]
    return torch.cat(perms or [torch.empty(0, dtype=torch.int64)])[:need].view(steps, per_batch).tolist()


@torch.no_grad()
def hessians(layer, calib, owner: dict, fp: dict, cfg) -> dict:
    """{expert: (H of x, H of the SwiGLU intermediate, tokens)} over the first --gptq-samples windows."""
    H = {e: [0, 0, 0] for e in fp}
    first = list(range(-(-min(cfg.gptq_samples, calib.n) // BLOCK)))
    for batch in in_batches(first, max(1, cfg.batch_size // BLOCK)):
        for e, (x, g, _) in routed(layer, calib, batch, owner).items():
            H[e] = [a + b for a, b in zip(H[e], expert_hessian(x, g, fp[e], cfg))]
    return H


def expert_hessian(x: torch.Tensor, g: torch.Tensor, weights, cfg) -> tuple:
    """One expert's (H of x, H of the SwiGLU intermediate, tokens) from its routed tokens x and router weights g."""
    x = x.float()
    gate, up, _ = weights
    mid = adapter.swiglu_mid(x, gate, up)
    if cfg.token_weights == "router":  # sum of g^2 x x^T: the error as the layer output weighs it
        x, mid = x * g.float()[:, None], mid * g.float()[:, None]
    return x.T @ x, mid.T @ mid, x.shape[0]


def grid(cfg) -> gptq.Grid:
    return gptq.Grid(cfg.bits, cfg.format)


def global_scales(weights, cfg) -> list:
    """NVFP4's global scale of each of the expert's (gate, up, down), else None each."""
    return list(gptq.global_scales(*weights)) if cfg.format == "nvfp4" else [None] * 3


def init_expert(weights, H, cfg):
    """(RTN codes+scales, init codes+scales) for gate, up, down of one expert with Hessians H."""
    rtn, init, grid_ = [], [], grid(cfg)
    for W, h, g in zip(weights, (H[0], H[0], H[1]), global_scales(weights, cfg)):
        scale_args = dict(steps=cfg.scale_grid, smallest=cfg.scale_min, norm=cfg.scale_norm, global_scale=g)
        s = gptq.mse_scales(W, grid_, cfg.group_size, **scale_args)
        rtn.append(gptq.Quantized(gptq.rtn(W, s, grid_), s))
        if H[2] < cfg.min_tokens or not uses_gptq(cfg):
            init.append(rtn[-1])  # too few tokens: MSE-RTN (= GPTQ with an identity Hessian)
        else:
            init.append(gptq.gptq(W, h, grid_, cfg.group_size, cfg.gptq_damp, cfg.gptq_block, **scale_args))
    return rtn, init


def refine(layer, i: int, calib, original, owner: dict, fp: dict, init: dict, batches: list, cfg, dtype,
           bar) -> tuple:
    """GSQ on the experts of `owner` (all of them trained) over `batches` in layer i: {expert: hard
    codes+scales} for this rank's, and the loss trajectory. With `original` (the original model's states),
    each token's target is the expert's output on the token's original input (`--targets original`)."""
    mine = sorted(e for e, r in owner.items() if r == dist.rank())
    module = opt = None
    if mine:
        dev = calib.device
        module = ExpertLogits([torch.stack([init[e][p].codes for e in mine]).to(dev) for p in range(3)],
                              [torch.stack([init[e][p].scales for e in mine]).to(dev) for p in range(3)],
                              grid(cfg), cfg.init_sigma, cfg.init_alpha, [(cfg.seed, i, e) for e in mine],
                              global_scales=[torch.stack([global_scales(fp[e], cfg)[p] for e in mine]).to(dev)
                                             for p in range(3)] if cfg.format == "nvfp4" else None,
                              rounded=cfg.format == "nvfp4" and cfg.nvfp4_scales == "rounded")
        weights = tuple(torch.stack([fp[e][p] for e in mine]).to(dtype) for p in range(3))
        opt = optimizer(module, cfg)
    trajectory = []
    for t, batch in enumerate(batches):
        tokens = routed(layer, calib, batch, owner, original)  # every rank takes part, with experts of its own or not
        if mine:
            xs = [tokens[e].x for e in mine]
            gs = [tokens[e].g for e in mine] if cfg.token_weights == "router" else None
            xt = [tokens[e].x_original for e in mine] if original is not None else None
            losses = step(module, opt, xs, weights, t, len(batches), cfg, dtype, gs, xt)
            if t % max(1, len(batches) // 10) == 0 or t == len(batches) - 1:
                trajectory.append((t, losses.nanmean().item()))
        bar.update()
    if not mine:
        return {}, trajectory
    hard = module.hard(dtype)
    learned = {e: [gptq.Quantized(hard[p].codes[j], hard[p].scales[j]) for p in range(3)] for j, e in enumerate(mine)}
    return learned, trajectory


@torch.no_grad()
def measure(layer, calib, owner: dict, fp: dict, results: dict, cfg) -> dict:
    """{expert: relative output error of each of its results (RTN, init, final)} on the tokens of the
    first MEASURE windows, summed minibatch by minibatch."""
    sums = {e: torch.zeros(len(results[e]) + 1, dtype=torch.float64) for e in fp}  # errors..., target
    first = list(range(-(-min(MEASURE, calib.n) // BLOCK)))
    for batch in in_batches(first, max(1, cfg.batch_size // BLOCK)):
        for e, (x, _, _) in routed(layer, calib, batch, owner).items():
            errs, ref = output_errors(x.float(), fp[e], [[dequant(c, s).to(x.device) for c, s in q] for q in results[e]])
            sums[e] += torch.tensor([*errs, ref], dtype=torch.float64)
    return {e: (s[:-1] / s[-1]).tolist() for e, s in sums.items() if s[-1] > 0}


def quantize(layer, i: int, calib, cfg, dtype, experts_per_batch: int, original=None):
    """Packed codes and scales of every routed expert of layer i (`final[e][p]`, see `export.packed`), and the
    layer's statistics. GSQ trains in `dtype`, the checkpoint's, and its scales are rounded to it. The
    layer keeps its original experts (`set_quantized` replaces them)."""
    t0 = time.time()
    E = adapter.num_experts(layer)
    count = counts(layer, calib)
    owners = dist.assign(count, list(range(E)), dist.world())
    trained = {e for e in range(E) if count[e] >= cfg.min_tokens and cfg.method == "gsq"}
    n_blocks, per_batch = -(-calib.n // BLOCK), max(1, cfg.batch_size // BLOCK)
    steps = max(cfg.min_steps, math.ceil(cfg.epochs * calib.n / cfg.batch_size)) if trained else 0
    batches = minibatches(n_blocks, min(per_batch, n_blocks), steps, derive_seed(cfg.seed, i))
    n_groups = max(-(-len(m) // experts_per_batch) for m in owners)
    final, errs, trajectory = {}, {}, []
    bar = tqdm(total=n_groups * steps, desc=f"layer {i} GSQ steps", leave=False, disable=not dist.is_writer())
    for g in range(n_groups):
        owner = {e: r for r, m in enumerate(owners) for e in m[g * experts_per_batch:(g + 1) * experts_per_batch]}
        fp = {e: tuple(w.float() for w in adapter.expert_weights(layer, e)) for e, r in owner.items()
              if r == dist.rank()}
        H = hessians(layer, calib, owner, fp, cfg) if uses_gptq(cfg) else {e: (None, None, 0) for e in fp}
        results = {e: init_expert(fp[e], H[e], cfg) for e in fp}  # (rtn, init)
        del H
        learned, traj = refine(layer, i, calib, original, {e: r for e, r in owner.items() if e in trained}, fp,
                               {e: q[1] for e, q in results.items()}, batches if trained & set(owner) else [],
                               cfg, dtype, bar)
        trajectory += traj
        results = {e: [*q, learned.get(e, q[1])] for e, q in results.items()}
        errs.update(measure(layer, calib, owner, fp, results, cfg))
        final.update({e: [packed(c, s, grid(cfg), g) for (c, s), g in zip(q[2], global_scales(fp[e], cfg))]
                      for e, q in results.items()})
    bar.close()
    got = dist.gather({e: (final[e], errs.get(e)) for e in final})
    final = [got[e][0] for e in range(E)]
    errs = {e: got[e][1] for e in got if got[e][1] is not None and count[e] >= cfg.min_tokens}
    per_expert = {name: [errs[e][k] for e in sorted(errs)] for k, name in enumerate(("rtn", "init", "gsq"))}
    stats = {"layer": i, "method": cfg.method, "init": "GPTQ" if uses_gptq(cfg) else "RTN",
             "tokens_per_expert": count, "steps": steps, "gsq_experts": len(trained),
             "rtn_init_experts": [e for e in range(E) if count[e] < cfg.min_tokens],
             "experts_per_batch": experts_per_batch, "groups": n_groups,
             "expert_seconds": round(time.time() - t0, 2), "ranks": dist.world(),
             **{f"err_{k}": sum(v) / max(1, len(v)) for k, v in per_expert.items()}, "err_per_expert": per_expert,
             "loss_trajectory": trajectory[-1:]}
    return final, stats


def set_quantized(layer, final: list, dtype):
    """Replace the layer's routed experts by their quantized weights, exactly as the checkpoint will
    dequantize them (in `dtype`)."""
    for e, projs in enumerate(final):
        adapter.set_expert_weights(layer, e, *(dequant(*unpacked(q)).to(dtype) for q in projs))


def summary(s: dict) -> str:
    """One line on a finished layer, from its statistics (`quantize`'s, with the pipeline's time and memory)."""
    line = f"layer {s['layer']}: {s['seconds']:.1f}s, RSS {s['rss_mb']:.0f} MB (peak {s['peak_rss_mb']:.0f} MB)"
    if not s.get("moe"):
        return line + " (dense: kept as is)"
    c = sorted(s["tokens_per_expert"])
    line += (f", tokens/expert min {c[0]} median {c[len(c) // 2]} max {c[-1]}; "
             f"rel. output error RTN {s['err_rtn']:.4f} -> {s['init']} {s['err_init']:.4f}")
    if s["method"] == "gsq":
        line += f" -> GSQ {s['err_gsq']:.4f} ({s['steps']} steps)"
    if s["rtn_init_experts"]:
        line += f"; experts with < min-tokens kept at MSE-RTN: {s['rtn_init_experts']}"
    return line
