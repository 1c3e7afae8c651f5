"""The memory plan: what one rank holds while it quantizes, from config.json alone, and whether it fits.

    python -m gsq.quantize --model DIR --dry-run [--ranks N] [--gpu-memory 80GB] [--host-memory 1TB] [--json]

Per rank, with H hidden, I expert intermediate, E routed experts, k per token, N ranks, B windows per step of
S tokens, d bytes per stored value (the model dtype), c per compute value (the model dtype on a GPU,
float32 on a CPU):
- Python, torch and their libraries: RUNTIME bytes of host memory;
- the embeddings, final norm and lm_head, in compute dtype, on the device;
- one layer's weights, in compute dtype, on the device (and twice on the host while it is loaded);
- the layer inputs: the rank's share of the windows x S x H x d (calibration, twice with `--targets original`,
  + perplexity watch), on the
  device, on the host, or on disk (`--activations`);
- a layer pass over one block of windows: an allowance of 10 x H x c per token;
- a group of `--experts-per-batch` experts in training: per weight 3 x L x 4 bytes (logits, their gradient,
  Lion's momentum; L = 4 levels, 5 local shifts) + 4 x d (soft weight, its gradient twice, the target
  weight) + 4 (a float32 copy for init and measurement) + 2 (RTN and init codes), and on a CPU 4 x L more
  (the reference path keeps the probabilities);
- one step's routed tokens, two copies each (as exchanged, sorted): one block's slots of the group's
  experts sent per round (BLOCK x S x k x their share), and this rank's experts' received at IMBALANCE
  times the mean load, x H x d (twice with `--targets original`: each token's original input rides along);
  and one expert at a time through the SwiGLU with autograd,
  IMBALANCE x B x S x k / E tokens x (16 H + 8 I) bytes;
- the perplexity watch's copy of its windows; the layer's packed results (gathered through the GPU
  under NCCL);
- GPTQ: the group's Hessians, 4 (H^2 + I^2) each, its float32 weights and codes (6 bytes per weight),
  one expert's workspace 4 (3 H^2 + 2 H I), and one step's routed tokens;
- the layer's results, packed (2 or 4 bits per weight), on the host;
- `--finetune-scales`: every MoE layer's codes (1 byte per expert weight) and scales (5 x 4 bytes per group:
  initial, factor, gradient, Adam's moments), the rank's share of a minibatch's states at every layer's
  input and at the top, one layer's dequantized experts and their gradients, a layer pass with autograd
  (3 x the allowance), and 4 copies of CHUNK tokens' logits;
- `--bits-budget` / `--target-size`: the sensitivity pass (gsq.budget), before the run: on the host, the states
  of the models it carries, each for W windows (S x H x c per window): the original, the narrowest and the
  rank's share of the wider ones (2 per MoE layer, split over the ranks), and one more being written; a phase on
  the device: a block of windows through one layer (the allowance, its input and output), one window's logits
  of two models (3 x S x vocab x 4), the layer's original experts copied (3 x E x H x I x c), one expert's GPTQ
  (its Hessians and workspace as above, its float32 weights, 3 copies of its tokens x (H + I) x 4); on the host
  also the layer's MoE inputs, router weights and indices (W x S x (H x c + k x 12)) and its experts' 2-bit
  results (codes and float32 scales, exchanged between the ranks);
- on disk: the resume point, the rank's layer inputs (on disk, also the next layer's being written).
The device holds all of that but the phases, and the largest of the phases (layer pass, init,
training, fine-tune), which never overlap; a host holds that for each of its ranks. Everything is usable up to
HEADROOM of the memory given. Disk space is not checked.
"""

import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, replace

from gsq import acts, adapter, budget, experts, finetune
from gsq.errors import InputError

HEADROOM = 0.9  # usable fraction of each memory (allocator, CUDA context, fragmentation)
IMBALANCE = 2  # routed tokens per expert per step: allowance over the mean (routers are uneven)
MAX_GROUP = 16  # experts trained together at most when --experts-per-batch is 0 (auto)
PASS_ALLOWANCE = 10  # bytes of a layer pass per token, in units of H x compute bytes
RUNTIME = 1_500_000_000  # host bytes per rank of Python, torch, CUDA libraries, tokenizer
_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
          "TIB": 2**40}


