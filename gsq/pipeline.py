"""The run: stream the model layer by layer, quantize each MoE layer's routed experts with GSQ,
pass the quantized layer's outputs on, write the checkpoint as it goes, watch perplexity.

    plan the memory (gsq.plan): refuse a run that cannot fit, before any work
    embed this rank's calibration windows into its activation store (gsq.acts)
    for each decoder layer i:
        load layer i from the shards
        if MoE: residual = h + attention(h) for every block of windows
                route, init, refine, measure every routed expert (gsq.experts)
                h = residual + MoE(residual), with the quantized experts
        else:   h = layer(h)
        write layer i's shard, free layer i (gsq.walk); the activations become the resume point
        every --eval-every layers: perplexity of quantized layers 0..i + original rest
    --finetune-scales: every expert's scales trained end to end on the KL to the original (gsq.finetune)
    write the rest of the checkpoint, then rename OUT.partial to OUT
"""

import json
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from gsq import acts, adapter, budget, card, dist, experts, export, finetune, partial, plan, walk
from gsq import calib as calibration
from gsq.config import Config
from gsq.inspect import tensor_parallel_sizes
from gsq.eval import TOKENIZER_HINT, eval_windows, load_tokenizer, pick_device, summarize, window_sums, wikitext_rows


@torch.no_grad()
def layer_pass(model, layer, stores: list, compute):
    """h = layer(h) for every block of windows in `stores`, in place."""
    for store in stores:
        for b in store.blocks:
            h = store.get(b, compute)
            store.put(b, layer(h, attention_mask=None, **adapter.positions(model, h)))


def moe_layer(model, layer, i: int, calib, original, cfg, dtype, compute, experts_per_batch: int):
    """A MoE layer on the calibration windows: attention, its routed experts quantized, then the MoE
    block with the quantized experts. Returns the packed experts and the layer's statistics. `original`
    (or None) holds the original model's states, which pass the layer with its original experts."""
    stores = [s for s in (calib, original) if s is not None]
    with torch.no_grad():
        for store in stores:
            for b in store.blocks:
                h = store.get(b, compute)
                store.put(b, adapter.attention_residual(layer, h, **adapter.positions(model, h)))
    final, stats = experts.quantize(layer, i, calib, cfg, dtype, experts_per_batch, original)
    for store in stores[::-1]:  # the original states first, while the layer has its original experts
        if store is calib:
            experts.set_quantized(layer, final, dtype)
        with torch.no_grad():
            for b in store.blocks:
                store.put(b, adapter.moe_output(layer, store.get(b, compute)))
    return final, stats


def perplexity(source, evals, windows, first_original: int, quantized=None) -> float:
    """Perplexity with layers before `first_original` quantized (their outputs are in `evals`) and the
    original layers from there on, streamed from the checkpoint; every rank runs its windows. With
    `quantized` (layer -> its experts as `final`, or None), from the embeddings with those experts."""
    model, device, compute = source.model, source.device, source.compute
    h = evals.scratch()
    if quantized is not None:
        with torch.no_grad():
            h = {b: adapter.embed(model, windows[evals.windows(b)].to(device)).to(x.device, x.dtype)
                 for b, x in h.items()}
    for j in range(first_original, source.n_layers):
        with source.layer(j) as layer:
            final = quantized(j) if quantized is not None else None
            if final is not None:
                experts.set_quantized(layer, final, evals.dtype)
            with torch.no_grad():
                for b, x in h.items():
                    x = x.to(device, compute)
                    h[b] = layer(x, attention_mask=None, **adapter.positions(model, x)).to(h[b].device, h[b].dtype)
    sums = {}
    with torch.no_grad():
        for b, x in h.items():
            for n, w in enumerate(range(evals.n)[evals.windows(b)]):
                sums[w] = window_sums(adapter.logits(model, x[n : n + 1].to(device, compute))[0], windows[w])
    sums = dist.gather(sums)
    return summarize([sums[w] for w in sorted(sums)])["ppl"]


