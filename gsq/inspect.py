"""`python -m gsq.inspect DIR [--original DIR] [--json]`: what a compressed-tensors checkpoint holds.

Per decoder layer: its code width (one per layer; a --bits-budget run mixes 2, 3 and 4; NVFP4 is "fp4"), the
number of quantized tensors, their storage in bits per weight (packed codes plus scales, padding and NVFP4's
global scales included) and the most distinct codes any one group uses (at most 2^bits: 4 at 2 bits, whatever
the container). Then the totals and the checkpoint's size against the original's (`--original`, else the
source recorded in gsq_config.json when it is still there). The codes are read with compressed-tensors' own
unpackers, not gsq's.
"""

import json
import re
from collections import defaultdict
from pathlib import Path

from gsq.errors import ArgumentParser, InputError, quiet_start, run_cli

quiet_start(__name__)  # before the imports below take seconds
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402


LAYER = re.compile(r".*layers\.(\d+)\.")
NVFP4 = "nvfp4-pack-quantized"


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def max_distinct_per_group(codes: torch.Tensor, group: int) -> int:
    g = codes.view(codes.shape[0], -1, group).sort(-1).values
    return int(((g[..., 1:] != g[..., :-1]).sum(-1) + 1).max())


def tensor_parallel_sizes(hidden: int, widths: set, heads: int, group: int) -> list:
    """The tensor-parallel sizes at which vLLM 0.33 loads experts of hidden size `hidden` and intermediate
    `widths`: its WNA16 MoE layer needs the hidden size and each rank's share of the expert width to be multiples
    of the group size, for either container (create_weights in compressed_tensors_moe_wna16.py), and the
    attention heads must split evenly. Expert parallelism does not split the experts (eval/vllm/README.md)."""
    if hidden % group:
        return []
    return [tp for tp in (1, 2, 4, 8, 16, 32, 64) if heads % tp == 0 and all(w % (tp * group) == 0 for w in widths)]


def inspect(path: Path) -> dict:
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.utils.match import match_name

    from gsq.stream import Checkpoint, read_config

    config_file = path / "config.json"
    if not config_file.is_file():
        raise InputError(f"{path} is not a checkpoint directory (no config.json)")
    Checkpoint(path)  # shards whole, formats known, packed widths as configured: refused in one line if not
    config = read_config(path)
    qc = config.get("quantization_config")
    if not qc or qc.get("quant_method") != "compressed-tensors":
        raise InputError(f"{path} has no compressed-tensors quantization_config: nothing quantized to inspect")
    # the integer pack-quantized groups (gsq's experts, one per container width) or the NVFP4 one; others describe
    # modules copied as the source stored them
    schemes = [g for g in qc["config_groups"].values() if ((g.get("weights") or {}).get("type"),
               g.get("format") or qc.get("format")) in (("int", "pack-quantized"), ("float", NVFP4))]
    if not schemes:
        raise InputError(f"{path} has no integer pack-quantized or NVFP4 config group: nothing gsq wrote to inspect")
    if len({s["weights"]["group_size"] for s in schemes}) > 1:
        raise InputError(f"{path} mixes group sizes across its pack-quantized config groups: gsq.inspect reads one")
    group = schemes[0]["weights"]["group_size"]
    run = json.loads((path / "gsq_config.json").read_text()) if (path / "gsq_config.json").is_file() else {}
    plan = json.loads((path / "gsq_bits.json").read_text())["layers"] if (path / "gsq_bits.json").is_file() else {}
    layers = defaultdict(lambda: {"tensors": 0, "weights": 0, "bytes": 0, "max_distinct": 0})
    shapes = set()
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                if not name.endswith(".weight_packed"):
                    continue
                key = name[: -len(".weight_packed")]
                scheme = next((s for s in schemes if any(match_name(key, t) for t in s["targets"])), None)
                if scheme is None:
                    continue
                container = scheme["weights"]["num_bits"]
                packed, scale = f.get_tensor(name), f.get_tensor(key + ".weight_scale")
                m = LAYER.match(name)
                i = int(m.group(1)) if m else -1
                if (scheme.get("format") or qc.get("format")) == NVFP4:
                    codes = unpack_fp4_from_uint8(packed, packed.shape[0], 2 * packed.shape[1])
                    scale = torch.cat([scale.flatten().view(torch.uint8), f.get_tensor(key + ".weight_global_scale")
                                       .view(torch.uint8)])  # (bytes only)
                    bits = "fp4"
                else:
                    shape = f.get_tensor(key + ".weight_shape")
                    codes = unpack_from_int32(packed, container, shape)
                    bits = plan.get(str(i), {}).get("bits") or (run.get("bits", container) if not plan else container)
                shapes.add(tuple(codes.shape))
                row = layers[i]
                if row["tensors"] and (row["bits"], row["container_bits"]) != (bits, container):
                    raise InputError(f"layer {i} mixes code widths across its experts ({key}): vLLM serves one per layer")
                row.update(bits=bits, container_bits=container)
                row["tensors"] += 1
                row["weights"] += codes.numel()
                row["bytes"] += packed.numel() * packed.element_size() + scale.numel() * scale.element_size()
                row["max_distinct"] = max(row["max_distinct"], max_distinct_per_group(codes, group))
    if not layers:
        raise InputError(f"{path} holds no packed (weight_packed) tensors")
    total = {k: sum(r[k] for r in layers.values()) for k in ("tensors", "weights", "bytes")}
    text = config.get("text_config", config)
    hidden = text["hidden_size"]
    widths = {(r["bits"], r["container_bits"]) for r in layers.values()}
    bits, container = widths.pop() if len(widths) == 1 else ("mixed", "mixed")
    report = {"checkpoint": str(path), "bits": bits, "container_bits": container, "group_size": group,
              "layers": {i: {**r, "bits_per_weight": 8 * r["bytes"] / r["weights"]} for i, r in sorted(layers.items())},
              "quantized": {**total, "bits_per_weight": 8 * total["bytes"] / total["weights"],
                            "max_distinct": max(r["max_distinct"] for r in layers.values())},
              "checkpoint_bytes": checkpoint_bytes(path),
              "vllm_tensor_parallel": None if bits == "fp4" else tensor_parallel_sizes(
                  hidden, {d for shape in shapes for d in shape if d != hidden} or {hidden}, text["num_attention_heads"],
                  group)}
    return report


