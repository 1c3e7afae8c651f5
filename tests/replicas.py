"""Small replicas of the checkpoints users download, as their authors ship them: each model's real
config keys and nesting, its on-disk tensor names and its source format (block FP8, int4 pack-quantized),
built from transformers' own classes or from the bundled tiny model."""

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from conftest import TINY_MODEL

FP8_BLOCK = 128
# DeepSeek-V3's published quantization_config (config.json of deepseek-ai/DeepSeek-V3, R1, V3.1).
FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


def fp8_blocks(w: torch.Tensor):
    """A weight `[out, in]` as DeepSeek-V3 stores it: float8_e4m3fn with a float32 `weight_scale_inv` per
    128x128 block (edge blocks partial), dequantized as `weight * weight_scale_inv`."""
    rows, cols = w.shape
    padded = torch.nn.functional.pad(w.float(), (0, -cols % FP8_BLOCK, 0, -rows % FP8_BLOCK))
    blocks = padded.unflatten(1, (-1, FP8_BLOCK)).unflatten(0, (-1, FP8_BLOCK))  # [R, 128, C, 128]
    scale = (blocks.abs().amax((1, 3)) / torch.finfo(torch.float8_e4m3fn).max).clamp(min=1e-12)
    q = (blocks / scale[:, None, :, None]).flatten(2).flatten(0, 1)[:rows, :cols]
    return q.to(torch.float8_e4m3fn).contiguous(), scale


