"""The one configuration of a gsq run. Defaults are the GSQ paper's Kimi-K2.5 settings; `PRESETS`
holds the scaled-down settings for the bundled tiny model. CLI flags are generated from the fields.
"""

import argparse
import dataclasses
import json
from dataclasses import dataclass, field

from gsq.errors import ArgumentParser
from gsq.gptq import NVFP4_GROUP


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class Config:
    # what to quantize, where to write
    model: str = _f("models/tiny-deepseek-v3", "source model directory (never modified)")
    out: str = _f("", "output directory for the compressed-tensors checkpoint")
    tokenizer: str = _f("", "tokenizer directory, where the model's folder has none (default: the model's); its "
                            "files are copied into the output")
    # calibration data
    dataset: str = _f("wikitext:wikitext-2-raw-v1:train", "local .txt/.jsonl file, or Hub id[:config[:split]]")
    text_field: str = _f("text", "text column of a Hub dataset or JSONL file ('messages' renders chat)")
    num_samples: int = _f(4096, "calibration sequences")
    seqlen: int = _f(4096, "tokens per calibration sequence")
    seed: int = _f(0, "seed of sampling and of every (layer, expert) optimisation")
    # grid
    bits: int = _f(2, "bits per expert weight (2: levels -2..1; 3, 4: local shifts)", choices=[2, 3, 4])
    format: str = _f("int", "the experts' number format: int (signed integer codes of --bits, group scales in the "
                     "model dtype), or nvfp4 (FP4 E2M1 codes, FP8 scales per 16 inputs and a global scale per "
                     "tensor: 4.5 bits per weight, served natively on Blackwell)", choices=["int", "nvfp4"])
    bits_budget: float = _f(0.0, "instead of --bits: average stored bits per routed-expert weight, scales included "
                            "(2 bits at group 128: 2.125); each MoE layer's width (2, 3, 4) chosen from measured "
                            "sensitivity to meet it from below (gsq.budget)")
    target_size: str = _f("", "instead of --bits: the whole checkpoint's size on disk, e.g. 240GB; widths as for "
                          "--bits-budget")
    bits_plan: str = _f("", "instead of --bits: each MoE layer's width from a gsq_bits.json (as written beside a "
                        "checkpoint, kept or edited)")
    sensitivity_windows: int = _f(16, "calibration windows (the first ones) of the sensitivity pass of "
                                  "--bits-budget / --target-size")
    group_size: int = _f(128, "input channels per scale")
    method: str = _f("gsq", "gsq (learned codes), or the baselines gptq / rtn with the same grid",
                     choices=["gsq", "gptq", "rtn"])
    # initialisation
    init: str = _f("gptq", "initial codes and scales", choices=["gptq", "rtn"])
    gptq_damp: float = _f(0.1, "GPTQ damping, fraction of mean diag(H)")
    gptq_block: int = _f(128, "GPTQ columns per block")
    gptq_samples: int = _f(512, "calibration windows whose tokens make the GPTQ Hessians (the first ones)")
    scale_grid: int = _f(100, "MSE scale search: shrink factors tried, down to scale_min")
    scale_min: float = _f(0.2, "MSE scale search: smallest shrink factor")
    scale_norm: float = _f(2.4, "MSE scale search: error norm")
    init_sigma: float = _f(0.01, "logit init: l = sigma * (eps + alpha * c)")
    init_alpha: float = _f(6.0, "logit init: weight of the initial code")
    # GSQ optimisation
    epochs: float = _f(10.0, "passes over the calibration windows")
    batch_size: int = _f(64, "calibration windows per optimizer step, spread over the ranks (paper: 64)")
    min_steps: int = _f(200, "floor on steps per expert, so small calibration sets still optimise")
    lr_logits: float = _f(2e-4, "Lion learning rate of the logits")
    lr_scales: float = _f(1e-5, "Lion learning rate of the scales (NVFP4: 1/8 of it, its scales being about 8x "
                          "smaller)")
    weight_decay: float = _f(1.0, "decoupled weight decay on the logits (towards uniform)")
    lion_betas: tuple = _f((0.9, 0.95), "Lion betas")
    nvfp4_scales: str = _f("float", "NVFP4: GSQ learns the scales in float and rounds them to FP8 at the end, or "
                           "trains through the rounding (rounded: the forward uses the stored scales)",
                           choices=["float", "rounded"])
    lr_final: float = _f(0.1, "cosine decay to this fraction of the learning rate")
    tau: tuple = _f((2.0, 0.05), "temperature, annealed linearly (start, end)")
    kappa: tuple = _f((100.0, 500.0), "logit gain, annealed linearly (start, end)")
    token_weights: str = _f("router", "weight of a token's output error in GPTQ's Hessians and GSQ's loss: uniform, "
                            "or router (g^2, the square of the router weight the layer output applies)",
                            choices=["uniform", "router"])
    finetune_scales: int = _f(0, "steps of the end-to-end scale fine-tune after the last layer: codes fixed, every "
                              "expert's scales trained on the KL to the original model (--method gsq; 0: off; each "
                              "step streams every layer twice, so it is on in the tiny preset only)")
    finetune_lr: float = _f(1e-2, "Adam learning rate of the fine-tune's scale factors (scale = initial * factor); "
                                "--format nvfp4 trains at 0.3x of it")
    targets: str = _f("quantized", "what each expert's output is trained towards: quantized (the original expert on "
                      "the quantized model's inputs), or original (the original expert on the original model's "
                      "inputs, so a layer also absorbs the error earlier layers left; holds both models' states)",
                      choices=["quantized", "original"])
    min_tokens: int = _f(16, "experts with fewer routed tokens keep their init (MSE-RTN), logged")
    experts_per_batch: int = _f(0, "experts of a rank trained together (0: as many as the memory plan fits, "
                                   "at most 16)")
    # REAP expert pruning (python -m gsq.prune only: PRUNE_FLAGS)
    keep: int = _f(0, "routed experts kept per layer")
    ratio: float = _f(0.0, "fraction of routed experts pruned per layer (instead of --keep)")
    criterion: str = _f("reap", "expert ranking: reap (router-weighted output norm), frequency, random",
                        choices=["reap", "frequency", "random"])
    # quality watch
    eval_every: int = _f(6, "WikiText-2 perplexity every N layers and at the end (0: off)")
    eval_data: str = _f("", "local wiki.test.raw for the perplexity checks (default: the Hub)")
    eval_windows: int = _f(128, "held-out windows for the perplexity checks")
    eval_seqlen: int = _f(2048, "tokens per perplexity window")
    # run
    device: str = _f("auto", "compute device: auto, cpu, cuda, cuda:N")
    activations: str = _f("auto", "where the layer inputs live: auto (device if the plan fits, else host, else "
                          "disk), device, host, disk (files under OUT.partial)", choices=["auto", "device", "host", "disk"])
    # the memory plan (python -m gsq.quantize ... --dry-run): reads config.json only, writes nothing
    dry_run: bool = _f(False, "print the memory plan and whether it fits, then exit")
    ranks: int = _f(0, "--dry-run: ranks to plan for (default: this run's)")
    gpu_memory: str = _f("", "GPU memory per rank, e.g. 80GB (default: this machine's GPU)")
    host_memory: str = _f("", "host memory per machine, e.g. 2TB (default: this machine's available memory)")
    json: bool = _f(False, "--dry-run: print the plan as JSON")
    resume: bool = _f(False, "continue an interrupted run in --out from its first unfinished layer")
    overwrite: bool = _f(False, "replace an existing --out")
    container: int = _f(2, "bits per code in the int32 words: 2 (each code at its own width: true 2-bit, dense "
                        "3-bit) or 4 (Marlin-era vLLM)", choices=[2, 4, 8])
    max_shard_bytes: int = _f(5 * 2**30, "largest safetensors shard written")
    preset: str = _f("", "named settings applied before the flags: 'tiny' for the bundled model")

    def to_json(self, flags: tuple = ()) -> str:
        """The resolved settings saved beside a checkpoint: those of `flags` (default: quantize's) that shape
        its bytes (not where it was written, nor whether the run was resumed)."""
        flags = flags or QUANTIZE_FLAGS
        unread = () if any(getattr(self, k) for k in WIDTH_CHOICE) else (*WIDTH_CHOICE, "sensitivity_windows")
        unread += ("format", "nvfp4_scales") if self.format == "int" else ()  # integer records as they always were
        shaping = {k: v for k, v in dataclasses.asdict(self).items()
                   if k in flags and k not in RUN_CONTROL and k not in unread}
        return json.dumps(shaping, indent=2) + "\n"


