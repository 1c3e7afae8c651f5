"""Fused Gumbel-Softmax fake-quant: soft weights forward, logit and scale gradients backward.

GSQ's hot spot (arXiv 2604.18556). Per weight (row m, column n) there are L logits
`l[m, n, k]`, one per grid level `v[k]` (or, with `base` level indices and the grid's sorted
`table` of levels, per local shift: level `table[base[m, n] + v[k]]`, shifts off the table
excluded; the level set is data: integer grids and NVFP4's E2M1 values alike). With Gumbel noise `g`:

    p[k] = softmax_k((kappa * l[k] + g[k]) / tau)
    w~   = s[m, n // G] * sum_k p[k] * v[k]                                  (forward)
    u[k] = s * v[k] * dL/dw~
    dL/dl[k] = (kappa / tau) * p[k] * (u[k] - sum_j p[j] u[j])               (backward)
    dL/ds    = sum over the group of dL/dw~ * sum_k p[k] v[k]

The noise is never stored: it is a function of (seed of the expert, index of the logit inside the
expert), drawn in-kernel by Philox in the forward and drawn again, bit for bit, in the backward.
On CPU (no interpreter) the reference runs, with noise from a torch.Generator seeded the same way,
and keeps the probabilities for the backward (host memory is not what limits a CPU run).

Layouts: logits `[E, out, in, L]` (L innermost: one weight's logits are contiguous, a tile of a
row block and a group is one contiguous run per row), scales `[E, out, in / G]` fp32, seeds `[E]`
int64; 2-D weights are `E = 1` views.
"""

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _ct(t):
    """Compute dtype of the references: float64 stays float64 (for gradient checks), else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def levels_ref(grid, base=None, table=None, dtype=torch.float32):
    """Level values `[..., L]` and a validity mask: the grid itself, or the table's levels at the base
    indices plus the local shifts."""
    if base is None:
        grid = grid.to(dtype)
        return grid, torch.ones_like(grid, dtype=torch.bool)
    index = base.long()[..., None] + grid.long().to(base.device)
    valid = (index >= 0) & (index < table.numel())
    return table.to(base.device, dtype)[index.clamp(0, table.numel() - 1)], valid


def gumbel_ref(seeds, shape, device="cpu"):
    """Gumbel noise `[E, *shape]` for the CPU path: expert e draws from torch.Generator(seeds[e])."""
    out = []
    for seed in seeds.tolist():
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        u = torch.rand(shape, generator=gen).clamp_(min=1e-20)
        out.append(-torch.log(-torch.log(u)))
    return torch.stack(out).to(device)


def _probs_ref(logits, tau, kappa, noise, valid):
    z = (kappa * logits.to(_ct(logits)) + noise.to(_ct(logits))) / tau
    return torch.softmax(z.masked_fill(~valid, float("-inf")), dim=-1)


def soft_weights_ref(logits, scales, grid, tau, kappa, noise, base=None, table=None, out_dtype=None):
    """Soft weights `[E, out, in]` (eq. of the relaxed forward); `noise` has the logits' shape."""
    values, valid = levels_ref(grid, base, table, _ct(logits))
    p = _probs_ref(logits, tau, kappa, noise, valid)
    return _weights_from_probs(p, values, scales).to(out_dtype or logits.dtype)


def soft_weights_bwd_ref(grad_w, logits, scales, grid, tau, kappa, noise, base=None, table=None):
    """(dlogits, dscales) for upstream `grad_w`, by the closed-form gradient above."""
    values, valid = levels_ref(grid, base, table, _ct(logits))
    p = _probs_ref(logits, tau, kappa, noise, valid)
    dlogits, dscales = _grads_from_probs(grad_w, p, values, scales, tau, kappa)
    return dlogits.to(logits.dtype), dscales


def _weights_from_probs(p, values, scales):
    group = p.shape[-2] // scales.shape[-1]
    return scales.to(p.dtype).repeat_interleave(group, dim=-1) * (p * values).sum(-1)


