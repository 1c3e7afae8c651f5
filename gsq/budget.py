"""Fit a model to a size: each MoE layer's bit width (all its routed experts share it: vLLM's fused MoE layer
serves one scheme per layer) chosen from measured sensitivity, so that a budget is met from below and the
predicted loss of the whole model is least.

    --bits-budget B      average stored bits per routed-expert weight, scales included (2 bits at group 128: 2.125)
    --target-size SIZE   the whole checkpoint on disk
    --bits-plan FILE     an allocation as written beside a checkpoint (gsq_bits.json), kept or edited

Sensitivity (one pass over `--sensitivity-windows` calibration windows, before the run), measured where the
choice is made: in the model with every MoE layer at the narrowest width, quantized as the run starts (its init:
GPTQ, or MSE-RTN for `--init rtn` / `--method rtn`). Layer by layer, it carries
    the original model's states (the reference),
    the states with every MoE layer's routed experts at the init at 2 bits (the base; each layer's GPTQ
    Hessians from the base's own states at its input),
    for each MoE layer i and wider width b: the base up to layer i, layer i at b bits (from the same Hessians),
    the base's layers after it;
then s_i(b) = KL(original || that model) per token, s_i(2) the base's: the loss of the model when only layer i
is wider. Errors of the layers compound (the sum of each layer's KL alone falls well short of the KL of all of
them together), so each layer's gain is measured in the company it will have; and measured with the codes the
run starts from, not round-to-nearest ones (with MSE-RTN codes the pass ranked tiny-qwen3-moe's layers 2 and 3
the other way round from GSQ's measured KL: eval/README). The predicted KL of an allocation is the base's minus the
gains s_i(2) - s_i(b_i), and an exact knapsack over the layers finds the least within the budget. The wider
models are split over the ranks (each carries the reference, the base and its share), the base's experts too
(each rank quantizes every world()-th one), their KLs gathered, and every rank chooses alike.
"""

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from gsq import adapter, dist, experts, stream
from gsq.acts import BLOCK
from gsq.config import WIDTH_CHOICE
from gsq.errors import InputError
from gsq.export import packed, unpacked
from gsq.quantizer import dequant

WIDTHS = (2, 3, 4)
FILE = "gsq_bits.json"


def container_bits(container: int, bits: int) -> int:
    """Bits per code as written: the code's own width (`--container 2`, dense), else the wider of the two."""
    return bits if container == 2 else max(container, bits)


def at(cfg, widths: dict, i: int):
    """The settings of layer i: its width (and the container that holds it)."""
    bits = widths.get(i, cfg.bits)
    return dataclasses.replace(cfg, bits=bits, container=container_bits(cfg.container, bits))


def mixed(cfg) -> bool:
    """Whether the widths are chosen per layer (a budget or a plan) rather than one --bits for all."""
    return any(getattr(cfg, k) for k in WIDTH_CHOICE)


def widest(cfg):
    """The settings the memory plan assumes: the widest width a layer may get."""
    return at(cfg, {0: max(WIDTHS)}, 0) if mixed(cfg) else cfg


def projection_shapes(layer) -> list:
    """(out, in) of each routed expert projection of a MoE layer: gate, up, down, times the experts."""
    E, inter, hidden = adapter.expert_shape(layer)
    return [(inter, hidden), (inter, hidden), (hidden, inter)] * E


