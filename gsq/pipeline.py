"""The run: stream the model layer by layer, quantize each MoE layer's routed experts with GSQ,
pass the quantized layer's outputs on, write the checkpoint as it goes, watch perplexity.

    for each decoder layer i:
        load layer i from the shards
        if MoE: route the calibration tokens, init every expert (GPTQ), refine it (GSQ)
        inputs of layer i+1 = layer i (quantized experts) on the inputs of layer i
        write layer i's shard; persist the activations (resume point); free layer i
        every --eval-every layers: perplexity of quantized layers 0..i + original rest
"""

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from gsq import adapter, calib, dist, export, gptq, stream
from gsq.config import Config
from gsq.errors import InputError
from gsq.eval import check_model_dir, eval_windows, pick_device, summarize, window_sums, wikitext_rows
from gsq.kernels.pack import pack, unpack
from gsq.quantizer import ExpertCodes, dequant, optimize, relative_error

CHUNK = 8  # windows per forward pass through a layer


def chunks(model, hidden: torch.Tensor, device):
    """Windows `[N, S, H]` (stored on CPU or the device) in chunks on the device, with positions and
    rotary embeddings: (slice, states, position_ids, position_embeddings)."""
    pos = torch.arange(hidden.shape[1], device=device)[None]
    compute = model.lm_head.weight.dtype  # the globals were loaded in the compute dtype
    for i in range(0, hidden.shape[0], CHUNK):
        h = hidden[i : i + CHUNK].to(device, compute)
        yield slice(i, i + CHUNK), h, pos, model.model.rotary_emb(h, pos)


@torch.no_grad()
def forward(model, layer, hidden: torch.Tensor, device) -> torch.Tensor:
    """One decoder layer over all windows, chunk by chunk (outputs stored like the inputs)."""
    out = torch.empty_like(hidden)
    for rows, h, pos, pe in chunks(model, hidden, device):
        out[rows] = layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe).to(out.device, out.dtype)
    return out


@torch.no_grad()
def expert_inputs(model, layer, hidden: torch.Tensor, device):
    """Each routed expert's calibration inputs: the post-attention-norm states of the tokens the
    router sends it, `[n_e, H]` per expert (on the activations' device)."""
    per_expert = [[] for _ in range(adapter.num_experts(layer))]
    for _, h, pos, pe in chunks(model, hidden, device):
        x = adapter.post_attention_states(layer, h, pos, pe)
        _, idx = adapter.route(layer, x)
        for e, parts in enumerate(per_expert):
            parts.append(x[(idx == e).any(-1)].to(hidden.device, hidden.dtype))
    return [torch.cat(parts) for parts in per_expert]


def uses_gptq(cfg: Config) -> bool:
    """Whether the init (or, for --method gptq, the result) is GPTQ rather than RTN."""
    return cfg.init == "gptq" if cfg.method == "gsq" else cfg.method == "gptq"


def init_expert(weights, x, cfg: Config, grid_bits: int):
    """(RTN codes+scales, init codes+scales) for gate, up, down of one expert on its tokens x."""
    rtn, init = [], []
    scale_args = dict(steps=cfg.scale_grid, smallest=cfg.scale_min, norm=cfg.scale_norm)
    use_gptq = uses_gptq(cfg)
    inputs = [x, x, None]
    if x.shape[0] >= cfg.min_tokens and use_gptq:
        gate, up, _ = weights
        inputs[2] = F.silu(x @ gate.T) * (x @ up.T)
    for W, inp in zip(weights, inputs):
        s = gptq.mse_scales(W, grid_bits, cfg.group_size, **scale_args)
        rtn.append((gptq.rtn(W, s, grid_bits), s))
        if x.shape[0] < cfg.min_tokens or not use_gptq:
            init.append(rtn[-1])  # too few tokens: MSE-RTN (= GPTQ with an identity Hessian)
        else:
            init.append(gptq.gptq(W, inp.T @ inp, grid_bits, cfg.group_size, cfg.gptq_damp, cfg.gptq_block,
                                  **scale_args))
    return rtn, init


