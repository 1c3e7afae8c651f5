"""Write the compressed-tensors `pack-quantized` checkpoint, one unit (layer) at a time.

Per routed expert Linear P (`model.layers.L.mlp.experts.E.gate_proj`, ...): `P.weight_packed` int32
`[out, ceil(in * bits / 32)]`, `P.weight_scale` (model dtype, signed) `[out, in / G]`,
`P.weight_shape` int64 `[2]`. Every other tensor is copied under its own name. The checkpoint is
written into `<out>.partial/` and renamed to `<out>` only when complete.
"""

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gsq.kernels.pack import pack

EXPERT_TARGETS = {  # regex of the quantized modules, as vLLM and transformers match them
    "mlp.experts.{e}.gate_proj": r"re:.*mlp\.experts\.\d+\.(gate|up|down)_proj$",
    "block_sparse_moe.experts.{e}.w1": r"re:.*block_sparse_moe\.experts\.\d+\.w[123]$",
}
COPIED_FILES = re.compile(r"(tokenizer.*|special_tokens_map\.json|generation_config\.json|chat_template.*"
                          r"|.*\.py|.*\.tiktoken|vocab\..*|merges\.txt|preprocessor_config\.json)$")


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def expert_tensors(key: str, codes: torch.Tensor, scales: torch.Tensor, container: int) -> dict:
    """The three tensors of one quantized Linear, `key` without `.weight`."""
    return {f"{key}.weight_packed": pack(codes, container).cpu(),
            f"{key}.weight_scale": scales.cpu().contiguous(),
            f"{key}.weight_shape": torch.tensor(list(codes.shape), dtype=torch.int64)}


def write_unit(root: Path, unit: str, tensors: dict, max_bytes: int):
    """Write `tensors` as `model-<unit>-NNN.safetensors` shards of at most max_bytes (one tensor may exceed)."""
    for old in [*root.glob(f"model-{unit}-*.safetensors"), *root.glob(f"model-{unit}-*.tmp")]:
        old.unlink()  # a rerun after an interrupted write replaces the unit whole
    parts, part, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if part and size + nbytes > max_bytes:
            parts.append(part)
            part, size = {}, 0
        part[name] = tensors[name].contiguous()
        size += nbytes
    parts.append(part)
    for n, part in enumerate(parts):
        path = root / f"model-{unit}-{n:03d}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file(part, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)


def quantization_config(arch, container: int, group_size: int, ignore: list) -> dict:
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    weights = QuantizationArgs(num_bits=container, type="int", symmetric=True, strategy="group",
                               group_size=group_size, dynamic=False)
    scheme = QuantizationScheme(targets=[EXPERT_TARGETS[arch.expert_names[0]]], weights=weights,
                                format="pack-quantized")
    qc = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                            quantization_status="compressed", ignore=ignore)
    return {**qc.model_dump(exclude_none=False), "version": compressed_tensors.__version__}


def finish(src: Path, root: Path, out: Path, config: dict, records: dict):
    """Index, `config` as config.json, tokenizer and friends, `records` (file name -> text); then the
    atomic rename of `root` to `out`."""
    weight_map = {}
    for shard in sorted(root.glob("model-*.safetensors")):
        with safe_open(shard, "pt") as f:
            weight_map.update({k: shard.name for k in f.keys()})
    total = sum((root / f).stat().st_size for f in set(weight_map.values()))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (root / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in sorted(src.iterdir()):
        if f.is_file() and COPIED_FILES.match(f.name):
            shutil.copy2(f, root / f.name)
    for name, text in records.items():
        (root / name).write_text(text)
    if out.exists():
        shutil.rmtree(out)
    os.replace(root, out)
