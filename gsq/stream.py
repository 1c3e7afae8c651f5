"""Stream a safetensors model one decoder layer at a time: never the whole model in memory.

The model skeleton is built from config.json on the meta device (no memory); a layer is
materialised from the shards when the pipeline reaches it and dropped after.
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open

from gsq import adapter
from gsq.errors import InputError


class Checkpoint:
    """Tensor name -> shard file of a (possibly sharded) safetensors checkpoint; loads by name."""

    def __init__(self, root: Path):
        self.root = Path(root)
        index = self.root / "model.safetensors.index.json"
        if index.is_file():
            self.where = {k: self.root / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        elif (self.root / "model.safetensors").is_file():
            with safe_open(self.root / "model.safetensors", "pt") as f:
                self.where = {k: self.root / "model.safetensors" for k in f.keys()}
        else:
            raise InputError(f"no safetensors weights (model.safetensors or its index) in {self.root}")
        missing = sorted({str(p.name) for p in self.where.values() if not p.is_file()})
        if missing:
            raise InputError(f"shard(s) listed in the index are missing: {', '.join(missing)}")

    def keys(self):
        return self.where.keys()

    def load(self, names, device="cpu") -> dict:
        by_file = {}
        for name in names:
            by_file.setdefault(self.where[name], []).append(name)
        out = {}
        for path, group in by_file.items():
            with safe_open(path, "pt", device=str(device)) as f:
                for name in group:
                    out[name] = f.get_tensor(name)
        return out

    def layer_keys(self, arch: adapter.Arch, i: int) -> list:
        prefix = f"{arch.layers_prefix}.{i}."
        return sorted(k for k in self.where if k.startswith(prefix))


def skeleton(config):
    """The causal LM of `config` on the meta device: module structure only, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
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
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise InputError(f"tensor {name} holds NaN or inf")
    return materialize(layer, adapter.layer_state_from_checkpoint(arch, i, tensors, n_routed), device, dtype)


def unload_layer(model, i: int):
    model.model.layers[i].to("meta")


def load_globals(ckpt: Checkpoint, model, arch, device, dtype):
    """Embeddings, final norm, lm_head and rotary embedding: what runs outside the decoder layers."""
    prefix = arch.layers_prefix[: -len("model.layers")]
    names = {"model.embed_tokens.weight": prefix + "model.embed_tokens.weight",
             "model.norm.weight": prefix + "model.norm.weight",
             "lm_head.weight": prefix + "lm_head.weight"}
    if names["lm_head.weight"] not in ckpt.where:  # tied embeddings
        names["lm_head.weight"] = names["model.embed_tokens.weight"]
    tensors = ckpt.load(set(names.values()), device)
    for module_name in ("model.embed_tokens", "model.norm", "lm_head"):
        module = model.get_submodule(module_name)
        module.to_empty(device=device)
        module.load_state_dict({"weight": tensors[names[module_name + ".weight"]]})
        module.to(dtype)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config).to(device)
    return model