def main(argv=None):
    ap = ArgumentParser(prog="python -m gsq.inspect", description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="compressed-tensors checkpoint directory (e.g. written by gsq.quantize)")
    ap.add_argument("--original", help="the unquantized source, for the size comparison")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    path = Path(args.checkpoint)
    if not path.is_dir():
        raise InputError(f"checkpoint directory not found: {path}")
    report = inspect(path)
    original = args.original
    if original is None and (path / "gsq_config.json").is_file():
        original = json.loads((path / "gsq_config.json").read_text()).get("model")
    if original and Path(original).is_dir():
        report["original"], report["original_bytes"] = original, checkpoint_bytes(Path(original))
    elif args.original:
        raise InputError(f"--original {args.original} is not a directory")
    if args.json:
        print(json.dumps(report, indent=2))
        return
    widths = {"mixed": "mixed widths", "fp4": "NVFP4 (E2M1 codes, an FP8 scale per 16 inputs, a global scale per "
              "tensor)"}.get(report["bits"], f"{report['bits']}-bit codes in {report['container_bits']}-bit words")
    print(f"{path}: {widths}, group {report['group_size']}")
    print(f"{'layer':>6}{'bits':>6}{'tensors':>9}{'weights':>12}{'bits/weight':>13}{'max codes/group':>17}")
    for i, r in report["layers"].items():
        print(f"{i:>6}{r['bits']:>6}{r['tensors']:>9}{r['weights']:>12}{r['bits_per_weight']:>13.3f}{r['max_distinct']:>17}")
    q = report["quantized"]
    print(f"quantized: {q['tensors']} tensors, {q['weights']} weights in {q['bytes'] / 2**20:.2f} MiB = "
          f"{q['bits_per_weight']:.3f} bits/weight (codes + scales); at most {q['max_distinct']} codes per group")
    line = f"checkpoint: {report['checkpoint_bytes'] / 2**20:.2f} MiB"
    if "original_bytes" in report:
        line += (f", original {report['original_bytes'] / 2**20:.2f} MiB "
                 f"({report['checkpoint_bytes'] / report['original_bytes']:.3f}x)")
    print(line)
    if report["vllm_tensor_parallel"] is None:
        print("vLLM 0.33 serves NVFP4 experts weight-only with its Marlin or Humming MoE kernels (eval/vllm/nvfp4.md)")
    else:
        tp = ", ".join(map(str, report["vllm_tensor_parallel"])) or "none"
        print(f"vLLM 0.33 loads it at tensor-parallel sizes: {tp} (hidden size and each rank's share of the expert "
              f"width must be multiples of group {report['group_size']}); expert parallelism "
              "(--enable-expert-parallel) does not split the experts, so this limit does not apply to it")
    for i, r in report["layers"].items():
        most = 2 ** r["container_bits"] if r["bits"] == "fp4" else 2 ** r["bits"]
        if r["max_distinct"] > most:
            raise InputError(f"a group of layer {i} uses {r['max_distinct']} distinct codes, more than {most} "
                             f"for {r['bits']}-bit quantization")


if __name__ == "__main__":
    run_cli(main)
