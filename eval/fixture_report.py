"""Report on the bundled tiny MoE: WikiText-2 test perplexity as trained and with its routed experts zeroed.

    python eval/fixture_report.py --model models/tiny-deepseek-v3 \
        --data-file ../shared/data/wikitext-2-raw/wiki.test.raw [--seqlen 256] [--out eval/results/fixture.json]

Zeroing every routed expert (shared expert, attention and router kept) shows how much of the model
lives in the weights gsq quantizes; the per-layer expert load shows that every expert gets tokens.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from gsq.eval import eval_windows, evaluate, load_model, wikitext_rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/tiny-deepseek-v3")
    ap.add_argument("--data-file", default="../shared/data/wikitext-2-raw/wiki.test.raw")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--out", default="eval/results/fixture.json")
    args = ap.parse_args()

    model, tokenizer = load_model(args.model)
    windows = eval_windows(tokenizer, wikitext_rows(args.data_file), args.seqlen)
    loads = {}

    def count(module, inputs, outputs):
        loads[module] = loads.get(module, 0) + torch.bincount(outputs[2].flatten(), minlength=module.num_experts)

    hooks = [layer.mlp.gate.register_forward_hook(count) for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    t0 = time.time()
    full = evaluate(model, windows)
    for hook in hooks:
        hook.remove()
    for name, p in model.named_parameters():
        if ".mlp.experts." in name:
            p.data.zero_()
    zeroed = evaluate(model, windows)
    report = {
        "model": args.model,
        "data_file": args.data_file,
        "seqlen": args.seqlen,
        "windows": full["windows"],
        "ppl": full["ppl"],
        "ppl_routed_experts_zeroed": zeroed["ppl"],
        "uniform_ppl": model.config.vocab_size,
        "expert_token_share_min": min((l.min() / l.sum()).item() for l in loads.values()),
        "expert_token_share_max": max((l.max() / l.sum()).item() for l in loads.values()),
        "seconds": round(time.time() - t0, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