def quantize_layer(model, layer, i: int, hidden, cfg: Config, device, dtype):
    """Codes and scales of every routed expert of layer i, and the layer's statistics. GSQ trains in
    `dtype`, the checkpoint's, and its scales are rounded to it. Under torchrun each rank initialises,
    trains and measures its share of the experts, and every rank gets all of them back."""
    xs = expert_inputs(model, layer, hidden, device)
    counts = [x.shape[0] for x in xs]
    E = len(xs)
    trained = [e for e in range(E) if counts[e] >= cfg.min_tokens and cfg.method == "gsq"]
    mean_tokens = sum(counts[e] for e in trained) / max(1, len(trained))
    steps = max(cfg.min_steps, math.ceil(cfg.epochs * mean_tokens / cfg.batch_tokens))
    seeds = [(cfg.seed * 1_000_003 + i) * 100_003 + e for e in range(E)]
    local = cfg.bits > 2
    grid = torch.arange(-2.0, 3.0) if local else gptq.grid_levels(cfg.bits)
    qrange = (-(1 << (cfg.bits - 1)), (1 << (cfg.bits - 1)) - 1)
    t_experts = time.time()
    mine = dist.assign(counts, list(range(E)), dist.world())[dist.rank()]  # all of them on one process
    fp = {e: tuple(w.float() for w in adapter.expert_weights(layer, e)) for e in mine}
    rtn, init = {}, {}
    for e in mine:
        rtn[e], init[e] = init_expert(fp[e], xs[e].to(device).float(), cfg, cfg.bits)
    final = dict(init)
    trajectory = []
    todo = [e for e in mine if e in trained]
    for b in range(0, len(todo), cfg.experts_per_batch):
        batch = todo[b : b + cfg.experts_per_batch]
        codes = [torch.stack([init[e][p][0] for e in batch]).to(device) for p in range(3)]
        scales = [torch.stack([init[e][p][1] for e in batch]).to(device) for p in range(3)]
        module = ExpertCodes(codes, scales, grid.to(device), cfg.init_sigma, cfg.init_alpha,
                             [seeds[e] for e in batch], local=local, qrange=qrange)
        weights = tuple(torch.stack([fp[e][p] for e in batch]).to(device, dtype) for p in range(3))
        trajectory += optimize(module, [xs[e] for e in batch], weights, steps, cfg.batch_tokens, cfg,
                               [seeds[e] for e in batch], dtype)
        hard = module.hard(dtype)
        for j, e in enumerate(batch):
            final[e] = [(hard[p][0][j].cpu(), hard[p][1][j].cpu()) for p in range(3)]
    errs = {}  # relative output error of RTN, the init and the result, on the expert's tokens
    for e in mine:
        if counts[e] >= cfg.min_tokens:
            x = xs[e][: 4096].to(device, torch.float32)[None]
            ref = tuple(w[None] for w in fp[e])
            errs[e] = [relative_error(x, ref, tuple(dequant(c, s).to(device)[None] for c, s in q))
                       for q in (rtn[e], init[e], final[e])]
    if dist.world() > 1:  # every rank passes on the same layer: gather the experts as packed 2/4-bit words
        bits = 2 if cfg.bits == 2 else 4
        got = dist.gather({e: ([(pack(c, bits), s, c.shape[-1]) for c, s in final[e]], errs.get(e)) for e in mine})
        final = {e: [(unpack(w, bits, n), s) for w, s, n in q] for e, (q, _) in got.items()}
        errs = {e: err for e, (_, err) in got.items() if err is not None}
    per_expert = {name: [errs[e][k] for e in sorted(errs)] for k, name in enumerate(("rtn", "init", "gsq"))}
    stats = {"layer": i, "method": cfg.method, "init": "GPTQ" if uses_gptq(cfg) else "RTN",
             "tokens_per_expert": counts, "steps": steps, "gsq_experts": len(trained),
             "rtn_init_experts": [e for e in range(E) if counts[e] < cfg.min_tokens],
             "expert_seconds": round(time.time() - t_experts, 2), "ranks": dist.world(),
             **{f"err_{k}": sum(v) / max(1, len(v)) for k, v in per_expert.items()}, "err_per_expert": per_expert,
             "loss_trajectory": trajectory[-1:]}
    final = [final[e] for e in range(E)]
    for e in range(E):  # the quantized experts, exactly as the checkpoint will dequantize them
        adapter.set_expert_weights(layer, e, *(dequant(c, s).to(dtype) for c, s in final[e]))  # exact in dtype
    return final, stats


def layer_shard(ckpt, arch, i: int, final, container: int) -> dict:
    """Layer i as written: its original tensors, routed experts replaced by packed codes and scales."""
    keys = ckpt.layer_keys(arch, i)
    tensors = {}
    expert_keys = set()
    for e, projs in enumerate(final or []):
        for p, (codes, scales) in enumerate(projs):
            key = arch.expert_key(i, e, p)
            expert_keys.add(key + ".weight")
            tensors.update(export.expert_tensors(key, codes, scales, container))
    tensors.update(ckpt.load([k for k in keys if k not in expert_keys]))
    return tensors