def stored_bytes(shapes: list, bits: int, group: int, scale_bytes: int) -> int:
    """Bytes of the quantized projections' codes (whole int32 words per row) and scales: what --bits-budget
    counts (the int64 shape beside them and the header entries count in --target-size's rest)."""
    return sum(out * -(-cols * bits // 32) * 4 + out * (cols // group) * scale_bytes for out, cols in shapes)


def scale_bytes(cfg, dtype) -> int:
    """Bytes per stored scale: GSQ rounds its scales to the model dtype; the GPTQ and RTN baselines keep float32."""
    return dtype.itemsize if cfg.method == "gsq" else 4


def layer_sizes(model, group: int, scale_bytes: int) -> dict:
    """{MoE layer: (weights, {width: stored bytes})}."""
    sizes = {}
    for i, layer in enumerate(model.model.layers):
        if adapter.is_moe(layer):
            shapes = projection_shapes(layer)
            sizes[i] = (sum(o * c for o, c in shapes),
                        {b: stored_bytes(shapes, container_bits(2, b), group, scale_bytes) for b in WIDTHS})
    return sizes


DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "U32": 4, "BF16": 2, "F16": 2, "I16": 2, "U16": 2}
HEADER_BYTES = 80  # a safetensors header entry beyond its name: dtype, shape, offsets (about 75)


def fixed_bytes(ckpt, arch, moe_layers: set) -> int:
    """Bytes of everything the checkpoint copies as stored (all but the routed experts of `moe_layers`),
    header entries included."""
    expert_parts = set()
    for name in ckpt.keys():
        if arch.expert_layer(name[: -len(".weight")]) in moe_layers:
            expert_parts.update(ckpt.compressed[name][2].values() if name in ckpt.compressed else [name])
    kept = [n for n in ckpt.files if n not in expert_parts]
    shapes, dtypes = stream.shapes(kept, ckpt.files), stream.dtypes(kept, ckpt.files)
    quantized = sum(16 + 3 * (len(name) + len(".weight_packed") + HEADER_BYTES) for name in ckpt.keys()
                    if arch.expert_layer(name[: -len(".weight")]) in moe_layers)  # weight_shape, header entries
    return quantized + sum(DTYPE_BYTES.get(dtypes[n], 1) * int(torch.Size(shapes[n]).numel()) + len(n) + HEADER_BYTES
                           for n in kept)


def limit(cfg, source, sizes: dict) -> tuple | None:
    """(stored bits the routed experts may take, bytes of the rest) of --bits-budget / --target-size, else None."""
    if not (cfg.bits_budget or cfg.target_size):
        return None
    fixed = fixed_bytes(source.ckpt, source.arch, set(sizes))
    return budget_bits(cfg, sizes, fixed), fixed


def choose(cfg, source, ids: torch.Tensor, sizes: dict, limits: tuple | None) -> dict | None:
    """The allocation (as gsq_bits.json holds it) of --bits-plan, or measured for --bits-budget /
    --target-size; None for one --bits everywhere."""
    if cfg.bits_plan:
        return record(read_plan(cfg.bits_plan, list(sizes)), sizes, None, f"--bits-plan {cfg.bits_plan}")
    if limits is None:
        return None
    bits, fixed = limits
    sens = sensitivity(source, ids[: cfg.sensitivity_windows], cfg)
    how = f"--bits-budget {cfg.bits_budget}" if cfg.bits_budget else f"--target-size {cfg.target_size}"
    rec = record(allocate(sens, sizes, bits), sizes, sens, how)
    rec.update(budget_bits=bits, rest_bytes=fixed, checkpoint_bytes=fixed + rec["expert_bytes"],
               sensitivity_windows=min(cfg.sensitivity_windows, ids.shape[0]))
    return rec


def budget_bits(cfg, sizes: dict, fixed: int) -> int:
    """The stored bits the routed experts may take, from --bits-budget or --target-size; refused when even
    2 bits everywhere does not fit."""
    weights = sum(n for n, _ in sizes.values())
    least = sum(by[min(WIDTHS)] for _, by in sizes.values()) * 8
    if cfg.bits_budget:
        bits, what = int(cfg.bits_budget * weights), f"--bits-budget {cfg.bits_budget}"
    else:
        from gsq.plan import gb, parse_size

        target = parse_size(cfg.target_size, "--target-size")
        bits, what = (target - fixed) * 8, f"--target-size {cfg.target_size}"
        if bits < least:
            raise InputError(f"{what} is below the smallest checkpoint gsq can write: {gb(fixed + least / 8)} "
                             f"(every routed expert at {min(WIDTHS)} bits; the rest as stored takes {gb(fixed)})")
    if bits < least:
        raise InputError(f"{what} is below {least / weights:.3f} bits per weight, what {min(WIDTHS)} bits everywhere "
                         "takes (codes and scales)")
    return bits


def allocate(sens: dict, sizes: dict, budget: int) -> dict:
    """{layer: width} with the least summed sensitivity whose stored bits stay within `budget` (exact: the
    Pareto front of (bits, loss) over the layers so far, every dominated partial allocation dropped)."""
    front = [(0, 0.0, ())]  # (bits, predicted loss, widths so far), bits ascending, loss strictly descending
    layers = sorted(sizes)
    for i in layers:
        options = sorted((c + sizes[i][1][b] * 8, loss + sens[i][b], (*w, b))
                         for c, loss, w in front for b in WIDTHS if c + sizes[i][1][b] * 8 <= budget)
        front = []
        for option in options:
            if not front or option[1] < front[-1][1]:
                front.append(option)
    _, _, widths = front[-1]  # the least loss within the budget (the front's loss only falls as bits grow)
    return dict(zip(layers, widths))


def read_plan(path: str, moe_layers: list) -> dict:
    """{layer: width} from a gsq_bits.json (as written, or edited): every MoE layer, widths from WIDTHS."""
    try:
        layers = json.loads(Path(path).read_text())["layers"]
        widths = {int(i): row["bits"] if isinstance(row, dict) else row for i, row in layers.items()}
    except FileNotFoundError:
        raise InputError(f"--bits-plan {path}: no such file") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"--bits-plan {path} is not a gsq_bits.json ('layers': {{layer: {{'bits': 2|3|4}}}}): "
                         f"{type(exc).__name__}: {exc}") from None
    if sorted(widths) != sorted(moe_layers):
        raise InputError(f"--bits-plan {path} lists layers {sorted(widths)}; the model's MoE layers are {sorted(moe_layers)}")
    bad = {i: b for i, b in widths.items() if b not in WIDTHS}
    if bad:
        raise InputError(f"--bits-plan {path}: widths must be one of {list(WIDTHS)}, got {bad}")
    return widths