RUN_CONTROL = ("out", "resume", "overwrite", "experts_per_batch", "activations", "dry_run", "ranks", "gpu_memory",
               "host_memory", "json")  # none of these changes a byte of the checkpoint
WIDTH_CHOICE = ("bits_budget", "target_size", "bits_plan")  # with none of them, one --bits for every layer
PRUNE_ONLY = ("keep", "ratio", "criterion")
PRUNE_FLAGS = ("model", "out", "tokenizer", *PRUNE_ONLY, "dataset", "text_field", "num_samples", "seqlen", "seed", "device", "resume",
               "overwrite", "max_shard_bytes", "preset")  # python -m gsq.prune's
QUANTIZE_FLAGS = tuple(f.name for f in dataclasses.fields(Config) if f.name not in PRUNE_ONLY)


PRESETS = {
    # The bundled tiny models on 2 CPU cores: 768 x 256 calibration tokens (~50k per expert; a step's 16
    # windows route ~1k to each; 3.6% lower KL than 256 windows on both models at the same 200 steps:
    # eval/README.md), 32 held-out windows of 256 tokens; learning rates scaled for 200-step runs; 50 steps
    # of the scale fine-tune (most of its gain on tiny-qwen3-moe came in those).
    # Data paths are not settings of a preset: they come from --dataset / --eval-data (the Makefile passes
    # the local copies where it has them).
    "tiny": dict(num_samples=768, seqlen=256, batch_size=16, epochs=4.0, min_steps=200, lr_logits=1e-3,
                 lr_scales=1e-4, eval_windows=32, eval_seqlen=256, finetune_scales=50),
}


