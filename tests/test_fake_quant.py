"""Fused Gumbel-Softmax fake-quant kernels against their plain-torch references (interpreter on CPU).

Shapes are small and odd: in = 128 * 3, out = 13 (not a multiple of the row block), 2 experts. On a
GPU machine the inputs live on the GPU, so the compiled kernels are what is tested.
"""

import math

import pytest
import torch

from gsq.gptq import Grid
from gsq.kernels import fake_quant as FQ

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GRID = torch.tensor([-2.0, -1.0, 0.0, 1.0], device=DEV)
E, OUT, IN, G = 2, 13, 384, 128
TAU, KAPPA = 0.7, 3.0


def problem(dtype=torch.float32, seed=0, levels=4, device=DEV):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(E, OUT, IN, levels, generator=gen).to(device, dtype)
    scales = (torch.randn(E, OUT, IN // G, generator=gen) * 0.05).to(device)  # signed, as GSQ learns them
    noise = FQ.gumbel_ref(torch.tensor([11, 12]), (OUT, IN, levels), device)
    return logits, scales, noise


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_matches_reference_given_the_same_noise(dtype):
    logits, scales, noise = problem(dtype)
    got = FQ.soft_weights(logits, scales, GRID, TAU, KAPPA, [1, 2], noise=noise, out_dtype=torch.float32)
    want = FQ.soft_weights_ref(logits, scales, GRID, TAU, KAPPA, noise, out_dtype=torch.float32)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_matches_reference_given_the_same_noise(dtype):
    logits, scales, noise = problem(dtype)
    logits.requires_grad_(True)
    scales.requires_grad_(True)
    upstream = torch.randn(E, OUT, IN, generator=torch.Generator().manual_seed(5)).to(DEV)
    w = FQ.soft_weights(logits, scales, GRID, TAU, KAPPA, [1, 2], noise=noise, out_dtype=torch.float32)
    w.backward(upstream)
    dlogits, dscales = FQ.soft_weights_bwd_ref(upstream, logits.detach(), scales.detach(), GRID, TAU, KAPPA, noise)
    assert logits.grad.dtype == dtype and not logits.grad.float().isnan().any()
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-3)
    torch.testing.assert_close(logits.grad, dlogits, **tol)
    torch.testing.assert_close(scales.grad, dscales, rtol=1e-4, atol=1e-5)


INT3 = torch.arange(-4.0, 4.0)
TABLES = {"int4": (torch.arange(-8.0, 8.0), G), "nvfp4": (Grid(4, "nvfp4").levels(), 16)}


@pytest.mark.parametrize("local_shifts", [False, True])
def test_reference_gradient_matches_autograd_in_float64(local_shifts):
    gen = torch.Generator().manual_seed(7)
    grid, base, table, levels = (GRID.cpu(), None, None, 4) if not local_shifts else (torch.arange(-2.0, 3.0), None, INT3, 5)
    if local_shifts:  # 3-bit codes' indices 0..7 moved by -2..+2; shifts that leave the table are excluded
        base = torch.randint(0, 8, (1, 5, 256), generator=gen, dtype=torch.int8)
    logits = torch.randn(1, 5, 256, levels, generator=gen, dtype=torch.float64, requires_grad=True)
    scales = torch.randn(1, 5, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(1, 5, 256, levels, generator=gen, dtype=torch.float64)
    upstream = torch.randn(1, 5, 256, generator=gen, dtype=torch.float64)
    w = FQ.soft_weights_ref(logits, scales, grid, TAU, KAPPA, noise, base, table)
    w.backward(upstream)
    dlogits, dscales = FQ.soft_weights_bwd_ref(upstream, logits.detach(), scales.detach(), grid, TAU, KAPPA,
                                               noise, base, table)
    torch.testing.assert_close(dlogits, logits.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dscales, scales.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", TABLES)
def test_local_shifts_kernel_matches_reference(name):
    # the level set is data: the same kernel over the 4-bit integer levels and over NVFP4's (groups of 16)
    table, group = TABLES[name]
    gen = torch.Generator().manual_seed(9)
    grid = torch.arange(-2.0, 3.0, device=DEV)
    logits = torch.randn(E, OUT, IN, 5, generator=gen).to(DEV).requires_grad_(True)
    scales = torch.randn(E, OUT, IN // group, generator=gen).to(DEV).requires_grad_(True)
    base = torch.randint(0, table.numel(), (E, OUT, IN), generator=gen, dtype=torch.int8).to(DEV)
    noise = FQ.gumbel_ref(torch.tensor([3, 4]), (OUT, IN, 5), DEV)
    upstream = torch.randn(E, OUT, IN, generator=gen).to(DEV)
    w = FQ.soft_weights(logits, scales, grid, TAU, KAPPA, [3, 4], base, table, noise=noise)
    w.backward(upstream)
    want = FQ.soft_weights_ref(logits.detach(), scales.detach(), grid, TAU, KAPPA, noise, base, table)
    dlogits, dscales = FQ.soft_weights_bwd_ref(upstream, logits.detach(), scales.detach(), grid, TAU, KAPPA,
                                               noise, base, table)
    torch.testing.assert_close(w.detach(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits.grad, dlogits, rtol=1e-4, atol=1e-4)  # unit-size scales here
    torch.testing.assert_close(scales.grad, dscales, rtol=1e-4, atol=1e-4)
    codes, deq = FQ.hard_codes(logits.detach(), scales.detach(), grid, base, table)
    want_codes, want_deq = FQ.hard_codes_ref(logits.detach(), scales.detach(), grid, base, table)
    assert torch.equal(codes, want_codes) and torch.equal(deq, want_deq)
    index = torch.searchsorted(table.to(DEV), codes.float().contiguous())
    assert torch.equal(table.to(DEV)[index], codes.float()) and (index - base.long()).abs().max() <= 2


def test_drawn_noise_is_bit_identical_in_forward_and_backward():
    # The kernels draw noise from (seed, index); feeding that same noise in from memory must give
    # bit-identical results in both passes, so both passes drew exactly the dumped noise.
    logits, scales, _ = problem()
    seeds = [123, 456]
    noise = FQ.gumbel_noise(seeds, (OUT, IN, 4), DEV)
    upstream = torch.randn(E, OUT, IN, generator=torch.Generator().manual_seed(1)).to(DEV)
    results = []
    for injected in (None, noise):
        x, s = logits.clone().requires_grad_(True), scales.clone().requires_grad_(True)
        w = FQ.soft_weights(x, s, GRID, TAU, KAPPA, seeds, noise=injected)
        w.backward(upstream)
        results.append((w.detach(), x.grad, s.grad))
    for drawn, stored in zip(*results):
        assert torch.equal(drawn, stored)
    # It is Gumbel(0, 1) noise (mean = Euler's gamma, variance pi^2 / 6), different per expert.
    assert abs(noise.mean().item() - 0.5772) < 0.02 and abs(noise.var().item() - math.pi**2 / 6) < 0.05
    assert not torch.equal(noise[0], noise[1])
    assert torch.equal(FQ.gumbel_noise(seeds, (OUT, IN, 4), DEV), noise)


def test_batched_experts_equal_one_launch_per_expert():
    logits, scales, _ = problem()
    batched = FQ.soft_weights(logits, scales, GRID, TAU, KAPPA, [5, 6])
    for e, seed in enumerate([5, 6]):
        assert torch.equal(FQ.soft_weights(logits[e], scales[e], GRID, TAU, KAPPA, seed), batched[e])


def test_low_temperature_gives_the_hard_weights():
    logits, scales, _ = problem()
    codes, deq = FQ.hard_codes(logits, scales, GRID)
    soft = FQ.soft_weights(logits, scales, GRID, tau=1e-3, kappa=1e4, seeds=[1, 2])
    torch.testing.assert_close(soft, deq, rtol=0, atol=1e-6)
    assert set(codes.unique().tolist()) <= {-2, -1, 0, 1}


def test_hard_codes_kernel_matches_reference():
    logits, scales, _ = problem(torch.bfloat16)
    codes, deq = FQ.hard_codes(logits, scales, GRID)
    want_codes, want_deq = FQ.hard_codes_ref(logits, scales, GRID)
    assert codes.dtype == torch.int8 and torch.equal(codes, want_codes)
    assert torch.equal(deq, want_deq)
    assert torch.equal(FQ.hard_codes(logits[1], scales[1], GRID)[0], codes[1])  # 2-D input


def test_cpu_fallback_is_the_reference(monkeypatch):
    monkeypatch.setattr(FQ, "INTERPRET", False)
    logits, scales, _ = problem(device="cpu")
    logits.requires_grad_(True)
    scales.requires_grad_(True)
    grid = GRID.cpu()
    w = FQ.soft_weights(logits, scales, grid, TAU, KAPPA, [8, 9])
    noise = FQ.gumbel_ref(torch.tensor([8, 9]), (OUT, IN, 4))
    torch.testing.assert_close(w, FQ.soft_weights_ref(logits, scales, grid, TAU, KAPPA, noise))
    upstream = torch.ones_like(w)
    w.backward(upstream)
    dlogits, dscales = FQ.soft_weights_bwd_ref(upstream, logits.detach(), scales.detach(), grid, TAU, KAPPA, noise)
    torch.testing.assert_close(logits.grad, dlogits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scales.grad, dscales, rtol=1e-5, atol=1e-6)


def test_bad_shapes_are_refused():
    logits, scales, _ = problem()
    with pytest.raises(ValueError, match="one seed per expert"):
        FQ.soft_weights(logits, scales, GRID, TAU, KAPPA, [1])
    with pytest.raises(ValueError, match="grid has 3 levels"):
        FQ.soft_weights(logits, scales, GRID[:3], TAU, KAPPA, [1, 2])
    with pytest.raises(ValueError, match="do not fit"):
        FQ.soft_weights(logits, scales[:, :5], GRID, TAU, KAPPA, [1, 2])
    with pytest.raises(ValueError, match="power of two, got 192"):
        FQ.soft_weights(logits, scales[:, :, :2], GRID, TAU, KAPPA, [1, 2])