def record(widths: dict, sizes: dict, sens: dict | None, how: str) -> dict:
    """The allocation as gsq_bits.json holds it."""
    weights = sum(sizes[i][0] for i in widths)
    stored = sum(sizes[i][1][b] for i, b in widths.items())
    out = {"how": how, "average_bits": 8 * stored / weights, "expert_bytes": stored, "layers": {}}
    if sens:
        out["predicted_kl"] = predicted(sens, widths)
    for i, b in sorted(widths.items()):
        out["layers"][str(i)] = {"bits": b, "weights": sizes[i][0], "bytes": sizes[i][1][b],
                                 **({"sensitivity": {str(w): sens[i][w] for w in WIDTHS}} if sens else {})}
    return out


def predicted(sens: dict, widths: dict) -> float:
    """The predicted KL of an allocation: the narrowest model's, less each wider layer's measured gain."""
    narrowest = next(iter(sens.values()))[min(WIDTHS)]
    return narrowest - sum(sens[i][min(WIDTHS)] - sens[i][b] for i, b in widths.items())


def describe(rec: dict) -> str:
    rows = " ".join(f"{i}:{row['bits']}" for i, row in rec["layers"].items())
    line = f"bit widths ({rec['how']}): {rows}; {rec['average_bits']:.3f} bits per expert weight"
    return line + (f", predicted KL {rec['predicted_kl']:.4f}" if "predicted_kl" in rec else "")


@torch.no_grad()
def routed_tokens(model, layer, states: list, device) -> list:
    """[(MoE inputs `[T, H]`, router weights `[T, k]`, expert indices `[T, k]`)] of each block of `states` (the
    layer's input), on the host: the tokens each expert's GPTQ Hessians are made of."""
    out = []
    for h in states:
        h = h.to(device)
        x = adapter.moe_input(layer, adapter.attention_residual(layer, h, **adapter.positions(model, h)))
        g, idx = adapter.route(layer, x)
        out.append((x.cpu(), g.float().cpu(), idx.cpu()))
    return out


