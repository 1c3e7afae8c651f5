"""NVFP4 (`--format nvfp4`): the E2M1 grid and its rounding as compressed-tensors defines them, the FP8 group
scales, and a written checkpoint read back by compressed-tensors' own NVFP4 decompressor, gsq.inspect and
gsq.eval."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8
from compressed_tensors.quantization import QuantizationScheme
from compressed_tensors.quantization.quant_args import FP4_E2M1_DATA
from compressed_tensors.utils.match import match_name
from conftest import CALIB_DATA, FAST, ROOT, TINY_MODEL, WIKI_TEST, quantize
from safetensors import safe_open

import replicas

from gsq.gptq import Grid, global_scales, mse_scales, rtn
from gsq.kernels.pack import fp4_pack, fp4_unpack
from gsq.quantizer import ExpertLogits, dequant

GRID = Grid(4, "nvfp4")


def test_rounding_is_compressed_tensors_e2m1():
    # every tie between two levels, points just off them, the ends and beyond: gsq holds E2M1 values doubled
    x = torch.tensor([0.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.2501, 0.7499, 2.4999, 5.0001, 6.0, 7.5, 100.0])
    x = torch.cat([x, -x, torch.linspace(-7, 7, 1001)])
    want = FP4_E2M1_DATA.cast_to_fp4(x)
    assert torch.equal(GRID.nearest(2 * x).float() / 2, want)
    assert GRID.levels().numel() == 15 and torch.equal(GRID.levels(), GRID.levels().sort().values)


def test_packing_is_compressed_tensors_bytes():
    codes = GRID.levels().to(torch.int8)[torch.randint(0, 15, (6, 64), generator=torch.Generator().manual_seed(0))]
    codes[codes == 0] = 1  # compressed-tensors writes a rounded-to-zero value as -0 (0x8); gsq writes +0
    theirs = pack_fp4_to_uint8(codes.float() / 2)
    assert torch.equal(fp4_pack(codes), theirs) and torch.equal(fp4_unpack(theirs), codes)


def test_scale_search_beats_compressed_tensors_amax_scales():
    # the MSE search over FP8 scales against compressed-tensors' own choice (amax / 6 per group, FP8-rounded)
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(1)) * 0.02
    g = global_scales(W, W, W)[0]
    ours = mse_scales(W, GRID, 16, global_scale=g)
    assert torch.equal(GRID.round_scales(ours, g), ours)  # already as stored: FP8 x the global scale
    amax = W.unflatten(-1, (-1, 16)).abs().amax(-1)
    theirs = GRID.round_scales(amax / 12, g)  # doubled levels: half the stored scale
    err = [(W - dequant(rtn(W, s, GRID), s)).pow(2).sum() for s in (ours, theirs)]
    assert err[0] < 0.95 * err[1]


def test_a_group_with_a_zero_scale_gets_zero_codes():
    # an all-zero group and one too small for FP8 beside its tensor's largest weight both store scale 0
    W = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    W[1, 16:32], W[2, :16] = 0.0, 1e-9
    g = global_scales(W, W, W)[0]
    s = mse_scales(W, GRID, 16, global_scale=g)
    assert s[1, 1] == 0 and s[2, 0] == 0
    codes = rtn(W, s, GRID)
    assert not codes[1, 16:32].any() and torch.equal(dequant(codes, s)[2, :16], torch.zeros(16))
    assert not GRID.nearest(torch.tensor([float("nan")])).any()


def test_rounded_scales_train_through_the_fp8_rounding():
    gen = torch.Generator().manual_seed(2)
    codes = [GRID.levels().to(torch.int8)[torch.randint(2, 13, (2, 8, 32), generator=gen)] for _ in range(3)]
    scales = [torch.rand(2, 8, 2, generator=gen) * 0.01 + 0.001 for _ in range(3)]
    g = [torch.tensor([300.0, 500.0])] * 3
    module = ExpertLogits(codes, scales, GRID, 0.01, 6.0, [(0, 1, 0), (0, 1, 1)], global_scales=g, rounded=True)
    s = module.scales[0]
    used = module.stored(s, g[0])
    assert torch.equal(used, GRID.round_scales(s.detach(), g[0])) and not torch.equal(used, s.detach())
    used.sum().backward()
    assert torch.equal(s.grad, torch.ones_like(s))  # straight through
    hard = module.hard(torch.bfloat16)[0]
    assert torch.equal(hard.scales, used.detach()) and torch.equal(GRID.round_scales(hard.scales, g[0]), hard.scales)


@pytest.fixture(scope="module", params=["tiny-deepseek-v3", "minimax_m2"])
def nvfp4(request, tmp_path_factory):
    """`make compress ... ARGS="--format nvfp4"`: REAP to 4 experts, then learned NVFP4 experts (GSQ and the scale
    fine-tune); on a bundled model and on the MiniMax-M2 replica as shipped (block FP8, a router correction bias)."""
    tmp = tmp_path_factory.mktemp(request.param)
    model = TINY_MODEL if request.param == "tiny-deepseek-v3" else replicas.minimax_m2_fp8(tmp / "src")
    small = " ".join([*CALIB_DATA, "--num-samples", "16", "--seqlen", "128"])
    proc = subprocess.run(["make", "-s", "compress", f"MODEL={model}", "KEEP=4", f"PRUNED={tmp / 'reap4'}",
                           f"VENV={Path(sys.executable).parent.parent}", f"PRUNE_ARGS={small}",
                           f"ARGS={' '.join(FAST)} --format nvfp4"], cwd=ROOT, capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})  # the torch path on CPU
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return model, tmp / "reap4-gsq-nvfp4"


def tensors(path):
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys() if ".experts." in k})
    return out


def test_decompressor_and_gsq_agree_bit_for_bit_on_every_expert(nvfp4):
    model, out = nvfp4
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    group = next(g for g in qc["config_groups"].values() if g["format"] == "nvfp4-pack-quantized")
    scheme = QuantizationScheme.model_validate(group)
    t = tensors(out)
    keys = sorted(k[: -len(".weight_packed")] for k in t if k.endswith(".weight_packed"))
    moe = json.loads((out / "gsq_run.json").read_text())["layers"]
    assert len(keys) == sum(layer.get("moe", False) for layer in moe) * 4 * 3 and keys
    distinct = set()
    for key in keys:
        assert any(match_name(key, target) for target in group["targets"])
        parts = {p: t[f"{key}.{p}"] for p in ("weight_packed", "weight_scale", "weight_global_scale")}
        assert parts["weight_packed"].dtype == torch.uint8 and parts["weight_scale"].dtype == torch.float8_e4m3fn
        dense = NVFP4PackedCompressor.decompress(dict(parts), scheme)["weight"]
        codes = fp4_unpack(parts["weight_packed"])  # gsq's reading: doubled codes, half the stored scale
        held = parts["weight_scale"].float() / parts["weight_global_scale"] / 2
        assert torch.equal(dense, dequant(codes, held).to(torch.bfloat16)), key
        distinct.update(codes.unique().tolist())
        gate, up = ("gate_proj", "up_proj") if key.endswith("_proj") else ("w1", "w3")
        if key.endswith(gate):  # vLLM's fused MoE reads the gate projection's global scale for gate and up
            assert torch.equal(parts["weight_global_scale"], t[key[: -len(gate)] + up + ".weight_global_scale"])
    assert len(distinct) > 8  # the float grid's levels, not a 3-bit subset


def test_inspect_and_eval_read_it(nvfp4):
    model, out = nvfp4
    proc = subprocess.run([sys.executable, "-m", "gsq.inspect", str(out), "--json"], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["bits"] == "fp4" and report["group_size"] == 16
    assert report["quantized"]["bits_per_weight"] == pytest.approx(4.5, abs=0.02)
    watch = json.loads((out / "gsq_run.json").read_text())["ppl"]
    proc = subprocess.run([sys.executable, "-m", "gsq.eval", "--model", str(out), "--reference", str(model),
                           "--data-file", str(WIKI_TEST), "--seqlen", "128", "--max-windows", "4", "--json"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert 0 < result["kl"] < 2 and 0.3 < result["top1"] <= 1
    if watch:  # the bundled model's run watched its perplexity: transformers alone would not decode the experts
        assert abs(result["ppl"] - watch[-1]["ppl"]) < 0.01 * watch[-1]["ppl"]


@pytest.mark.parametrize("flags, says", [(["--bits", "2"], "drop --bits 2"), (["--bits-budget", "2.5"], "drop --bits-budget"),
                                         (["--group-size", "32"], "drop --group-size 32")])
def test_nvfp4_refuses_settings_it_fixes(tmp_path, flags, says):
    proc = quantize("--out", str(tmp_path / "x"), "--format", "nvfp4", *flags, "--dry-run", model=TINY_MODEL)
    assert proc.returncode != 0 and says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
