"""The memory plan (`--dry-run`) on Kimi-K2.5's real text-model dimensions, from a config.json alone (no
weights), checked against a hand computation; and a real run that cannot fit is refused before any work."""

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import FAST, ROOT, TINY_MODEL, quantize

ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

# Kimi-K2.5's config.json as published (text model under text_config; the vision tower left out)
KIMI = {
    "architectures": ["KimiK25ForConditionalGeneration"], "model_type": "kimi_k25", "dtype": "bfloat16",
    "text_config": {
        "model_type": "deepseek_v3", "vocab_size": 163840, "hidden_size": 7168, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 64,
        "num_key_value_heads": 64, "n_shared_experts": 1, "n_routed_experts": 384, "routed_scaling_factor": 2.827,
        "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 1, "topk_group": 1, "num_experts_per_tok": 8,
        "first_k_dense_replace": 1, "norm_topk_prob": True, "max_position_embeddings": 262144,
        "rope_theta": 50000.0, "dtype": "bfloat16", "tie_word_embeddings": False},
}


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    d = tmp_path_factory.mktemp("kimi-k2.5")
    (d / "config.json").write_text(json.dumps(KIMI))
    return d  # config.json only: users plan before they download 1 TB


def dry_run(model, *flags):
    return subprocess.run([sys.executable, "-m", "gsq.quantize", "--model", str(model), "--dry-run", *flags],
                          cwd=ROOT, env=ENV, capture_output=True, text=True)


def by_name(items: dict, start: str) -> list:
    (sizes,) = [v for k, v in items.items() if k.startswith(start)]
    return sizes