@torch.no_grad()
def init_experts(layer, cfg, originals: list, tokens: list, device, dtype, split: bool):
    """Every routed expert of the layer replaced by the run's init at cfg's width (GPTQ on its tokens among
    `tokens`, or MSE-RTN), made from `originals`, as the checkpoint would dequantize it (in `dtype`). With
    `split`, each rank quantizes every world()-th expert and the ranks exchange the results in the
    checkpoint's packed form."""
    travel = split and dist.world() > 1
    share = range(dist.rank(), len(originals), dist.world()) if travel else range(len(originals))
    done = {}
    for e in share:
        fp = tuple(w.to(device, torch.float32) for w in originals[e])
        H = (None, None, 0)
        if experts.uses_gptq(cfg):
            mine = [(idx == e).nonzero(as_tuple=True) for _, _, idx in tokens]
            x = torch.cat([x[tok] for (x, _, _), (tok, _) in zip(tokens, mine)]).to(device)
            g = torch.cat([g[tok, slot] for (_, g, _), (tok, slot) in zip(tokens, mine)]).to(device)
            H = experts.expert_hessian(x, g, fp, cfg)
        _, init = experts.init_expert(fp, H, cfg)
        done[e] = [packed(q.codes, q.scales, experts.grid(cfg)) if travel else (q.codes, q.scales) for q in init]
    if travel:
        done = {e: [unpacked(p) for p in projs] for e, projs in dist.gather(done).items()}
    for e in range(len(originals)):
        adapter.set_expert_weights(layer, e, *(dequant(c, s).to(dtype) for c, s in done[e]))


def sensitivity(source, ids: torch.Tensor, cfg) -> dict:
    """{MoE layer: {width: KL per token of the model with that layer at the width, every other MoE layer at
    2 bits}} on the windows `ids` (see the module docstring); this rank measures its share of the layers."""
    model, device, compute = source.model, source.device, source.compute
    narrow, wider = min(WIDTHS), [b for b in WIDTHS if b != min(WIDTHS)]
    moe = [i for i, layer in enumerate(model.model.layers) if adapter.is_moe(layer)]
    mine = [(i, b) for i in moe for b in wider][dist.rank() :: dist.world()]
    blocks = list(torch.split(ids, BLOCK))
    with torch.no_grad():
        x = [adapter.embed(model, b.to(device)).to(compute).cpu() for b in blocks]
    states = {"original": x, narrow: x}  # on the host: each model's states at the current layer's input
    for i in range(source.n_layers):
        with source.layer(i) as layer:
            if i in moe:
                originals = [tuple(w.clone() for w in adapter.expert_weights(layer, e))
                             for e in range(adapter.num_experts(layer))]
                states["original"] = through(model, layer, states["original"], device)
                tokens = routed_tokens(model, layer, states[narrow], device)
                for b in [b for j, b in mine if j == i]:  # the wider models that start here, from the base's states
                    init_experts(layer, at(cfg, {i: b}, i), originals, tokens, device, compute, split=False)
                    states[i, b] = through(model, layer, states[narrow], device)
                init_experts(layer, at(cfg, {i: narrow}, i), originals, tokens, device, compute, split=True)
                del tokens
                for key in [narrow, *(k for k in mine if k[0] < i)]:
                    states[key] = through(model, layer, states[key], device)
            else:
                for key in states:
                    states[key] = through(model, layer, states[key], device)
    reference = states.pop("original")
    kls = {key: divergence(model, reference, h, device, compute) / ids.numel() for key, h in states.items()
           if key in mine or (key == narrow and dist.is_writer())}
    kls = dist.gather(kls)
    return {i: {b: kls[narrow] if b == narrow else kls[i, b] for b in WIDTHS} for i in moe}


@torch.no_grad()
def through(model, layer, blocks: list, device) -> list:
    """The layer's outputs for the blocks of states (kept on the host)."""
    out = []
    for x in blocks:
        x = x.to(device)
        out.append(layer(x, attention_mask=None, **adapter.positions(model, x)).cpu())
    return out


@torch.no_grad()
def divergence(model, reference: list, states: list, device, compute) -> float:
    """Summed KL(reference model || this one) over the positions, from their last states, one window at a time."""
    total = 0.0
    for r, h in zip(reference, states):
        for w in range(r.shape[0]):
            p = F.log_softmax(adapter.logits(model, r[w].to(device, compute)).float(), -1)
            q = F.log_softmax(adapter.logits(model, h[w].to(device, compute)).float(), -1)
            total += (p.exp() * (p - q)).sum().item()
    return total
