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
        write layer i's shard; the activations become the resume point; free layer i
        every --eval-every layers: perplexity of quantized layers 0..i + original rest
"""

import json
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from gsq import acts, adapter, dist, experts, export, finetune, partial, plan, stream
from gsq import calib as calibration
from gsq.config import Config
from gsq.eval import (check_model_dir, eval_windows, load_tokenizer, model_config, pick_device, summarize,
                      window_sums, wikitext_rows)

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


def perplexity(model, ckpt, arch, evals, windows, first_original: int, device, compute, quantized=None) -> float:
    """Perplexity with layers before `first_original` quantized (their outputs are in `evals`) and the
    original layers from there on, streamed from the checkpoint; every rank runs its windows. With
    `quantized` (layer -> its experts as `final`, or None), from the embeddings with those experts."""
    h = evals.scratch()
    if quantized is not None:
        with torch.no_grad():
            h = {b: model.model.embed_tokens(windows[evals.windows(b)].to(device)).to(x.device, x.dtype)
                 for b, x in h.items()}
    for j in range(first_original, len(model.model.layers)):
        layer = stream.load_layer(ckpt, model, arch, j, device, compute)
        final = quantized(j) if quantized is not None else None
        if final is not None:
            experts.set_quantized(layer, final, evals.dtype)
        with torch.no_grad():
            for b, x in h.items():
                x = x.to(device, compute)
                h[b] = layer(x, attention_mask=None, **adapter.positions(model, x)).to(h[b].device, h[b].dtype)
        stream.unload_layer(model, j)
    sums = {}
    with torch.no_grad():
        for b, x in h.items():
            for n, w in enumerate(range(evals.n)[evals.windows(b)]):
                logits = model.lm_head(model.model.norm(x[n : n + 1].to(device, compute)))[0]
                sums[w] = window_sums(logits, windows[w])
    sums = dist.gather(sums)
    return summarize([sums[w] for w in sorted(sums)])["ppl"]


def dtypes(tcfg, device):
    """(model dtype, compute dtype of the layers). On a CPU the layers run in float32: bf16 matmuls there
    go through oneDNN, which keeps state for every new shape (MoE token counts make every shape new) and
    grows the process layer by layer; float32 is also no slower there. GSQ's own steps stay in the model
    dtype, and activations are stored in it."""
    dtype = stream.model_dtype(tcfg)
    return dtype, torch.float32 if device.type == "cpu" else dtype


def run(cfg: Config) -> dict:
    t0 = time.time()
    device = torch.device(dist.init(pick_device(cfg.device)))  # under torchrun: this rank's device
    writer = dist.is_writer()  # rank 0 writes the checkpoint
    src = check_model_dir(cfg.model)
    config = model_config(src)
    arch = adapter.arch_of(config)
    tcfg = adapter.text_config(config)
    adapter.check_context(tcfg, seqlen=cfg.seqlen, **({"eval_seqlen": cfg.eval_seqlen} if cfg.eval_every else {}))
    model = stream.skeleton(tcfg)
    adapter.check_quantizable(model, cfg.group_size)
    dtype, compute = dtypes(tcfg, device)
    gpu, host = plan.machine(cfg, device.type)
    setup = plan.Setup(plan.dimensions(tcfg, model), dist.world(),
                       int(os.environ.get("LOCAL_WORLD_SIZE", "1")), gpu, host, dtype.itemsize)
    memory = dist.on_writer(plan.plan, setup, cfg)  # rank 0's: every rank must group the experts alike
    plan.check(memory)  # a run that cannot fit is refused here, before any work
    ckpt = stream.Checkpoint(src)
    stream.check_shapes(ckpt, model, arch)
    this_run = partial.identity(cfg, src, dist.world(), device.type)  # what a resume point is bound to
    point = dist.on_writer(partial.check, cfg, src, this_run)  # the resume point of this same run, or None
    tokenizer = load_tokenizer(src)
    ids = note = windows = None  # the data, read and checked before anything is written
    if point is None or cfg.finetune_scales:  # (the fine-tune reads the calibration windows again)
        ids, note = calibration.calibration_ids(tokenizer, cfg.dataset, cfg.text_field, cfg.num_samples,
                                                cfg.seqlen, cfg.seed)
    if cfg.eval_every:
        windows = eval_windows(tokenizer, wikitext_rows(cfg.eval_data or None, "--eval-data"), cfg.eval_seqlen, cfg.eval_windows)
    root = dist.on_writer(partial.claim, cfg, src, this_run)  # held by this run from here on
    work = root / partial.WORK
    stream.load_globals(ckpt, model, arch, device, compute)
    n_layers, hidden_size = len(model.model.layers), tcfg.hidden_size
    placement = memory.placement  # on a CPU, "device" is host memory
    calib = acts.Activations("calib", (cfg.num_samples, cfg.seqlen, hidden_size), placement, device, dtype, work)
    stores = [calib]
    original = None  # --targets original: the original model's states beside the quantized model's
    if cfg.targets == "original":
        original = acts.Activations("orig", calib.shape, placement, device, dtype, work)
        stores.append(original)
    evals = None
    if windows is not None:
        evals = acts.Activations("eval", (windows.shape[0], cfg.eval_seqlen, hidden_size), placement, device, dtype, work)
        stores.append(evals)

    if point is not None:
        start, record = point["next_layer"], point["record"]
        if writer:
            acts.drop_old(work, start, unfinished=True)  # what an interrupted layer had begun to write
        dist.barrier()
        for store in stores:
            store.load(start)
        if writer:
            print(f"resuming {root} at layer {start} of {n_layers}")
    else:
        start, record = 0, {"calibration": note, "layers": [], "ppl": []}
        with torch.no_grad():
            for store, tokens in ((calib, ids), (original, ids), (evals, windows)):
                if store is not None:
                    store.begin(-1)
                    for b in store.blocks:
                        store.put(b, model.model.embed_tokens(tokens[store.windows(b)].to(device)))
        acts.commit(work, 0, stores)
        if windows is not None:
            record["ppl"].append({"layers_quantized": 0, "ppl": perplexity(
                model, ckpt, arch, evals, windows, 0, device, compute)})
        if writer:
            print(f"calibration: {note}")
            if windows is not None:
                print(f"perplexity, original model: {record['ppl'][-1]['ppl']:.3f}")
            partial.save_state(root, 0, record, this_run)
    held = dist.gather({dist.rank(): (len(calib.rows()), len(evals.rows()) if evals else 0,
                                      sum(store.resident_bytes() for store in stores))})
    if writer:
        print(f"memory plan: layer inputs on {placement}, {memory.experts_per_batch} experts per batch; " + "; ".join(
            f"rank {r} holds {c} of {calib.n} calibration windows and {e} perplexity-watch windows ({b / 2**20:.1f} MB)"
            for r, (c, e, b) in sorted(held.items())))

    for i in tqdm(range(start, n_layers), desc="layers", initial=start, total=n_layers, disable=not writer):
        t_layer = time.time()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        layer = stream.load_layer(ckpt, model, arch, i, device, compute)
        for store in stores:
            store.begin(i)
        final, stats = None, {"layer": i, "moe": False}
        if adapter.is_moe(layer):
            final, stats = moe_layer(model, layer, i, calib, original, cfg, dtype, compute, memory.experts_per_batch)
            stats["moe"] = True
            layer_pass(model, layer, [s for s in stores if s not in (calib, original)], compute)
        else:
            layer_pass(model, layer, stores, compute)
        if writer:
            export.write_unit(root, export.unit_name(i), export.layer_shard(ckpt, arch, i, final, cfg.container),
                              cfg.max_shard_bytes)
        stream.unload_layer(model, i)
        del layer, final
        release_host_memory()
        stats.update(seconds=round(time.time() - t_layer, 1), peak_rss_mb=peak_rss_mb(), rss_mb=current_rss_mb())
        if device.type == "cuda":
            stats["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        record["layers"].append(stats)
        if writer:
            tqdm.write(layer_summary(stats))
        done = i + 1
        acts.commit(work, done, stores)
        if windows is not None and (done % cfg.eval_every == 0 or done == n_layers):
            ppl = perplexity(model, ckpt, arch, evals, windows, done, device, compute)
            record["ppl"].append({"layers_quantized": done, "ppl": ppl})
            if writer:
                tqdm.write(f"perplexity after layer {done} (quantized 0..{i} + original rest): {ppl:.3f}")
        if writer:
            partial.save_state(root, done, record, this_run)

    if cfg.finetune_scales and cfg.method == "gsq":  # part of GSQ: the baselines stay as their papers have them
        record["finetune"], finetuned = finetune.stage(model, ckpt, arch, root, ids, cfg, dtype, device, compute)
        if windows is not None:
            record["finetune"]["ppl"] = perplexity(model, ckpt, arch, evals, windows, 0, device, compute, finetuned)
            if writer:
                print(f"perplexity after the scale fine-tune: {record['finetune']['ppl']:.3f}")
    if not writer:
        dist.finish()
        return record
    out = Path(cfg.out)
    run_config = cfg.to_json()
    export.write_unit(root, "rest", ckpt.stored(rest_keys(ckpt, arch, n_layers)), cfg.max_shard_bytes)
    partial.finish_work(root)
    config = json.loads((src / "config.json").read_text())
    config.get("text_config", {}).pop("quantization_config", None)  # one config, at the top, describes it all
    config["quantization_config"] = output_quantization(ckpt, arch, n_layers, cfg)
    export.finish(src, root, out, config, {"gsq_config.json": run_config})
    partial.release(out)
    record.update(seconds=round(time.time() - t0, 1), peak_rss_mb=peak_rss_mb())
    (out / "gsq_run.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out} in {record['seconds']:.0f}s, peak RSS {record['peak_rss_mb']:.0f} MB")
    dist.finish()
    return record


def rest_keys(ckpt, arch, n_layers: int) -> list:
    """Tensors outside decoder layers 0..n-1 (embeddings, norm, lm_head, MTP layers, vision tower)."""
    inside = {k for i in range(n_layers) for k in ckpt.layer_keys(arch, i)}
    return sorted(k for k in ckpt.keys() if k not in inside)


def output_quantization(ckpt, arch, n_layers: int, cfg) -> dict:
    """The written checkpoint's one quantization config: the routed experts of layers 0..n-1 at `cfg.container`
    bits, and every module copied quantized from the source (FP8 attention, an MTP layer's experts) as stored."""
    modules = {k[: -len(".weight")] for k in ckpt.keys() if k.endswith(".weight")}
    quantized = {m for m in modules if arch.expert_layer(m) is not None and arch.expert_layer(m) < n_layers}
    copied = {k[: -len(".weight")]: scheme for k, (_, scheme, _) in ckpt.compressed.items()}
    copied = {m: scheme for m, scheme in copied.items() if m not in quantized}
    vllm = {name for m in quantized for name in arch.vllm_names(m)}  # what vLLM's MoE layer looks up, too
    return export.quantization_config(cfg.container, cfg.group_size, quantized | vllm, copied, modules)


def _libc():
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


def map_large_host_buffers():
    """Have glibc map every host buffer of 8 MiB or more on its own and unmap it when freed. By
    default it raises that threshold each time such a buffer is freed and then serves the GPTQ and
    scale-search temporaries from its heap, which fragments: the peak grew by hundreds of MB. (At
    1 MiB GSQ's per-step buffers would be mapped too, and the run took 60% longer.)"""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, 8 << 20)  # M_MMAP_THRESHOLD


def release_host_memory():
    """Hand freed heap pages back to the OS after a layer (glibc keeps them per thread arena
    otherwise, and the process would grow with the number of layers)."""
    import gc

    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def current_rss_mb() -> float:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux
        return float("nan")


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def layer_summary(s: dict) -> str:
    line = f"layer {s['layer']}: {s['seconds']:.1f}s, RSS {s['rss_mb']:.0f} MB (peak {s['peak_rss_mb']:.0f} MB)"
    if not s.get("moe"):
        return line + " (dense: kept as is)"
    c = sorted(s["tokens_per_expert"])
    line += (f", tokens/expert min {c[0]} median {c[len(c) // 2]} max {c[-1]}; "
             f"rel. output error RTN {s['err_rtn']:.4f} -> {s['init']} {s['err_init']:.4f}")
    if s["method"] == "gsq":
        line += f" -> GSQ {s['err_gsq']:.4f} ({s['steps']} steps)"
    if s["rtn_init_experts"]:
        line += f"; experts with < min-tokens kept at MSE-RTN: {s['rtn_init_experts']}"
    return line
