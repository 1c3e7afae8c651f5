"""Write the compressed-tensors checkpoint, one unit (layer) at a time.

Per routed expert Linear P (`model.layers.L.mlp.experts.E.gate_proj`, ...), integer codes (`pack-quantized`):
`P.weight_packed` int32 `[out, ceil(in * bits / 32)]`, `P.weight_scale` (model dtype, signed) `[out, in / G]`,
`P.weight_shape` int64 `[2]`; NVFP4 (`nvfp4-pack-quantized`): `P.weight_packed` uint8 `[out, in / 2]` (E2M1
nibbles), `P.weight_scale` float8_e4m3fn `[out, in / 16]`, `P.weight_global_scale` float32 `[1]` (the weight is
fp4 * weight_scale / weight_global_scale). Every other tensor is copied under its own name. The checkpoint is
written into `<out>.partial/` and renamed to `<out>` only when complete.
"""

import json
import os
import re
import shutil
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gsq import partial
from gsq.errors import tensor_bytes, write_text, writing
from gsq.gptq import Grid, fp8
from gsq.kernels.pack import fp4_pack, fp4_unpack, pack, unpack

COPIED_FILES = re.compile(r"(tokenizer.*|special_tokens_map\.json|generation_config\.json|chat_template.*"
                          r"|.*\.py|.*\.tiktoken|vocab\..*|merges\.txt|preprocessor_config\.json|LICEN[SC]E.*|NOTICE.*)$",
                          re.I)
TOKENIZER_FILES = re.compile(r"(tokenizer.*|special_tokens_map\.json|chat_template.*|.*\.tiktoken|tiktoken\.model|vocab\..*"
                             r"|merges\.txt|spiece\.model)$", re.I)  # taken from --tokenizer DIR


def expert_tensors(key: str, result, container: int) -> dict:
    """The three tensors of one quantized Linear (a `packed` result), `key` without `.weight`."""
    if result.grid.nvfp4:
        g = result.global_scale.float().reshape(1).clone()  # its own storage (safetensors writes no views)
        return {f"{key}.weight_packed": result.words.cpu(),
                f"{key}.weight_scale": fp8(2 * result.scales.float() * g).cpu(),
                f"{key}.weight_global_scale": g.cpu()}
    codes, scales = unpacked(result)
    return {f"{key}.weight_packed": pack(codes, container).cpu(),
            f"{key}.weight_scale": scales.cpu().contiguous(),
            f"{key}.weight_shape": torch.tensor(list(codes.shape), dtype=torch.int64)}


def unit_name(i: int) -> str:
    return f"layer{i:05d}"


def layer_shard(ckpt, arch, i: int, final, container: int) -> dict:
    """Layer i as written: its original tensors, routed experts replaced by packed codes and scales."""
    keys = ckpt.layer_keys(arch, i)
    tensors = {}
    expert_keys = set()
    for e, projs in enumerate(final or []):
        for p, result in enumerate(projs):
            key = arch.expert_key(i, e, p)
            expert_keys.add(key + ".weight")
            tensors.update(expert_tensors(key, result, container))
    tensors.update(ckpt.stored([k for k in keys if k not in expert_keys]))  # as the source stores them
    return tensors


class Packed(NamedTuple):
    """A result as kept until the layer is written (and as ranks exchange it): the codes in int32 words of
    `grid.word_bits` per code (NVFP4: E2M1 bytes, as written), the scales as held, the row length, the grid,
    NVFP4's global scale."""

    words: torch.Tensor
    scales: torch.Tensor
    cols: int
    grid: Grid
    global_scale: torch.Tensor | None = None


def packed(codes, scales, grid: Grid, global_scale=None) -> Packed:
    words = fp4_pack(codes) if grid.nvfp4 else pack(codes, grid.word_bits)
    return Packed(words.cpu(), scales.cpu(), codes.shape[-1], grid, global_scale)