def perplexity(model, ckpt, arch, eval_hidden, windows, first_original: int, device, compute) -> float:
    """Perplexity with layers before `first_original` quantized (their outputs are `eval_hidden`)
    and the original layers from there on, streamed from the checkpoint."""
    h = eval_hidden
    for j in range(first_original, len(model.model.layers)):
        layer = stream.load_layer(ckpt, model, arch, j, device, compute)
        h = forward(model, layer, h, device)
        stream.unload_layer(model, j)
    sums = []
    with torch.no_grad():
        for n in range(h.shape[0]):
            logits = model.lm_head(model.model.norm(h[n : n + 1].to(device, compute)))[0]
            sums.append(window_sums(logits, windows[n]))
    return summarize(sums)["ppl"]


def dtypes(tcfg, device):
    """(model dtype, compute dtype of the layers, where activations are stored). On a CPU the layers
    run in float32: bf16 matmuls there go through oneDNN, which keeps state for every new shape (MoE
    token counts make every shape new) and grows the process layer by layer; float32 is also no
    slower there. GSQ's own steps (fixed shapes) stay in the model dtype, and activations are stored
    in it either way: on the GPU, or in host memory."""
    dtype = getattr(tcfg, "dtype", None) or torch.bfloat16
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    compute = torch.float32 if device.type == "cpu" else dtype
    return dtype, compute, device if device.type == "cuda" else torch.device("cpu")


def prepare_output(cfg: Config, src: Path) -> Path:
    out = Path(cfg.out)
    if not cfg.out:
        raise InputError("--out DIR is required")
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise InputError(f"--out {out} is inside the source model {src}: the source is never written to")
    root = export.partial_dir(out)
    if out.exists() and not (cfg.overwrite or cfg.resume):
        raise InputError(f"output {out} exists: pass --overwrite to replace it")
    if root.exists() and not cfg.resume:
        if not cfg.overwrite:
            raise InputError(f"an interrupted run is in {root}: pass --resume to continue it or --overwrite")
        shutil.rmtree(root)
    if cfg.resume and out.exists() and not root.exists():
        raise InputError(f"output {out} is already complete: nothing to resume")
    root.mkdir(parents=True, exist_ok=True)
    return root


def save_state(work: Path, next_layer: int, hidden, eval_hidden, record: dict):
    """Resume point after a layer: activations, then progress, each written whole and renamed."""
    work.mkdir(exist_ok=True)
    tensors = {"hidden": hidden.cpu().contiguous()}
    if eval_hidden is not None:
        tensors["eval_hidden"] = eval_hidden.cpu().contiguous()
    save_file(tensors, work / "acts.tmp")
    os.replace(work / "acts.tmp", work / f"acts-{next_layer}.safetensors")
    (work / "state.tmp").write_text(json.dumps({"next_layer": next_layer, "record": record}))
    os.replace(work / "state.tmp", work / "state.json")
    for old in work.glob("acts-*.safetensors"):
        if old.name != f"acts-{next_layer}.safetensors":
            old.unlink()


