"""The algorithm on synthetic experts: scale search, GPTQ vs RTN, GSQ vs its init, batching, schedules,
steps on minibatches where an expert may receive no token."""

import pytest
import torch

from gsq import gptq
from gsq.config import Config
from gsq.kernels import fake_quant
from gsq.adapter import swiglu
from gsq.quantizer import ExpertLogits, Lion, cosine, dequant, init_logits, linear, optimizer, relative_error, step


@pytest.fixture(autouse=True)
def torch_reference_path(monkeypatch):
    # Optimisation tests run the CPU reference path (the interpreter would take minutes); the kernels
    # themselves are checked against that reference in test_fake_quant.py.
    monkeypatch.setattr(fake_quant, "INTERPRET", False)


def correlated_inputs(n, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=gen) / dim**0.5 + torch.eye(dim)
    return torch.randn(n, dim, generator=gen) @ mix


def test_signed_scale_search_uses_the_negative_side():
    # Values {-1, 0, 1, 2} fit the grid {-2, -1, 0, 1} exactly with s = -1, not with any s > 0.
    W = torch.tensor([-1.0, 0.0, 1.0, 2.0] * 32)[None]
    s = gptq.mse_scales(W, gptq.Grid(2), group=128)
    assert s.item() == pytest.approx(-1.0)
    assert torch.equal(dequant(gptq.rtn(W, s, gptq.Grid(2)), s), W)


def test_gptq_beats_rtn_on_the_layer_output():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(64, 256, generator=gen) * 0.02
    X = correlated_inputs(2048, 256, seed=1)
    s = gptq.mse_scales(W, gptq.Grid(2), 128)
    q_rtn = dequant(gptq.rtn(W, s, gptq.Grid(2)), s)
    codes, scales = gptq.gptq(W, X.T @ X, gptq.Grid(2), 128)
    assert codes.min() >= -2 and codes.max() <= 1
    err = lambda Q: ((X @ (Q - W).T) ** 2).sum().item()
    assert err(dequant(codes, scales)) < 0.7 * err(q_rtn)