def unpacked(result: Packed) -> tuple:
    """Codes and scales of a `packed` result."""
    if result.grid.nvfp4:
        return fp4_unpack(result.words), result.scales
    return unpack(result.words, result.grid.word_bits, result.cols), result.scales


def write_unit(partial_dir: Path, unit: str, tensors: dict, max_bytes: int):
    """Write `tensors` as `model-<unit>-NNN.safetensors` shards of at most max_bytes (one tensor may exceed)."""
    for old in [*partial_dir.glob(f"model-{unit}-*.safetensors"), *partial_dir.glob(f"model-{unit}-*.tmp")]:
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
        path = partial_dir / f"model-{unit}-{n:03d}.safetensors"
        tmp = path.with_suffix(".tmp")
        with writing(tmp, tensor_bytes(part)):
            save_file(part, tmp, metadata={"format": "pt"})
        readable(tmp)
        os.replace(tmp, path)


def readable(path: Path):
    """The mode any new file gets (0666 less the umask): safetensors writes 0600, which a server running as
    another user (a container, a shared model store) cannot read."""
    umask = os.umask(0o022)
    os.umask(umask)  # (reading it means setting it)
    os.chmod(path, 0o666 & ~umask)


def targets(mine: set, others: set) -> list:
    """Regexes (compressed-tensors `re:` targets) that match every module name in `mine` and none in
    `others`, each as general as that allows: layer and expert numbers as `\\d+` (anything before the
    layers prefix as `.*`, so vLLM's own prefixes match too), else the layer number kept (DeepSeek's MTP
    layer keeps its FP8 experts beside the 2-bit ones), else the exact name."""
    free = {}  # pattern -> whether it matches none of `others` (a handful of patterns, each checked once)
    found = set()
    for name in sorted(mine):
        exact = re.escape(name)
        candidates = [f"^{exact}$"]
        layer = re.search(r"layers\\\.\d+\\\.", exact)
        if layer:
            tail = re.sub(r"(?<=\\\.)\d+(?=\\\.)", r"\\d+", exact[layer.end():])
            candidates[:0] = [r".*layers\.\d+\." + tail + "$", ".*" + exact[layer.start():layer.end()] + tail + "$"]
        for c in candidates:
            if c not in free:
                free[c] = not any(re.match(c, o) for o in others)
            if free[c]:
                found.add("re:" + c)
                break
    return sorted(found)


NVFP4 = "nvfp4"  # the layout of NVFP4 experts, where the integer ones name their container bits


def layout(cfg) -> int | str:
    """How a layer's experts are written: NVFP4, or integer codes in words of `cfg.container` bits."""
    return NVFP4 if cfg.format == NVFP4 else cfg.container