def _grads_from_probs(grad_w, p, values, scales, tau, kappa):
    group = p.shape[-2] // scales.shape[-1]
    dw = grad_w.to(p.dtype)
    u = (scales.to(p.dtype).repeat_interleave(group, dim=-1) * dw)[..., None] * values
    dlogits = (kappa / tau) * p * (u - (p * u).sum(-1, keepdim=True))
    dscales = (dw * (p * values).sum(-1)).unflatten(-1, (-1, group)).sum(-1)
    return dlogits, dscales


def hard_codes_ref(logits, scales, grid, base=None, table=None):
    """Argmax of the logits (no noise): int8 codes `[E, out, in]` and the dequantized weight (fp32)."""
    values, valid = levels_ref(grid, base, table)
    k = logits.float().masked_fill(~valid, float("-inf")).argmax(-1, keepdim=True)
    codes = values.expand_as(logits).gather(-1, k)[..., 0] if base is not None else values[k[..., 0]]
    group = logits.shape[-2] // scales.shape[-1]
    return codes.to(torch.int8), scales.float().repeat_interleave(group, dim=-1) * codes


@triton.jit
def _levels(grid_ptr, base_ptr, table_ptr, pid_e, offs_w, mask_m, offs_k, M, N, L: tl.constexpr, T,
            HAS_BASE: tl.constexpr):
    """Level values [BLOCK_M, G, BLOCK_L] (or [1, 1, BLOCK_L]) and which of them are allowed: the grid's, or
    the table's (T levels) at base index + shift."""
    v = tl.load(grid_ptr + offs_k, mask=offs_k < L, other=0.0)[None, None, :]
    valid = (offs_k < L)[None, None, :]  # rows past M load zeros: finite, masked at the store
    if HAS_BASE:
        b = tl.load(base_ptr + pid_e.to(tl.int64) * M * N + offs_w, mask=mask_m[:, None], other=0)
        index = b.to(tl.int32)[:, :, None] + v.to(tl.int32)
        valid = valid & (index >= 0) & (index < T)
        v = tl.load(table_ptr + index, mask=valid, other=0.0)
    return v, valid


