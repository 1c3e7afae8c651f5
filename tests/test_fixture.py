"""The bundled tiny MoEs (DeepSeek-V3 and Qwen3-MoE routing): load offline with plain transformers, are real
LMs, and their experts matter."""

import pytest
import torch
from conftest import QWEN_MODEL, TINY_MODEL, vllm_misses

from gsq.eval import eval_windows, evaluate, load_model

CLASSES = {TINY_MODEL: "DeepseekV3ForCausalLM", QWEN_MODEL: "Qwen3MoeForCausalLM"}


@pytest.mark.parametrize("path", CLASSES, ids=lambda p: p.name)
def test_loads_offline_with_plain_auto_classes(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = " The game 's battle system , the BliTZ system , is carried over directly from Valkyira Chronicles ."
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text
    assert type(model).__name__ == CLASSES[path] and model.dtype == torch.bfloat16
    assert model.config.vocab_size == len(tokenizer)
    assert sum(f.stat().st_size for f in path.iterdir()) < 20e6


@pytest.mark.parametrize("path", CLASSES, ids=lambda p: p.name)
def test_config_holds_every_key_vllm_reads(path):
    assert vllm_misses(path) == []


def test_has_the_shape_of_a_real_deepseek_v3_moe():
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(TINY_MODEL)
    assert c.model_type == "deepseek_v3"
    assert c.num_hidden_layers >= 7 and c.first_k_dense_replace == 1  # the every-6-layers check fires
    assert c.n_routed_experts >= 8 and c.num_experts_per_tok >= 2 and c.n_shared_experts == 1
    assert c.hidden_size % 128 == 0 and c.moe_intermediate_size % 128 == 0  # group-128 quantization
    assert c.q_lora_rank and c.kv_lora_rank  # MLA attention


def test_qwen_has_another_routing_shape():
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(QWEN_MODEL)
    assert c.model_type == "qwen3_moe" and not c.mlp_only_layers and c.decoder_sparse_step == 1  # every layer MoE
    assert c.num_experts > 8 and c.num_experts_per_tok > 2 and not getattr(c, "shared_expert_intermediate_size", 0)
    assert c.hidden_size % 128 == 0 and c.moe_intermediate_size % 128 == 0


@pytest.fixture(scope="module", params=list(CLASSES), ids=lambda p: p.name)
def bundled(request, wiki_rows):
    model, tokenizer = load_model(str(request.param))
    return model, eval_windows(tokenizer, wiki_rows, seqlen=256, max_windows=8)


def test_is_a_real_language_model(bundled):
    model, windows = bundled
    ppl = evaluate(model, windows, progress=False)["ppl"]
    assert ppl < 300, f"WikiText-2 test perplexity {ppl:.1f} (uniform would be {model.config.vocab_size})"


def test_routed_experts_matter_and_all_get_tokens(bundled):
    model, windows = bundled
    counts = {}

    def count(module, inputs, outputs):  # the router's (logits, weights, indices)
        counts[module] = counts.get(module, 0) + torch.bincount(outputs[2].flatten(), minlength=outputs[0].shape[-1])

    hooks = [layer.mlp.gate.register_forward_hook(count) for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    base = evaluate(model, windows, progress=False)["ppl"]
    for hook in hooks:
        hook.remove()
    # every expert has real work to quantize: DeepSeek's bias-balanced router gives each at least 2% of a
    # layer's routed tokens; Qwen's auxiliary loss balances less (its least used expert gets ~0.5%, still
    # ~1400 of the 256 x 256 calibration tokens' routes, far above --min-tokens)
    least = 0.02 if model.config.model_type == "deepseek_v3" else 0.004
    for load in counts.values():
        assert load.min() >= least * load.sum(), load.tolist()

    saved = {n: p.detach().clone() for n, p in model.named_parameters() if ".mlp.experts." in n}
    try:
        for name, p in model.named_parameters():
            if name in saved:
                p.data.zero_()
        zeroed = evaluate(model, windows, progress=False)["ppl"]
    finally:
        for name, p in model.named_parameters():
            if name in saved:
                p.data.copy_(saved[name])
    assert zeroed > 1.25 * base, f"ppl {base:.1f} -> {zeroed:.1f} with routed experts zeroed"
