"""Stream a safetensors model one decoder layer at a time: never the whole model in memory.

The model skeleton is built from config.json on the meta device (no memory); a layer is
materialised from the shards when the pipeline reaches it and dropped after. A quantized source
(Kimi-K2.5's int4 pack-quantized experts, DeepSeek-V3's and MiniMax-M2's block FP8) is read through
compressed-tensors' own decompressor, module by module as it is loaded: the rest of gsq sees plain
`P.weight` tensors.
"""

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from gsq import adapter
from gsq.errors import BrokenSource, InputError


# Tensor-name suffixes that only a quantized format writes: left unclaimed by the source's decoder, they
# mean a format gsq cannot read.
QUANT_SUFFIXES = ("weight_packed", "weight_scale", "weight_scale_inv", "weight_zero_point", "weight_shape",
                  "weight_g_idx", "input_scale", "qweight", "qzeros", "scales", "g_idx", "_blocks", "_scales")


def shard_map(index: Path) -> dict:
    """The index's tensor -> shard file name, each a plain file name in the model directory: an index that points
    elsewhere (`../other/x.safetensors`, `/abs/x.safetensors`) is refused, so a model never reads outside its
    folder. A shard that is a symbolic link (the Hugging Face cache: snapshots/REV/* -> ../../blobs/*) is fine."""
    def unique(pairs):
        seen = {}
        for key, value in pairs:
            if key in seen and seen[key] != value:
                raise InputError(f"{index.name} lists {key} twice, in {seen[key]!r} and {value!r}")
            seen[key] = value
        return seen

    try:
        weight_map = json.loads(index.read_text(), object_pairs_hook=unique)["weight_map"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"cannot read {index}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}") from exc
    if not isinstance(weight_map, dict):
        raise InputError(f"cannot read {index}: its weight_map is not a mapping of tensor names to shard files")
    for name, file in weight_map.items():
        if not isinstance(file, str) or file in ("", ".", "..") or "/" in file or "\\" in file:
            raise InputError(f"{index.name} maps {name} to {file!r}: a shard must be a file name in the model "
                             f"directory {index.parent} (no folders, no absolute path, no ..)")
    return weight_map