def quantization_config(group_size: int, quantized: dict, copied: dict, modules: set) -> dict:
    """One compressed-tensors config for everything the checkpoint stores quantized: the new group-`group_size`
    experts (`quantized`: layout (container bits or NVFP4) -> module names, one config group per layout) and the modules copied as
    the source stored them (`copied`: module name -> its compressed-tensors scheme, e.g. DeepSeek-V3's block-FP8
    attention). Every target selects exactly its group's modules among `modules` (all the checkpoint's modules)."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    def scheme(layout):
        if layout == NVFP4:  # compressed-tensors' NVFP4A16 preset: weights only, activations stay as they are
            return QuantizationScheme(targets=["Linear"], format="nvfp4-pack-quantized", weights=QuantizationArgs(
                num_bits=4, type="float", symmetric=True, strategy="tensor_group", group_size=16, dynamic=False,
                scale_dtype=torch.float8_e4m3fn))
        return QuantizationScheme(targets=["Linear"], format="pack-quantized", weights=QuantizationArgs(
            num_bits=layout, type="int", symmetric=True, strategy="group", group_size=group_size, dynamic=False))

    schemes = [(scheme(layout), set(names)) for layout, names in sorted(quantized.items(), key=lambda kv: str(kv[0]))]
    for name, scheme in sorted(copied.items()):
        same = next((names for s, names in schemes if s == scheme), None)
        if same is None:
            schemes.append((scheme, same := set()))
        same.add(name)
    groups = {f"group_{n}": scheme.model_copy(update={"targets": targets(names, modules - names)})
              for n, (scheme, names) in enumerate(schemes)}
    formats = {scheme.format for scheme, _ in schemes}
    qc = QuantizationConfig(config_groups=groups, format=formats.pop() if len(formats) == 1 else "mixed-precision",
                            quantization_status="compressed", ignore=[])
    return {**qc.model_dump(exclude_none=False), "version": compressed_tensors.__version__}


def rest_keys(ckpt, arch, n_layers: int) -> list:
    """Tensors outside decoder layers 0..n-1 (embeddings, norm, lm_head, MTP layers, vision tower)."""
    inside = {k for i in range(n_layers) for k in ckpt.layer_keys(arch, i)}
    return sorted(k for k in ckpt.keys() if k not in inside)


def output_quantization(ckpt, arch, n_layers: int, containers: dict, group_size: int) -> dict:
    """The written checkpoint's one quantization config: the routed experts of layers 0..n-1 in their layer's
    layout (`containers`: layer -> container bits or NVFP4), and every module copied quantized from the source (FP8
    attention, an MTP layer's experts) as stored."""
    modules = {k[: -len(".weight")] for k in ckpt.keys() if k.endswith(".weight")}
    quantized = {}
    for m in modules:
        i = arch.expert_layer(m)
        if i is not None and i < n_layers:
            quantized.setdefault(containers[i], set()).update([m, *arch.vllm_names(m)])  # vLLM's names, too
    everything = set().union(*quantized.values())
    copied = {k[: -len(".weight")]: scheme for k, (_, scheme, _) in ckpt.compressed.items()}
    copied = {m: scheme for m, scheme in copied.items() if m not in everything}
    return quantization_config(group_size, quantized, copied, modules)


def finish(src: Path, partial_dir: Path, out: Path, config: dict, records: dict, tokenizer: str = ""):
    """The shards renamed as users and tools expect them (`model-00001-of-000NN.safetensors`, in unit order;
    the resume design keeps its own names until here), their index, `config` as config.json, tokenizer and
    friends (also from `tokenizer`, a directory, when given), `records` (file name -> text); then the atomic
    rename of `partial_dir` to `out`. Every file is written while the resume point stands (a full disk here
    resumes at this step); then it goes, and the renames are all that is left."""
    units = sorted(partial_dir.glob("model-*.safetensors"))
    names = {unit: f"model-{n:05d}-of-{len(units):05d}.safetensors" for n, unit in enumerate(units, 1)}
    weight_map = {}
    for unit, name in names.items():
        with safe_open(unit, "pt") as f:
            weight_map.update({k: name for k in f.keys()})
    index = {"metadata": {"total_size": sum(unit.stat().st_size for unit in units)},
             "weight_map": dict(sorted(weight_map.items()))}
    write_text(partial_dir / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
    write_text(partial_dir / "config.json", json.dumps(config, indent=2) + "\n")
    copies = {f.name: f for f in sorted(src.iterdir()) if f.is_file() and COPIED_FILES.match(f.name)}
    if tokenizer:
        copies.update({f.name: f for f in sorted(Path(tokenizer).iterdir())
                       if f.is_file() and TOKENIZER_FILES.match(f.name)})
    for f in copies.values():
        with writing(partial_dir / f.name, f.stat().st_size):
            shutil.copyfile(f, partial_dir / f.name)  # the mode of a new file, as every other file here
    for name, text in records.items():
        write_text(partial_dir / name, text)
    partial.finish_work(partial_dir)
    for unit, name in names.items():
        os.replace(unit, partial_dir / name)
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial_dir, out)
