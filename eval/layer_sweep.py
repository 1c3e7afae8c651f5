"""GSQ's schedule, one MoE layer at a time: how far GSQ gets below its GPTQ init on a layer's experts, for
several settings side by side, on the original model's inputs (no quantized prefix, so layers are
independent and a setting is judged on the layer alone).

    python eval/layer_sweep.py --model models/tiny-deepseek-v3 --layers 1,5 --dataset CALIB --test-file TEST \
        --set base: --set steps800:min_steps=800 --set lr3e-4:lr_logits=3e-4 ...

Each setting NAME:FIELD=VALUE,... overrides `--preset tiny` (tuples as a/b; `format=nvfp4` brings its 4-bit codes
in groups of 16 and per-tensor global scales, as gsq.config resolves --format nvfp4). The layer's experts are trained
as the pipeline trains them (GPTQ init with router-weighted Hessians, minibatches of --batch-size windows,
every expert stepping on its routed tokens), then measured: the router-weighted relative output error
(sum g^2 |f_q(x) - f(x)|^2 / sum g^2 |f(x)|^2, averaged over experts) of the init and of GSQ, on the training
windows and on the first WikiText-2 test windows. Prints one JSON line per (setting, layer) and writes them
all to --record.
"""

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gsq import adapter, quantizer  # noqa: E402
from gsq.calib import calibration_ids  # noqa: E402
from gsq.config import PRESETS, Config  # noqa: E402
from gsq.eval import eval_windows, wikitext_rows  # noqa: E402
from gsq.gptq import NVFP4_GROUP  # noqa: E402
from gsq.experts import global_scales, grid, init_expert  # noqa: E402


def moe_inputs(model, ids: torch.Tensor, layers: list) -> dict:
    """{layer: the MoE block's inputs `[windows * seqlen, H]`} of the original model on the windows `ids`."""
    got = {i: [] for i in layers}
    hooks = [model.model.layers[i].mlp.register_forward_pre_hook(
        lambda mod, args, i=i: got[i].append(args[0].detach().reshape(-1, args[0].shape[-1]))) for i in layers]
    with torch.no_grad():
        for k in range(0, len(ids), 16):
            model(ids[k : k + 16])
    for h in hooks:
        h.remove()
    return {i: torch.cat(v) for i, v in got.items()}


def routed(layer, X: torch.Tensor) -> list:
    """Per expert: (token indices into X, their router weights)."""
    with torch.no_grad():
        g, idx = adapter.route(layer, X)
    out = []
    for e in range(adapter.num_experts(layer)):
        token, slot = (idx == e).nonzero(as_tuple=True)
        out.append((token, g[token, slot].float()))
    return out


def weighted_error(x, g, fp, q) -> float:
    target, y = adapter.swiglu(x.float(), *fp), adapter.swiglu(x.float(), *q)
    w = g[:, None] ** 2
    return ((w * (y - target) ** 2).sum() / (w * target**2).sum()).item()


