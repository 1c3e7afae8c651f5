"""REAP expert pruning (Cerebras, arXiv 2510.13999): drop each layer's least useful routed experts
before quantization.

    python -m gsq.prune --model DIR --out DIR (--keep N | --ratio R) [--criterion reap] [--dataset ...]

Saliency of routed expert j over the calibration tokens X_j that the router sends to it:

    S_j = 1/|X_j| * sum_{x in X_j} g_j(x) * ||f_j(x)||_2

with g_j(x) the router's normalised weight of j for x and f_j(x) the expert's output. Each layer
keeps its top-N experts on its own (with expert groups, `n_group` > 1, the top N/n_group of every
group, so that the groups stay whole). The run streams like quantization: layer i is scored on the
outputs of the already pruned layers before it; it is written into OUT.partial with a resume point after
every layer (`--resume` continues an interrupted run, gsq.partial). The kept experts are renumbered 0..N-1 in their
original order, the router's expert rows (weight, e_score_correction_bias) are sliced to match and
the config's expert count is updated. Every other tensor is copied as it is stored; so are a
compressed-tensors source's kept experts (scoring dequantizes them, the packed tensors are copied).
`--criterion frequency | random` rank by routed-token count or at random instead (baselines).
"""

import copy
import json
import time
from pathlib import Path

from gsq.errors import InputError, quiet_start, run_cli

quiet_start(__name__)  # before the imports below take seconds
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from gsq import acts, adapter, calib, card, export, partial, stream, walk
from gsq.config import PRUNE_FLAGS, Config, build_parser, derive_seed, from_args
from gsq.eval import TOKENIZER_HINT, load_tokenizer, pick_device


def blocks(model, store: acts.Activations, compute):
    """The windows' states block by block on the device, in the compute dtype, with their positions."""
    for b in store.blocks:
        h = store.get(b, compute)
        yield b, h, adapter.positions(model, h)


@torch.no_grad()
def saliency(model, layer, hidden: acts.Activations, compute):
    """REAP saliency S_j and routed-token count of every routed expert of `layer` on the windows `hidden`."""
    E = adapter.num_experts(layer)
    total = torch.zeros(E, dtype=torch.float64)
    count = torch.zeros(E, dtype=torch.int64)
    for _, h, positions in blocks(model, hidden, compute):
        x = adapter.post_attention_states(layer, h, **positions)
        g, idx = adapter.route(layer, x)
        for e in range(E):
            token, slot = (idx == e).nonzero(as_tuple=True)
            if token.numel():
                f = adapter.expert_output(layer, e, x[token]).float()
                total[e] += (g[token, slot].float() * f.norm(dim=-1)).sum().item()
                count[e] += token.numel()
    return total / count.clamp(min=1), count


def experts_to_keep(tcfg, E: int, keep: int, ratio: float) -> int:
    """N from --keep or --ratio, refused when the router could not work with N experts."""
    if bool(keep) == bool(ratio):
        raise InputError("give exactly one of --keep N and --ratio R")
    if ratio and not 0 < ratio < 1:
        raise InputError(f"--ratio is the fraction of experts pruned, in (0, 1); got {ratio}")
    n = keep or E - round(ratio * E)
    top_k = tcfg.num_experts_per_tok
    if not top_k <= n < E:
        raise InputError(f"cannot keep {n} of {E} routed experts: the router picks {top_k} per token, so keep "
                         f"between {top_k} and {E - 1}")
    groups = getattr(tcfg, "n_group", None) or 1
    if groups > 1:
        per, topk_group = n // groups, getattr(tcfg, "topk_group", groups)
        if n % groups or per < 2 or per * topk_group < top_k:
            raise InputError(f"cannot keep {n} experts in {groups} expert groups (n_group): keep a multiple of "
                             f"{groups} with at least 2 per group and topk_group ({topk_group}) x per-group >= "
                             f"top-k ({top_k})")
    return n