SEED_STRIDES = (1_000_003, 100_003, 4, 1_000_003)  # run -> layer -> expert -> projection -> step


def derive_seed(run: int, *path: int) -> int:
    """The seed of (layer, expert, projection, step) of the run seeded `run` (--seed), to as many levels as
    `path` gives: every random draw of a run takes its seed here (the minibatch order and prune's random
    ranking per layer, the fine-tune's order as layer -1, the logit init per projection, the Gumbel noise
    per step), so each is fixed by where it is, whatever ran before it or on which rank."""
    seed = run
    for stride, x in zip(SEED_STRIDES, path):
        seed = seed * stride + x
    return seed


def _parse(kind, text):
    return tuple(float(x) for x in text.split(",")) if kind is tuple else kind(text)


def build_parser(prog: str, description: str, only: tuple = ()) -> argparse.ArgumentParser:
    """Flags for the Config fields (`only` those named, when given)."""
    ap = ArgumentParser(prog=prog, description=description)
    for f in dataclasses.fields(Config):
        if only and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = type(f.default)
        if kind is bool:
            ap.add_argument(flag, action="store_true", default=None, help=f.metadata["help"])
        else:
            shown = ",".join(map(str, f.default)) if kind is tuple else f.default
            ap.add_argument(flag, type=lambda t, k=kind: _parse(k, t), default=None,
                            choices=f.metadata.get("choices"), help=f"{f.metadata['help']} (default: {shown})")
    return ap


def from_args(args: argparse.Namespace) -> Config:
    """Defaults, then the preset, then the flags given on the command line."""
    given = {k: v for k, v in vars(args).items() if v is not None}
    preset = given.get("preset", "")
    if preset and preset not in PRESETS:
        raise ValueError(f"unknown preset '{preset}' (known: {', '.join(PRESETS)})")
    cfg = Config(**{**PRESETS.get(preset, {}), **given})
    for name, least in (("num_samples", 1), ("seqlen", 1), ("batch_size", 1), ("gptq_samples", 1), ("min_tokens", 1),
                        ("eval_windows", 1), ("eval_seqlen", 1), ("experts_per_batch", 0), ("ranks", 0)):
        if getattr(cfg, name) < least:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(cfg, name)}")
    if cfg.batch_size % 4:
        raise ValueError(f"--batch-size must be a multiple of 4 (windows are handled in blocks of 4), got {cfg.batch_size}")
    chosen = [f"--{k.replace('_', '-')}" for k in WIDTH_CHOICE if getattr(cfg, k)]
    if len(chosen) > 1:
        raise ValueError(f"{' and '.join(chosen)} each choose the widths: give one")
    if cfg.bits_budget < 0 or cfg.sensitivity_windows < 1:
        raise ValueError("--bits-budget must be positive and --sensitivity-windows at least 1")
    if cfg.format == "nvfp4":
        fixed = {"bits": 4, "group_size": NVFP4_GROUP}
        clash = [f"--{k.replace('_', '-')} {given[k]}" for k in fixed if k in given and given[k] != fixed[k]]
        clash += [f"--{k.replace('_', '-')}" for k in WIDTH_CHOICE if getattr(cfg, k)]
        if clash:
            raise ValueError(f"--format nvfp4 has 4-bit codes in groups of {NVFP4_GROUP} for every layer: drop "
                             f"{', '.join(clash)}")
        cfg = dataclasses.replace(cfg, **fixed)
    return cfg
