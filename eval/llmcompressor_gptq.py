"""The external reference: llm-compressor's GPTQ W2A16 (int2, symmetric, group 128), or its NVFP4A16 (`--scheme
NVFP4A16`: its QuantizationModifier, the recipe llm-compressor documents for NVFP4 weights), on the same routed
experts and the same calibration tokens as gsq, saved as a compressed-tensors checkpoint.

    PYTHON_WITH_LLMCOMPRESSOR eval/llmcompressor_gptq.py --model DIR --out DIR [--preset tiny] [--scheme NVFP4A16]

llm-compressor pins older transformers and compressed-tensors than gsq, so it lives in its own
environment (`python -m venv V && V/bin/pip install torch==2.13.0 llmcompressor`); this script runs
there and `eval/compare.py --llmcompressor V/bin/python` calls it. The calibration windows are drawn
by gsq's own `gsq.calib` (imported from this checkout) with gsq's settings, so both see the same
tokens. llm-compressor's defaults are kept otherwise (damping 0.01, every expert calibrated on all
tokens during calibration, as its MoE support does by default).
"""

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # gsq's calibration sampler and settings, without installing gsq here

EXPERTS = {  # the routed experts gsq quantizes, per model type (as in gsq.export.EXPERT_TARGETS)
    "mixtral": r"re:.*block_sparse_moe\.experts\.\d+\.w[123]$",
}
DEFAULT_EXPERTS = r"re:.*mlp\.experts\.\d+\.(gate|up|down)_proj$"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="", help="gsq preset whose calibration settings are used")
    ap.add_argument("--dataset", help="calibration data, as gsq's --dataset (default: gsq's default)")
    ap.add_argument("--scheme", default="W2A16", choices=["W2A16", "NVFP4A16"])
    args = ap.parse_args()

    import datasets
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from transformers import AutoConfig, AutoTokenizer

    from gsq.calib import calibration_ids
    from gsq.config import PRESETS, Config

    cfg = dataclasses.replace(Config(), **PRESETS.get(args.preset, {}))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids, note = calibration_ids(tokenizer, args.dataset or cfg.dataset, cfg.text_field, cfg.num_samples, cfg.seqlen, cfg.seed)
    print(f"calibration: {note}")
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model_type = AutoConfig.from_pretrained(args.model).model_type
    modifier = GPTQModifier if args.scheme == "W2A16" else QuantizationModifier
    recipe = modifier(targets=[EXPERTS.get(model_type, DEFAULT_EXPERTS)], scheme=args.scheme, ignore=["lm_head"])
    oneshot(model=args.model, dataset=data, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], output_dir=args.out)


if __name__ == "__main__":
    main()
