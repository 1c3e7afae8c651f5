"""Every supported architecture end to end: a small random Qwen3-MoE and Mixtral (DeepSeek-V3 is the
bundled model) are quantized, and the checkpoint has exactly the expert names vLLM loads, a config
whose targets select exactly those modules, and transformers reads it back."""

import json

import pytest
import torch
from compressed_tensors.utils.match import match_name
from safetensors import safe_open
from conftest import FAST, TINY_MODEL, quantize

# vLLM's per-expert parameter names (its FusedMoE checkpoint mapping) for each model type.
VLLM_EXPERT_NAMES = {
    "deepseek_v3": "model.layers.{l}.mlp.experts.{e}.{p}.weight_packed",
    "kimi_k25": "language_model.model.layers.{l}.mlp.experts.{e}.{p}.weight_packed",
    "qwen3_moe": "model.layers.{l}.mlp.experts.{e}.{p}.weight_packed",
    "mixtral": "model.layers.{l}.block_sparse_moe.experts.{e}.{p}.weight_packed",
}
PROJS = {"mixtral": ("w1", "w2", "w3")}


def build(kind, path):
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    common = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=2048, num_experts_per_tok=2, max_position_embeddings=512)
    torch.manual_seed(0)
    if kind == "qwen3_moe":
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, moe_intermediate_size=128, intermediate_size=256,
                                                   num_experts=4, head_dim=64, decoder_sparse_step=1))
    else:
        model = MixtralForCausalLM(MixtralConfig(**common, intermediate_size=128, num_local_experts=4))
    model.to(torch.bfloat16).save_pretrained(path)
    AutoTokenizer.from_pretrained(TINY_MODEL).save_pretrained(path)


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_architecture_end_to_end(kind, tmp_path):
    build(kind, tmp_path / "src")
    out = tmp_path / "w2"
    proc = quantize("--out", str(out), *FAST, model=tmp_path / "src")
    assert proc.returncode == 0, proc.stderr[-3000:]
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    expected = {VLLM_EXPERT_NAMES[kind].format(l=l, e=e, p=p) for l in range(2) for e in range(4)
                for p in PROJS.get(kind, ("gate_proj", "up_proj", "down_proj"))}
    assert {k for k in index if k.endswith(".weight_packed")} == expected
    quantized = {k[: -len(".weight_packed")] for k in expected}
    assert not any(k[: -len(".weight")] in quantized for k in index if k.endswith(".weight"))

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    modules = {k.rsplit(".", 1)[0] for k in index if k.endswith((".weight", ".weight_packed"))}
    selected = {m for m in modules if any(match_name(m, t) for t in group["targets"])
                and not any(match_name(m, i) for i in qc["ignore"])}
    assert selected == quantized  # targets and ignore pick exactly the quantized modules

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    key = sorted(quantized)[0]
    with safe_open(out / index[key + ".weight_packed"], "pt") as f:
        scale = f.get_tensor(key + ".weight_scale")
    assert torch.isfinite(model(torch.arange(1, 33)[None]).logits).all()
    assert scale.dtype == torch.bfloat16 and (scale < 0).any() and (scale > 0).any()  # signed scales