def fp8_dequant(q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """The test's own reading of a block-FP8 weight: each element times its block's scale, in float32."""
    rows, cols = q.shape
    s = scale_inv.repeat_interleave(FP8_BLOCK, 0)[:rows].repeat_interleave(FP8_BLOCK, 1)[:, :cols]
    return q.float() * s


def write_fp8(tensors: dict, dst: Path, is_fp8) -> None:
    """`tensors` with every 2-D weight that `is_fp8(name)` selects stored as block FP8, into dst/ as two
    shards and an index (as the real checkpoints are sharded)."""
    out = {}
    for name, w in tensors.items():
        if is_fp8(name) and w.dim() == 2:
            out[name], out[name + "_scale_inv"] = fp8_blocks(w)
        else:
            out[name] = w
    names = sorted(out)
    half = len(names) // 2
    weight_map = {}
    for n, part in enumerate((names[:half], names[half:])):
        shard = f"model-{n + 1:05d}-of-00002.safetensors"
        save_file({k: out[k].contiguous() for k in part}, dst / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def copy_tokenizer(dst: Path):
    for f in TINY_MODEL.iterdir():
        if f.name.startswith("tokenizer") or f.name == "generation_config.json":
            shutil.copy(f, dst / f.name)


def saved(model, dst: Path) -> dict:
    """Save a transformers model (bf16) with the bundled tokenizer the way its authors' tools do (per-expert
    on-disk names come from transformers' own conversion); returns its tensors, read back from disk."""
    model.to(torch.bfloat16).save_pretrained(dst)
    copy_tokenizer(dst)
    tensors = {}
    for shard in sorted(dst.glob("*.safetensors")):
        tensors.update(load_file(shard))
        shard.unlink()
    (dst / "model.safetensors.index.json").unlink(missing_ok=True)
    return tensors


# Keys every published DeepSeek-V3/R1/Kimi-K2 config.json states that transformers' DeepseekV3Config does not hold
# (it always routes this way); vLLM reads them, and without them builds no e_score_correction_bias and routes with
# softmax (eval/vllm/README.md).
DEEPSEEK_ROUTING = {"topk_method": "noaux_tc", "scoring_func": "sigmoid"}


def deepseek_v3_fp8(dst: Path, kv_lora_rank: int = 128) -> Path:
    """DeepSeek-V3 as shipped: block FP8 on every linear of the decoder layers (the routers `mlp.gate`
    stay bf16), and a multi-token-prediction layer stored as layer `num_hidden_layers` with its
    `enorm`/`hnorm`/`eh_proj`/`shared_head`. Random weights; the real model's shape rules (MLA ranks and
    every FP8 linear's input a multiple of 128, the first layer dense, one shared expert)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    config = DeepseekV3Config(vocab_size=2048, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                              num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
                              n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1,
                              n_group=1, topk_group=1, q_lora_rank=128, kv_lora_rank=kv_lora_rank, qk_nope_head_dim=64,
                              qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=4096, num_nextn_predict_layers=1)
    dst.mkdir(parents=True)
    tensors = saved(DeepseekV3ForCausalLM(config), dst)
    n = config.num_hidden_layers
    last, mtp = f"model.layers.{n - 1}.", f"model.layers.{n}."
    tensors.update({mtp + k[len(last):]: v.clone() for k, v in tensors.items() if k.startswith(last)})
    hidden = config.hidden_size
    tensors.update({mtp + "enorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                    mtp + "hnorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                    mtp + "eh_proj.weight": torch.randn(hidden, 2 * hidden, dtype=torch.bfloat16) * 0.02,
                    mtp + "embed_tokens.weight": tensors["model.embed_tokens.weight"].clone(),
                    mtp + "shared_head.norm.weight": tensors["model.norm.weight"].clone(),
                    mtp + "shared_head.head.weight": tensors["lm_head.weight"].clone()})
    mtp_plain = re.compile(rf"model\.layers\.{n}\.(eh_proj|embed_tokens|shared_head)\.")
    write_fp8(tensors, dst, lambda k: k.startswith("model.layers.") and not k.endswith("mlp.gate.weight")
              and not mtp_plain.match(k))
    published = json.loads((dst / "config.json").read_text())
    published.update(DEEPSEEK_ROUTING, quantization_config=FP8_CONFIG)
    (dst / "config.json").write_text(json.dumps(published, indent=2))
    return dst


def fp8_source(dst: Path, tensors: dict, is_fp8) -> None:
    write_fp8(tensors, dst, is_fp8)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = FP8_CONFIG
    (dst / "config.json").write_text(json.dumps(config, indent=2))


COMMON = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, vocab_size=2048, num_experts_per_tok=2,
              max_position_embeddings=4096, pad_token_id=0, bos_token_id=0, eos_token_id=0)


def minimax_m2_fp8(dst: Path) -> Path:
    """MiniMax-M2 / M2.5 as shipped: block FP8 on attention and experts (`block_sparse_moe.experts.E.w1/w2/w3`),
    bf16 router `block_sparse_moe.gate` and its `e_score_correction_bias` (sigmoid scoring)."""
    from transformers import MiniMaxM2Config, MiniMaxM2ForCausalLM

    torch.manual_seed(0)
    # as published: partial RoPE stated as rotary_dim (half the head, 64 of 128), sigmoid routing with a bias
    config = MiniMaxM2Config(**COMMON, num_hidden_layers=2, intermediate_size=128, num_local_experts=8, head_dim=64,
                             rotary_dim=32, scoring_func="sigmoid", use_routing_bias=True)
    model = MiniMaxM2ForCausalLM(config)
    with torch.no_grad():  # a trained router's correction bias is not zero
        for layer in model.model.layers:
            layer.mlp.e_score_correction_bias.normal_(0, 0.05)
    dst.mkdir(parents=True)
    tensors = saved(model, dst)
    fp8_source(dst, tensors, lambda k: k.startswith("model.layers.") and ".gate." not in k)
    return dst


def qwen3_next(dst: Path) -> Path:
    """Qwen3-Next: gated DeltaNet (`linear_attn`) layers beside attention layers, 1 in 4 as published, routed
    experts `mlp.experts.E.*_proj` and a gated shared expert; bf16."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    torch.manual_seed(0)
    config = Qwen3NextConfig(**COMMON, num_hidden_layers=4, moe_intermediate_size=128, shared_expert_intermediate_size=128,
                             intermediate_size=256, num_experts=8, head_dim=64, linear_num_value_heads=4,
                             linear_num_key_heads=2, linear_key_head_dim=64, linear_value_head_dim=64)
    dst.mkdir(parents=True)
    save_whole(Qwen3NextForCausalLM(config), dst)
    return dst


def kimi_linear(dst: Path) -> Path:
    """Kimi-Linear-48B-A3B: KDA linear-attention layers beside MLA layers (`linear_attn_config` as published,
    1-indexed layer lists), the first layer dense, routed experts `block_sparse_moe.experts.E.w1/w2/w3` with a
    shared expert and a biased sigmoid router; bf16."""
    from transformers import KimiLinearConfig, KimiLinearForCausalLM

    torch.manual_seed(0)
    config = KimiLinearConfig(**{**COMMON, "num_key_value_heads": 4}, num_hidden_layers=4, moe_intermediate_size=128,
                              intermediate_size=256, num_local_experts=8, kv_lora_rank=128, qk_nope_head_dim=64,
                              qk_rope_head_dim=64, v_head_dim=64, mla_use_nope=True,
                              moe_router_activation_func="sigmoid",
                              linear_attn_config={"full_attn_layers": [2, 4], "kda_layers": [1, 3], "head_dim": 64,
                                                  "num_heads": 4, "short_conv_kernel_size": 4})
    dst.mkdir(parents=True)
    save_whole(KimiLinearForCausalLM(config), dst)
    return dst


def qwen3_moe(dst: Path) -> Path:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(**COMMON, num_hidden_layers=2, moe_intermediate_size=128, intermediate_size=256,
                            num_experts=8, head_dim=64, decoder_sparse_step=1)
    dst.mkdir(parents=True)
    save_whole(Qwen3MoeForCausalLM(config), dst)
    return dst


def mixtral(dst: Path) -> Path:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(**COMMON, num_hidden_layers=2, intermediate_size=128, num_local_experts=8)
    dst.mkdir(parents=True)
    save_whole(MixtralForCausalLM(config), dst)
    return dst


def save_whole(model, dst: Path):
    model.to(torch.bfloat16).save_pretrained(dst)
    copy_tokenizer(dst)


def kimi_k25_int4(dst: Path) -> Path:
    """Kimi-K2.5 as shipped: `kimi_k25` with the text model under `text_config` (its model_type `kimi_k2`),
    tensors under `language_model.`, a vision tower and projector, and the routed experts int4 symmetric
    group 32 pack-quantized by compressed-tensors (`weight_shape` int32), its quantization_config under
    text_config."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from transformers import AutoModelForImageTextToText, Kimi_K25Config

    torch.manual_seed(0)
    text = dict(model_type="deepseek_v3", vocab_size=2048, hidden_size=256, intermediate_size=512,
                moe_intermediate_size=128, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
                n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1, n_group=1,
                topk_group=1, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=64,
                v_head_dim=128, max_position_embeddings=4096, tie_word_embeddings=False, **DEEPSEEK_ROUTING)
    vision = dict(num_attention_heads=2, num_hidden_layers=1, hidden_size=64, intermediate_size=128,
                  pos_emb_height=8, pos_emb_width=8)
    config = Kimi_K25Config(text_config=text, vision_config=vision, projection_hidden_size=64, tie_word_embeddings=False)
    dst.mkdir(parents=True)
    # transformers 5.24 writes the text layers back as `blocks` (its vision renames, reversed): the shipped
    # checkpoint names them `language_model.model.layers.L`
    tensors = {k.replace("language_model.model.blocks.", "language_model.model.layers."): v
               for k, v in saved(AutoModelForImageTextToText.from_config(config), dst).items()}
    scheme = QuantizationScheme(targets=[r"re:.*mlp\.experts\.\d+\.(gate|up|down)_proj$"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=32))
    expert = re.compile(r"language_model\.model\.layers\.\d+\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight")
    out = {}
    for name, w in tensors.items():
        if not expert.fullmatch(name):
            out[name] = w
            continue
        scale = (w.float().unflatten(-1, (-1, 32)).abs().amax(-1) / 7).clamp(min=1e-8).to(w.dtype)
        packed = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale}, scheme)
        packed["weight_shape"] = packed["weight_shape"].to(torch.int32)
        out.update({f"{name[:-len('.weight')]}.{k}": v for k, v in packed.items()})
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    published = json.loads((dst / "config.json").read_text())
    published["text_config"]["model_type"] = "kimi_k2"
    published["text_config"]["quantization_config"] = QuantizationConfig(
        config_groups={"group_0": scheme}, format="pack-quantized", ignore=["lm_head", "re:.*vision_tower.*"]).model_dump()
    (dst / "config.json").write_text(json.dumps(published, indent=2))
    return dst


FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def mxfp4(w: torch.Tensor):
    """Fused experts `[E, out, in]` as gpt-oss ships them: per 32 inputs one e8m0 exponent (`_scales`, uint8,
    biased by 127) and e2m1 codes, two per byte, the even element in the low nibble (`_blocks`
    `[E, out, in/32, 16]`)."""
    g = w.float().unflatten(-1, (-1, 32))
    exp = torch.ceil(torch.log2(g.abs().amax(-1).clamp(min=2.0 ** -126) / 6.0)).clamp(-127, 127)
    v = g / torch.exp2(exp)[..., None]
    code = (v.abs()[..., None] - FP4_VALUES).abs().argmin(-1) + 8 * (v < 0)
    packed = (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8)
    return packed, (exp + 127).to(torch.uint8)


def gpt_oss_mxfp4(dst: Path) -> Path:
    """gpt-oss as shipped: MXFP4 fused experts (`mlp.experts.gate_up_proj_blocks/_scales` with gate and up
    interleaved, `_bias`), bf16 attention with sinks and biases, router `mlp.router` with a bias, sliding
    and full attention layers; `quantization_config` {quant_method: mxfp4} as published."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    config = GptOssConfig(**COMMON, num_hidden_layers=2, intermediate_size=128, num_local_experts=8, head_dim=64,
                          sliding_window=64)
    model = GptOssForCausalLM(config)
    with torch.no_grad():  # gpt-oss's init leaves the experts at zero; a checkpoint's are not
        for layer in model.model.layers:
            for p in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
                p.normal_(0, 0.05)
    dst.mkdir(parents=True)
    tensors = saved(model, dst)
    out = {}
    for name, t in tensors.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            out[name + "_blocks"], out[name + "_scales"] = mxfp4(t.transpose(1, 2))
        else:
            out[name] = t
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    published = json.loads((dst / "config.json").read_text())
    published["quantization_config"] = {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                                   "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"}
    (dst / "config.json").write_text(json.dumps(published, indent=2))
    return dst


def deepseek_v3_ct_fp8(dst: Path) -> Path:
    """DeepSeek-V3 block FP8 as llm-compressor writes it: compressed-tensors `float-quantized`, FP8_BLOCK
    scheme, the scale named `weight_scale`."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import FP8_BLOCK

    deepseek_v3_fp8(dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(dst / shard)
        save_file({k.replace("weight_scale_inv", "weight_scale"): v for k, v in tensors.items()}, dst / shard,
                  metadata={"format": "pt"})
    index["weight_map"] = {k.replace("weight_scale_inv", "weight_scale"): v for k, v in index["weight_map"].items()}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], **FP8_BLOCK)}, format="float-quantized",
        ignore=["lm_head", r"re:.*mlp\.gate$", r"re:.*eh_proj$", r"re:.*shared_head.*"]).model_dump()
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


BUILDERS = {"deepseek_v3": deepseek_v3_fp8, "deepseek_v3_ct": deepseek_v3_ct_fp8, "kimi_k25": kimi_k25_int4, "minimax_m2": minimax_m2_fp8,
            "kimi_linear": kimi_linear, "qwen3_next": qwen3_next, "qwen3_moe": qwen3_moe, "mixtral": mixtral}