def test_init_logits_argmax_is_the_init_code():
    codes = torch.randint(-2, 2, (8, 256), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    grid = gptq.Grid(2).levels()
    logits = init_logits(codes, grid, sigma=0.01, alpha=60.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(grid[logits.argmax(-1)].to(torch.int8), codes)
    assert logits.mean(-1).abs().max() < 0.05  # centred over the levels (up to the noise)


def test_schedules():
    assert linear(2.0, 0.05, 0, 10) == 2.0 and linear(2.0, 0.05, 9, 10) == pytest.approx(0.05)
    assert cosine(0, 10, 0.1) == 1.0 and cosine(9, 10, 0.1) == pytest.approx(0.1)


def test_lion_step_is_sign_of_interpolated_momentum():
    p = torch.nn.Parameter(torch.tensor([1.0, -1.0, 0.5]))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=1.0)
    p.grad = torch.tensor([2.0, -3.0, 0.0])
    opt.step()  # m = 0: update = sign(0.1 * g); p = p * (1 - 0.1) - 0.1 * sign
    torch.testing.assert_close(p.data, torch.tensor([0.8, -0.8, 0.45]))


def experts_problem(E=3, H=128, inter=128, n=600, seed=0):
    gen = torch.Generator().manual_seed(seed)
    fp = [tuple(torch.randn(*shape, generator=gen) * 0.05 for shape in ((inter, H), (inter, H), (H, inter)))
          for _ in range(E)]
    xs = [correlated_inputs(n + 37 * e, H, seed + e) for e in range(E)]
    init = []
    for e in range(E):
        projs = []
        for W, X in zip(fp[e], (xs[e], xs[e], torch.nn.functional.silu(xs[e] @ fp[e][0].T) * (xs[e] @ fp[e][1].T))):
            projs.append(gptq.gptq(W, X.T @ X, gptq.Grid(2), 128))
        init.append(projs)
    return fp, xs, init


def minibatch(xs, e, t, skip=()):
    """Expert e's tokens in step t: a varying slice of its inputs (none in the steps listed in `skip`)."""
    if t in skip:
        return xs[e][:0]
    n = 200 + 37 * ((t * 7 + e) % 5)
    start = (t * 131) % (xs[e].shape[0] - n)
    return xs[e][start : start + n]


def train(fp, xs, init, experts, cfg, steps=60, skip=None):
    """GSQ on `experts` together, each seeing `minibatch` tokens; `skip[e]`: steps where e gets none."""
    codes = [torch.stack([init[e][p][0] for e in experts]) for p in range(3)]
    scales = [torch.stack([init[e][p][1] for e in experts]) for p in range(3)]
    module = ExpertLogits(codes, scales, gptq.Grid(2), cfg.init_sigma, cfg.init_alpha,
                          [(0, 0, 100 + e) for e in experts])
    weights = tuple(torch.stack([fp[e][p] for e in experts]) for p in range(3))
    opt = optimizer(module, cfg)
    for t in range(steps):
        step(module, opt, [minibatch(xs, e, t, (skip or {}).get(e, ())) for e in experts], weights, t, steps, cfg,
             torch.float32)
    return module, module.hard(torch.float32)


CFG = Config(lr_logits=1e-3, lr_scales=1e-4, init_alpha=6.0)


def test_gsq_beats_its_gptq_init():
    fp, xs, init = experts_problem()
    _, hard = train(fp, xs, init, [0, 1, 2], CFG)
    for e in range(3):
        x = xs[e][None]
        ref = tuple(w[None] for w in fp[e])
        err_init = relative_error(x, ref, tuple(dequant(c, s)[None] for c, s in init[e]))
        err_gsq = relative_error(x, ref, tuple(dequant(hard[p][0][e], hard[p][1][e])[None] for p in range(3)))
        assert err_gsq < 0.8 * err_init, (e, err_init, err_gsq)


def test_batched_experts_equal_one_by_one():
    # Lion is elementwise and experts share no state: a batch gives exactly the per-expert result, also
    # when the experts receive different token counts and one of them none in some steps.
    fp, xs, init = experts_problem(E=2, n=300)
    skip = {1: (2, 3, 9)}
    _, both = train(fp, xs, init, [0, 1], CFG, steps=15, skip=skip)
    for e in (0, 1):
        _, alone = train(fp, xs, init, [e], CFG, steps=15, skip=skip)  # same expert seed (100 + e) either way
        for p in range(3):
            assert torch.equal(both[p][0][e], alone[p][0][0])
            assert torch.equal(both[p][1][e], alone[p][1][0])


def test_swiglu_matches_the_expert_formula():
    fp, xs, _ = experts_problem(E=1, n=10)
    g, u, d = fp[0]
    x = xs[0]
    want = (torch.nn.functional.silu(x @ g.T) * (x @ u.T)) @ d.T
    torch.testing.assert_close(swiglu(x[None], g[None], u[None], d[None])[0], want)


def test_an_expert_without_tokens_does_not_move():
    # the minibatch sent expert 1 nothing: its logits, scales and Lion momentum stay exactly as they were
    fp, xs, init = experts_problem(E=2, n=300)
    module, _ = train(fp, xs, init, [0, 1], CFG, steps=3)
    before = [t.detach().clone() for t in [*module.logits, *module.scales]]
    opt = optimizer(module, CFG)
    for p in [*module.logits, *module.scales]:
        opt.state[p]["m"] = torch.randn(p.shape, generator=torch.Generator().manual_seed(3))
    momentum = [opt.state[p]["m"].clone() for p in [*module.logits, *module.scales]]
    weights = tuple(torch.stack([fp[e][p] for e in (0, 1)]) for p in range(3))
    losses = step(module, opt, [minibatch(xs, 0, 5), xs[1][:0]], weights, 5, 10, CFG, torch.float32)
    assert losses[1].isnan() and losses[0] > 0
    after = [*module.logits, *module.scales]
    for old, new, m, p in zip(before, after, momentum, after):
        assert torch.equal(old[1], new.detach()[1]) and torch.equal(m[1], opt.state[p]["m"][1])  # expert 1
        assert not torch.equal(old[0], new.detach()[0])  # expert 0 stepped


def test_minibatches_are_seeded_epochs_of_blocks():
    from gsq.experts import minibatches

    batches = minibatches(5, 2, 6, seed=1)
    assert len(batches) == 6 and all(len(b) == 2 for b in batches)
    flat = [b for batch in batches for b in batch]
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))  # epochs
    assert batches == minibatches(5, 2, 6, seed=1) and batches != minibatches(5, 2, 6, seed=2)
    assert minibatches(5, 2, 0, seed=1) == []


def test_router_weighted_loss_counts_each_token_by_its_weight_squared():
    """--token-weights router: a token of weight 0 adds nothing, scaling every weight changes nothing, and
    weights {0, 1} give the uniform loss of the weight-1 tokens."""
    fp, xs, init = experts_problem(E=1, n=300)
    x = minibatch(xs, 0, 4)
    keep = torch.arange(x.shape[0]) % 3 != 0
    weights = tuple(w[None] for w in fp[0])

    def loss(tokens, g):
        module = ExpertLogits([init[0][p][0][None] for p in range(3)], [init[0][p][1][None] for p in range(3)],
                              gptq.Grid(2), CFG.init_sigma, CFG.init_alpha, [(0, 0, 100)])
        return step(module, optimizer(module, CFG), [tokens], weights, 4, 10, CFG, torch.float32,
                    None if g is None else [g])[0].item()

    subset = loss(x[keep], None)
    assert loss(x, keep.float()) == pytest.approx(subset, rel=1e-5)
    assert loss(x, 0.3 * keep.float()) == pytest.approx(subset, rel=1e-5)
    assert loss(x, torch.rand(x.shape[0], generator=torch.Generator().manual_seed(0))) != pytest.approx(subset, rel=1e-3)