def run(cfg: Config) -> dict:
    """Quantize the routed experts of `cfg.model` into `cfg.out`, layer by layer, as the loop above says;
    returns the run record (also written as OUT/gsq_run.json). Everything that can refuse the run (the
    model, the memory plan, the output directory, the data) is checked before any work."""
    t0 = time.time()
    device = torch.device(dist.init(pick_device(cfg.device)))  # under torchrun: this rank's device
    writer = dist.is_writer()  # rank 0 writes the checkpoint
    source = walk.Source(cfg.model, device, seqlen=cfg.seqlen, **({"eval_seqlen": cfg.eval_seqlen} if cfg.eval_every else {}))
    model, arch, dtype, compute = source.model, source.arch, source.dtype, source.compute
    adapter.check_quantizable(model, cfg.group_size)
    gpu, host = plan.machine(cfg, device.type)
    setup = plan.Setup(plan.dimensions(source.text, model), dist.world(),
                       int(os.environ.get("LOCAL_WORLD_SIZE", "1")), gpu, host, dtype.itemsize)
    memory = dist.on_writer(plan.plan, setup, budget.widest(cfg))  # rank 0's: every rank must group the experts alike
    plan.check(memory)  # a run that cannot fit is refused here, before any work
    source.open()
    this_run = partial.identity(cfg, source.path, dist.world(), device.type)  # what a resume point is bound to
    sizes = budget.layer_sizes(model, cfg.group_size, budget.scale_bytes(cfg, dtype))
    if cfg.bits_plan:  # the plan's widths, not its file name, are what the bytes depend on
        this_run["widths"] = {str(i): b for i, b in budget.read_plan(cfg.bits_plan, list(sizes)).items()}
    limit = budget.limit(cfg, source, sizes)  # a budget below what 2 bits take is refused here
    point = dist.on_writer(partial.check, cfg, source.path, this_run)  # the resume point of this same run, or None
    tokenizer = load_tokenizer(cfg.tokenizer or source.path, TOKENIZER_HINT)
    ids = note = windows = None  # the data, read and checked before anything is written
    if point is None or cfg.finetune_scales:  # (the fine-tune reads the calibration windows again)
        ids, note = calibration.calibration_ids(tokenizer, cfg.dataset, cfg.text_field, cfg.num_samples,
                                                cfg.seqlen, cfg.seed)
    if cfg.eval_every:
        windows = eval_windows(tokenizer, wikitext_rows(cfg.eval_data or None, "--eval-data"), cfg.eval_seqlen, cfg.eval_windows)
    partial_dir = dist.on_writer(partial.claim, cfg, source.path, this_run)  # held by this run from here on
    work = partial_dir / partial.WORK
    source.load_globals()
    if point is not None:
        allocation = point["record"].get("bits")  # the widths the interrupted run chose
    else:
        t_alloc = time.time()
        allocation = budget.choose(cfg, source, ids, sizes, limit)  # every rank measures its share
        t_alloc = round(time.time() - t_alloc, 1)
    widths = {int(i): row["bits"] for i, row in allocation["layers"].items()} if allocation else {}
    if allocation and writer:
        print(budget.describe(allocation))
    hidden, placement = source.text.hidden_size, memory.placement  # (on a CPU, "device" is host memory)
    calib = acts.Activations("calib", (cfg.num_samples, cfg.seqlen, hidden), placement, device, dtype, work)
    original = evals = None
    if cfg.targets == "original":  # the original model's states beside the quantized model's
        original = acts.Activations("orig", calib.shape, placement, device, dtype, work)
    if windows is not None:
        evals = acts.Activations("eval", (windows.shape[0], cfg.eval_seqlen, hidden), placement, device, dtype, work)
    inputs = [(s, w) for s, w in ((calib, ids), (original, ids), (evals, windows)) if s is not None]
    stores = [s for s, _ in inputs]

    start = walk.begin(source, work, inputs, point)
    if point is not None:
        record = point["record"]
        if writer:
            print(f"resuming {partial_dir} at layer {start} of {source.n_layers}")
    else:
        record = {"calibration": note, "layers": [], "ppl": []}
        if allocation:
            record.update(bits=allocation, bits_seconds=t_alloc)
        if windows is not None:
            record["ppl"].append({"layers_quantized": 0, "ppl": perplexity(source, evals, windows, 0)})
        if writer:
            print(f"calibration: {note}")
            if windows is not None:
                print(f"perplexity, original model: {record['ppl'][-1]['ppl']:.3f}")
            partial.save_state(partial_dir, 0, record, this_run)
    held = dist.gather({dist.rank(): (len(calib.rows()), len(evals.rows()) if evals else 0,
                                      sum(store.resident_bytes() for store in stores))})
    if writer:
        print(f"memory plan: layer inputs on {placement}, {memory.experts_per_batch} experts per batch; " + "; ".join(
            f"rank {r} holds {c} of {calib.n} calibration windows and {e} perplexity-watch windows ({b / 2**20:.1f} MB)"
            for r, (c, e, b) in sorted(held.items())))

    for i in tqdm(range(start, source.n_layers), desc="layers", initial=start, total=source.n_layers, disable=not writer):
        t_layer = time.time()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with source.layer(i) as layer:
            for store in stores:
                store.begin(i)
            final, stats = None, {"layer": i, "moe": False}
            here = budget.at(cfg, widths, i)  # this layer's width
            if adapter.is_moe(layer):
                final, stats = moe_layer(model, layer, i, calib, original, here, dtype, compute, memory.experts_per_batch)
                stats["moe"] = True
                layer_pass(model, layer, [evals] if evals else [], compute)
            else:
                layer_pass(model, layer, stores, compute)
            if writer:
                export.write_unit(partial_dir, export.unit_name(i), export.layer_shard(source.ckpt, arch, i, final,
                                                                                       export.layout(here)), cfg.max_shard_bytes)
            del final
        stats.update(seconds=round(time.time() - t_layer, 1), peak_rss_mb=walk.peak_rss_mb(), rss_mb=walk.current_rss_mb())
        if device.type == "cuda":
            stats["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        record["layers"].append(stats)
        if writer:
            tqdm.write(experts.summary(stats))
        done = i + 1
        acts.commit(work, done, stores)
        if windows is not None and (done % cfg.eval_every == 0 or done == source.n_layers):
            ppl = perplexity(source, evals, windows, done)
            record["ppl"].append({"layers_quantized": done, "ppl": ppl})
            if writer:
                tqdm.write(f"perplexity after layer {done} (quantized 0..{i} + original rest): {ppl:.3f}")
        if writer:
            partial.save_state(partial_dir, done, record, this_run)

    if cfg.finetune_scales and cfg.method == "gsq":  # part of GSQ: the baselines stay as their papers have them
        record["finetune"], finetuned = finetune.stage(model, source.ckpt, arch, partial_dir, ids, cfg, widths, dtype,
                                                       device, compute)
        if windows is not None:
            record["finetune"]["ppl"] = perplexity(source, evals, windows, 0, finetuned)
            if writer:
                print(f"perplexity after the scale fine-tune: {record['finetune']['ppl']:.3f}")
    if not writer:
        dist.finish()
        return record
    out = Path(cfg.out)
    export.write_unit(partial_dir, "rest", source.ckpt.stored(export.rest_keys(source.ckpt, arch, source.n_layers)),
                      cfg.max_shard_bytes)
    config = json.loads((source.path / "config.json").read_text())
    config.get("text_config", {}).pop("quantization_config", None)  # one config, at the top, describes it all
    config["quantization_config"] = export.output_quantization(
        source.ckpt, arch, source.n_layers, {i: export.layout(budget.at(cfg, widths, i)) for i in sizes}, cfg.group_size)
    record.update(seconds=round(time.time() - t0, 1), peak_rss_mb=walk.peak_rss_mb())
    _, inter, hidden = adapter.expert_shape(next(layer for layer in model.model.layers if adapter.is_moe(layer)))
    tp = tensor_parallel_sizes(hidden, {inter}, model.config.num_attention_heads, cfg.group_size)
    export.finish(source.path, partial_dir, out, config, {
        "gsq_config.json": cfg.to_json(), "gsq_run.json": json.dumps(record, indent=2) + "\n",
        **({budget.FILE: json.dumps(allocation, indent=2) + "\n"} if allocation else {}),
        "README.md": card.quantized_card(source.path, config, cfg, record, tp, partial_dir)}, cfg.tokenizer)
    partial.release(out)
    print(f"wrote {out} in {record['seconds']:.0f}s, peak RSS {record['peak_rss_mb']:.0f} MB")
    dist.finish()
    return record
