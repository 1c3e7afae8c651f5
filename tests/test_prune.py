"""REAP expert pruning (`python -m gsq.prune`): the saliency is the paper's, the written checkpoint is
exactly the original with the other experts removed, and it loads with transformers and gsq.eval."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from conftest import CALIB_DATA, FAST, ROOT, TINY_MODEL, WIKI_TEST, digest, quantize, unreadable_by_others

from gsq import acts, adapter, prune, stream
from gsq.errors import InputError

CALIB = [*CALIB_DATA, "--preset", "tiny", "--num-samples", "16", "--seqlen", "128"]


def run_prune(*args, model=TINY_MODEL):
    cmd = [sys.executable, "-m", "gsq.prune", "--model", str(model), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, source_digest):
    out = tmp_path_factory.mktemp("p") / "tiny-reap4"
    proc = run_prune("--out", str(out), "--keep", "4", *CALIB)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert digest(TINY_MODEL, skip=()) == source_digest  # the source is never written to
    return out


def remove_in_memory(model, kept_per_layer: dict):
    """The original transformers model with the other routed experts cut out of its modules."""
    for i, kept in kept_per_layer.items():
        mlp = model.model.layers[i].mlp
        index = torch.tensor(kept)
        for module, names in ((mlp.gate, ("weight", "e_score_correction_bias")),
                              (mlp.experts, ("gate_up_proj", "down_proj"))):
            for name in names:
                t = getattr(module, name)
                setattr(module, name, type(t)(t.data[index], requires_grad=False) if isinstance(t, torch.nn.Parameter)
                        else t[index])
            module.num_experts = len(kept)
    return model


def test_pruned_checkpoint_is_the_original_minus_the_pruned_experts(pruned, tiny):
    from transformers import AutoModelForCausalLM

    record = json.loads((pruned / "gsq_prune.json").read_text())
    assert json.loads((pruned / "config.json").read_text())["n_routed_experts"] == 4
    kept = {l["layer"]: l["kept"] for l in record["layers"]}
    assert sorted(kept) == [1, 2, 3, 4, 5, 6] and all(len(k) == 4 for k in kept.values())
    ours = AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.bfloat16).eval()
    reference = remove_in_memory(AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.bfloat16).eval(), kept)
    ids = torch.arange(3, 131)[None]
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, reference(ids).logits)
        assert not torch.equal(ours(ids).logits, tiny[0](ids).logits)  # something was pruned
    index = json.loads((pruned / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any(".mlp.experts.4." in k for k in index)
    with safe_open(pruned / index["model.layers.3.self_attn.o_proj.weight"], "pt") as f, \
            safe_open(TINY_MODEL / "model.safetensors", "pt") as g:
        assert torch.equal(f.get_tensor("model.layers.3.self_attn.o_proj.weight"),
                           g.get_tensor("model.layers.3.self_attn.o_proj.weight"))


def test_kept_experts_are_the_most_salient(pruned):
    for layer in json.loads((pruned / "gsq_prune.json").read_text())["layers"]:
        s = torch.tensor(layer["saliency"])
        assert layer["kept"] == sorted(s.topk(4).indices.tolist())
        assert layer["reap_separated"] and min(s[layer["kept"]]) > max(s[[e for e in range(8) if e not in layer["kept"]]])


def test_saliency_is_the_router_weighted_output_norm(tiny):
    """S_j against the paper's formula evaluated with transformers' own expert module, token by token."""
    model = tiny[0]
    skeleton = stream.skeleton(model.config)
    ckpt = stream.Checkpoint(TINY_MODEL)
    arch = adapter.arch_of(model.config)
    stream.load_globals(ckpt, skeleton, arch, "cpu", torch.float32)
    layer = stream.load_layer(ckpt, skeleton, arch, 2, "cpu", torch.float32)
    torch.manual_seed(0)
    hidden = torch.randn(2, 64, model.config.hidden_size).to(torch.bfloat16)
    store = acts.Activations("calib", tuple(hidden.shape), "device", "cpu", torch.bfloat16, None)
    for b in store.blocks:
        store.put(b, hidden[store.windows(b)])
    ours, count = prune.saliency(skeleton, layer, store, torch.float32)
    x = adapter.post_attention_states(layer, hidden.float(), position_ids=torch.arange(64)[None],
                                      position_embeddings=skeleton.model.rotary_emb(hidden.float(), torch.arange(64)[None]))
    _, weights, indices = layer.mlp.gate(x)
    total, n = torch.zeros(8, dtype=torch.float64), torch.zeros(8)
    for t in range(x.shape[0]):
        for k in range(indices.shape[1]):
            e = indices[t, k].item()
            f = layer.mlp.experts(x[t : t + 1], indices[t : t + 1, k : k + 1], torch.ones(1, 1))  # f_e(x_t)
            total[e] += weights[t, k].item() * f.norm().item()
            n[e] += 1
    assert torch.equal(count, n.long())
    torch.testing.assert_close(ours, total / n.clamp(min=1), rtol=1e-4, atol=1e-6)


def test_the_card_says_what_was_pruned_and_carries_the_license(pruned, tmp_path):
    import yaml

    from gsq import card, export

    text = (pruned / "README.md").read_text()
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["base_model"] == "tiny-deepseek-v3" and {"reap", "pruned"} <= set(meta["tags"])
    assert "pruned from 8 to 4\nby REAP" in text
    src = tmp_path / "models--org--Big-MoE" / "snapshots" / "abc123"  # a Hub cache snapshot
    src.mkdir(parents=True)
    (src / "README.md").write_text("---\nlicense: other\nlicense_name: modified-mit\n---\n# Big MoE\n")
    meta = yaml.safe_load(card.front_matter(src, ["gsq"]).split("---\n")[1])
    assert meta["base_model"] == "org/Big-MoE" and (meta["license"], meta["license_name"]) == ("other", "modified-mit")
    assert all(export.COPIED_FILES.match(f) for f in ("LICENSE", "LICENSE.txt", "license.md", "NOTICE"))
    assert not export.COPIED_FILES.match("README.md")


def test_prune_then_gsq_end_to_end(pruned, tmp_path):
    out = tmp_path / "reap4-w2"
    proc = quantize("--out", str(out), *FAST, model=pruned)
    assert proc.returncode == 0, proc.stderr[-3000:]
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len([k for k in index if k.endswith(".weight_packed")]) == 6 * 4 * 3
    assert unreadable_by_others(pruned) == [] and unreadable_by_others(out) == []  # prune's output, compress's
    for model in (pruned, out):
        proc = subprocess.run([sys.executable, "-m", "gsq.eval", "--model", str(model), "--reference",
                               str(TINY_MODEL), "--data-file", str(WIKI_TEST), "--seqlen", "128",
                               "--max-windows", "4", "--json", *(["--no-card"] if model == pruned else [])],
                              cwd=ROOT, capture_output=True, text=True)  # (the pruned fixture is shared: left as it is)
        assert proc.returncode == 0, proc.stderr[-2000:]
        result = json.loads(proc.stdout)
        assert 0 < result["kl"] < 2 and 0.3 < result["top1"] < 1
    assert not (pruned / "gsq_eval.json").exists() and json.loads((out / "gsq_eval.json").read_text()) == [result]


def test_compressed_source_keeps_its_packed_experts(tmp_path):
    from test_sources import int4_copy

    src = tmp_path / "int4"
    int4_copy(src)
    out = tmp_path / "int4-reap4"
    proc = run_prune("--out", str(out), "--keep", "4", *CALIB, model=src)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == json.loads((src / "config.json").read_text())["quantization_config"]
    kept = {l["layer"]: l["kept"] for l in json.loads((out / "gsq_prune.json").read_text())["layers"]}
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(src / "model.safetensors", "pt") as f:
        for i, experts in kept.items():
            for new, old in enumerate(experts):
                for part in ("weight_packed", "weight_scale", "weight_shape"):
                    name = f"model.layers.{i}.mlp.experts.{{}}.down_proj.{part}"
                    with safe_open(out / index[name.format(new)], "pt") as g:
                        assert torch.equal(g.get_tensor(name.format(new)), f.get_tensor(name.format(old)))
    assert len(stream.Checkpoint(out).keys()) < len(stream.Checkpoint(src).keys())  # and it reads back


def test_refused_keeps(tmp_path):
    from transformers import DeepseekV3Config

    proc = run_prune("--out", str(tmp_path / "x"), "--keep", "1", *CALIB)
    assert proc.returncode == 2 and "the router picks 2 per token" in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()
    flat = DeepseekV3Config(n_routed_experts=8, num_experts_per_tok=2, n_group=1)
    for keep, ratio, words in ((8, 0, "keep between 2 and 7"), (4, 0.5, "exactly one of"), (0, 1.5, "in \\(0, 1\\)")):
        with pytest.raises(InputError, match=words):
            prune.experts_to_keep(flat, 8, keep, ratio)
    grouped = DeepseekV3Config(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    assert prune.experts_to_keep(grouped, 16, 8, 0) == 8
    for keep in (6, 4):  # not a multiple of the groups; 1 per group
        with pytest.raises(InputError, match="n_group"):
            prune.experts_to_keep(grouped, 16, keep, 0)
    assert prune.select(torch.tensor([5., 1, 2, 9, 0, 3, 8, 7]), 4, 2) == [0, 3, 6, 7]  # top 2 of each group


def test_sigterm_then_resume_gives_the_same_checkpoint(pruned, tmp_path):
    """Prune writes like quantization: stopped after layer 3's shard (its 20th file: 4 blocks of windows per
    resume point, then a shard and a resume point per layer), it says how to continue; a resume with other
    settings is refused; the same settings finish the identical checkpoint."""
    import shlex

    out = tmp_path / "p"
    flags = ["--keep", "4", *CALIB]
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "faulty_run.py"), "term", "20", "gsq.prune",
                           "--model", str(TINY_MODEL), "--out", str(out), *flags], cwd=ROOT, capture_output=True, text=True)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 143 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert last.startswith(f"error: stopped by SIGTERM: the finished layers are kept in {out}.partial; continue with: "
                           "python -m gsq.prune ") and not out.exists()
    command = shlex.split(last.split("continue with: ", 1)[1])[3:]  # the flags, ending in --resume
    refused = run_prune(*command[2:], "--keep", "5", model=command[1])
    assert refused.returncode == 2 and "this run has --keep 5, it was started with --keep 4" in refused.stderr
    resumed = run_prune(*command[2:], model=command[1])
    assert resumed.returncode == 0 and f"resuming {out}.partial at layer 3 of 7" in resumed.stdout, resumed.stderr
    assert digest(out, skip=("gsq_prune.json",)) == digest(pruned, skip=("gsq_prune.json",))
    records = [json.loads((d / "gsq_prune.json").read_text()) for d in (out, pruned)]
    assert [r["layers"] for r in records] == [records[1]["layers"]] * 2