@triton.jit
def _tile(logits_ptr, scales_ptr, grid_ptr, base_ptr, table_ptr, seeds_ptr, noise_ptr, M, N, L: tl.constexpr, T,
          tau, kappa,
          HAS_NOISE: tl.constexpr, HAS_BASE: tl.constexpr,
          BLOCK_M: tl.constexpr, G: tl.constexpr, BLOCK_L: tl.constexpr):
    """This program's (expert, row block, group) tile: probabilities p [BLOCK_M, G, BLOCK_L], level
    values v, scales s [BLOCK_M], and the offsets the kernels store through."""
    pid_e, pid_m, pid_g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_g * G + tl.arange(0, G)
    offs_k = tl.arange(0, BLOCK_L)
    mask_m = offs_m < M
    offs_w = offs_m[:, None] * N + offs_n[None, :]  # weight index inside the expert
    offs_l = offs_w[:, :, None] * L + offs_k[None, None, :]  # logit index inside the expert
    mask_l = mask_m[:, None, None] & (offs_k < L)[None, None, :]
    start_l = pid_e.to(tl.int64) * M * N * L
    x = tl.load(logits_ptr + start_l + offs_l, mask=mask_l, other=0.0).to(tl.float32)
    if HAS_NOISE:
        g = tl.load(noise_ptr + start_l + offs_l, mask=mask_l, other=0.0).to(tl.float32)
    else:  # Gumbel noise from (seed of the expert, logit index): the same draw in both passes
        u = tl.maximum(tl.rand(tl.load(seeds_ptr + pid_e), offs_l), 1e-20)
        g = -tl.log(-tl.log(u))
    v, valid = _levels(grid_ptr, base_ptr, table_ptr, pid_e, offs_w, mask_m, offs_k, M, N, L, T, HAS_BASE)
    z = tl.where(valid, (kappa * x + g) / tau, float("-inf"))
    z = z - tl.max(z, axis=2)[:, :, None]
    e = tl.where(valid, tl.exp(z), 0.0)
    p = e / tl.sum(e, axis=2)[:, :, None]
    offs_s = pid_e.to(tl.int64) * M * (N // G) + offs_m * (N // G) + pid_g
    s = tl.load(scales_ptr + offs_s, mask=mask_m, other=0.0)
    return p, v, s, offs_s, pid_e.to(tl.int64) * M * N + offs_w, start_l + offs_l, mask_m, mask_l


@triton.jit
def _soft_weights_fwd_kernel(logits_ptr, scales_ptr, grid_ptr, base_ptr, table_ptr, seeds_ptr, noise_ptr, out_ptr,
                             M, N, L: tl.constexpr, T, tau, kappa,
                             HAS_NOISE: tl.constexpr, HAS_BASE: tl.constexpr,
                             BLOCK_M: tl.constexpr, G: tl.constexpr, BLOCK_L: tl.constexpr):
    p, v, s, offs_s, offs_w, offs_l, mask_m, mask_l = _tile(
        logits_ptr, scales_ptr, grid_ptr, base_ptr, table_ptr, seeds_ptr, noise_ptr, M, N, L, T, tau, kappa,
        HAS_NOISE, HAS_BASE, BLOCK_M, G, BLOCK_L)
    w = s[:, None] * tl.sum(p * v, axis=2)
    tl.store(out_ptr + offs_w, w.to(out_ptr.dtype.element_ty), mask=mask_m[:, None])


@triton.jit
def _soft_weights_bwd_kernel(grad_ptr, logits_ptr, scales_ptr, grid_ptr, base_ptr, table_ptr, seeds_ptr, noise_ptr,
                             dlogits_ptr, dscales_ptr, M, N, L: tl.constexpr, T, tau, kappa,
                             HAS_NOISE: tl.constexpr, HAS_BASE: tl.constexpr,
                             BLOCK_M: tl.constexpr, G: tl.constexpr, BLOCK_L: tl.constexpr):
    p, v, s, offs_s, offs_w, offs_l, mask_m, mask_l = _tile(
        logits_ptr, scales_ptr, grid_ptr, base_ptr, table_ptr, seeds_ptr, noise_ptr, M, N, L, T, tau, kappa,
        HAS_NOISE, HAS_BASE, BLOCK_M, G, BLOCK_L)
    dw = tl.load(grad_ptr + offs_w, mask=mask_m[:, None], other=0.0).to(tl.float32)
    u = (s[:, None] * dw)[:, :, None] * v
    dl = (kappa / tau) * p * (u - tl.sum(p * u, axis=2)[:, :, None])
    tl.store(dlogits_ptr + offs_l, dl.to(dlogits_ptr.dtype.element_ty), mask=mask_l)
    ds = tl.sum(dw * tl.sum(p * v, axis=2), axis=1)
    tl.store(dscales_ptr + offs_s, ds, mask=mask_m)


@triton.jit
def _gumbel_kernel(seeds_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    """The noise exactly as the fake-quant kernels draw it, written out (tests and debugging only)."""
    pid, pid_e = tl.program_id(0), tl.program_id(1)  # the large count on axis 0 (axes 1, 2 stop at 65535)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    u = tl.maximum(tl.rand(tl.load(seeds_ptr + pid_e), offs), 1e-20)
    tl.store(out_ptr + pid_e.to(tl.int64) * numel + offs, -tl.log(-tl.log(u)), mask=offs < numel)


@triton.jit
def _hard_codes_kernel(logits_ptr, scales_ptr, grid_ptr, base_ptr, table_ptr, codes_ptr, deq_ptr, M, N,
                       L: tl.constexpr, T,
                       HAS_BASE: tl.constexpr, BLOCK_M: tl.constexpr, G: tl.constexpr, BLOCK_L: tl.constexpr):
    pid_e, pid_m, pid_g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_g * G + tl.arange(0, G)
    offs_k = tl.arange(0, BLOCK_L)
    mask_m = offs_m < M
    offs_w = offs_m[:, None] * N + offs_n[None, :]
    mask = mask_m[:, None, None] & (offs_k < L)[None, None, :]
    x = tl.load(logits_ptr + pid_e.to(tl.int64) * M * N * L + offs_w[:, :, None] * L + offs_k[None, None, :],
                mask=mask, other=0.0).to(tl.float32)
    v, valid = _levels(grid_ptr, base_ptr, table_ptr, pid_e, offs_w, mask_m, offs_k, M, N, L, T, HAS_BASE)
    k = tl.argmax(tl.where(valid, x, float("-inf")), axis=2)  # first maximum, like torch.argmax
    code = tl.sum(tl.where(offs_k[None, None, :] == k[:, :, None], v, 0.0), axis=2)
    s = tl.load(scales_ptr + pid_e.to(tl.int64) * M * (N // G) + offs_m * (N // G) + pid_g, mask=mask_m, other=0.0)
    tl.store(codes_ptr + pid_e.to(tl.int64) * M * N + offs_w, code.to(tl.int8), mask=mask_m[:, None])
    tl.store(deq_ptr + pid_e.to(tl.int64) * M * N + offs_w, s[:, None] * code, mask=mask_m[:, None])


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or INTERPRET


def _prepare(logits, scales, grid, seeds, base, table):
    """Validate and view everything as `[E, ...]`; returns tensors, (E, M, N, L), group size.
    `seeds=None`: no noise is drawn (hard codes)."""
    if logits.dim() not in (3, 4):
        raise ValueError(f"logits must be [out, in, L] or [E, out, in, L], got {tuple(logits.shape)}")
    squeeze = logits.dim() == 3
    if squeeze:
        logits, scales = logits[None], scales[None]
        base = None if base is None else base[None]
    E, M, N, L = logits.shape
    if scales.shape[:2] != (E, M) or scales.dim() != 3 or N % scales.shape[-1]:
        raise ValueError(f"scales {tuple(scales.shape)} do not fit logits {tuple(logits.shape)}")
    group = N // scales.shape[-1]
    if group & (group - 1):
        raise ValueError(f"group size must be a power of two, got {group}")
    if grid.numel() != L:
        raise ValueError(f"grid has {grid.numel()} levels, logits have {L}")
    if base is not None and base.shape != (E, M, N):
        raise ValueError(f"base codes {tuple(base.shape)} do not fit logits {tuple(logits.shape)}")
    if (base is None) != (table is None):
        raise ValueError("local shifts need both the base level indices and the table of levels")
    if M * N * L >= 2**31:
        raise ValueError("one expert's logits must have fewer than 2**31 elements")
    if seeds is not None:
        seeds = torch.as_tensor(seeds, dtype=torch.int64).reshape(-1).to(logits.device)
        if seeds.numel() != E:
            raise ValueError(f"need one seed per expert ({E}), got {seeds.numel()}")
    grid = grid.to(device=logits.device, dtype=torch.float32).contiguous()
    scales = scales.float().contiguous()
    base = None if base is None else base.to(torch.int8).contiguous()
    table = None if table is None else table.to(device=logits.device, dtype=torch.float32).contiguous()
    return logits.contiguous(), scales, grid, seeds, base, table, (E, M, N, L), group, squeeze


def _block_m(group, levels):
    """Rows per program: a tile of about 2048 logits (168 -> ~100 registers per thread at L = 4)."""
    return max(1, 2048 // (group * triton.next_power_of_2(levels)))


def _launch_grid(E, M, N, group, levels):
    return (E, triton.cdiv(M, _block_m(group, levels)), N // group)


class _SoftWeights(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, scales, grid, tau, kappa, seeds, base, table, out_dtype, noise):
        E, M, N, L = logits.shape
        group = N // scales.shape[-1]
        ctx.args = (tau, kappa)
        if not _use_triton(logits):  # CPU: keep the probabilities for the backward (memory is not the limit)
            noise = gumbel_ref(seeds, (M, N, L), logits.device) if noise is None else noise
            values, valid = levels_ref(grid, base, table)
            p = _probs_ref(logits, tau, kappa, noise, valid)
            ctx.save_for_backward(p, values, scales)
            ctx.dtype = logits.dtype
            return _weights_from_probs(p, values, scales).to(out_dtype)
        ctx.save_for_backward(logits, scales, grid, seeds, base, table, noise)
        out = torch.full((E, M, N), float("nan"), device=logits.device, dtype=out_dtype)
        _soft_weights_fwd_kernel[_launch_grid(E, M, N, group, L)](
            logits, scales, grid, base if base is not None else seeds, table if table is not None else grid, seeds,
            noise if noise is not None else logits, out, M, N, L, _levels_in(table), float(tau), float(kappa),
            HAS_NOISE=noise is not None, HAS_BASE=base is not None,
            BLOCK_M=_block_m(group, L), G=group, BLOCK_L=triton.next_power_of_2(L))
        return out

    @staticmethod
    def backward(ctx, grad_w):
        tau, kappa = ctx.args
        if len(ctx.saved_tensors) == 3:  # the CPU path
            p, values, scales = ctx.saved_tensors
            dlogits, dscales = _grads_from_probs(grad_w, p, values, scales, tau, kappa)
            return dlogits.to(ctx.dtype), dscales, None, None, None, None, None, None, None, None
        logits, scales, grid, seeds, base, table, noise = ctx.saved_tensors
        E, M, N, L = logits.shape
        group = N // scales.shape[-1]
        grad_w = grad_w.contiguous()
        dlogits = torch.full_like(logits, float("nan"))
        dscales = torch.full_like(scales, float("nan"))
        _soft_weights_bwd_kernel[_launch_grid(E, M, N, group, L)](  # draws the forward's noise again
            grad_w, logits, scales, grid, base if base is not None else seeds, table if table is not None else grid,
            seeds, noise if noise is not None else logits, dlogits, dscales, M, N, L, _levels_in(table),
            float(tau), float(kappa), HAS_NOISE=noise is not None, HAS_BASE=base is not None,
            BLOCK_M=_block_m(group, L), G=group, BLOCK_L=triton.next_power_of_2(L))
        return dlogits, dscales, None, None, None, None, None, None, None, None


def _levels_in(table) -> int:
    return 0 if table is None else table.numel()


def soft_weights(logits, scales, grid, tau, kappa, seeds, base=None, table=None, out_dtype=None, noise=None):
    """Differentiable soft weights `[(E,) out, in]` from logits `[(E,) out, in, L]` and scales.

    `seeds`: one int per expert (an int for 2-D); the same seeds give the same noise. Local shifts: `base`
    `[(E,) out, in]` int8 indices into `table` (the grid's sorted levels) and `grid` the shifts. `noise`
    (same shape as the logits) replaces the drawn noise: a test hook. Gradients flow to
    `logits` and `scales` (fp32); the noise is re-generated in the backward, never stored.
    """
    logits, scales, grid, seeds, base, table, _, _, squeeze = _prepare(logits, scales, grid, seeds, base, table)
    if noise is not None:
        noise = (noise[None] if squeeze else noise).float().contiguous()
    w = _SoftWeights.apply(logits, scales, grid, tau, kappa, seeds, base, table, out_dtype or logits.dtype, noise)
    return w[0] if squeeze else w


def gumbel_noise(seeds, shape, device):
    """The noise that `soft_weights` draws for these seeds: `[E, *shape]` (shape = one expert's logits)."""
    seeds = torch.as_tensor(seeds, dtype=torch.int64).reshape(-1).to(device)
    if not (torch.device(device).type == "cuda" or INTERPRET):
        return gumbel_ref(seeds, shape, device)
    numel = int(torch.tensor(shape).prod())
    out = torch.full((seeds.numel(), *shape), float("nan"), device=device)
    _gumbel_kernel[(triton.cdiv(numel, 1024), seeds.numel())](seeds, out, numel, BLOCK=1024)
    return out


@torch.no_grad()
def hard_codes(logits, scales, grid, base=None, table=None):
    """Final codes: argmax of the logits (no noise) -> int8 codes and dequantized weight (fp32)."""
    logits, scales, grid, _, base, table, (E, M, N, L), group, squeeze = _prepare(logits, scales, grid, None, base, table)
    if not _use_triton(logits):
        codes, deq = hard_codes_ref(logits, scales, grid, base, table)
    else:
        codes = torch.full((E, M, N), -128, dtype=torch.int8, device=logits.device)
        deq = torch.full((E, M, N), float("nan"), device=logits.device)
        _hard_codes_kernel[_launch_grid(E, M, N, group, L)](
            logits, scales, grid, base if base is not None else codes, table if table is not None else grid, codes,
            deq, M, N, L, _levels_in(table),
            HAS_BASE=base is not None, BLOCK_M=_block_m(group, L), G=group, BLOCK_L=triton.next_power_of_2(L))
    return (codes[0], deq[0]) if squeeze else (codes, deq)
