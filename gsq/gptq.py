"""Initial codes and scales for GSQ: MSE scale search (signed), round-to-nearest, and GPTQ.

The grid (`Grid`): integer levels (2 bits: -2, -1, 0, 1; NVFP4: the E2M1 values, doubled); weight = s * q
with one scale s per group of `group` consecutive input channels of a row. On the integer grids a negative
s flips which side of zero gets the extra level; the search tries both signs per group.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch


class Quantized(NamedTuple):
    """One weight matrix on the grid: int8 codes `[R, C]` and signed group scales `[R, C / group]`."""

    codes: torch.Tensor
    scales: torch.Tensor


E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # FP4 magnitudes, indexed by the code's low 3 bits
FP8_MAX, NVFP4_GROUP = 448.0, 16


@dataclass(frozen=True)
class Grid:
    """The grid of a run as data: its sorted levels (integers; a weight is scale * level), how GSQ's logits
    choose among them, and how a scale is stored.

    `int` (`--bits b`): levels qmin..qmax = -2^(b-1)..2^(b-1)-1. GSQ learns one logit per level at 2 bits, and
    one per local shift -2..+2 of the init code's level index at 3 and 4 bits (`local`: 99.99999% of weights
    move by at most 2, the paper's observation), shifts off the grid excluded.
    `nvfp4` (`--format nvfp4`): the E2M1 values {0, 0.5, 1, 1.5, 2, 3, 4, 6} with a sign, held doubled so that
    every level is an integer (-12..12, 15 levels) and the held scale is half the stored one; groups of 16;
    local shifts; each scale stored as FP8 E4M3 relative to a per-tensor global scale (`round_scales`)."""

    bits: int
    format: str = "int"

    @property
    def nvfp4(self) -> bool:
        return self.format == "nvfp4"

    @property
    def qmin(self) -> int:
        return -12 if self.nvfp4 else -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 12 if self.nvfp4 else (1 << (self.bits - 1)) - 1

    @property
    def local(self) -> bool:
        return self.nvfp4 or self.bits > 2

    @property
    def symmetric(self) -> bool:
        """Whether level -v exists for every v (then a scale's sign is a choice of no consequence)."""
        return self.nvfp4

    def levels(self) -> torch.Tensor:
        if self.nvfp4:
            half = torch.tensor(E2M1) * 2
            return torch.cat([-half.flip(0)[:-1], half])
        return torch.arange(self.qmin, self.qmax + 1, dtype=torch.float32)

    @property
    def scale_lr(self) -> float:
        """GSQ's scale learning rate relative to --lr-scales (set for the 2-bit grid): Lion moves a scale by the
        rate itself, and an NVFP4 scale (held: amax / 12 over 16 inputs) is about 8x smaller than a 2-bit one
        (amax / 2 over 128 inputs; 0.0050 against 0.041 on tiny-deepseek-v3's layer 1)."""
        return 1 / 8 if self.nvfp4 else 1.0

    @property
    def finetune_lr(self) -> float:
        """The scale fine-tune's learning rate relative to --finetune-lr (set for the 2-bit grid). NVFP4 takes 0.3x:
        its scales move only where they cross an FP8 step, and at 1e-2 the fine-tune undid GSQ's gain on
        tiny-deepseek-v3 (KL 0.0091 -> 0.0104) where 3e-3 lowered the KL on both bundled models (0.0090;
        tiny-qwen3-moe 0.00160 -> 0.00137, against 0.00145 at 1e-2): eval/finetune_sweep.py's records."""
        return 0.3 if self.nvfp4 else 1.0

    @property
    def word_bits(self) -> int:
        """Bits per code in the words a result is held in until written: 2, or 4 for 3- and 4-bit and NVFP4
        codes (NVFP4: E2M1 nibbles in bytes, as written)."""
        return 2 if self.bits == 2 and not self.nvfp4 else 4

    def choices(self) -> torch.Tensor:
        """What GSQ's logits choose between: the levels, or the local shifts of the init code's level index."""
        return torch.arange(-2.0, 3.0) if self.local else self.levels()

    def index(self, codes: torch.Tensor) -> torch.Tensor:
        """Each code's position among the levels (int8): the base the local shifts move from."""
        return torch.searchsorted(self.levels().to(codes.device), codes.float().contiguous()).to(torch.int8)

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """The level nearest each x (in units of the held scale), as int8 codes: rounding half to even on the
        integer grid, and on the E2M1 grid as compressed-tensors rounds (a tie goes to the even mantissa). A
        group whose scale is 0 (all its weights zero, or too small for FP8 beside its tensor's largest) gives
        0 / 0: code 0, said here rather than left to how a platform casts NaN to int8."""
        x = torch.nan_to_num(x, nan=0.0)
        if not self.nvfp4:
            return torch.clamp(torch.round(x), self.qmin, self.qmax).to(torch.int8)
        half = torch.tensor(E2M1, device=x.device) * 2
        mid = (half[1:] + half[:-1]) / 2
        a = x.abs().clamp(max=12)
        k = torch.bucketize(a, mid)  # a == mid[j] gives j, the lower level
        k = k + ((k % 2 == 1) & (a == mid[k.clamp(max=6)])).long()  # ties: the even index
        return (torch.sign(x) * half[k]).to(torch.int8)

    def round_scales(self, scales: torch.Tensor, global_scale: torch.Tensor | None) -> torch.Tensor:
        """Scales as the checkpoint will hold them (fp32): NVFP4's FP8 E4M3 of (stored scale x global scale),
        divided back; integer grids' unchanged (the caller rounds them to the model dtype)."""
        if not self.nvfp4:
            return scales
        g = global_scale.float()[..., None, None] if global_scale.dim() else global_scale.float()
        return fp8(2 * scales.float() * g).float() / g / 2


    def stored(self, scales: torch.Tensor, global_scale: torch.Tensor | None) -> torch.Tensor:
        """The scales as the checkpoint will hold them (`round_scales`, either sign), the gradient passed straight
        through the rounding: what training through it uses."""
        rounded = self.round_scales(scales.abs(), global_scale) * torch.sign(scales)
        return scales + (rounded - scales).detach()


def fp8(x: torch.Tensor) -> torch.Tensor:
    """Round to FP8 E4M3 (saturating at +-448)."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def global_scales(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """NVFP4's per-tensor global scales `[3]` of one expert, as compressed-tensors chooses them (448 * 6 /
    amax, so that the largest group scale is FP8's largest), gate and up sharing one: vLLM's fused MoE
    reads gate_proj's for both."""
    amax = torch.stack([torch.maximum(gate.abs().amax(), up.abs().amax()), down.abs().amax()]).float()
    g = FP8_MAX * E2M1[-1] / amax.clamp(min=torch.finfo(torch.float32).tiny)
    return torch.where(torch.isfinite(g), g, torch.ones_like(g))[[0, 0, 1]]


def mse_scales(W: torch.Tensor, grid: Grid, group: int, steps=100, smallest=0.2, norm=2.4,
               global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Per-group scales `[R, C / group]` minimising sum |w - s * nearest(w / s)|^norm over `steps` shrink
    factors from 1 down to `smallest` of the range-fitting scale, for both signs (one on a symmetric grid),
    each candidate as the checkpoint holds it (`Grid.round_scales`, with the tensor's `global_scale`)."""
    qmin, qmax = grid.qmin, grid.qmax
    Wg = W.float().unflatten(-1, (-1, group))  # [R, ng, G]
    best_err = torch.full(Wg.shape[:-1], float("inf"), device=W.device)
    best = torch.ones(Wg.shape[:-1], device=W.device)
    shrink = torch.linspace(1.0, smallest, steps, device=W.device)
    chunk = max(1, 2**24 // Wg.numel())  # candidates evaluated together, bounded memory
    for sign in (1.0,) if grid.symmetric else (1.0, -1.0):
        x = sign * Wg  # with s = sign * t (t > 0): need qmin * t <= x <= qmax * t
        t0 = torch.maximum(x.amax(-1) / qmax, x.amin(-1) / qmin).clamp(min=1e-8)
        for c in range(0, steps, chunk):
            s = grid.round_scales(sign * shrink[c : c + chunk, None, None] * t0, global_scale)  # [P, R, ng]
            q = grid.nearest(Wg / s[..., None])
            err = (Wg - s[..., None] * q).abs().pow(norm).sum(-1)
            err, k = err.min(0)  # first best among the candidates, like a sequential scan
            s = s.gather(0, k[None])[0]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, s, best)
    return best


def rtn(W: torch.Tensor, scales: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Round-to-nearest int8 codes of W on the grid with the given group scales."""
    s = scales.repeat_interleave(W.shape[-1] // scales.shape[-1], dim=-1)
    return grid.nearest(W.float() / s)


def gptq(W: torch.Tensor, H: torch.Tensor, grid: Grid, group: int, damp=0.1, block=128,
         global_scale: torch.Tensor | None = None, **scale_args):
    """GPTQ (Frantar et al., 2023) on the signed group grid: codes int8 `[R, C]`, scales `[R, C / group]`.

    H = X^T X of the layer's inputs. Columns are quantized in order; each one's rounding error is
    spread over the columns not yet quantized through the inverse Hessian's Cholesky factor. A
    group's scale is searched when its first column is reached, on the error-updated weights.
    """
    if block % group:
        raise ValueError(f"GPTQ block {block} must be a multiple of the group size {group}")
    W = W.float().clone()
    H = H.float().clone()
    R, C = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.diag(H).mean() * torch.eye(C, device=W.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros(R, C, dtype=torch.int8, device=W.device)
    scales = torch.zeros(R, C // group, device=W.device)
    for i1 in range(0, C, block):
        i2 = min(i1 + block, C)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if col % group == 0:
                scales[:, col // group] = mse_scales(W1[:, i:i + group], grid, group, global_scale=global_scale,
                                                     **scale_args)[:, 0]
            s = scales[:, col // group]
            q = grid.nearest(W1[:, i] / s).float()
            codes[:, col] = q.to(torch.int8)
            err = (W1[:, i] - s * q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            err1[:, i] = err
        W[:, i2:] -= err1 @ Hinv[i1:i2, i2:]
    return Quantized(codes, scales)
