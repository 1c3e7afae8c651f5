"""End-to-end scale fine-tune after the last layer (`--finetune-scales STEPS`): the codes stay fixed; every
routed expert's group scales are trained so that the quantized model's next-token distribution matches
the original model's (KL) on the calibration windows. The paper's scale-only fine-tune.

    read     every MoE layer's codes and scales back from the layer shards the run has written
    step t   the blocks of minibatch t (--batch-size windows, seeded epochs; each rank its own blocks):
             forward, layer by layer: the original layer on the original states, the quantized layer
                 on the quantized states (its input kept)
             KL(original || quantized) at the top, over the vocabulary in chunks of tokens -> dKL/dh
             backward, layer by layer from the top: each layer loaded again and run with gradients
             one Adam step on the factors m (scale = s0 * m, one per group), the gradients of the blocks
             summed in block order (every rank gets every block's: the same bits for any number of ranks)
    write    the trained scales, rounded to the checkpoint dtype, into `finetuned.safetensors` (the
             resume point of this stage), then each MoE layer's shards anew with them (`stage`)

Memory: one layer, the minibatch's states at every layer's input, and every expert's codes (int8) and
scales (two float32 copies and Adam's two moments): 1 byte per expert weight plus 16 per group.
"""

import json
import os

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from gsq import adapter, budget, dist, export, partial, stream
from gsq.acts import BLOCK
from gsq.config import derive_seed
from gsq.errors import tensor_bytes, write_text, writing
from gsq.experts import minibatches
from gsq.gptq import Grid
from gsq.export import packed
from gsq.kernels.pack import fp4_unpack, unpack
from gsq.quantizer import cosine, dequant

FILE = "finetuned.safetensors"
CHUNK = 1024  # tokens whose logits are held at once at the top


def shards(partial_dir, unit: str) -> list:
    """The files a unit (a layer, under its first or its rewritten name) is written in."""
    return sorted(partial_dir.glob(f"model-{unit}-*.safetensors"))


