"""`python -m gsq.quantize` end to end on the bundled tiny model (a small step budget that fits CI).

The checkpoint is read back by transformers and by compressed-tensors' own unpacker; the source model is
never touched. (Interrupted runs and --resume: tests/test_faults.py.)
"""

import json
import os
import subprocess
import sys

import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from conftest import FAST, ROOT, TINY_MODEL, WIKI_TEST, digest, quantize, unreadable_by_others
from safetensors import safe_open


def test_output_is_a_complete_checkpoint(quantized, source_digest):
    names = {p.name for p in quantized.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "gsq_config.json", "gsq_run.json"} <= names
    assert not (quantized.parent / (quantized.name + ".partial")).exists()
    config = json.loads((quantized / "config.json").read_text())
    weights = config["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (2, 128, True)
    saved = json.loads((quantized / "gsq_config.json").read_text())
    assert saved["min_steps"] == 4 and saved["preset"] == "tiny" and "resume" not in saved
    run = json.loads((quantized / "gsq_run.json").read_text())
    moe = [layer for layer in run["layers"] if layer["moe"]]
    assert len(moe) == 6 and all(len(layer["tokens_per_expert"]) == 8 for layer in moe)
    assert digest(TINY_MODEL, skip=()) == source_digest  # the source is never modified
    shards = sorted(p.name for p in quantized.glob("*.safetensors"))
    assert shards == [f"model-{n:05d}-of-00008.safetensors" for n in range(1, 9)]  # 6 MoE layers, 1 dense, the rest
    index = json.loads((quantized / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] <= sum((quantized / f).stat().st_size for f in shards)
    assert unreadable_by_others(quantized) == []


def test_the_card_describes_the_run_and_takes_the_eval_results(quantized, tmp_path):
    import shutil

    import yaml

    out = shutil.copytree(quantized, tmp_path / "w2")
    text = (out / "README.md").read_text()
    meta = yaml.safe_load(text.split("---\n")[1])  # Hub-style front matter
    assert meta["base_model"] == "tiny-deepseek-v3" and {"gsq", "compressed-tensors", "2-bit"} <= set(meta["tags"])
    assert (meta["library_name"], meta["pipeline_tag"]) == ("transformers", "text-generation")
    run = json.loads((out / "gsq_run.json").read_text())
    for point in run["ppl"]:  # the perplexity trajectory measured during the run
        assert f"| {point['layers_quantized']} | {point['ppl']:.3f} |" in text
    assert "vllm serve /path/to/this/folder\n" in text and "tensor-parallel sizes 1 " in text
    proc = subprocess.run([sys.executable, "-m", "gsq.eval", "--model", str(out), "--reference", str(TINY_MODEL),
                           "--data-file", str(WIKI_TEST), "--seqlen", "128", "--max-windows", "4", "--json"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    row = f"| tiny-deepseek-v3 | wiki.test.raw | 4 x 128 | {result['kl']:.5f} | {100 * result['top1']:.2f}% | "
    assert row + f"{result['ppl']:.3f} | - |" in (out / "README.md").read_text()
    assert json.loads((out / "gsq_eval.json").read_text()) == [result]
    assert (quantized / "README.md").read_text() == text  # (the copy's card took it, not the fixture's)


def test_transformers_loads_exactly_our_codes(quantized):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(quantized, dtype=torch.bfloat16)
    index = json.loads((quantized / "model.safetensors.index.json").read_text())["weight_map"]
    checked = 0
    for layer in range(1, 7):
        for e in (0, 5):
            for proj, rows in (("gate_proj", slice(0, 128)), ("up_proj", slice(128, 256)), ("down_proj", None)):
                key = f"model.layers.{layer}.mlp.experts.{e}.{proj}"
                with safe_open(quantized / index[key + ".weight_packed"], "pt") as f:
                    packed, scale, shape = (f.get_tensor(key + s)
                                            for s in (".weight_packed", ".weight_scale", ".weight_shape"))
                codes = unpack_from_int32(packed, 2, torch.Size(shape.tolist()))  # compressed-tensors' reader
                assert codes.min() >= -2 and codes.max() <= 1
                ours = (scale.float().repeat_interleave(128, dim=1) * codes.float()).to(torch.bfloat16)
                experts = model.model.layers[layer].mlp.experts
                loaded = experts.gate_up_proj[e][rows] if rows else experts.down_proj[e]
                assert torch.equal(loaded, ours), key
                checked += 1
    assert checked == 36


def test_existing_output_is_refused(quantized):
    proc = quantize("--out", str(quantized), *FAST)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith("error: output")
    proc = quantize("--out", str(TINY_MODEL / "sub"), *FAST)
    assert proc.returncode != 0 and "never written to" in proc.stderr


def test_a_clone_without_local_data_offline_is_refused_in_one_line(tmp_path):
    # The package knows no workspace: in a clone with no ../shared beside it (the bundled models copied, the
    # Hub offline, as in the tests), the first command fails in one line that names the flag to pass.
    clone = tmp_path / "clone"
    (clone / "models").mkdir(parents=True)
    os.symlink(TINY_MODEL, clone / "models" / TINY_MODEL.name)
    assert not (tmp_path / "shared").exists()
    proc = subprocess.run([sys.executable, "-m", "gsq.quantize", "--preset", "tiny", "--out", "out/x"], cwd=clone,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("error: ") and "--dataset PATH" in proc.stderr
    assert not (clone / "out").exists()


def test_dense_model_is_refused(tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=2048)).save_pretrained(tmp_path / "llama")
    AutoTokenizer.from_pretrained(TINY_MODEL).save_pretrained(tmp_path / "llama")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "gsq.quantize", "--model", str(tmp_path / "llama"),
                           "--out", str(tmp_path / "o")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == \
        "error: unsupported architecture 'llama' (supported: deepseek_v3, kimi_k25, qwen3_moe, qwen3_next, mixtral, minimax_m2, kimi_linear, gpt_oss)"


def test_original_targets_change_every_moe_layer_after_the_first(quantized, tmp_path):
    """--targets original: each expert is trained towards its output on the original model's inputs. At the
    first MoE layer those are the quantized model's inputs (only a dense layer came before), so its codes are
    the default's; every later MoE layer has other targets, other codes. (The scale fine-tune that follows
    moves scales only, never codes.)"""
    out = tmp_path / "original-targets"
    proc = quantize("--out", str(out), *FAST, "--targets", "original")
    assert proc.returncode == 0, proc.stderr[-3000:]

    def codes(root, layer):
        index = json.loads((root / "model.safetensors.index.json").read_text())["weight_map"]
        keys = [k for k in index if k.startswith(f"model.layers.{layer}.mlp.experts.") and k.endswith(".weight_packed")]
        tensors = {}
        for k in keys:
            with safe_open(root / index[k], "pt") as f:
                tensors[k] = f.get_tensor(k)
        return tensors

    same = []
    for layer in range(1, 7):
        ours, default = codes(out, layer), codes(quantized, layer)
        assert len(ours) == 24 and ours.keys() == default.keys()
        same.append(all(torch.equal(ours[k], default[k]) for k in ours))
    assert same == [True] + [False] * 5
