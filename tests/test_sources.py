"""Sources other than a plain bf16 DeepSeek-V3: a compressed-tensors int4 checkpoint (how Kimi-K2.5
ships its experts), read by dequantizing each layer's experts while streaming."""

import json
import re
import shutil

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from conftest import FAST, TINY_MODEL, quantize

from gsq import stream
from gsq.kernels.pack import unpack_ref

EXPERT = re.compile(r"model\.layers\.\d+\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight")


def int4_copy(dst):
    """The tiny model with every routed expert stored as Kimi-K2.5 does: int4 symmetric, group 32,
    pack-quantized, written by compressed-tensors' own compressor."""
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=32))
    tensors, originals = {}, {}
    for name, w in load_file(TINY_MODEL / "model.safetensors").items():
        if not EXPERT.fullmatch(name):
            tensors[name] = w
            continue
        originals[name] = w
        scale = (w.float().unflatten(-1, (-1, 32)).abs().amax(-1) / 7).clamp(min=1e-8).to(w.dtype)
        packed = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale}, scheme)
        tensors.update({f"{name[:-len('.weight')]}.{k}": v for k, v in packed.items()})
    dst.mkdir()
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    for f in TINY_MODEL.iterdir():
        if f.name.startswith("tokenizer") or f.name == "generation_config.json":
            shutil.copy(f, dst / f.name)
    config = json.loads((TINY_MODEL / "config.json").read_text())
    non_expert = sorted({n[: -len(".weight")] for n in tensors if n.endswith(".weight") and "mlp.experts" not in n
                         and "norm" not in n and "embed" not in n})
    config["quantization_config"] = QuantizationConfig(
        config_groups={"group_0": scheme}, format="pack-quantized", ignore=non_expert).model_dump()
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return originals


@pytest.fixture(scope="module")
def int4_source(tmp_path_factory):
    dst = tmp_path_factory.mktemp("src") / "tiny-int4"
    return dst, int4_copy(dst)


def test_streaming_dequantizes_int4_experts(int4_source):
    src, originals = int4_source
    ckpt = stream.Checkpoint(src)
    assert set(ckpt.keys()) == set(load_file(TINY_MODEL / "model.safetensors"))  # logical names: dense P.weight
    name = "model.layers.3.mlp.experts.5.down_proj.weight"
    w = ckpt.load([name])[name]
    with safe_open(src / "model.safetensors", "pt") as f:  # independent dequant: our unpacker, scale * code
        packed, scale = f.get_tensor(name[:-7] + ".weight_packed"), f.get_tensor(name[:-7] + ".weight_scale")
    codes = unpack_ref(packed, 4, w.shape[-1])
    assert torch.equal(w.float(), (scale.float().repeat_interleave(32, -1) * codes.float()).to(w.dtype).float())
    err = (w.float() - originals[name].float()).abs()
    assert (err <= scale.float().repeat_interleave(32, -1) / 2 + 1e-3).all()  # int4 rounding, nothing worse
    assert len(set(codes.unique().tolist()) - set(range(-8, 8))) == 0 and codes.unique().numel() > 8


def test_quantize_from_int4_source(int4_source, tmp_path):
    src, _ = int4_source
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    out = tmp_path / "w2"
    proc = quantize("--out", str(out), *FAST, model=src)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # source untouched
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] == 2
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.2.mlp.experts.1.gate_proj"
    assert f"{key}.weight_packed" in index and f"{key}.weight" not in index
    with safe_open(out / index[f"{key}.weight_packed"], "pt") as f:
        assert f.get_tensor(f"{key}.weight_packed").shape == (128, 256 * 2 // 32)  # 2-bit words now
    attn = "model.layers.2.self_attn.o_proj.weight"
    with safe_open(out / index[attn], "pt") as f, safe_open(src / "model.safetensors", "pt") as g:
        assert torch.equal(f.get_tensor(attn), g.get_tensor(attn))

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    logits = model(torch.arange(1, 33)[None]).logits
    assert torch.isfinite(logits).all()
