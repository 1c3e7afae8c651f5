"""GSQ: learn each routed expert's grid codes with a Gumbel-Softmax relaxation (the method as the paper describes it, arXiv 2604.18556).

A batch of E experts of one layer is one problem: logits `[E, out, in, L]` and signed scales
`[E, out, in / G]` for gate, up and down, trained together so that the relaxed SwiGLU expert
reproduces the full-precision expert on the tokens the router sends it. Experts share nothing but
the schedule, and Lion's update is elementwise, so a batch gives exactly what one-by-one would.
"""

import math

import torch
import torch.nn.functional as F

from gsq.adapter import swiglu
from gsq.config import derive_seed
from gsq.gptq import Grid, Quantized
from gsq.kernels.fake_quant import hard_codes, soft_weights


def init_logits(codes: torch.Tensor, grid: torch.Tensor, sigma: float, alpha: float, generator) -> torch.Tensor:
    """l[k] = sigma * (eps + alpha * c[k]), c[k] = -(v[k] - q)^2 / 2 centred over k (init of the paper)."""
    c = -0.5 * (grid.to(codes.device) - codes.float()[..., None]) ** 2
    c = c - c.mean(-1, keepdim=True)
    eps = torch.randn(c.shape, generator=generator).to(codes.device)
    return sigma * (eps + alpha * c)


def linear(start: float, end: float, step: int, steps: int) -> float:
    """Linear anneal from start (step 0) to end (last step): tau and kappa."""
    return start + (end - start) * step / max(1, steps - 1)