def parse_size(text: str, flag: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise InputError(f"{flag} {text!r} is not a size (e.g. 80GB, 1.5TB, 512GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


@dataclass(frozen=True)
class Setup:
    """What the plan is for: the model's dimensions and the machines (bytes; gpu None: a CPU run)."""
    model: dict
    ranks: int
    ranks_per_host: int
    gpu: int | None
    host: int
    d: int  # bytes per stored value (the model dtype)

    @property
    def cpu(self) -> bool:
        return self.gpu is None

    @property
    def c(self) -> int:  # bytes per compute value: float32 on a CPU
        return 4 if self.cpu else self.d

    @property
    def experts_per_rank(self) -> int:
        return -(-self.model["experts"] // self.ranks)


@dataclass
class Plan:
    setup: Setup
    placement: str  # where the layer inputs live
    experts_per_batch: int
    fits: bool
    why: str  # when it does not fit: one line, naming what would make it fit
    items: dict  # name -> (GPU bytes, host bytes, disk bytes), per rank
    totals: dict  # "gpu" / "host": (needed, usable); host per host
    steps: int  # GSQ steps per layer
    groups: int  # groups of experts per rank and layer

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def dimensions(tcfg, model) -> dict:
    """The model's figures that the plan needs, from its skeleton (meta device, no weights)."""
    layers = list(model.model.layers)
    moe = [layer for layer in layers if adapter.is_moe(layer)]
    E, inter, H = adapter.expert_shape(moe[0])
    return dict(model_type=tcfg.model_type, layers=len(layers), moe_layers=len(moe), experts=E,
                top_k=tcfg.num_experts_per_tok, hidden=H, inter=inter, vocab=tcfg.vocab_size,
                layer_params=max(sum(t.numel() for t in layer.state_dict().values()) for layer in layers),
                params=sum(t.numel() for t in model.state_dict().values()),
                global_params=sum(t.numel() for n, t in model.state_dict().items() if ".layers." not in n))


PHASES = ("layer pass", "GPTQ init", "GSQ training", "scale fine-tune", "sensitivity pass")


def figures(s: Setup, cfg, epb: int, placement: str) -> dict:
    """Bytes per rank of every item: {name: (gpu, host, disk)}; on a CPU run the GPU column is 0."""
    m, d, c = s.model, s.d, s.c
    H, I, E, k, N = m["hidden"], m["inter"], m["experts"], m["top_k"], s.ranks
    B, S = cfg.batch_size, cfg.seqlen
    windows = acts.rank_windows(cfg.num_samples, 0, N)  # rank 0 holds the most
    eval_windows = acts.rank_windows(cfg.eval_windows, 0, N) if cfg.eval_every else 0
    stored = 2 if cfg.targets == "original" else 1  # the original model's states beside the quantized model's
    inputs = (stored * windows * S + eval_windows * cfg.eval_seqlen) * H * d
    L = 4 if cfg.bits == 2 else 5
    per_weight = 3 * L * 4 + 4 * d + 4 + 2 + (4 * L if s.cpu else 0)
    expert = 3 * H * I
    mean_tokens = B * S * k / E  # routed to one expert in one step, on average
    # one block's token slots for the group's experts out (and its sorted copy), the step's tokens for
    # this rank's experts in (and their sorted copy)
    tokens = 2 * stored * (acts.BLOCK * S * k * min(1.0, epb * N / E) + IMBALANCE * mean_tokens * epb) * H * d
    phases = {
        "layer pass (one block of windows)": acts.BLOCK * max(S, cfg.eval_seqlen) * PASS_ALLOWANCE * H * c,
        "GPTQ init (the group's Hessians and float32 weights, one workspace)":
            epb * 4 * (H * H + I * I) + 4 * (3 * H * H + 2 * H * I) + epb * expert * 6 + tokens,
        "GSQ training (the group's logits, Lion state, soft weights; a step's tokens)":
            epb * expert * per_weight + tokens + IMBALANCE * mean_tokens * (16 * H + 8 * I),
    }
    if cfg.finetune_scales and cfg.method == "gsq":
        weights = m["moe_layers"] * E * expert
        kept = acts.rank_windows(min(B, cfg.num_samples), 0, N) * S * H * c  # a minibatch's states, this rank's
        phases["scale fine-tune (codes, scales and Adam state; every layer's input; one layer's weights, "
               "gradients and logits)"] = (weights + weights // cfg.group_size * 4 * 5 + (m["layers"] + 2) * kept
                                           + 2 * E * expert * c + 3 * acts.BLOCK * S * PASS_ALLOWANCE * H * c
                                           + 4 * finetune.CHUNK * m["vocab"] * 4)
    sensitivity_windows = min(cfg.sensitivity_windows, cfg.num_samples) if cfg.bits_budget or cfg.target_size else 0
    if sensitivity_windows:
        block = min(acts.BLOCK, sensitivity_windows) * S * H * c
        expert_tokens = IMBALANCE * sensitivity_windows * S * k / E  # routed to one expert, on average x IMBALANCE
        phases["sensitivity pass (a block through a layer; one window's logits; experts copied; one expert's GPTQ)"] = (
            block * (PASS_ALLOWANCE + 2) + 3 * S * m["vocab"] * 4 + E * expert * c
            + 4 * (H * H + I * I) + 4 * (3 * H * H + 2 * H * I) + 4 * expert + 3 * expert_tokens * (H + I) * 4)
    layer, outside = m["layer_params"] * c, m["global_params"] * c
    items = {"Python, torch and their libraries (allowance)": (0, RUNTIME, 0),
             "embeddings, final norm, lm_head": (0, outside, 0) if s.cpu else (outside, 0, 0),
             "one layer's weights (and its copy while loading)": (0, 2 * layer, 0) if s.cpu else (layer, 2 * layer, 0)}
    column = [0, 0, 0]
    column[{"device": 1 if s.cpu else 0, "host": 1, "disk": 2}[placement]] = inputs
    items[f"layer inputs: {windows} + {eval_windows} windows, on {placement}"] = tuple(column)
    items["resume point (and, on disk, the next layer's inputs)"] = (0, 0, inputs)
    if sensitivity_windows:
        models = 3 + -(-(len(budget.WIDTHS) - 1) * m["moe_layers"] // N)  # the original, the narrowest, one being
        items[f"sensitivity pass: {models} models' states, {sensitivity_windows} windows"] = (  # written, the share
            0, models * sensitivity_windows * S * H * c, 0)
        items["sensitivity pass: a layer's routed tokens and its experts' 2-bit codes and scales"] = (
            0, sensitivity_windows * S * (H * c + k * 12) + E * expert * (2 / 8 + 4 / cfg.group_size), 0)
    scratch = eval_windows * cfg.eval_seqlen * H * d  # the perplexity watch runs the rest of the model on a copy
    items["perplexity-watch copy of its windows"] = (scratch, 0, 0) if placement == "device" and not s.cpu \
        else (0, scratch, 0)
    for name, size in phases.items():
        items[name] = (0, size, 0) if s.cpu else (size, 0, 0)
    results = 3 * H * I * E * (2 if cfg.bits == 2 else 4) / 8
    # under NCCL the ranks' results are gathered through the GPU
    items["the layer's packed results"] = (results if N > 1 and not s.cpu else 0, results, 0)
    return {name: tuple(int(v) for v in sizes) for name, sizes in items.items()}


def totals(s: Setup, items: dict) -> dict:
    """Peak GPU memory per rank and host memory per host, each with what is usable: the phases do not
    overlap, everything else is held throughout."""
    phases = [v for name, v in items.items() if name.startswith(PHASES)]
    rest = [v for name, v in items.items() if not name.startswith(PHASES)]
    peak = [sum(v[i] for v in rest) + max(v[i] for v in phases) for i in (0, 1)]
    out = {"host": (peak[1] * s.ranks_per_host, int(HEADROOM * s.host))}
    if not s.cpu:
        out = {"gpu": (peak[0], int(HEADROOM * s.gpu)), **out}
    return out


def fits(s: Setup, cfg, epb: int, placement: str) -> bool:
    return all(need <= usable for need, usable in totals(s, figures(s, cfg, epb, placement)).values())


def choose(s: Setup, cfg):
    """(experts per batch, placement) that fit, or None: the largest group first (fewer passes over the
    inputs), then the nearest placement."""
    placements = ["device", "host", "disk"] if cfg.activations == "auto" else [cfg.activations]
    if s.cpu and cfg.activations == "auto":
        placements = ["host", "disk"]
    sizes = [min(cfg.experts_per_batch, s.experts_per_rank)] if cfg.experts_per_batch else \
        range(min(MAX_GROUP, s.experts_per_rank), 0, -1)
    return next(((epb, where) for epb in sizes for where in placements if fits(s, cfg, epb, where)), None)


def plan(s: Setup, cfg) -> Plan:
    """The plan for `cfg` (its --activations and --experts-per-batch, auto or given); when that cannot
    fit, `why` names the setting that would."""
    steps = max(cfg.min_steps, math.ceil(cfg.epochs * cfg.num_samples / cfg.batch_size)) if cfg.method == "gsq" else 0
    best = choose(s, cfg)
    epb, placement = best or smallest(s, cfg)
    items = figures(s, cfg, epb, placement)
    return Plan(s, placement, epb, best is not None, "" if best else refusal(s, cfg), items, totals(s, items),
                steps, -(-s.experts_per_rank // epb))


def smallest(s: Setup, cfg) -> tuple:
    """The leanest setting within what the flags pin: shown when nothing fits."""
    return (min(cfg.experts_per_batch or 1, s.experts_per_rank),
            cfg.activations if cfg.activations != "auto" else "disk")


def refusal(s: Setup, cfg) -> str:
    """One line: what does not fit, and the first setting that would make it fit."""
    tries = []
    if cfg.activations != "auto" or cfg.experts_per_batch:
        tries.append((s, replace(cfg, activations="auto", experts_per_batch=0)))
    tries += [(replace(s, ranks=s.ranks * f), cfg) for f in (2, 4, 8, 16) if s.ranks * f <= s.model["experts"]]
    n = cfg.num_samples // 2
    while n >= max(1, cfg.batch_size):
        tries.append((s, replace(cfg, num_samples=n)))
        n //= 2
    for setup, other in tries:
        found = choose(setup, other)
        if found:
            flags = {"--ranks": setup.ranks != s.ranks and setup.ranks, "--num-samples":
                     other.num_samples != cfg.num_samples and other.num_samples,
                     "--activations": cfg.activations != "auto" and found[1],
                     "--experts-per-batch": cfg.experts_per_batch and found[0]}
            return f"{overflow(s, cfg)}; it fits with " + " ".join(f"{k} {v}" for k, v in flags.items() if v)
    return f"{overflow(s, cfg)}, and no setting makes it fit ({'more host memory' if s.cpu else 'a GPU with more memory'} is needed)"


def overflow(s: Setup, cfg) -> str:
    epb, placement = smallest(s, cfg)
    t = totals(s, figures(s, cfg, epb, placement))
    where = "gpu" if "gpu" in t and t["gpu"][0] > t["gpu"][1] else "host"
    need, usable = t[where]
    given = "--gpu-memory" if where == "gpu" else "--host-memory"
    return (f"does not fit: even with {epb} expert(s) per batch and the layer inputs on {placement} it needs "
            f"{gb(need)} of {'GPU memory per rank' if where == 'gpu' else 'host memory'}, "
            f"{gb(usable)} usable ({int(100 * HEADROOM)}% of {given} {gb(usable / HEADROOM)})")


def machine(cfg, device_type: str) -> tuple:
    """(GPU bytes or None for a CPU run, host bytes): the flags, else this machine's."""
    gpu = parse_size(cfg.gpu_memory, "--gpu-memory") if cfg.gpu_memory else None
    if gpu is None and device_type == "cuda":
        import torch

        gpu = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    if cfg.host_memory:
        host = parse_size(cfg.host_memory, "--host-memory")
    else:
        try:
            meminfo = dict(line.split(":", 1) for line in open("/proc/meminfo"))
            host = int(meminfo["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError):
            host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return gpu, host


def describe(p: Plan, cfg) -> str:
    s, m = p.setup, p.setup.model
    lines = [f"memory plan: {m['model_type']}, {m['layers']} layers ({m['moe_layers']} MoE: {m['experts']} routed "
             f"experts, top-{m['top_k']}, hidden {m['hidden']}, expert intermediate {m['inter']}), "
             f"{m['params'] / 1e9:.1f}B parameters",
             f"{s.ranks} rank(s), {s.ranks_per_host} per host; " +
             (f"GPU memory {gb(s.gpu)} per rank" if s.gpu else "CPU run (the host is the device)") +
             f", host memory {gb(s.host)}",
             f"calibration: {cfg.num_samples} windows x {cfg.seqlen} tokens; GSQ {p.steps} steps per layer "
             f"(minibatches of {cfg.batch_size} windows), {p.experts_per_batch} experts per batch, "
             f"{p.groups} group(s) per rank and layer",
             "", f"{'per rank':<78}{'GPU':>11}{'host':>11}{'disk':>11}"]
    for name, sizes in p.items.items():
        lines.append(f"  {name:<76}" + "".join(f"{gb(v) if v else '-':>11}" for v in sizes))
    lines.append("")
    for where, (need, usable) in p.totals.items():
        per = f" per host ({s.ranks_per_host} ranks)" if where == "host" else " per rank"
        lines.append(f"{'GPU' if where == 'gpu' else 'host'} peak{per}: {gb(need)} of {gb(usable)} usable")
    lines.append(f"fits: layer inputs on {p.placement}, {p.experts_per_batch} experts per batch" if p.fits
                 else p.why)
    if cfg.bits_budget or cfg.target_size:
        lines.append(sensitivity_cost(p, cfg))
    return "\n".join(lines)


def sensitivity_cost(p: Plan, cfg) -> str:
    """What the sensitivity pass of --bits-budget / --target-size costs beside the run, in work on tokens: W
    windows through the original and the narrowest model, and through each wider one from its MoE layer on (the
    MoE layers taken as the last ones), against the run's one forward over the calibration windows and GSQ's
    training (each step runs every expert forward and backward on its tokens: about 3 forwards of the MoE layers
    per minibatch); and in experts quantized by the run's init per rank: the narrowest model's share of every
    layer, and whole layers of the rank's share of the wider models, against the run's own init."""
    m, W, N = p.setup.model, min(cfg.sensitivity_windows, cfg.num_samples), p.setup.ranks
    L, M, E = m["layers"], m["moe_layers"], m["experts"]
    sens = round(W * (2 * L + (len(budget.WIDTHS) - 1) * M * (M + 1) // 2) / L)
    run = cfg.num_samples + 3 * p.steps * cfg.batch_size
    own = M * -(-E // N)  # the run's init: every layer's share of the experts
    inits = own + -(-(len(budget.WIDTHS) - 1) * M // N) * E
    init = "GPTQ" if experts.uses_gptq(cfg) else "MSE-RTN"
    return (f"sensitivity pass: {W} windows x {cfg.seqlen} tokens, about {sens} window-passes of the model against "
            f"the run's {run} ({100 * sens / run:.1f}%), split over the ranks; and {init} of {inits} experts per rank "
            f"at 2, 3 or 4 bits, {inits / own:.1f}x the run's own init ({own})")


def check(p: Plan):
    """Refuse a run that cannot fit, in one line, before any work."""
    if not p.fits:
        raise InputError(p.why)


def dry_run(cfg):
    """`--dry-run`: print the plan; exit 2 with one error line when it does not fit."""
    from gsq import stream
    from gsq.eval import check_model_dir, model_config

    src = check_model_dir(cfg.model)
    config = model_config(src)
    tcfg = adapter.text_config(config)
    adapter.check_context(tcfg, seqlen=cfg.seqlen)
    model = stream.skeleton(tcfg)
    adapter.check_quantizable(model, cfg.group_size)
    ranks = cfg.ranks or int(os.environ.get("WORLD_SIZE", "1"))
    device = "cpu" if cfg.device == "cpu" else ("cuda" if cfg.gpu_memory or _has_cuda() else "cpu")
    gpu, host = machine(cfg, device)
    p = plan(Setup(dimensions(tcfg, model), ranks, min(ranks, 8), gpu, host, stream.model_dtype(tcfg).itemsize), cfg)
    print(p.to_json() if cfg.json else describe(p, cfg))
    if not p.fits:
        print(f"error: {p.why}", file=sys.stderr)
        sys.exit(2)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()