class Checkpoint:
    """Tensor name -> shard file of a (possibly sharded) safetensors checkpoint; loads by name.

    A quantized source module (compressed-tensors, or block FP8 as DeepSeek-V3 ships it) appears under
    its dense name `P.weight` and is decoded by compressed-tensors' own decompressor when loaded;
    `stored(names)` returns such modules as they are on disk, named as the output's compressed-tensors
    config describes them, and `schemes` the quantization scheme of each."""

    def __init__(self, root: Path):
        self.root = Path(root)
        index = self.root / "model.safetensors.index.json"
        if index.is_file():
            self.where = {k: self.root / f for k, f in shard_map(index).items()}
        elif (self.root / "model.safetensors").is_file():
            self.where = dict.fromkeys(shard_keys(self.root / "model.safetensors"), self.root / "model.safetensors")
        else:
            raise InputError(f"no safetensors weights (model.safetensors or its index) in {self.root}")
        missing = sorted({str(p.name) for p in self.where.values() if not p.is_file()})
        if missing:
            raise InputError(f"shard(s) listed in the index are missing: {', '.join(missing)}")
        check_shards(self.where)
        self.files = dict(self.where)  # on-disk names
        # "P.weight" -> (compressor, scheme, {part: on-disk name}); the output names part p "P.p"
        self.compressed = quantized_modules(self.root, self.files)
        config = read_config(self.root)
        self.dtype = model_dtype(config.get("text_config") or config)  # what decoded tensors are held in
        for name, (_, _, parts) in self.compressed.items():  # self.where: the logical names
            file = self.files[next(iter(parts.values()))]
            for disk_name in parts.values():
                del self.where[disk_name]
            self.where[name] = file
        unread = next((k for k in self.where if k.rsplit(".", 1)[-1].endswith(QUANT_SUFFIXES)), None)
        if unread is not None:
            raise InputError(f"tensor {unread} is stored in a quantized format gsq cannot read "
                             f"(suffix '{unread.rsplit('.', 1)[-1]}' with no quantization_config that explains it)")
        plain = [k for k in self.where if k not in self.compressed]
        for name, dtype in dtypes(plain, self.files).items():
            if dtype.startswith(("F8", "F4", "I8", "U8", "I4", "U4")):
                raise InputError(f"tensor {name} is stored as {dtype} with no scale or quantization_config that "
                                 "says how to read it")

    def keys(self):
        """Logical tensor names: a compressed module appears as its dense `P.weight`."""
        return self.where.keys()

    def raw(self, names, device="cpu") -> dict:
        """Tensors by on-disk name, as stored."""
        by_file = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for path, group in by_file.items():
            with safe_open(path, "pt", device=str(device)) as f:
                for name in group:
                    out[name] = f.get_tensor(name)
        return out

    def load(self, names, device="cpu") -> dict:
        """Dense tensors by logical name; quantized modules decoded."""
        out = self.raw([p for n in names for p in (self.compressed[n][2].values() if n in self.compressed
                                                      else [n])], device)
        for name in names:
            if name in self.compressed:
                compressor, scheme, parts = self.compressed[name]
                local = {part: out.pop(disk_name) for part, disk_name in parts.items()}
                # in the model's dtype at once: a layer's decoded experts never sit in float32 together
                out[name] = compressor.decompress(local, scheme)["weight"].to(self.dtype)
        for name, t in out.items():
            if t.is_floating_point() and t.element_size() > 1 and not torch.isfinite(t).all():
                raise BrokenSource(f"tensor {name} holds NaN or inf ({self.where[name].name})")
        return out

    def stored(self, names) -> dict:
        """Tensors by logical name as stored, a quantized module as its parts `P.weight_scale`, ... (the
        compressed-tensors names: block FP8's `weight_scale_inv` is its `weight_scale`)."""
        disk = {}
        for name in names:
            if name in self.compressed and self.compressed[name][1] is not None:  # described by a scheme
                prefix = name[: -len(".weight")]
                disk.update({d: f"{prefix}.{part}" for part, d in self.compressed[name][2].items()})
            else:
                disk.update({d: d for d in (self.compressed[name][2].values() if name in self.compressed else [name])})
        return {disk[k]: t for k, t in self.raw(list(disk), "cpu").items()}

    def layer_keys(self, arch: adapter.Arch, i: int) -> list:
        prefix = f"{arch.layers_prefix}.{i}."
        return sorted(k for k in self.where if k.startswith(prefix))


def shard_keys(path: Path) -> list:
    """The tensor names in one shard, from its header; refused if the header does not read or does not
    cover the file (a truncated or overwritten shard)."""
    try:
        with safe_open(path, "pt") as f:
            return list(f.keys())
    except Exception as exc:  # safetensors' own error, e.g. "incomplete metadata, file not fully covered"
        raise InputError(f"shard {path.name} is truncated or corrupt: {str(exc).splitlines()[0]}") from exc


def dtypes(names, files: dict) -> dict:
    """Each tensor's stored dtype (safetensors' name, e.g. "BF16", "F8_E4M3"), from the shard headers."""
    return _headers(names, files, lambda s: s.get_dtype())


def shapes(names, files: dict) -> dict:
    """Each tensor's stored shape, from the shard headers."""
    return _headers(names, files, lambda s: tuple(s.get_shape()))