def read_layer(files: list, arch, i: int, n_experts: int, here) -> tuple:
    """Codes `[E, out, in]` int8 and scales `[E, out, in / G]` float32 (as held: NVFP4's doubled codes, half
    scales) of (gate+up, down) from the safetensors `files` holding layer i (gate rows first, as transformers
    fuses them), and NVFP4's global scales `[E]` of (gate+up, down) (None for integer codes); `here`: the
    layer's settings."""
    tensors = {}
    for shard in files:
        with safe_open(shard, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    nvfp4 = export.layout(here) == export.NVFP4
    parts = [[], [], [], [], [], []]  # gate+up codes, gate+up scales, down codes, down scales, global scales
    for e in range(n_experts):
        got = []
        for p in range(3):
            key = arch.expert_key(i, e, p)
            if nvfp4:
                g = tensors[key + ".weight_global_scale"]
                got.append((fp4_unpack(tensors[key + ".weight_packed"]), tensors[key + ".weight_scale"].float() / g / 2, g))
            else:
                n = int(tensors[key + ".weight_shape"][1])
                got.append((unpack(tensors[key + ".weight_packed"], here.container, n),
                            tensors[key + ".weight_scale"].float(), torch.ones(1)))
        parts[0].append(torch.cat([got[0][0], got[1][0]]))
        parts[1].append(torch.cat([got[0][1], got[1][1]]))
        parts[2].append(got[2][0])
        parts[3].append(got[2][1])
        parts[4].append(got[0][2])  # gate and up share theirs
        parts[5].append(got[2][2])
    codes_scales = tuple(torch.stack(p) for p in parts[:4])
    return (*codes_scales, (torch.cat(parts[4]), torch.cat(parts[5])) if nvfp4 else None)


class Scales:
    """The trainable factors of every MoE layer's scales, with the fixed codes and initial scales (and NVFP4's
    global scales: its scales are used as stored, FP8-rounded, the gradient passed straight through)."""

    def __init__(self, layers: dict, device):
        self.codes = {i: (gu.to(device), d.to(device)) for i, (gu, _, d, _, _) in layers.items()}
        self.base = {i: (sgu.to(device), sd.to(device)) for i, (_, sgu, _, sd, _) in layers.items()}
        self.globals = {i: g and tuple(x.to(device) for x in g) for i, (*_, g) in layers.items()}
        self.m = {i: [torch.ones_like(s) for s in self.base[i]] for i in layers}

    def scales(self, i: int) -> list:
        scales = [s * m for s, m in zip(self.base[i], self.m[i])]
        if self.globals[i] is None:
            return scales
        return [Grid(4, "nvfp4").stored(s, g) for s, g in zip(scales, self.globals[i])]

    def weights(self, i: int, dtype) -> list:
        """The layer's fused expert weights (gate_up, down) as leaves that collect their gradients."""
        return [dequant(c, s).to(dtype).requires_grad_() for c, s in zip(self.codes[i], self.scales(i))]

    def factor_grads(self, i: int, leaves: list) -> list:
        """dL/dm from the gradients of the dequantized weights: s0[g] * sum over group g of code * grad."""
        out = []
        for c, s, w in zip(self.codes[i], self.base[i], leaves):
            g = w.grad if w.grad is not None else torch.zeros_like(w)
            out.append((c.float() * g.float()).unflatten(-1, (s.shape[-1], -1)).sum(-1) * s)
        return out


def call(model, layer, x, weights=None):
    """The decoder layer on states `[B, S, H]`; with `weights`, its routed experts are those tensors."""
    kwargs = dict(attention_mask=None, **adapter.positions(model, x))
    if weights is None:
        return layer(x, **kwargs)
    return torch.func.functional_call(layer, dict(zip(adapter.EXPERT_PARAMS, weights)), (x,), kwargs)


def kl_top(model, h_q, h_fp) -> tuple:
    """Summed KL(original || quantized) of the next-token distributions at states `[B, S, H]`, and its
    gradient with respect to h_q, computed CHUNK tokens at a time."""
    flat_q, flat_fp = h_q.reshape(-1, h_q.shape[-1]), h_fp.reshape(-1, h_fp.shape[-1])
    grad, total = torch.empty_like(flat_q), 0.0
    for r in range(0, flat_q.shape[0], CHUNK):
        with torch.no_grad():
            logp = F.log_softmax(adapter.logits(model, flat_fp[r : r + CHUNK]).float(), -1)
        q = flat_q[r : r + CHUNK].detach().requires_grad_()
        logq = F.log_softmax(adapter.logits(model, q).float(), -1)
        kl = (logp.exp() * (logp - logq)).sum()
        kl.backward()
        grad[r : r + CHUNK] = q.grad
        total += kl.item()
    return total, grad.view_as(h_q)


def held_dtype(cfg, dtype):
    """The dtype trained scales are saved in: the model's, NVFP4's float32 (as FP8 x its global scale)."""
    return torch.float32 if cfg.format == "nvfp4" else dtype


def train(model, ckpt, arch, scales: Scales, ids, cfg, device, compute) -> list:
    """`cfg.finetune_scales` Adam steps on the factors; returns the mean KL per token of each step."""
    n_layers = len(model.model.layers)
    factors = [m for i in sorted(scales.m) for m in scales.m[i]]
    lr = cfg.finetune_lr * Grid(cfg.bits, cfg.format).finetune_lr
    opt = torch.optim.Adam(factors, lr=lr)
    n_blocks, per_batch = -(-ids.shape[0] // BLOCK), max(1, cfg.batch_size // BLOCK)
    batches = minibatches(n_blocks, min(per_batch, n_blocks), cfg.finetune_scales, derive_seed(cfg.seed, -1))
    history = []
    bar = tqdm(batches, desc="scale fine-tune", disable=not dist.is_writer())
    for t, batch in enumerate(bar):
        for group in opt.param_groups:
            group["lr"] = lr * cosine(t, len(batches), cfg.lr_final)
        mine = [b for b in batch if b % dist.world() == dist.rank()]
        tokens = {b: ids[b * BLOCK : (b + 1) * BLOCK].to(device) for b in mine}
        with torch.no_grad():
            q = {b: adapter.embed(model, x).to(compute) for b, x in tokens.items()}
        fp = dict(q)
        inputs = []
        for i in range(n_layers):  # forward
            layer = stream.load_layer(ckpt, model, arch, i, device, compute)
            inputs.append(q)
            with torch.no_grad():
                w = [x.detach() for x in scales.weights(i, compute)] if i in scales.m else None
                fp = {b: call(model, layer, x) for b, x in fp.items()}
                q = {b: call(model, layer, x, w) for b, x in q.items()}
            stream.unload_layer(model, i)
        total, grads = 0.0, {}
        for b in mine:
            kl, grads[b] = kl_top(model, q[b], fp[b])
            total += kl
        n_tokens = sum(min(BLOCK, ids.shape[0] - b * BLOCK) for b in batch) * ids.shape[1]
        for i in reversed(range(n_layers)):  # backward
            layer = stream.load_layer(ckpt, model, arch, i, device, compute)
            w = scales.weights(i, compute) if i in scales.m else None
            per_block = {}
            for b in mine:
                x = inputs[i][b].detach().requires_grad_()
                torch.autograd.backward(call(model, layer, x, w), grads[b])
                grads[b] = x.grad
                if w is not None:
                    per_block[b] = [g.cpu() for g in scales.factor_grads(i, w)]
                    for leaf in w:
                        leaf.grad = None
            if w is not None:  # summed block by block in block order: the same bits whatever the ranks
                per_block = dist.gather(per_block)
                for p, m in enumerate(scales.m[i]):
                    m.grad = sum(per_block[b][p] for b in sorted(per_block)).to(m.device) / n_tokens
            stream.unload_layer(model, i)
            del layer, w
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.append(sum(dist.gather({dist.rank(): total}).values()) / n_tokens)
        bar.set_postfix(kl=f"{history[-1]:.4f}")
    return history


def trained_scales(model, ckpt, arch, partial_dir, ids, cfg, widths, dtype, device, compute) -> tuple:
    """The trained scales of every MoE layer (`{i: (gate_up, down)}` in `dtype`) and the stage's record; read
    from `WORK/FILE` when an interrupted run had finished training, else trained and saved there."""
    moe = [i for i, layer in enumerate(model.model.layers) if adapter.is_moe(layer)]
    done = partial_dir / partial.WORK / FILE
    if not done.exists():
        n_experts = {i: adapter.num_experts(model.model.layers[i]) for i in moe}
        layers = dist.on_writer(lambda: {i: read_layer(shards(partial_dir, export.unit_name(i)), arch, i, n_experts[i],
                                                       budget.at(cfg, widths, i)) for i in moe})
        scales = Scales(layers, device)
        history = train(model, ckpt, arch, scales, ids, cfg, device, compute)
        record = {"steps": len(history), "kl_first": history[0], "kl_last": history[-1],
                  "kl": history[:: max(1, len(history) // 20)]}
        if dist.is_writer():
            tmp = done.with_suffix(".tmp")
            held = held_dtype(cfg, dtype)
            tensors = {f"{i}.{p}": s.detach().to("cpu", held).contiguous()
                       for i in moe for p, s in zip(("gate_up", "down"), scales.scales(i))}
            with writing(tmp, tensor_bytes(tensors)):
                save_file(tensors, tmp, metadata={"record": json.dumps(record)})
            os.replace(tmp, done)
        dist.barrier()
    saved = dist.on_writer(lambda: (load_file(done), safe_open(done, "pt").metadata()["record"]))
    return {i: (saved[0][f"{i}.gate_up"], saved[0][f"{i}.down"]) for i in moe}, json.loads(saved[1])


def stage(model, ckpt, arch, partial_dir, ids, cfg, widths: dict, dtype, device, compute) -> tuple:
    """The fine-tune after the last layer: train (or take the saved result), then rewrite every MoE layer
    with its trained scales. Returns the record and `{layer: final}` as a function (rank 0 reads the shards
    and hands them to every rank), for the perplexity watch.

    A layer is rewritten under a new unit name (`finetunedNNNNN`), listed in `WORK/REWRITTEN` once whole, and
    only then is its first unit removed: an interruption anywhere leaves each layer complete under one of
    the two names, and the resume rewrites the layers not listed."""
    trained, record = trained_scales(model, ckpt, arch, partial_dir, ids, cfg, widths, dtype, device, compute)
    listed = partial_dir / partial.WORK / REWRITTEN
    if dist.is_writer():
        done = json.loads(listed.read_text()) if listed.exists() else []
        for i in trained:
            if i not in done:
                here = budget.at(cfg, widths, i)  # the layer's width
                final = layer_results(shards(partial_dir, export.unit_name(i)), arch, i, trained[i], here)
                export.write_unit(partial_dir, unit(i), export.layer_shard(ckpt, arch, i, final, here.container),
                                  cfg.max_shard_bytes)
                done.append(i)
                write_text(listed, json.dumps(done))
            for old in partial_dir.glob(f"model-{export.unit_name(i)}-*.safetensors"):
                old.unlink()
        print(f"scale fine-tune: {record['steps']} steps, KL per token {record['kl_first']:.4f} -> {record['kl_last']:.4f}")
    dist.barrier()
    return record, lambda i: (dist.on_writer(layer_results, shards(partial_dir, unit(i)), arch, i, trained[i],
                                             budget.at(cfg, widths, i))
                              if i in trained else None)


def unit(i: int) -> str:
    """The name of layer i's shards once rewritten with its trained scales."""
    return f"finetuned{i:05d}"


REWRITTEN = "finetuned-layers.json"


def layer_results(files: list, arch, i: int, trained: tuple, cfg) -> list:
    """`final[e][p]` of layer i (see `export.packed`): the codes read back from `files`, the trained scales."""
    n_experts = trained[0].shape[0]
    gu, _, d, _, g = read_layer(files, arch, i, n_experts, cfg)
    inter, grid = gu.shape[1] // 2, Grid(cfg.bits, cfg.format)
    g = g or (torch.full((n_experts,), float("nan")),) * 2
    return [[packed(c, s, grid, None if cfg.format == "int" else gs) for c, s, gs in (
                (gu[e, :inter], trained[0][e, :inter], g[0][e]), (gu[e, inter:], trained[0][e, inter:], g[0][e]),
                (d[e], trained[1][e], g[1][e]))]
            for e in range(n_experts)]
