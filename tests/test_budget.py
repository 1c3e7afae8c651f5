"""Per-layer widths from a budget (gsq.budget): the knapsack is exact, each sensitivity is the KL of the model it
names (measured again with the whole model in memory), and a 2-layer budget run exports one config group per width that compressed-tensors reads back, resumes to the same
bytes, and is reproduced from its gsq_bits.json."""

import itertools
import json
import random
import subprocess
import sys

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from compressed_tensors.utils.match import match_name
from safetensors import safe_open

from conftest import FAST, ROOT, WIKI_TEST, digest, kill_after_layer, quantize
from gsq import budget
from test_faults import one_error_line


def brute_force(sens, sizes, limit):
    best = None
    for widths in itertools.product(budget.WIDTHS, repeat=len(sizes)):
        chosen = dict(zip(sorted(sizes), widths))
        bits = sum(sizes[i][1][b] * 8 for i, b in chosen.items())
        loss = sum(sens[i][b] for i, b in chosen.items())
        if bits <= limit and (best is None or loss < best[0]):
            best = (loss, chosen)
    return best


@pytest.mark.parametrize("seed", range(30))
def test_the_knapsack_is_exact(seed):
    rng = random.Random(seed)
    layers = rng.sample(range(12), rng.randint(1, 7))
    sizes = {}
    for i in layers:
        n = rng.choice([128, 256, 384]) * 1024
        sizes[i] = (n, {b: n * b // 8 + n // 64 for b in budget.WIDTHS})  # codes + bf16 scales at group 128
    sens = {i: dict(zip(budget.WIDTHS, sorted((rng.random() for _ in budget.WIDTHS), reverse=True))) for i in layers}
    weights = sum(n for n, _ in sizes.values())
    limit = int(rng.uniform(2.125, 4.3) * weights)
    loss, expected = brute_force(sens, sizes, limit)
    chosen = budget.allocate(sens, sizes, limit)
    assert sum(sens[i][b] for i, b in chosen.items()) == pytest.approx(loss, rel=1e-12)
    assert sum(sizes[i][1][b] * 8 for i, b in chosen.items()) <= limit


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    from replicas import qwen3_moe

    return qwen3_moe(tmp_path_factory.mktemp("src") / "qwen3-moe")


def test_each_sensitivity_is_the_kl_of_the_model_it_names(replica):
    """The streamed pass (every model's states carried layer by layer) against the whole model in memory: every
    MoE layer's experts at GPTQ 2 bits (Hessians from the base model's states at the layer) but layer i's at
    width b, KL(original || that) per token."""
    from transformers import AutoModelForCausalLM

    from gsq import adapter, walk
    from gsq.config import Config

    cfg = Config(model=str(replica), group_size=128, min_tokens=1)
    source = walk.Source(str(replica), torch.device("cpu"))
    source.open()
    source.load_globals()
    ids = torch.randint(0, source.text.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))
    sens = budget.sensitivity(source, ids, cfg)

    model = AutoModelForCausalLM.from_pretrained(replica, dtype=source.compute).eval()
    moe = [i for i, layer in enumerate(model.model.layers) if adapter.is_moe(layer)]
    assert sorted(sens) == moe and len(moe) == 2
    with torch.no_grad():
        reference = torch.log_softmax(model(ids).logits.float(), -1)
    weights = {}  # (layer, width) -> its experts quantized from the base model's states at the layer
    for i in moe:
        layer = model.model.layers[i]
        originals = [tuple(w.clone() for w in adapter.expert_weights(layer, e)) for e in range(adapter.num_experts(layer))]
        seen = []
        hook = layer.register_forward_pre_hook(lambda m, args, kw: seen.append(kw.get("hidden_states", args[0] if args else None)),
                                               with_kwargs=True)
        with torch.no_grad():
            model(ids)  # the layers before i at 2 bits: the base
        hook.remove()
        tokens = budget.routed_tokens(model, layer, seen, torch.device("cpu"))
        for b in budget.WIDTHS:
            budget.init_experts(layer, budget.at(cfg, {i: b}, i), originals, tokens, torch.device("cpu"), source.compute,
                                split=False)
            weights[i, b] = [tuple(w.clone() for w in adapter.expert_weights(layer, e)) for e in range(len(originals))]
        for e, ws in enumerate(weights[i, 2]):
            adapter.set_expert_weights(model.model.layers[i], e, *ws)
    for i, b in itertools.product(moe, budget.WIDTHS):
        for j in moe:
            for e, ws in enumerate(weights[j, b if j == i else 2]):
                adapter.set_expert_weights(model.model.layers[j], e, *ws)
        with torch.no_grad():
            q = torch.log_softmax(model(ids).logits.float(), -1)
        kl = (reference.exp() * (reference - q)).sum(-1).mean().item()
        assert sens[i][b] == pytest.approx(kl, rel=1e-4), (i, b)
    assert sens[moe[0]][2] == sens[moe[1]][2] > max(sens[i][b] for i in moe for b in (3, 4))


def written(out):
    """{module: (container bits, codes)} of every packed expert, read with compressed-tensors' own unpacker and the
    config group whose targets match the module (compressed-tensors' matcher)."""
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"].values()
    found = {}
    for shard in sorted(out.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                if name.endswith(".weight_packed"):
                    key = name[: -len(".weight_packed")]
                    (bits,) = [g["weights"]["num_bits"] for g in groups if any(match_name(key, t) for t in g["targets"])]
                    shape = torch.Size(f.get_tensor(key + ".weight_shape").tolist())
                    found[key] = (bits, unpack_from_int32(f.get_tensor(name), bits, shape))
    return found


def test_a_two_layer_budget_exports_reads_back_and_resumes_to_the_same_bytes(replica, tmp_path):
    # the two MoE layers are the same size: 2.625 bits is exactly one at 3 bits and one at 2
    flags = [*FAST, "--bits-budget", "2.625"]
    whole = tmp_path / "whole"
    proc = quantize("--out", str(whole), *flags, model=replica)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads((whole / "gsq_bits.json").read_text())
    layers = plan["layers"]
    assert sorted(b["bits"] for b in layers.values()) == [2, 3] and plan["average_bits"] == pytest.approx(2.625)
    for row in layers.values():  # more bits, less loss
        s = row["sensitivity"]
        assert s["2"] > s["3"] > 0 and s["2"] > s["4"] > 0
    # the layer at 3 bits is the one whose upgrade buys more
    gain = {i: row["sensitivity"]["2"] - row["sensitivity"]["3"] for i, row in layers.items()}
    assert layers[max(gain, key=gain.get)]["bits"] == 3
    for key, (bits, codes) in written(whole).items():
        i = key.split(".layers.")[1].split(".")[0]
        assert bits == layers[i]["bits"]
        assert codes.min() >= -(1 << (bits - 1)) and codes.max() < 1 << (bits - 1)
        if bits == 3:
            assert ((codes < -2) | (codes > 1)).any()

    # gsq.eval reads each layer at its width: the perplexity the run measured on its in-memory model
    proc = subprocess.run([sys.executable, "-m", "gsq.eval", "--model", str(whole), "--no-card", "--data-file",
                           str(WIKI_TEST), "--seqlen", "128", "--max-windows", "4", "--json"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "gsq's own streaming reader" in proc.stderr, proc.stderr[-2000:]
    run = json.loads((whole / "gsq_run.json").read_text())
    in_run = run["finetune"]["ppl"] if "ppl" in run.get("finetune", {}) else run["ppl"][-1]["ppl"]
    assert json.loads(proc.stdout)["ppl"] == pytest.approx(in_run, rel=1e-3)

    # killed after layer 1, resumed: the same bytes (the widths come from the resume point, not measured again)
    out = tmp_path / "resumed"
    proc = quantize("--out", str(out), *flags, wait=False, model=replica)
    kill_after_layer(proc, out.with_name("resumed.partial") / ".gsq-work" / "state.json", 1)
    resumed = quantize("--out", str(out), *flags, "--resume", model=replica)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert digest(out) == digest(whole)

    # the allocation, kept and given back: the same checkpoint; edited to one it does not fit: one line
    again = tmp_path / "again"
    proc = quantize("--out", str(again), *FAST, "--bits-plan", str(whole / "gsq_bits.json"), model=replica)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = sorted(p.name for p in whole.glob("*.safetensors"))
    assert [(again / s).read_bytes() for s in shards] == [(whole / s).read_bytes() for s in shards]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"layers": {"0": {"bits": 5}, "1": {"bits": 2}}}))
    one_error_line(quantize("--out", str(tmp_path / "x"), *FAST, "--bits-plan", str(bad), model=replica),
                   f"--bits-plan {bad}: widths must be one of [2, 3, 4]")
    assert not (tmp_path / "x.partial").exists()


def test_a_target_size_lands_within_one_percent_below(replica, tmp_path):
    # the size of a checkpoint with layer 0 at 3 bits and layer 1 at 2 (RTN: seconds), then that size + 0.5% as
    # --target-size: the same widths, on disk within 1% below the target
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"layers": {"0": {"bits": 3}, "1": {"bits": 2}}}))
    flags = [*FAST, "--method", "rtn", "--eval-every", "0"]
    proc = quantize("--out", str(tmp_path / "a"), *flags, "--bits-plan", str(plan), model=replica)
    assert proc.returncode == 0, proc.stderr[-3000:]
    size = sum(p.stat().st_size for p in (tmp_path / "a").glob("*.safetensors"))
    target = int(size * 1.005)
    proc = quantize("--out", str(tmp_path / "b"), *flags, "--target-size", f"{target}B", model=replica)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = sum(p.stat().st_size for p in (tmp_path / "b").glob("*.safetensors"))
    widths = {i: row["bits"] for i, row in json.loads((tmp_path / "b" / "gsq_bits.json").read_text())["layers"].items()}
    assert 0.99 * target <= got <= target and sorted(widths.values()) == [2, 3], (got, target, widths)
