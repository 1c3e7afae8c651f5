"""Every supported model as its authors ship it (tests/replicas.py): quantize, prune and evaluate each; the
checkpoint holds exactly the expert names vLLM's loader for that model reads, one quantization config that
selects exactly the re-quantized experts plus the modules copied quantized from the source, every other
tensor byte-identical to the source, and transformers reads it back with the experts equal to gsq's codes
times scales."""

import json
import os
import subprocess
import sys

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from compressed_tensors.utils.match import match_name
from safetensors import safe_open
from conftest import CALIB_DATA, FAST, ROOT, WIKI_TEST, digest, quantize, vllm_misses

import replicas
from gsq import stream

STD = ("gate_proj", "up_proj", "down_proj")
W = ("w1", "w3", "w2")  # gate, up, down
# kind: (the experts' checkpoint names as vLLM's weight loader reads them, their projection names;
#        the names vLLM's MoE layer looks the experts' compressed-tensors scheme up under, and theirs)
VLLM = {
    "deepseek_v3": ("model.layers.{l}.mlp.experts.{e}.{p}", STD, "model.layers.{l}.mlp.experts.0.{p}", STD),
    "kimi_k25": ("language_model.model.layers.{l}.mlp.experts.{e}.{p}", STD,
                 "language_model.model.layers.{l}.mlp.experts.0.{p}", STD),
    "minimax_m2": ("model.layers.{l}.block_sparse_moe.experts.{e}.{p}", W, "model.layers.{l}.mlp.experts.0.{p}", W),
    "kimi_linear": ("model.layers.{l}.block_sparse_moe.experts.{e}.{p}", W,
                    "model.layers.{l}.block_sparse_moe.experts.0.{p}", STD),
    "qwen3_next": ("model.layers.{l}.mlp.experts.{e}.{p}", STD, "model.layers.{l}.mlp.experts.0.{p}", STD),
    "qwen3_moe": ("model.layers.{l}.mlp.experts.{e}.{p}", STD, "model.layers.{l}.mlp.experts.0.{p}", STD),
    "mixtral": ("model.layers.{l}.block_sparse_moe.experts.{e}.{p}", W, "model.layers.{l}.block_sparse_moe.experts.0.{p}", W),
}
VLLM["deepseek_v3_ct"] = VLLM["deepseek_v3"]  # the same model, its FP8 written by llm-compressor
MOE_LAYERS = {"deepseek_v3": [1, 2], "deepseek_v3_ct": [1, 2], "kimi_k25": [1, 2], "minimax_m2": [0, 1], "kimi_linear": [1, 2, 3],
              "qwen3_next": [0, 1, 2, 3], "qwen3_moe": [0, 1], "mixtral": [0, 1]}
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
# transformers 5.24 and 5.25 cannot load any compressed-tensors Kimi-Linear checkpoint: its dequantizing loader feeds
# the KDA layers' q/k/v_conv1d concatenation nothing (CompressedTensorsDequantize takes the converter's
# per-source dict for an experts one)
TRANSFORMERS_CANNOT = {"kimi_linear": "transformers 5.24-5.25 loads no compressed-tensors Kimi-Linear checkpoint"}
# ... nor a compressed-tensors block-FP8 MoE source (the reference in test_eval_against_the_source): it multiplies each FP8 expert by its
# [out/128, in/128] scale grid without expanding it to the blocks
NO_REFERENCE = {"deepseek_v3_ct": "transformers 5.24-5.25 loads no compressed-tensors block-FP8 MoE checkpoint"}


@pytest.fixture(scope="module", params=list(VLLM))
def run(request, tmp_path_factory):
    kind = request.param
    src = replicas.BUILDERS[kind](tmp_path_factory.mktemp(kind) / "src")
    before = digest(src, skip=())
    out = src.parent / "w2"
    proc = quantize("--out", str(out), *FAST, model=src)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert digest(src, skip=()) == before  # the source is never modified
    return kind, src, out


