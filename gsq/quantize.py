"""`python -m gsq.quantize --model DIR --out DIR [...]`: GSQ 2-bit quantization of a MoE model's routed
experts into a compressed-tensors `pack-quantized` checkpoint. Every flag is a field of gsq.config.Config;
`--preset tiny` holds the settings for the bundled tiny model. `--dry-run` prints the memory plan (from
config.json alone) and writes nothing.
"""

from gsq.errors import InputError, quiet_start, run_cli

quiet_start(__name__)  # before the imports below take seconds
from gsq import plan  # noqa: E402
from gsq.config import QUANTIZE_FLAGS, build_parser, from_args  # noqa: E402
from gsq.pipeline import run  # noqa: E402
from gsq.walk import map_large_host_buffers  # noqa: E402


def main(argv=None):
    args = build_parser("python -m gsq.quantize", "GSQ 2-bit quantization of a Mixture-of-Experts model",
                        QUANTIZE_FLAGS).parse_args(argv)
    try:
        cfg = from_args(args)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    if cfg.dry_run:
        return plan.dry_run(cfg)
    map_large_host_buffers()  # a process-wide allocator setting: the entry point's decision
    run(cfg)


if __name__ == "__main__":
    run_cli(main)
