"""Everything model-specific, as one table: where the decoder layers, routers, experts and shared
experts are, and how routed experts are named on disk. Add an architecture by adding a row.

All supported architectures share transformers' MoE interface: `layer.mlp.gate(x)` returns
`(logits, topk_weights, topk_indices)`; `layer.mlp.experts` holds fused parameters
`gate_up_proj [E, 2I, H]` (gate rows first) and `down_proj [E, H, I]`; checkpoints keep one 2-D
tensor per expert and projection.
"""

from dataclasses import dataclass

import torch

from gsq.errors import InputError


@dataclass(frozen=True)
class Arch:
    layers_prefix: str  # checkpoint prefix of decoder layer i: f"{layers_prefix}.{i}."
    expert_names: tuple  # on-disk names of (gate, up, down) of expert e, relative to the layer
    rename: tuple = ()  # (on-disk fragment, module fragment) pairs for the rest of the layer
    text_config: bool = False  # the causal LM is config.text_config (multimodal wrappers)
    router: str = "mlp.gate"  # on-disk name of the router, relative to the layer (rows: experts)
    n_experts_key: str = "n_routed_experts"  # the config field holding the number of routed experts

    def expert_key(self, layer: int, expert: int, proj: int) -> str:
        return f"{self.layers_prefix}.{layer}.{self.expert_names[proj].format(e=expert)}"


_STD = ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj", "mlp.experts.{e}.down_proj")
ARCHS = {
    "deepseek_v3": Arch("model.layers", _STD),
    "kimi_k25": Arch("language_model.model.layers", _STD, text_config=True),
    "qwen3_moe": Arch("model.layers", _STD, n_experts_key="num_experts"),
    "mixtral": Arch("model.layers", ("block_sparse_moe.experts.{e}.w1", "block_sparse_moe.experts.{e}.w3",
                                     "block_sparse_moe.experts.{e}.w2"), rename=(("block_sparse_moe.", "mlp."),),
                    router="block_sparse_moe.gate", n_experts_key="num_local_experts"),
}


def arch_of(config) -> Arch:
    if config.model_type not in ARCHS:
        raise InputError(f"unsupported architecture '{config.model_type}' (supported: {', '.join(ARCHS)})")
    return ARCHS[config.model_type]


def text_config(config):
    return config.text_config if arch_of(config).text_config else config


def is_moe(layer) -> bool:
    return hasattr(layer.mlp, "experts") and hasattr(layer.mlp, "gate")


def route(layer, x: torch.Tensor):
    """The model's own router on post-attention-norm hidden states `[T, H]`: (weights, indices) `[T, k]`."""
    _, weights, indices = layer.mlp.gate(x)
    return weights, indices


def expert_weights(layer, e: int):
    """(gate, up, down) weights of routed expert e: `[I, H]`, `[I, H]`, `[H, I]`."""
    gate_up = layer.mlp.experts.gate_up_proj[e]
    inter = gate_up.shape[0] // 2
    return gate_up[:inter], gate_up[inter:], layer.mlp.experts.down_proj[e]


def expert_output(layer, e: int, x: torch.Tensor) -> torch.Tensor:
    """Routed expert e's output f_e(x) on tokens `[T, H]` (before the router weight): `[T, H]`."""
    gate, up, down = expert_weights(layer, e)
    return (layer.mlp.experts.act_fn(x @ gate.T) * (x @ up.T)) @ down.T


def set_expert_weights(layer, e: int, gate, up, down):
    with torch.no_grad():
        experts = layer.mlp.experts
        experts.gate_up_proj[e].copy_(torch.cat([gate, up]).to(experts.gate_up_proj.dtype))
        experts.down_proj[e].copy_(down.to(experts.down_proj.dtype))


def num_experts(layer) -> int:
    return layer.mlp.experts.gate_up_proj.shape[0]


def layer_state_from_checkpoint(arch: Arch, layer_idx: int, tensors: dict, num_routed: int) -> dict:
    """Map a layer's on-disk tensors (full names) to the module's state dict (fused experts). The routed
    experts are copied into the fused tensors one by one and dropped from `tensors` as they go, so the
    layer is held about once, not three times."""
    prefix = f"{arch.layers_prefix}.{layer_idx}."
    state = {}
    if num_routed:
        first = tensors[arch.expert_key(layer_idx, 0, 0) + ".weight"]
        inter, hidden = first.shape
        gate_up = torch.empty(num_routed, 2 * inter, hidden, dtype=first.dtype)
        down = torch.empty(num_routed, hidden, inter, dtype=first.dtype)
        for e in range(num_routed):
            g, u, d = (arch.expert_key(layer_idx, e, p) + ".weight" for p in range(3))
            gate_up[e, :inter].copy_(tensors.pop(g))
            gate_up[e, inter:].copy_(tensors.pop(u))
            down[e].copy_(tensors.pop(d))
        state["mlp.experts.gate_up_proj"] = gate_up
        state["mlp.experts.down_proj"] = down
    for key, value in tensors.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        for disk, module in arch.rename:
            name = name.replace(disk, module)
        state[name] = value
    return state


def attention_residual(layer, h: torch.Tensor, position_ids, position_embeddings) -> torch.Tensor:
    """The first half of a decoder layer on hidden states `[B, S, H]`: h + attention(input_norm(h))."""
    attn, _ = layer.self_attn(hidden_states=layer.input_layernorm(h), attention_mask=None,
                              position_ids=position_ids, position_embeddings=position_embeddings)
    return h + attn


def moe_input(layer, residual: torch.Tensor) -> torch.Tensor:
    """What the MoE block (router and experts) sees: the post-attention norm of the residual, `[B*S, H]`."""
    x = layer.post_attention_layernorm(residual)
    return x.reshape(-1, x.shape[-1])


def moe_output(layer, residual: torch.Tensor) -> torch.Tensor:
    """The second half of a decoder layer: residual + MoE block(post-attention norm(residual))."""
    return residual + layer.mlp(layer.post_attention_layernorm(residual))


def post_attention_states(layer, h: torch.Tensor, pos, position_embeddings) -> torch.Tensor:
    """The MoE block's input for hidden states `[B, S, H]`: attention + residual, then the norm; `[B*S, H]`."""
    return moe_input(layer, attention_residual(layer, h, pos, position_embeddings))


def check_quantizable(model, group_size: int):
    """Refuse, before any work, a model with no routed experts or expert dims off the group size."""
    moe = [layer for layer in model.model.layers if is_moe(layer)]
    if not moe:
        raise InputError(f"{model.config.model_type} model has no MoE layers with routed experts: nothing to quantize")
    if not 16 <= group_size <= 1024 or group_size & (group_size - 1):
        raise InputError(f"--group-size must be a power of two in [16, 1024], got {group_size}")
    _, inter2, hidden = moe[0].mlp.experts.gate_up_proj.shape
    for name, dim in (("hidden_size", hidden), ("moe_intermediate_size", inter2 // 2)):
        if dim % group_size:
            raise InputError(f"{name} {dim} is not divisible by --group-size {group_size}")