def weight_map(path):
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return {k: path / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    with safe_open(path / "model.safetensors", "pt") as f:
        return dict.fromkeys(f.keys(), path / "model.safetensors")


def tensor(where, name):
    with safe_open(where[name], "pt") as f:
        return f.get_tensor(name)


def test_source_and_output_configs_hold_every_key_vllm_reads(run):
    kind, src, out = run
    assert vllm_misses(src) == [] and vllm_misses(out) == []


def test_checkpoint_as_vllm_and_compressed_tensors_read_it(run):
    kind, src, out = run
    names, projs, probe, probe_projs = VLLM[kind]
    where = weight_map(out)
    quantized = {names.format(l=l, e=e, p=p) for l in MOE_LAYERS[kind] for e in range(8) for p in projs}
    schemes = {k[: -len(".weight")]: scheme.weights.model_dump() for k, (_, scheme, _) in stream.Checkpoint(src).compressed.items()}
    source_quantized = set(schemes)
    assert {k[: -len(".weight_packed")] for k in where if k.endswith(".weight_packed")} == quantized | {
        m for m in source_quantized - quantized if m + ".weight_packed" in where}

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config.get("text_config", {})  # one config, describing everything
    qc = config["quantization_config"]
    groups = {name: g["targets"] for name, g in qc["config_groups"].items()}
    modules = {k.rsplit(".", 1)[0] for k in where if k.endswith((".weight", ".weight_packed"))}

    def selected_by(module):
        return {name for name, targets in groups.items() if any(match_name(module, t) for t in targets)}

    for module in modules:
        expected = {"group_0"} if module in quantized else set()
        if module in source_quantized - quantized:  # copied as stored, in the group of the source's scheme
            expected = {n for n, g in qc["config_groups"].items() if n != "group_0" and g["weights"] == schemes[module]}
            assert len(expected) == 1
        assert selected_by(module) == expected, module
    for l in MOE_LAYERS[kind]:  # vLLM's MoE layer finds the 2-bit scheme under its own names
        for p in probe_projs:
            assert selected_by(probe.format(l=l, p=p)) == {"group_0"}

    from gsq.inspect import inspect

    report = inspect(out)  # reads gsq's 2-bit group beside the source's FP8 / int4 one
    assert report["quantized"]["tensors"] == len(quantized) and report["quantized"]["max_distinct"] <= 4

    source = weight_map(src)
    renamed = {k[: -len("_inv")] if k.endswith("weight_scale_inv") else k: k for k in source}
    if kind.startswith("deepseek_v3"):
        assert sum(k.endswith("weight_scale") for k in where) > 50  # the FP8 modules kept their scales
    for name in where:  # everything not re-quantized: byte-identical to the source's tensor
        if name.rsplit(".", 1)[0] not in quantized:
            a, b = tensor(where, name), tensor(source, renamed[name])
            assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name


def expect_upstream_failure(request, kind, known=TRANSFORMERS_CANNOT):
    if kind in known:  # strict: once transformers reads it, this test says so
        request.applymarker(pytest.mark.xfail(reason=known[kind], strict=True))


def test_transformers_reads_the_experts_as_codes_times_scales(run, request):
    kind, src, out = run
    expect_upstream_failure(request, kind)
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if kind == "kimi_k25" else AutoModelForCausalLM
    model = auto.from_pretrained(out, dtype=torch.bfloat16)  # transformers' own reader, nothing of gsq's
    names, projs, _, _ = VLLM[kind]
    where = weight_map(out)
    layer = MOE_LAYERS[kind][-1]
    key = names.format(l=layer, e=5, p=projs[2])  # down_proj of expert 5
    packed, scale, shape = (tensor(where, f"{key}.{t}") for t in ("weight_packed", "weight_scale", "weight_shape"))
    codes = unpack_from_int32(packed, 2, shape)
    expected = (codes.float() * scale.float().repeat_interleave(codes.shape[1] // scale.shape[1], 1)).to(torch.bfloat16)
    text = model.model.language_model if kind == "kimi_k25" else model.model
    assert torch.equal(text.layers[layer].mlp.experts.down_proj[5], expected)
    logits = model(torch.arange(1, 33)[None]).logits
    assert torch.isfinite(logits).all()
    if kind not in ("deepseek_v3", "deepseek_v3_ct", "minimax_m2"):  # (transformers fake-quantizes FP8 inputs)
        ours = stream.dense_model(out, "cpu", torch.bfloat16)(torch.arange(1, 33)[None]).logits  # eval's fallback
        assert (ours.float() - logits.float()).abs().max() <= 0.02 * logits.float().abs().max()


def test_eval_against_the_source(run):
    """Where transformers cannot load the output or the source, gsq.eval says so and reads it with gsq's own
    streaming reader."""
    kind, src, out = run
    proc = subprocess.run([sys.executable, "-m", "gsq.eval", "--model", str(out), "--reference", str(src),
                           "--data-file", str(WIKI_TEST), "--seqlen", "128", "--max-windows", "2", "--json"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0 < result["kl"] < 1 and 0 < result["top1"] <= 1
    assert ("reading it with gsq's own streaming reader" in proc.stderr) == (kind in {**TRANSFORMERS_CANNOT, **NO_REFERENCE})


def test_prune(run):
    kind, src, out = run
    pruned = out.parent / "reap4"
    proc = subprocess.run([sys.executable, "-m", "gsq.prune", "--model", str(src), "--out", str(pruned), "--keep", "4",
                           *CALIB_DATA, "--num-samples", "8", "--seqlen", "64"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names, projs, _, _ = VLLM[kind]
    where = weight_map(pruned)
    experts = {k for k in where if any(k.startswith(names.format(l=l, e=e, p="")) for l in MOE_LAYERS[kind]
                                       for e in range(8))}
    assert {k.split(".experts.")[1].split(".")[0] for k in experts} == {"0", "1", "2", "3"}
    from gsq.eval import load_model

    model, _ = load_model(str(pruned), dtype="bfloat16")
    text = model.model.language_model if kind == "kimi_k25" else model.model
    assert [text.layers[l].mlp.experts.down_proj.shape[0] for l in MOE_LAYERS[kind]] == [4] * len(MOE_LAYERS[kind])
    assert torch.isfinite(model(torch.arange(1, 33)[None]).logits).all()
    source = weight_map(src)
    config = json.loads((pruned / "config.json").read_text())
    assert json.dumps(config.get("quantization_config") or config.get("text_config", {}).get("quantization_config")) \
        == json.dumps(stream.source_quantization(src))  # still the source's format, fewer experts
    assert all(tensor(where, k).dtype == tensor(source, k).dtype for k in list(where)[:50] if k in source)


def test_fp8_experts_are_calibrated_dequantized(tmp_path):
    """The experts gsq calibrates on equal weight x weight_scale_inv, computed here independently."""
    src = replicas.deepseek_v3_fp8(tmp_path / "src")
    ckpt = stream.Checkpoint(src)
    source = weight_map(src)
    for name in ("model.layers.1.mlp.experts.3.gate_proj.weight", "model.layers.2.self_attn.kv_a_proj_with_mqa.weight"):
        dense = ckpt.load([name])[name]  # held in the model's dtype, as the layer runs in it
        expected = replicas.fp8_dequant(tensor(source, name), tensor(source, name + "_scale_inv"))
        assert dense.dtype == torch.bfloat16 and torch.equal(dense, expected.to(torch.bfloat16))


def _unknown_method(src):
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (src / "config.json").write_text(json.dumps(config))


def _no_config(src):
    config = json.loads((src / "config.json").read_text())
    del config["quantization_config"]
    (src / "config.json").write_text(json.dumps(config))


def _unknown_suffix(src):
    from safetensors.torch import load_file, save_file

    shard = sorted(src.glob("*.safetensors"))[0]
    tensors = load_file(shard)
    tensors["model.layers.1.self_attn.o_proj.qweight"] = torch.zeros(4, 4, dtype=torch.int32)
    save_file(tensors, shard, metadata={"format": "pt"})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.1.self_attn.o_proj.qweight"] = shard.name
    (src / "model.safetensors.index.json").write_text(json.dumps(index))


def _scales_dropped(src):
    _no_config(src)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.endswith("_scale_inv")}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.fixture(scope="module")
def fp8_source(tmp_path_factory):
    return replicas.deepseek_v3_fp8(tmp_path_factory.mktemp("fp8") / "src")


@pytest.mark.parametrize("damage, line", [
    (_unknown_method, "error: source quantization 'gptq' is not supported (gsq reads bf16/fp16/fp32, block FP8 "
                      "(quant_method fp8), MXFP4 (gpt-oss) and compressed-tensors checkpoints)"),
    (_no_config, "is stored in a quantized format gsq cannot read (suffix 'weight_scale_inv' with no "
                 "quantization_config that explains it)"),
    (_unknown_suffix, "error: tensor model.layers.1.self_attn.o_proj.qweight is stored in a quantized format gsq "
                      "cannot read (suffix 'qweight' with no quantization_config that explains it)"),
    (_scales_dropped, "is stored as F8_E4M3 with no scale or quantization_config that says how to read it"),
])
def test_unreadable_sources_are_refused_before_any_work(damage, line, fp8_source, tmp_path):
    import shutil

    src = shutil.copytree(fp8_source, tmp_path / "src")
    damage(src)
    for tool in ("gsq.quantize", "gsq.prune")[: 2 if damage is _unknown_method else 1]:  # one shared check
        out = tmp_path / tool
        extra = ["--keep", "4"] if tool == "gsq.prune" else []
        proc = subprocess.run([sys.executable, "-m", tool, "--model", str(src), "--out", str(out), *extra, *CALIB_DATA],
                              cwd=ROOT, env=ENV, capture_output=True, text=True)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].endswith(line) and len(proc.stderr.strip().splitlines()) == 1
        assert not out.exists() and not out.with_name(out.name + ".partial").exists()


# gpt-oss-20b's config.json as published (the fields that shape the experts)
GPT_OSS_20B = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": 2880,
               "intermediate_size": 2880, "num_hidden_layers": 24, "num_local_experts": 32, "experts_per_token": 4,
               "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 201088,
               "swiglu_limit": 7.0, "sliding_window": 128, "max_position_embeddings": 131072,
               "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
                   "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}}


def test_gpt_oss_prunes_and_refuses_2_bit_in_one_line(tmp_path):
    src = replicas.gpt_oss_mxfp4(tmp_path / "src")
    source = weight_map(src)
    name = "model.layers.1.mlp.experts.down_proj"
    dense = stream.Checkpoint(src).load([name])[name]  # transformers' MXFP4 decoder, in the module's layout
    blocks, scales = tensor(source, name + "_blocks"), tensor(source, name + "_scales")
    codes = torch.stack([blocks & 15, blocks >> 4], -1).flatten(-2).long()  # even element in the low nibble
    values = torch.cat([replicas.FP4_VALUES, -replicas.FP4_VALUES])[codes] * torch.exp2(scales.float() - 127)[..., None]
    assert torch.equal(dense, values.flatten(-2).transpose(1, 2).to(torch.bfloat16))

    pruned = tmp_path / "reap4"
    proc = subprocess.run([sys.executable, "-m", "gsq.prune", "--model", str(src), "--out", str(pruned), "--keep", "4",
                           *CALIB_DATA, "--num-samples", "8", "--seqlen", "64"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    where = weight_map(pruned)
    for t in ("gate_up_proj_blocks", "gate_up_proj_scales", "gate_up_proj_bias", "down_proj_blocks", "down_proj_bias"):
        assert tensor(where, f"model.layers.0.mlp.experts.{t}").shape[0] == 4  # MXFP4 rows sliced, not re-encoded
    assert tensor(where, "model.layers.1.mlp.router.bias").shape == (4,)
    proc = subprocess.run([sys.executable, "-m", "gsq.eval", "--model", str(pruned), "--reference", str(src), "--data-file",
                           str(WIKI_TEST), "--seqlen", "64", "--max-windows", "2", "--json"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and 0 < json.loads(proc.stdout.strip().splitlines()[-1])["kl"], proc.stderr[-3000:]

    real = tmp_path / "gpt-oss-20b"
    real.mkdir()
    (real / "config.json").write_text(json.dumps(GPT_OSS_20B))
    for model, why in ((src, "its experts carry biases"), (real, "its hidden_size 2880 is not a multiple of --group-size 128")):
        proc = quantize("--out", str(tmp_path / "w2"), *CALIB_DATA, model=model)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith("error: gpt_oss cannot be quantized to 2 bits: " + why)
        assert not (tmp_path / "w2").exists() and not (tmp_path / "w2.partial").exists()
