"""The bundled tiny MoE: loads offline with plain transformers, is a real LM, and its experts matter."""

import pytest
import torch
from conftest import TINY_MODEL

from gsq.eval import eval_windows, evaluate


def test_loads_offline_with_plain_auto_classes():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    text = " The game 's battle system , the BliTZ system , is carried over directly from Valkyira Chronicles ."
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text
    assert type(model).__name__ == "DeepseekV3ForCausalLM" and model.dtype == torch.bfloat16
    assert model.config.vocab_size == len(tokenizer)


def test_has_the_shape_of_a_real_deepseek_v3_moe():
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(TINY_MODEL)
    assert c.model_type == "deepseek_v3"
    assert c.num_hidden_layers >= 7 and c.first_k_dense_replace == 1  # the every-6-layers check fires
    assert c.n_routed_experts >= 8 and c.num_experts_per_tok >= 2 and c.n_shared_experts == 1
    assert c.hidden_size % 128 == 0 and c.moe_intermediate_size % 128 == 0  # group-128 quantization
    assert c.q_lora_rank and c.kv_lora_rank  # MLA attention
    assert sum(f.stat().st_size for f in TINY_MODEL.iterdir()) < 20e6


@pytest.fixture(scope="module")
def windows(tiny, wiki_rows):
    return eval_windows(tiny[1], wiki_rows, seqlen=256, max_windows=8)


def test_is_a_real_language_model(tiny, windows):
    ppl = evaluate(tiny[0], windows, progress=False)["ppl"]
    assert ppl < 300, f"WikiText-2 test perplexity {ppl:.1f} (uniform would be {tiny[0].config.vocab_size})"


def test_routed_experts_matter_and_all_get_tokens(tiny, windows):
    model = tiny[0]
    counts = {}

    def count(module, inputs, outputs):
        counts[module] = counts.get(module, 0) + torch.bincount(outputs[2].flatten(), minlength=module.num_experts)

    hooks = [layer.mlp.gate.register_forward_hook(count) for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    base = evaluate(model, windows, progress=False)["ppl"]
    for hook in hooks:
        hook.remove()
    for load in counts.values():  # a balanced router: every expert has real work to quantize
        assert load.min() >= 0.02 * load.sum(), load.tolist()

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
