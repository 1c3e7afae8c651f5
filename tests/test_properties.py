"""Property-based tests (hypothesis): pack/unpack, the grid maths and the export on random shapes and
values, each checked against compressed-tensors or a bound that must always hold."""

import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from hypothesis import given, settings
from hypothesis import strategies as st

from gsq import export, gptq
from gsq.kernels import pack as P
from gsq.kernels.fake_quant import soft_weights_ref

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
seeds = st.integers(0, 2**31 - 1)


def codes_of(shape, bits, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), shape, generator=gen, dtype=torch.int8)


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), rows=st.integers(1, 9), cols=st.integers(1, 300), lead=st.integers(1, 3),
       seed=seeds)
def test_pack_round_trips_and_matches_compressed_tensors(bits, rows, cols, lead, seed):
    codes = codes_of((lead, rows, cols), bits, seed)
    words = P.pack(codes.to(DEV), bits).cpu()  # the Triton kernel (interpreter on a CPU)
    assert torch.equal(words, pack_to_int32(codes, bits))
    assert words.shape[-1] == -(-cols * bits // 32)
    assert torch.equal(P.unpack(words.to(DEV), bits, cols).cpu(), codes)
    assert torch.equal(unpack_from_int32(words, bits, codes.shape), codes)


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4]), rows=st.integers(1, 6), groups=st.integers(1, 4),
       group=st.sampled_from([16, 32, 128]), spread=st.floats(1e-3, 1e3), seed=seeds)
def test_rtn_codes_are_in_range_and_nearest(bits, rows, groups, group, spread, seed):
    gen = torch.Generator().manual_seed(seed)
    W = spread * torch.randn(rows, groups * group, generator=gen)
    s = gptq.mse_scales(W, gptq.Grid(bits), group, steps=8)
    q = gptq.rtn(W, s, gptq.Grid(bits))
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    assert q.dtype == torch.int8 and q.min() >= qmin and q.max() <= qmax
    full = s.repeat_interleave(group, -1)
    inside = ((W / full) >= qmin - 0.5) & ((W / full) <= qmax + 0.5)
    err = (W - full * q.float()).abs()
    assert (err[inside] <= full.abs()[inside] * (0.5 + 1e-5)).all()  # nearest level inside the range
    assert torch.equal(q[~inside], torch.where(W / full > 0, qmax, qmin)[~inside].to(torch.int8))  # else clamped


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4]), rows=st.integers(1, 6), groups=st.integers(1, 3), seed=seeds)
def test_scale_search_never_loses_to_the_range_fitting_scale(bits, rows, groups, seed):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, groups * 32, generator=gen) * torch.rand(rows, 1, generator=gen)
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    Wg = W.unflatten(-1, (-1, 32))
    plain = torch.maximum(Wg.amax(-1) / qmax, Wg.amin(-1) / qmin).clamp(min=1e-8)  # absmax-style, positive
    searched = gptq.mse_scales(W, gptq.Grid(bits), 32, steps=20, norm=2.0)

    def sq_err(s):
        return ((W - s.repeat_interleave(32, -1) * gptq.rtn(W, s, gptq.Grid(bits)).float()) ** 2).unflatten(-1, (-1, 32)).sum(-1)

    assert (sq_err(searched) <= sq_err(plain) * (1 + 1e-5) + 1e-12).all()


@settings(max_examples=60, deadline=None)
@given(out=st.integers(1, 5), groups=st.integers(1, 3), tau=st.floats(0.01, 5.0), kappa=st.floats(1.0, 500.0),
       seed=seeds)
def test_soft_weights_stay_between_the_extreme_levels(out, groups, tau, kappa, seed):
    gen = torch.Generator().manual_seed(seed)
    grid = gptq.Grid(2).levels()
    logits = torch.randn(1, out, groups * 16, 4, generator=gen)
    scales = torch.randn(1, out, groups, generator=gen)
    noise = torch.rand(logits.shape, generator=gen).clamp(1e-6, 1 - 1e-6)
    w = soft_weights_ref(logits, scales, grid, tau, kappa, noise, out_dtype=torch.float32)
    s = scales.repeat_interleave(16, -1)
    lo, hi = torch.minimum(-2 * s, 1 * s), torch.maximum(-2 * s, 1 * s)
    assert torch.isfinite(w).all() and (w >= lo - 1e-5).all() and (w <= hi + 1e-5).all()


@settings(max_examples=25, deadline=None)
@given(out=st.integers(1, 8), groups=st.integers(1, 3), group=st.sampled_from([32, 128]),
       container=st.sampled_from([2, 4]), seed=seeds)
def test_exported_tensors_decompress_to_scale_times_code(out, groups, group, container, seed):
    codes = codes_of((out, groups * group), 2, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    scales = torch.randn(out, groups, generator=gen).to(torch.bfloat16)
    tensors = export.expert_tensors("m", export.packed(codes, scales, gptq.Grid(2)), container)
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=container, type="int", symmetric=True, strategy="group", group_size=group))
    dense = PackedQuantizationCompressor.decompress({k[2:]: v for k, v in tensors.items()}, scheme)["weight"]
    want = (scales.float().repeat_interleave(group, -1) * codes.float()).to(torch.bfloat16)
    assert dense.dtype == torch.bfloat16 and torch.equal(dense, want)