def test_kimi_on_8_h200(kimi):
    proc = dry_run(kimi, "--ranks", "8", "--gpu-memory", "141GB", "--host-memory", "2TB", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["fits"] and plan["placement"] == "device" and plan["experts_per_batch"] == 16
    assert plan["steps"] == 640 and plan["groups"] == 3  # 10 epochs of 4096/64 minibatches; 48 experts per rank

    # by hand: H 7168, I 2048, 384 experts top-8, bf16 (2 bytes), 8 ranks, 64 x 4096-token windows per step
    H, I, E, k = 7168, 2048, 384, 8
    attention = (H * 1536 + 1536 + 1536 * 64 * 192 + H * (512 + 64) + 512 + 512 * 64 * (128 + 128) + 64 * 128 * H)
    moe_layer = 3 * H * I * E + 3 * H * I + E * H + E + attention + 2 * H  # experts, shared, router, norms
    items = plan["items"]
    assert by_name(items, "one layer's weights") == [2 * moe_layer, 4 * moe_layer, 0]  # host: twice while loading
    inputs = (512 * 4096 + 16 * 2048) * H * 2  # 4096 / 8 windows + 128 / 8 perplexity-watch windows
    assert by_name(items, "layer inputs") == [inputs, 0, 0]
    mean = 64 * 4096 * k / E  # tokens per expert per step
    tokens = 2 * (4 * 4096 * k * (16 * 8 / E) + 2 * mean * 16) * H * 2  # one block sent, the step received
    training = 16 * 3 * H * I * (3 * 4 * 4 + 4 * 2 + 4 + 2) + tokens + 2 * mean * (16 * H + 8 * I)
    assert by_name(items, "GSQ training")[0] == int(training)
    globals_ = 2 * (2 * 163840 * H + H)  # embeddings, lm_head, final norm
    scratch = 16 * 2048 * H * 2  # the perplexity watch's copy of its windows
    results = 3 * H * I * E * 2 // 8  # packed 2-bit codes, gathered through the GPU
    gpu_need, gpu_usable = plan["totals"]["gpu"]
    assert gpu_need == 2 * moe_layer + inputs + int(training) + globals_ + scratch + results
    assert gpu_usable == int(0.9 * 141e9) and gpu_need <= gpu_usable


def test_kimi_on_one_h100_says_how_it_fits(kimi):
    proc = dry_run(kimi, "--ranks", "1", "--gpu-memory", "80GB", "--host-memory", "512GB")
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("fits: layer inputs on host"), last  # 244 GB of inputs go to host memory
    groups = int(last.split(", ")[1].split()[0])
    assert 1 <= groups < 16  # and the experts train in smaller groups than on an H200
    plan = json.loads(dry_run(kimi, "--ranks", "1", "--gpu-memory", "80GB", "--host-memory", "512GB", "--json").stdout)
    assert plan["groups"] == math.ceil(384 / plan["experts_per_batch"])
    assert plan["totals"]["gpu"][0] <= plan["totals"]["gpu"][1] and plan["totals"]["host"][0] <= plan["totals"]["host"][1]


def test_kimi_on_a_1gb_gpu_is_refused_in_one_line(kimi):
    proc = dry_run(kimi, "--gpu-memory", "1GB", "--host-memory", "16GB")
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: does not fit") and "no setting makes it fit" in line


def test_bad_size_is_one_line(kimi):
    proc = dry_run(kimi, "--gpu-memory", "lots")
    assert proc.returncode == 2 and proc.stderr.strip() == \
        "error: --gpu-memory 'lots' is not a size (e.g. 80GB, 1.5TB, 512GiB)"


def test_a_run_that_cannot_fit_is_refused_before_any_work(tmp_path):
    # 40000 windows of layer inputs in host memory (5.2 GB) on a 4 GB host: refused, naming the way out
    out = tmp_path / "out"
    proc = quantize("--out", str(out), *FAST, "--num-samples", "40000", "--seqlen", "256", "--activations", "host",
                    "--host-memory", "4GB")
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: does not fit") and line.endswith("it fits with --activations disk"), line
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_dry_run_of_the_tiny_model_writes_nothing(tmp_path):
    out = tmp_path / "out"
    proc = dry_run(TINY_MODEL, "--preset", "tiny", "--out", str(out))
    assert proc.returncode == 0 and "fits: layer inputs on host" in proc.stdout
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_kimi_with_a_bits_budget_plans_the_sensitivity_pass(kimi):
    flags = ["--ranks", "8", "--gpu-memory", "141GB", "--host-memory", "2TB", "--bits-budget", "2.5"]
    plan = json.loads(dry_run(kimi, *flags, "--json").stdout)
    H, I, E, S, W, V = 7168, 2048, 384, 4096, 16, 163840
    # by hand: each rank carries the original, the narrowest, one being written and its share of the 120 wider
    # models (60 MoE layers x 3 and 4 bits, over 8 ranks: 15), 16 windows each in bf16
    assert by_name(plan["items"], "sensitivity pass: 18 models' states") == [0, 18 * W * S * H * 2, 0]
    block = 4 * S * H * 2  # a block of windows through one layer, one window's logits of two models, the experts,
    tokens = 2 * W * S * 8 / E  # and one expert's GPTQ: its tokens (2x the mean), Hessians, workspace, weights
    gptq = 4 * (H * H + I * I) + 4 * (3 * H * H + 2 * H * I) + 4 * 3 * H * I + 3 * tokens * (H + I) * 4
    phase = block * 12 + 3 * S * V * 4 + E * 3 * H * I * 2 + gptq
    assert by_name(plan["items"], "sensitivity pass (")[0] == phase
    # on the host: the layer's MoE inputs (bf16), router weights (fp32) and indices (int64) of the 8 experts each
    # token goes to; the layer's experts at 2 bits with a float32 scale per 128 weights
    assert by_name(plan["items"], "sensitivity pass: a layer's") == [0, W * S * (H * 2 + 8 * 12) + E * 3 * H * I * (2 / 8 + 4 / 128), 0]
    assert plan["fits"]  # the phases do not overlap: the GSQ training phase is still the largest
    text = dry_run(kimi, *flags).stdout
    # 16 x (2 x 61 + 2 x (60 + 59 + ... + 1)) / 61 layer-passes = 992 window-passes
    assert "sensitivity pass: 16 windows x 4096 tokens, about 992 window-passes of the model against the run's " \
           "126976 (0.8%), split over the ranks" in text
    # GPTQ: each rank's 48 of the 384 experts of the 60 MoE layers (as the run's init does), and 15 whole layers (its
    # share of the 120 wider models)
    assert "GPTQ of 8640 experts per rank at 2, 3 or 4 bits, 3.0x the run's own init (2880)" in text