def run(cfg: Config) -> dict:
    t0 = time.time()
    device = torch.device(dist.init(pick_device(cfg.device)))  # under torchrun: this rank's device
    writer = dist.is_writer()  # rank 0 writes the checkpoint and watches the perplexity
    src = check_model_dir(cfg.model)
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(src)
    arch = adapter.arch_of(config)
    tcfg = adapter.text_config(config)
    model = stream.skeleton(tcfg)
    adapter.check_quantizable(model, cfg.group_size)
    ckpt = stream.Checkpoint(src)
    root = dist.on_writer(prepare_output, cfg, src)
    work = root / ".gsq-work"
    dtype, compute, store = dtypes(tcfg, device)
    tokenizer = AutoTokenizer.from_pretrained(src)
    stream.load_globals(ckpt, model, arch, device, compute)
    windows = None
    if cfg.eval_every and writer:
        windows = eval_windows(tokenizer, wikitext_rows(cfg.eval_data or None), cfg.eval_seqlen, cfg.eval_windows)
    n_layers = len(model.model.layers)

    if cfg.resume and (work / "state.json").exists():
        state = json.loads((work / "state.json").read_text())
        start, record = state["next_layer"], state["record"]
        acts = load_file(work / f"acts-{start}.safetensors")
        hidden, eval_hidden = acts["hidden"].to(store), acts.get("eval_hidden")
        eval_hidden = None if eval_hidden is None or windows is None else eval_hidden.to(store)
        if writer:
            print(f"resuming {root} at layer {start} of {n_layers}")
    else:
        ids, note = calib.calibration_ids(tokenizer, cfg.dataset, cfg.text_field, cfg.num_samples, cfg.seqlen, cfg.seed)
        if writer:
            print(f"calibration: {note}" + (f"; experts split over {dist.world()} ranks" if dist.world() > 1 else ""))
        start, record = 0, {"calibration": note, "layers": [], "ppl": []}
        with torch.no_grad():
            hidden = model.model.embed_tokens(ids.to(device)).to(store, dtype)
            eval_hidden = None if windows is None else model.model.embed_tokens(windows.to(device)).to(store, dtype)
        if windows is not None:
            record["ppl"].append({"layers_quantized": 0, "ppl": perplexity(
                model, ckpt, arch, eval_hidden, windows, 0, device, compute)})
            print(f"perplexity, original model: {record['ppl'][-1]['ppl']:.3f}")

    for i in tqdm(range(start, n_layers), desc="layers", initial=start, total=n_layers, disable=not writer):
        t_layer = time.time()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        layer = stream.load_layer(ckpt, model, arch, i, device, compute)
        final, stats = None, {"layer": i, "moe": False}
        if adapter.is_moe(layer):
            final, stats = quantize_layer(model, layer, i, hidden, cfg, device, dtype)
            stats["moe"] = True
        hidden = forward(model, layer, hidden, device)
        if eval_hidden is not None:
            eval_hidden = forward(model, layer, eval_hidden, device)
        if writer:
            export.write_unit(root, f"layer{i:05d}", layer_shard(ckpt, arch, i, final, cfg.container),
                              cfg.max_shard_bytes)
        stream.unload_layer(model, i)
        del layer, final
        release_host_memory()
        stats["seconds"] = round(time.time() - t_layer, 1)
        stats["peak_rss_mb"] = peak_rss_mb()
        stats["rss_mb"] = current_rss_mb()
        if device.type == "cuda":
            stats["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        record["layers"].append(stats)
        if writer:
            tqdm.write(layer_summary(stats))
        done = i + 1
        if windows is not None and (done % cfg.eval_every == 0 or done == n_layers):
            ppl = perplexity(model, ckpt, arch, eval_hidden, windows, done, device, compute)
            record["ppl"].append({"layers_quantized": done, "ppl": ppl})
            print(f"perplexity after layer {done} (quantized 0..{i} + original rest): {ppl:.3f}")
        if writer:
            save_state(work, done, hidden, eval_hidden, record)

    if not writer:
        dist.finish()
        return record
    out = Path(cfg.out)
    run_config = cfg.to_json()
    export.write_unit(root, "rest", ckpt.load(rest_keys(ckpt, arch, n_layers)), cfg.max_shard_bytes)
    (work / "state.json").unlink()  # first: a resume never meets a half-deleted resume point
    shutil.rmtree(work)
    ignore = ["lm_head"] + [f"re:.*layers\\.{j}\\." for j in mtp_layers(ckpt, arch, n_layers)]
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = export.quantization_config(arch, cfg.container, cfg.group_size, ignore)
    export.finish(src, root, out, config, {"gsq_config.json": run_config})
    record.update(seconds=round(time.time() - t0, 1), peak_rss_mb=peak_rss_mb())
    (out / "gsq_run.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out} in {record['seconds']:.0f}s, peak RSS {record['peak_rss_mb']:.0f} MB")
    dist.finish()
    return record


def rest_keys(ckpt, arch, n_layers: int) -> list:
    """Tensors outside decoder layers 0..n-1 (embeddings, norm, lm_head, MTP layers, vision tower)."""
    inside = {k for i in range(n_layers) for k in ckpt.layer_keys(arch, i)}
    return sorted(k for k in ckpt.keys() if k not in inside)


def mtp_layers(ckpt, arch, n_layers: int) -> list:
    """Indices of extra layers stored past num_hidden_layers (DeepSeek's multi-token prediction)."""
    prefix = arch.layers_prefix + "."
    idx = {int(k[len(prefix):].split(".")[0]) for k in ckpt.keys() if k.startswith(prefix)}
    return sorted(j for j in idx if j >= n_layers)


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