def _headers(names, files: dict, read) -> dict:
    by_file, out = {}, {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    for path, group in by_file.items():
        with safe_open(path, "pt") as f:
            out.update({name: read(f.get_slice(name)) for name in group})
    return out


def check_shapes(ckpt: Checkpoint, model, arch):
    """The weights are the model config.json describes (another hidden_size, expert width or vocabulary is
    refused before any work): every tensor stored plain or as block FP8 whose name maps onto the skeleton
    has the skeleton's shape; each routed expert has its slice of the fused expert tensors. Headers only."""
    prefix = arch.layers_prefix[: -len("model.layers")]
    want = {prefix + k: tuple(t.shape) for k, t in model.state_dict().items() if not k.startswith("model.layers.")}
    for i, layer in enumerate(model.model.layers):
        for k, t in layer.state_dict().items():
            want[f"{arch.layers_prefix}.{i}.{k}"] = tuple(t.shape)
        if adapter.is_moe(layer) and arch.expert_names:
            _, inter, hidden = adapter.expert_shape(layer)
            for e in range(adapter.num_experts(layer)):
                for p, shape in enumerate([(inter, hidden)] * 2 + [(hidden, inter)]):
                    want[arch.expert_key(i, e, p) + ".weight"] = shape
    names = {}  # stored name -> the name it has in the skeleton's terms
    for k in ckpt.keys():
        layer_of = k[len(arch.layers_prefix) + 1:].split(".", 1) if k.startswith(arch.layers_prefix + ".") else None
        name = f"{arch.layers_prefix}.{layer_of[0]}.{arch.module_name(layer_of[1])}" if layer_of and len(layer_of) > 1 else k
        if k not in ckpt.compressed:
            names[k] = name if name in want else k
        elif ckpt.compressed[k][1] is not None and ckpt.compressed[k][1].format == "float-quantized":
            names[ckpt.compressed[k][2]["weight"]] = name if name in want else k
    got = shapes(list(names), ckpt.files)
    for disk, name in sorted(names.items()):
        if name in want and got[disk] != want[name]:
            raise InputError(f"config.json does not match the weights: {disk} is stored as {list(got[disk])}, the "
                             f"config makes it {list(want[name])}")


def check_shards(where: dict):
    """Every shard's header reads and covers the file (a truncated or overwritten shard does not), and
    every tensor the index puts in a shard is there: checked before any work."""
    by_file = {}
    for name, path in where.items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        held = set(shard_keys(path))
        lost = [n for n in names if n not in held]
        if lost:
            raise InputError(f"shard {path.name} lacks {lost[0]} (and {len(lost) - 1} more) that the index puts there")


class MXFP4:
    """gpt-oss's MXFP4 experts, decoded by transformers' own MXFP4 dequantizer into the module's layout."""

    @staticmethod
    def decompress(parts: dict, scheme=None) -> dict:
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors

        return {"weight": convert_moe_packed_tensors(parts["blocks"], parts["scales"])}


def read_config(root: Path) -> dict:
    """config.json as a dict; one that is not a JSON object is one line."""
    try:
        config = json.loads((Path(root) / "config.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"cannot read {Path(root) / 'config.json'}: {str(exc).splitlines()[0][:160]}") from exc
    if not isinstance(config, dict) or not isinstance(config.get("text_config", {}), dict):
        raise InputError(f"{Path(root) / 'config.json'} is not a JSON object of settings")
    return config


def source_quantization(root: Path):
    """The source's quantization_config, wherever it sits (top level, or a multimodal wrapper's text_config)."""
    config = read_config(root)
    return config.get("quantization_config") or config.get("text_config", {}).get("quantization_config")


def quantized_modules(root: Path, where: dict) -> dict:
    """Modules the source stores quantized, each with compressed-tensors' decompressor and scheme and its
    parts' on-disk names. compressed-tensors sources carry their schemes; block FP8 (`quant_method: fp8`,
    DeepSeek-V3, MiniMax-M2) is compressed-tensors' FP8_BLOCK scheme with the scale named `weight_scale_inv`."""
    qc = source_quantization(root)
    if not qc:
        return {}
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import FP8_BLOCK

    method = qc.get("quant_method")
    if method == "mxfp4":  # gpt-oss: fused experts `P_blocks` (e2m1 pairs) + `P_scales` (e8m0 per 32), no scheme
        return {k[: -len("_blocks")]: (MXFP4, None, {"blocks": k, "scales": k[: -len("_blocks")] + "_scales"})
                for k in where if k.endswith("_blocks")}
    if method == "fp8":
        block = qc.get("weight_block_size")
        if list(block or []) != [128, 128] or qc.get("activation_scheme", "dynamic") != "dynamic":
            raise InputError(f"FP8 source with weight_block_size {block} and activation_scheme "
                             f"{qc.get('activation_scheme')!r} is not supported (only 128x128 blocks, dynamic)")
        scheme = QuantizationScheme(targets=["Linear"], **FP8_BLOCK, format="float-quantized")
        compressor = BaseCompressor.get_value_from_registry("float-quantized")
        modules = [k[: -len(".weight_scale_inv")] for k in where if k.endswith(".weight_scale_inv")]
        return {m + ".weight": (compressor, scheme, {"weight": m + ".weight", "weight_scale": m + ".weight_scale_inv"})
                for m in modules}
    if method != "compressed-tensors":
        raise InputError(f"source quantization '{method}' is not supported (gsq reads bf16/fp16/fp32, "
                         "block FP8 (quant_method fp8), MXFP4 (gpt-oss) and compressed-tensors checkpoints)")
    qc = QuantizationConfig.model_validate(qc)
    modules = {}
    for prefix in sorted(k[: -len(".weight_scale")] for k in where if k.endswith(".weight_scale")):
        scheme = next((g for g in qc.config_groups.values()
                       if any(t == "Linear" or t == prefix or (t.startswith("re:") and re.match(t[3:], prefix))
                              for t in g.targets)), None)
        if scheme is None:
            raise InputError(f"no quantization_config group of {root} targets {prefix}")
        fmt = scheme.format or qc.format
        try:
            compressor = BaseCompressor.get_value_from_registry(fmt)
        except Exception as exc:
            raise InputError(f"compressed-tensors format '{fmt}' of {root} cannot be decompressed") from exc
        scheme = scheme.model_copy(update={"format": fmt})
        parts = {p: f"{prefix}.{p}" for p in compressor.compression_param_names(scheme)}
        lost = [n for n in parts.values() if n not in where]
        if lost:
            raise InputError(f"compressed module {prefix} lacks {', '.join(lost)}")
        modules[prefix + ".weight"] = (compressor, scheme, parts)
    check_packed(modules, where)
    return modules


def check_packed(modules: dict, where: dict):
    """Every group-quantized `pack-quantized` module holds as many int32 words per row as its config
    group's bit width needs for the inputs its scales cover (a checkpoint that mixes bit widths, or whose
    config does not describe it, is refused before anything reads it). Headers only."""
    packed = {m: parts for m, (_, scheme, parts) in modules.items() if scheme is not None
              and scheme.format == "pack-quantized" and scheme.weights.strategy == "group"
              and {"weight_packed", "weight_scale"} <= set(parts)}
    got = shapes([p for parts in packed.values() for p in (parts["weight_packed"], parts["weight_scale"])], where)
    for m, parts in sorted(packed.items()):
        bits, group = modules[m][1].weights.num_bits, modules[m][1].weights.group_size
        words, groups = got[parts["weight_packed"]][-1], got[parts["weight_scale"]][-1]
        least, most = -(-((groups - 1) * group + 1) * bits // 32), -(-groups * group * bits // 32)
        if not least <= words <= most:
            raise InputError(f"{parts['weight_packed']} holds {words} int32 words per row, but the {bits}-bit codes "
                             f"of its {groups} groups of {group} need {most}: the checkpoint's tensors do not have the "
                             "bit width its quantization_config says")


def model_dtype(config) -> torch.dtype:
    """The dtype the model's weights are stored and trained in (config `dtype`, default bf16); `config` a
    transformers config or config.json's dict."""
    dtype = (config.get("dtype") or config.get("torch_dtype") if isinstance(config, dict)
             else getattr(config, "dtype", None)) or torch.bfloat16
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


POSITIVE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "n_group", "topk_group",
            "moe_intermediate_size", "intermediate_size")  # read by every architecture gsq quantizes, when present


def skeleton(config):
    """The causal LM of `config` on the meta device: module structure only, no memory."""
    from transformers import AutoModelForCausalLM

    for key in POSITIVE:
        value = getattr(config, key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InputError(f"config.json: {key} is {value!r}, not a positive whole number")
    default = type(config)()
    for key, value in config.to_dict().items():  # a number where the config class has one (null allowed: optional)
        want = getattr(default, key, None)
        if value is not None and type(want) in (int, float) and (type(value) not in (int, float) or
                                                                type(want) is int and type(value) is float):
            raise InputError(f"config.json: {key} is {value!r}, not a {'whole ' if type(want) is int else ''}number")
    k, n = getattr(config, "num_experts_per_tok", None), next(
        (getattr(config, a) for a in ("n_routed_experts", "num_experts", "num_local_experts") if hasattr(config, a)), None)
    if isinstance(k, int) and isinstance(n, int) and not 0 < k <= n:
        raise InputError(f"config.json: num_experts_per_tok is {k}, not between 1 and the {n} routed experts")
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (RuntimeError, ValueError, TypeError, KeyError, AttributeError, ZeroDivisionError, IndexError) as exc:
        raise InputError(f"config.json describes no model transformers can build: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:160] if str(exc) else ''}") from exc
    return model.requires_grad_(False)  # only GSQ's own tensors are ever trained


def materialize(module: torch.nn.Module, state: dict, device, dtype) -> torch.nn.Module:
    """Give a meta module real storage on `device` and fill it from `state` (all keys required)."""
    module.to_empty(device=device)
    missing, unexpected = module.load_state_dict(state, strict=False, assign=False)
    if missing or unexpected:
        raise InputError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return module.to(dtype)


def load_layer(ckpt: Checkpoint, model, arch, i: int, device, dtype):
    layer = model.model.layers[i]
    n_routed = adapter.num_experts(layer) if adapter.is_moe(layer) else 0
    tensors = ckpt.load(ckpt.layer_keys(arch, i))
    return materialize(layer, adapter.layer_state_from_checkpoint(arch, i, tensors, n_routed), device, dtype)


def unload_layer(model, i: int):
    model.model.layers[i].to("meta")


def load_globals(ckpt: Checkpoint, model, arch, device, dtype):
    """Embeddings, final norm, lm_head and rotary embedding: what runs outside the decoder layers."""
    prefix = arch.layers_prefix[: -len("model.layers")]
    names = {m + ".weight": prefix + m + ".weight" for m in adapter.GLOBALS}
    embeddings, _, head = (m + ".weight" for m in adapter.GLOBALS)
    if names[head] not in ckpt.where:  # tied embeddings
        names[head] = names[embeddings]
    tensors = ckpt.load(set(names.values()), device)
    for module_name in adapter.GLOBALS:
        module = model.get_submodule(module_name)
        module.to_empty(device=device)
        module.load_state_dict({"weight": tensors[names[module_name + ".weight"]]})
        module.to(dtype)
    if getattr(model.model, "rotary_emb", None) is not None:
        model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config).to(device)
    return model


def dense_model(root: Path, device, dtype):
    """A supported model read whole through gsq's own streaming reader (every quantized tensor decoded by
    compressed-tensors' or transformers' decoder, then cast to `dtype`): its causal LM, text only."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(root)
    arch = adapter.arch_of(config)
    model = skeleton(adapter.text_config(config))
    ckpt = Checkpoint(root)
    load_globals(ckpt, model, arch, device, dtype)
    for i in range(len(model.model.layers)):
        load_layer(ckpt, model, arch, i, device, dtype)
    return model.eval()