def select(scores: torch.Tensor, keep: int, groups: int) -> list:
    """Indices of the kept experts, ascending: the top `keep` by score (ties to the lower index), or
    the top keep/groups of each of `groups` equal contiguous expert groups."""
    per = scores.numel() // groups
    kept = []
    for g in range(groups):
        order = torch.argsort(scores[g * per:(g + 1) * per], descending=True, stable=True)
        kept += (order[: keep // groups] + g * per).tolist()
    return sorted(kept)


def separated(reap: torch.Tensor, kept: list, groups: int) -> bool:
    """min(kept saliency) > max(pruned saliency), within each expert group."""
    per = reap.numel() // groups
    for g in range(groups):
        mine = range(g * per, (g + 1) * per)
        ins = [reap[e] for e in mine if e in kept]
        outs = [reap[e] for e in mine if e not in kept]
        if outs and min(ins) <= max(outs):
            return False
    return True


def sliced_module_state(arch, layer, kept: list) -> dict:
    """The layer's state dict with the router's and the routed experts' tensors cut to the kept experts."""
    E = adapter.num_experts(layer)
    per_expert = arch.expert_row_modules()
    state = {}
    for name, t in layer.state_dict().items():
        cut = name.startswith(per_expert) and t.dim() > 0 and t.shape[0] == E
        state[name] = t[torch.tensor(kept, device=t.device)] if cut else t
    return state


def layer_tensors(ckpt, arch, i: int, kept: list | None, E: int) -> dict:
    """Layer i's tensors as stored (packed ones stay packed); for a pruned layer, only the kept
    experts, renumbered 0..N-1, and the router's expert rows sliced to them."""
    prefix = f"{arch.layers_prefix}.{i}."
    tensors = ckpt.raw(sorted(k for k in ckpt.files if k.startswith(prefix)))
    if kept is None:
        return tensors
    experts, rows = arch.stored_expert_prefix(i), arch.stored_expert_rows(i)
    new_index = {e: n for n, e in enumerate(kept)}
    out = {}
    for name, t in tensors.items():
        if experts and name.startswith(experts):
            e, _, tail = name[len(experts):].partition(".")
            if int(e) in new_index:
                out[f"{experts}{new_index[int(e)]}.{tail}"] = t
        elif name.startswith(rows) and t.dim() > 0 and t.shape[0] == E:
            out[name] = t[torch.tensor(kept)]
        else:
            out[name] = t
    return out


def layer_index(arch, name: str):
    prefix = arch.layers_prefix + "."
    return int(name[len(prefix):].split(".")[0]) if name.startswith(prefix) else None


def run(cfg: Config) -> dict:
    """Prune `cfg.model`'s routed experts into `cfg.out`, layer by layer; returns the record (also written as
    OUT/gsq_prune.json). The model, the data and the output directory are checked before any work."""
    t0 = time.time()
    source = walk.Source(cfg.model, torch.device(pick_device(cfg.device)), seqlen=cfg.seqlen)
    model, arch, tcfg, device, compute = source.model, source.arch, source.text, source.device, source.compute
    moe = [j for j, layer in enumerate(model.model.layers) if adapter.is_moe(layer)]
    if not moe:
        raise InputError(f"{tcfg.model_type} model has no MoE layers with routed experts: nothing to prune")
    E = adapter.num_experts(model.model.layers[moe[0]])
    keep = experts_to_keep(tcfg, E, cfg.keep, cfg.ratio)
    groups = getattr(tcfg, "n_group", None) or 1
    pruned_cfg = copy.deepcopy(tcfg)
    setattr(pruned_cfg, arch.n_experts_key, keep)
    pruned = stream.skeleton(pruned_cfg)  # the layers as they will be, for passing activations on
    source.open()
    this_run = partial.identity(cfg, source.path, 1, device.type, PRUNE_FLAGS)  # what a resume point is bound to
    point = partial.check(cfg, source.path, this_run)  # the resume point of this same run, or None
    ids = note = None
    if point is None:  # the calibration data, read and checked before anything is written
        tokenizer = load_tokenizer(cfg.tokenizer or source.path, TOKENIZER_HINT)
        ids, note = calib.calibration_ids(tokenizer, cfg.dataset, cfg.text_field, cfg.num_samples, cfg.seqlen, cfg.seed)
    partial_dir = partial.claim(cfg, source.path, this_run)  # held by this run from here on
    work = partial_dir / partial.WORK
    source.load_globals()
    # the calibration windows' states between layers: on the GPU, or in host memory
    hidden = acts.Activations("calib", (cfg.num_samples, cfg.seqlen, tcfg.hidden_size), "device", device,
                              source.dtype, work)
    start = walk.begin(source, work, [(hidden, ids)], point)
    if point is None:
        record = {"criterion": cfg.criterion, "experts": E, "keep": keep, "calibration": note, "layers": []}
        partial.save_state(partial_dir, 0, record, this_run)
        print(f"calibration: {note}; keeping {keep} of {E} routed experts per layer by {cfg.criterion}")
    else:
        record = point["record"]
        print(f"resuming {partial_dir} at layer {start} of {source.n_layers}")
    for i in tqdm(range(start, source.n_layers), desc="layers", initial=start, total=source.n_layers):
        with source.layer(i) as layer:
            hidden.begin(i)
            kept = None
            if adapter.is_moe(layer):
                reap, count = saliency(model, layer, hidden, compute)
                scores = {"reap": reap, "frequency": count.double(),
                          "random": torch.rand(E, generator=torch.Generator().manual_seed(derive_seed(cfg.seed, i)))}
                kept = select(scores[cfg.criterion], keep, groups)
                stats = {"layer": i, "kept": kept, "saliency": reap.tolist(), "tokens": count.tolist(),
                         "reap_separated": separated(reap, kept, groups)}
                record["layers"].append(stats)
                pruned_away = sum(reap[e].item() for e in range(E) if e not in kept) / reap.sum().item()
                tqdm.write(f"layer {i}: kept {kept}; pruned experts hold {100 * pruned_away:.1f}% of the saliency; "
                           f"min kept > max pruned saliency: {stats['reap_separated']}")
                state = sliced_module_state(arch, layer, kept)
                stream.unload_layer(model, i)  # the original layer's weights go before the pruned layer's come
                layer = stream.materialize(pruned.model.layers[i], state, device, compute)
            with torch.no_grad():  # the pruned layer passes the windows on
                for b, h, positions in blocks(model, hidden, compute):
                    hidden.put(b, layer(h, attention_mask=None, **positions))
            export.write_unit(partial_dir, export.unit_name(i), layer_tensors(source.ckpt, arch, i, kept, E),
                              cfg.max_shard_bytes)
            layer.to("meta")
        acts.commit(work, i + 1, [hidden])
        partial.save_state(partial_dir, i + 1, record, this_run)

    out_config = json.loads((source.path / "config.json").read_text())
    target = out_config["text_config"] if arch.text_config else out_config
    # the field and its alias in transformers' attribute_map (Qwen3-MoE's num_experts is num_local_experts
    # now): both written, so old and new readers (transformers, vLLM) agree
    for key in {arch.n_experts_key, type(tcfg).attribute_map.get(arch.n_experts_key, arch.n_experts_key)}:
        target[key] = keep
    extra = sorted({layer_index(arch, k) for k in source.ckpt.files} - {None} - set(range(source.n_layers)))
    if extra:  # DeepSeek's multi-token-prediction layers: their experts cannot be scored here
        print(f"dropping the multi-token-prediction layer(s) {extra}: their experts cannot be scored")
        target["num_nextn_predict_layers"] = 0
    rest = sorted(k for k in source.ckpt.files if layer_index(arch, k) is None)
    export.write_unit(partial_dir, "rest", source.ckpt.raw(rest), cfg.max_shard_bytes)
    record.update(seconds=round(time.time() - t0, 1), config=json.loads(cfg.to_json(PRUNE_FLAGS)))
    export.finish(source.path, partial_dir, Path(cfg.out), out_config, {
        "gsq_prune.json": json.dumps(record, indent=2) + "\n",
        "README.md": card.pruned_card(source.path, out_config, record, partial_dir)}, cfg.tokenizer)
    partial.release(Path(cfg.out))
    print(f"wrote {cfg.out}: {keep} of {E} routed experts per layer, in {record['seconds']:.0f}s")
    return record


def main(argv=None):
    args = build_parser("python -m gsq.prune", "REAP expert pruning of a Mixture-of-Experts model",
                        PRUNE_FLAGS).parse_args(argv)
    try:
        cfg = from_args(args)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    walk.map_large_host_buffers()
    run(cfg)


if __name__ == "__main__":
    run_cli(main)
