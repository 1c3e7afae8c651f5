"""Initial codes and scales for GSQ: MSE scale search (signed), round-to-nearest, and GPTQ.

Grid of `bits` bits (`Grid`): integer levels qmin..qmax (2 bits: -2, -1, 0, 1); weight = s * q with one
signed scale s per group of `group` consecutive input channels of a row. A negative s flips which
side of zero gets the extra level; the search tries both signs per group.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch


class Quantized(NamedTuple):
    """One weight matrix on the grid: int8 codes `[R, C]` and signed group scales `[R, C / group]`."""

    codes: torch.Tensor
    scales: torch.Tensor


@dataclass(frozen=True)
class Grid:
    """The grid of `--bits` as data: integer levels qmin..qmax. GSQ learns one logit per level at 2 bits, and
    one per local shift -2..+2 of the init code at 3 and 4 bits (`local`: 99.99999% of weights move by at
    most 2, the paper's observation), clamped to the levels."""

    bits: int

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def local(self) -> bool:
        return self.bits > 2

    def levels(self) -> torch.Tensor:
        return torch.arange(self.qmin, self.qmax + 1, dtype=torch.float32)

    @property
    def word_bits(self) -> int:
        """Bits per code in the int32 words a result is held in until written: 2, or 4 for 3- and 4-bit codes."""
        return 2 if self.bits == 2 else 4

    def choices(self) -> torch.Tensor:
        """What GSQ's logits choose between: the levels, or the local shifts of the init code."""
        return torch.arange(-2.0, 3.0) if self.local else self.levels()


def mse_scales(W: torch.Tensor, grid: Grid, group: int, steps=100, smallest=0.2, norm=2.4) -> torch.Tensor:
    """Per-group signed scales `[R, C / group]` minimising sum |w - s * round(w / s)|^norm over
    `steps` shrink factors from 1 down to `smallest` of the range-fitting scale, for both signs."""
    qmin, qmax = grid.qmin, grid.qmax
    Wg = W.float().unflatten(-1, (-1, group))  # [R, ng, G]
    best_err = torch.full(Wg.shape[:-1], float("inf"), device=W.device)
    best = torch.ones(Wg.shape[:-1], device=W.device)
    shrink = torch.linspace(1.0, smallest, steps, device=W.device)
    chunk = max(1, 2**24 // Wg.numel())  # candidates evaluated together, bounded memory
    for sign in (1.0, -1.0):
        x = sign * Wg  # with s = sign * t (t > 0): need qmin * t <= x <= qmax * t
        t0 = torch.maximum(x.amax(-1) / qmax, x.amin(-1) / qmin).clamp(min=1e-8)
        for c in range(0, steps, chunk):
            s = sign * shrink[c : c + chunk, None, None] * t0  # [P, R, ng]
            q = torch.clamp(torch.round(Wg / s[..., None]), qmin, qmax)
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
    return torch.clamp(torch.round(W.float() / s), grid.qmin, grid.qmax).to(torch.int8)


def gptq(W: torch.Tensor, H: torch.Tensor, grid: Grid, group: int, damp=0.1, block=128, **scale_args):
    """GPTQ (Frantar et al., 2023) on the signed group grid: codes int8 `[R, C]`, scales `[R, C / group]`.

    H = X^T X of the layer's inputs. Columns are quantized in order; each one's rounding error is
    spread over the columns not yet quantized through the inverse Hessian's Cholesky factor. A
    group's scale is searched when its first column is reached, on the error-updated weights.
    """
    if block % group:
        raise ValueError(f"GPTQ block {block} must be a multiple of the group size {group}")
    qmin, qmax = grid.qmin, grid.qmax
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
                scales[:, col // group] = mse_scales(W1[:, i:i + group], grid, group, **scale_args)[:, 0]
            s = scales[:, col // group]
            q = torch.clamp(torch.round(W1[:, i] / s), qmin, qmax)
            codes[:, col] = q.to(torch.int8)
            err = (W1[:, i] - s * q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            err1[:, i] = err
        W[:, i2:] -= err1 @ Hinv[i1:i2, i2:]
    return Quantized(codes, scales)