def cosine(step: int, steps: int, final: float) -> float:
    """Learning-rate factor: cosine decay from 1 to `final`, no warm-up."""
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * step / max(1, steps - 1)))


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al., 2023): update = sign(beta1 * m + (1 - beta1) * g); m = beta2 * m + (1 - beta2) * g;
    decoupled weight decay p *= 1 - lr * wd. Elementwise, so independent problems batch exactly.

    `step(active)`: only the experts (rows of the leading dimension) where `active` is true move, momentum
    included; the others are left exactly as they were (an expert that got no token in this step)."""

    def __init__(self, params, lr, betas=(0.9, 0.95), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, active: torch.Tensor | None = None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("m", torch.zeros_like(p, dtype=torch.float32))
                g = p.grad.float()
                # in place, expert by expert: no full-size temporaries beyond one row's update
                for r in [slice(None)] if active is None else active.nonzero().flatten().tolist():
                    update = torch.sign(beta1 * m[r] + (1 - beta1) * g[r])
                    p[r].mul_(1 - group["lr"] * group["weight_decay"])
                    p[r].add_(update.to(p.dtype), alpha=-group["lr"])
                    m[r].mul_(beta2).add_(g[r], alpha=1 - beta2)


class ExpertLogits(torch.nn.Module):
    """The learnable tensors of E experts: per projection, logits `[E, out, in, L]` over the grid's choices,
    and the group scales."""

    def __init__(self, codes: list, scales: list, grid: Grid, sigma: float, alpha: float, experts: list,
                 logits_dtype=torch.float32, global_scales: list | None = None, rounded: bool = False):
        """`codes`/`scales`: per projection, the init `[E, out, in]` / `[E, out, in / G]`; `experts`: each
        expert's (run seed, layer, expert), where its noise is derived from. On a `local` grid (3, 4 bits,
        NVFP4) the logits choose shifts of the init code's level index. `global_scales`: per projection, the
        experts' NVFP4 global scales `[E]` (what the final scales are rounded with); `rounded`: train through that
        rounding (`stored`)."""
        super().__init__()
        choices = grid.choices().to(codes[0].device)
        self.register_buffer("grid", choices)
        self.spec, self.global_scales, self.rounded = grid, global_scales or [None] * 3, rounded
        self.table = grid.levels().to(codes[0].device) if grid.local else None
        self.experts = experts
        self.base = [grid.index(q) if grid.local else None for q in codes]
        self.logits = torch.nn.ParameterList()
        for p, q in enumerate(codes):
            start = torch.zeros_like(q) if grid.local else q
            self.logits.append(torch.nn.Parameter(torch.stack([
                init_logits(start[j], choices, sigma, alpha, torch.Generator().manual_seed(derive_seed(*path, p)))
                for j, path in enumerate(experts)]).to(logits_dtype)))
        self.scales = torch.nn.ParameterList([torch.nn.Parameter(s.float().clone()) for s in scales])

    def soft(self, tau: float, kappa: float, t: int, dtype):
        """Relaxed (gate, up, down) weights with the noise of step t (a distinct Philox stream per expert and
        projection, its seed derived from (run, layer, expert, projection, step))."""
        seeds = torch.tensor([[derive_seed(*path, p, t) for path in self.experts] for p in range(3)],
                             dtype=torch.int64) % 2**62
        return [soft_weights(l, self.stored(s, g), self.grid, tau, kappa, seeds[i].to(l.device), self.base[i],
                             self.table, out_dtype=dtype)
                for i, (l, s, g) in enumerate(zip(self.logits, self.scales, self.global_scales))]

    def stored(self, s: torch.Tensor, g) -> torch.Tensor:
        """The scales the relaxed forward uses: as learned, or (`rounded`, NVFP4) as the checkpoint will store
        them, FP8 of scale x global scale, the gradient passed straight through the rounding."""
        return self.spec.stored(s, g) if self.rounded else s

    @torch.no_grad()
    def hard(self, scale_dtype):
        """Final codes (argmax of the logits) and scales as stored: rounded to the checkpoint's dtype, or on
        NVFP4 made positive (the grid is symmetric: a negative scale's codes change sign) and rounded to FP8
        with the global scale."""
        out = []
        for l, s, base, g in zip(self.logits, self.scales, self.base, self.global_scales):
            codes, _ = hard_codes(l, s.float(), self.grid, base, self.table)
            if self.spec.nvfp4:
                codes = torch.where(s.repeat_interleave(codes.shape[-1] // s.shape[-1], -1) < 0, -codes, codes)
                out.append(Quantized(codes, self.spec.round_scales(s.abs(), g)))
            else:
                out.append(Quantized(codes, s.to(scale_dtype)))
        return out


def dequant(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return scales.float().repeat_interleave(codes.shape[-1] // scales.shape[-1], dim=-1) * codes.float()


ROWS = 256  # an expert's tokens in a step are padded to a multiple of this


def optimizer(model: ExpertLogits, cfg) -> Lion:
    """Lion over the logits and the scales; each group keeps its `base_lr` (the cosine decay scales it). A step
    of Lion is lr itself, whatever the gradient: the scales' rate is --lr-scales times the grid's `scale_lr`."""
    scales_lr = cfg.lr_scales * model.spec.scale_lr
    return Lion([{"params": list(model.logits), "lr": cfg.lr_logits, "base_lr": cfg.lr_logits,
                  "weight_decay": cfg.weight_decay},
                 {"params": list(model.scales), "lr": scales_lr, "base_lr": scales_lr, "weight_decay": 0.0}],
                lr=cfg.lr_logits, betas=cfg.lion_betas)


def step(model: ExpertLogits, opt: Lion, xs: list, fp: tuple, t: int, steps: int, cfg, dtype,
         gs: list | None = None, xt: list | None = None):
    """Optimizer step t of `steps` for the E experts of `model`: soft experts match the full-precision
    experts `fp` (gate, up, down stacked `[E, ...]`) on the tokens `xs[e]` `[n_e, H]` the minibatch routed
    to expert e. The loss of expert e is its relative output MSE, each token's error weighted by g^2 when
    its router weights `gs[e]` `[n_e]` are given (the layer adds g * f_e(x)); the target is the full-precision
    expert on `xt[e]` (the tokens' inputs in the original model) when given, else on `xs[e]`; experts with no
    token do not move. Returns the per-expert losses (NaN where no token)."""
    tau, kappa = linear(*cfg.tau, t, steps), linear(*cfg.kappa, t, steps)
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * cosine(t, steps, cfg.lr_final)
    soft = model.soft(tau, kappa, t, dtype)  # fresh noise every step
    # one expert at a time through the SwiGLU (token counts differ; memory is one expert's tokens), each
    # with its own leaf of the soft weights, then one backward through the fused fake-quant
    leaves = [[w[e].detach().requires_grad_() for w in soft] for e in range(len(xs))]
    losses = torch.full((len(xs),), float("nan"), device=fp[0].device)
    for e, x in enumerate(xs):
        if x.shape[0] == 0:
            continue
        # zero rows up to a multiple of ROWS: a few shapes, not one per token count (oneDNN builds and keeps
        # a kernel for every new bf16 shape on a CPU); a zero row's output and target are exactly 0
        pad = -x.shape[0] % ROWS
        x = F.pad(x.to(fp[0].device, dtype), (0, 0, 0, pad))
        with torch.no_grad():
            x_target = x if xt is None else F.pad(xt[e].to(fp[0].device, dtype), (0, 0, 0, pad))
            target = swiglu(x_target, *(w[e] for w in fp)).float()
        y = swiglu(x, *leaves[e]).float()
        if gs is None:
            loss = ((y - target) ** 2).sum() / (target**2).sum().clamp(min=1e-12)
        else:
            w = F.pad(gs[e].to(y.device, torch.float32), (0, pad))[:, None] ** 2
            loss = (w * (y - target) ** 2).sum() / (w * target**2).sum().clamp(min=1e-12)
        loss.backward()
        losses[e] = loss.detach()
    grads = [torch.stack([leaf[p].grad if leaf[p].grad is not None else torch.zeros_like(leaf[p]) for leaf in leaves])
             for p in range(3)]
    del leaves
    opt.zero_grad(set_to_none=True)
    torch.autograd.backward(soft, grads)
    del soft, grads
    opt.step(active=torch.tensor([x.shape[0] > 0 for x in xs]))
    return losses


@torch.no_grad()
def output_errors(x: torch.Tensor, fp: tuple, qs: list) -> tuple:
    """Summed squared output error of the experts with weights q (each of `qs`) against fp on tokens x,
    and the summed squared target: the terms of the relative output MSE, to add up over minibatches."""
    target = swiglu(x, *fp).float()
    return [((swiglu(x, *q).float() - target) ** 2).sum().item() for q in qs], (target**2).sum().item()


def relative_error(x: torch.Tensor, fp: tuple, q: tuple) -> float:
    """Relative output MSE of experts with weights q against fp on tokens x `[E, T, H]`."""
    (err,), ref = output_errors(x, fp, [q])
    return err / max(ref, 1e-12)