def sweep_layer(layer, X: torch.Tensor, X_test: torch.Tensor, seqlen: int, cfg: Config) -> dict:
    E = adapter.num_experts(layer)
    train, test = routed(layer, X), routed(layer, X_test)
    fp = [tuple(w.float() for w in adapter.expert_weights(layer, e)) for e in range(E)]
    init = []
    for e, (token, g) in enumerate(train):
        x = X[token].float()
        mid = adapter.swiglu_mid(x, fp[e][0], fp[e][1])
        if cfg.token_weights == "router":
            x, mid = x * g[:, None], mid * g[:, None]
        init.append(init_expert(fp[e], (x.T @ x, mid.T @ mid, len(token)), cfg)[1])
    n_windows = X.shape[0] // seqlen
    steps = max(cfg.min_steps, math.ceil(cfg.epochs * n_windows / cfg.batch_size))
    gen = torch.Generator().manual_seed(1)
    order = torch.cat([torch.randperm(n_windows, generator=gen)
                       for _ in range(-(-steps * cfg.batch_size // n_windows))])
    module = quantizer.ExpertLogits([torch.stack([init[e][p].codes for e in range(E)]) for p in range(3)],
                                    [torch.stack([init[e][p].scales for e in range(E)]) for p in range(3)],
                                    grid(cfg), cfg.init_sigma, cfg.init_alpha,
                                    [(cfg.seed, 0, e) for e in range(E)],
                                    global_scales=[torch.stack([global_scales(fp[e], cfg)[p] for e in range(E)])
                                                   for p in range(3)] if cfg.format == "nvfp4" else None)
    opt = quantizer.optimizer(module, cfg)
    weights = tuple(torch.stack([fp[e][p] for e in range(E)]).to(torch.bfloat16) for p in range(3))
    window_of = [token // seqlen for token, _ in train]
    for t in range(steps):
        picked = torch.zeros(n_windows, dtype=torch.bool)
        picked[order[t * cfg.batch_size : (t + 1) * cfg.batch_size]] = True
        sel = [picked[w] for w in window_of]
        xs = [X[token[s]] for (token, _), s in zip(train, sel)]
        gs = [g[s] for (_, g), s in zip(train, sel)] if cfg.token_weights == "router" else None
        quantizer.step(module, opt, xs, weights, t, steps, cfg, torch.bfloat16, gs)
    hard = module.hard(torch.bfloat16)
    errors = {"init_train": [], "gsq_train": [], "init_test": [], "gsq_test": []}
    for e in range(E):
        q_init = [quantizer.dequant(*init[e][p]) for p in range(3)]
        q_gsq = [quantizer.dequant(hard[p].codes[e], hard[p].scales[e]) for p in range(3)]
        for split, (Xs, (token, g)) in (("train", (X, train[e])), ("test", (X_test, test[e]))):
            errors[f"init_{split}"].append(weighted_error(Xs[token], g, fp[e], q_init))
            errors[f"gsq_{split}"].append(weighted_error(Xs[token], g, fp[e], q_gsq))
    mean = {k: sum(v) / len(v) for k, v in errors.items()}
    return {**mean, "ratio_train": mean["gsq_train"] / mean["init_train"],
            "ratio_test": mean["gsq_test"] / mean["init_test"], "steps": steps}


def setting(spec: str, base: Config) -> tuple:
    name, _, assignments = spec.partition(":")
    fields = {f.name: f for f in dataclasses.fields(Config)}
    over = {}
    for item in filter(None, assignments.split(",")):
        key, value = item.split("=")
        kind = type(fields[key].default)
        over[key] = tuple(float(v) for v in value.split("/")) if kind is tuple else kind(value)
    if over.get("format") == "nvfp4":
        over = {"bits": 4, "group_size": NVFP4_GROUP, **over}  # as gsq.config resolves --format nvfp4
    return name, dataclasses.replace(base, **over)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--layers", required=True, help="comma-separated MoE layer indices")
    ap.add_argument("--dataset", required=True, help="calibration text (as gsq.quantize --dataset)")
    ap.add_argument("--test-file", required=True, help="local wiki.test.raw")
    ap.add_argument("--test-windows", type=int, default=64)
    ap.add_argument("--num-samples", type=int, help="calibration windows (default: the tiny preset's)")
    ap.add_argument("--set", action="append", default=[], help="NAME:FIELD=VALUE,... (repeatable; default base:)")
    ap.add_argument("--record", help="JSON record of every line")
    args = ap.parse_args()
    base = Config(**{**PRESETS["tiny"], **({"num_samples": args.num_samples} if args.num_samples else {})})
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    layers = [int(i) for i in args.layers.split(",")]
    ids, _ = calibration_ids(tokenizer, args.dataset, "text", base.num_samples, base.seqlen, base.seed)
    test = eval_windows(tokenizer, wikitext_rows(args.test_file), base.seqlen, args.test_windows)
    X, X_test = moe_inputs(model, ids, layers), moe_inputs(model, test, layers)
    lines = []
    for spec in args.set or ["base:"]:
        name, cfg = setting(spec, base)
        for i in layers:
            t0 = time.time()
            result = sweep_layer(model.model.layers[i], X[i], X_test[i], base.seqlen, cfg)
            lines.append({"set": spec, "layer": i, **{k: round(v, 5) for k, v in result.items()},
                          "seconds": round(time.time() - t0, 1)})
            print(json.dumps(lines[-1]), flush=True)
    if args.record:
        Path(args.record).write_text(json.dumps({"model": args.model, "device": "CPU", "num_samples": base.num_samples,
                                                 "lines": lines}, indent=1) + "\n")


if __name__ == "__main__":
    main()
