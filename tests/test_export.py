"""The written checkpoint as others read it: compressed-tensors' own decompressor, the 2- and 4-bit
containers, and `python -m gsq.inspect`."""

import json
import subprocess
import sys

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from compressed_tensors.quantization import QuantizationScheme
from conftest import FAST, ROOT, TINY_MODEL, WIKI_TEST, quantize
from safetensors import safe_open


def inspect(path, *extra):
    proc = subprocess.run([sys.executable, "-m", "gsq.inspect", str(path), *extra], cwd=ROOT,
                          capture_output=True, text=True)
    return proc


def expert(path, key):
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(path / index[key + ".weight_packed"], "pt") as f:
        return {s: f.get_tensor(f"{key}.{s}") for s in ("weight_packed", "weight_scale", "weight_shape")}


@pytest.fixture(scope="module")
def container4(tmp_path_factory):
    out = tmp_path_factory.mktemp("c4") / "tiny-w2-c4"
    proc = quantize("--out", str(out), *FAST, "--container", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_compressed_tensors_decompressor_gives_our_weights(quantized):
    qc = json.loads((quantized / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme.model_validate(qc["config_groups"]["group_0"])
    for layer in (1, 6):
        for e in (0, 7):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                t = expert(quantized, f"model.layers.{layer}.mlp.experts.{e}.{proj}")
                dense = PackedQuantizationCompressor.decompress(t, scheme)["weight"]
                words = t["weight_packed"].to(torch.int64)  # 16 two-bit fields per word, offset by 2
                codes = ((words[..., None] >> (2 * torch.arange(16))) & 3).flatten(-2) - 2
                ours = t["weight_scale"].float().repeat_interleave(128, -1) * codes.float()
                assert dense.dtype == torch.bfloat16 and torch.equal(dense, ours.to(torch.bfloat16))


def test_containers_hold_the_same_codes_at_half_the_bytes(quantized, container4):
    for key in ("model.layers.2.mlp.experts.3.down_proj", "model.layers.5.mlp.experts.6.gate_proj"):
        a, b = expert(quantized, key), expert(container4, key)
        assert torch.equal(a["weight_scale"], b["weight_scale"])
        assert b["weight_packed"].shape[-1] == 2 * a["weight_packed"].shape[-1]
    r2 = json.loads(inspect(quantized, "--json").stdout)
    r4 = json.loads(inspect(container4, "--json").stdout)
    # 2 bits per code + one bf16 scale per 128 weights = 2.125 bits (no padding: rows are 128 or 256 wide)
    assert r2["quantized"]["bits_per_weight"] == 2.125 and r4["quantized"]["bits_per_weight"] == 4.125
    assert r2["quantized"]["weights"] == r4["quantized"]["weights"] == 6 * 8 * 3 * 128 * 256
    assert r2["quantized"]["max_distinct"] <= 4 and r4["quantized"]["max_distinct"] <= 4
    codes_bytes = [r["quantized"]["bytes"] - r["quantized"]["weights"] // 128 * 2 for r in (r2, r4)]
    assert codes_bytes[0] * 2 == codes_bytes[1]


def test_inspect_prints_layers_and_size(quantized):
    proc = inspect(quantized, "--original", str(TINY_MODEL))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert sum(line.split()[0].isdigit() for line in lines) == 6  # one row per MoE layer
    assert "2.125 bits/weight" in proc.stdout and "at most 4 codes per group" in proc.stdout
    assert "original" in lines[-2]
    # hidden 256, expert width 128, group 128: only TP 1 (each rank's share of the width would be 64)
    assert lines[-1].startswith("vLLM 0.33 loads it at tensor-parallel sizes: 1 (")
    bad = inspect(TINY_MODEL)
    assert bad.returncode == 2 and bad.stderr.strip() == \
        f"error: {TINY_MODEL} has no compressed-tensors quantization_config: nothing quantized to inspect"


def test_tensor_parallel_sizes_vllm_loads():
    from gsq.inspect import tensor_parallel_sizes

    def sizes(hidden, width, heads):
        return tensor_parallel_sizes(hidden, {width}, heads, 128)

    assert sizes(2048, 768, 32) == [1, 2]  # Qwen3-30B-A3B: not TP 4 (192 per rank) or 8
    assert sizes(3072, 1536, 48) == [1, 2, 4]  # MiniMax-M2: not TP 8
    assert sizes(7168, 2048, 64) == [1, 2, 4, 8, 16]  # Kimi-K2.5, DeepSeek-V3
    assert sizes(2880, 2880, 64) == []  # gpt-oss: hidden 2880 is no multiple of 128


def test_eval_of_the_export_matches_the_runs_own_perplexity(quantized):
    """The run's last perplexity check is its in-memory quantized model (fp32 on the CPU); gsq.eval
    reads the exported directory through transformers (bf16): the same model, within bf16 noise."""
    watch = json.loads((quantized / "gsq_run.json").read_text())["ppl"]
    assert [w["layers_quantized"] for w in watch] == [0, 6, 7]
    proc = subprocess.run([sys.executable, "-m", "gsq.eval", "--model", str(quantized), "--no-card", "--data-file",
                           str(WIKI_TEST), "--seqlen", "128", "--max-windows", "4", "--json"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ppl = json.loads(proc.stdout)["ppl"]
    print(f"\nexported: ppl {ppl:.4f}; in-run model: {watch[-1]['ppl']:.4f}; original: {watch[0]['ppl']:.4f}")
    assert abs(ppl - watch[-1]["ppl"]) < 0.01 * watch[-1]["ppl"]
    assert abs(ppl - watch[-1]["ppl"]) < abs(watch[0]["ppl"] - watch[-1]["ppl"])  # tighter than the quantization effect


def test_3bit_codes_export_dense(tmp_path):
    # 3-bit codes in compressed-tensors' dense packing (32 codes in 3 int32 words): 3.125 bits per weight, read
    # back by compressed-tensors' own unpacker (vLLM's Humming MoE reads the same layout: eval/vllm/mixed-widths.md)
    out = tmp_path / "w3"
    proc = quantize("--out", str(out), *FAST, "--bits", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(inspect(out, "--json").stdout)
    assert report["bits"] == 3 and report["container_bits"] == 3
    assert report["quantized"]["bits_per_weight"] == pytest.approx(3 + 16 / 128)
    assert 4 < report["quantized"]["max_distinct"] <= 8  # more than the 2-bit grid, within 3 bits
    t = expert(out, "model.layers.4.mlp.experts.2.up_proj")
    assert t["weight_packed"].shape[-1] == t["weight_shape"][-1] * 3 // 32
    codes = unpack_from_int32(t["weight_packed"], 3, torch.Size(t["weight_shape"].tolist()))
    assert codes.min() >= -4 and codes.max() <= 3 and ((codes < -2) | (codes > 1)).any()
