"""Everything model-specific, as one table: where the decoder layers, routers, experts and shared
experts are, and how routed experts are named on disk. Add an architecture by adding a row.

All supported architectures share transformers' MoE interface: the router `layer.mlp.gate(x)` returns
`(logits, topk_weights, topk_indices)`; `layer.mlp.experts` holds fused parameters
`gate_up_proj [E, 2I, H]` (gate rows first) and `down_proj [E, H, I]`; checkpoints keep one 2-D
tensor per expert and projection. gpt-oss differs, and only gsq.prune takes it: its router is
`layer.mlp.router`, its MoE block returns (hidden, router scores), its experts are stored fused
(`[E, H, 2I]`, gate and up interleaved, with biases and a clamped SwiGLU), MXFP4 on disk.
"""

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gsq.errors import InputError

# Module names every supported architecture shares (transformers' MoE interface, above)
GLOBALS = ("model.embed_tokens", "model.norm", "lm_head")  # what runs outside the decoder layers
EXPERTS = "mlp.experts."  # a layer's routed experts: fused `gate_up_proj` and `down_proj`
EXPERT_PARAMS = (EXPERTS + "gate_up_proj", EXPERTS + "down_proj")


@dataclass(frozen=True)
class Arch:
    layers_prefix: str  # checkpoint prefix of decoder layer i: f"{layers_prefix}.{i}."
    expert_names: tuple  # on-disk names of (gate, up, down) of expert e, relative to the layer
    rename: tuple = ()  # (on-disk fragment, module fragment) pairs for the rest of the layer
    text_config: bool = False  # the causal LM is config.text_config (multimodal wrappers)
    router: str = "mlp.gate"  # on-disk name of the router, relative to the layer (rows: experts)
    expert_rows: tuple = ()  # other on-disk tensors of the layer with one row per routed expert
    n_experts_key: str = "n_routed_experts"  # the config field holding the number of routed experts
    concat: tuple = ()  # (module tensor, on-disk tensors joined along dim 0) pairs, relative to the layer
    # vLLM's names for the experts (gate, up, down) when its MoE layer looks them up under other names than
    # the checkpoint's: its compressed-tensors scheme lookup probes f"{moe prefix}.experts.0.{name}"
    vllm_experts: tuple = ()
    # why gsq.quantize refuses the architecture (gsq.prune still takes it), "" if it does not
    no_quantize: str = ""

    def expert_key(self, layer: int, expert: int, proj: int) -> str:
        return f"{self.layers_prefix}.{layer}.{self.expert_names[proj].format(e=expert)}"

    def expert_layer(self, module: str):
        """The layer index of a routed expert projection's module name, else None."""
        names = "|".join(re.escape(n).replace(r"\{e\}", r"\d+") for n in self.expert_names)
        m = re.fullmatch(rf"{re.escape(self.layers_prefix)}\.(\d+)\.(?:{names})", module)
        return int(m.group(1)) if m else None

    def vllm_names(self, module: str) -> list:
        """The names vLLM's loader probes for the scheme of the expert projection `module` (a checkpoint name)."""
        if not self.vllm_experts:
            return []
        layer = self.expert_layer(module)
        for disk, vllm in zip(self.expert_names, self.vllm_experts):
            m = re.fullmatch(rf"{re.escape(self.layers_prefix)}\.{layer}\." + re.escape(disk).replace(r"\{e\}", r"(\d+)"), module)
            if m:
                return [f"{self.layers_prefix}.{layer}.{vllm.format(e=m.group(1))}"]
        return []

    def expert_row_modules(self) -> tuple:
        """Module-side prefixes (relative to the layer) of the tensors with one row per routed expert: the
        router's, the fused experts', the `expert_rows`."""
        return (self.module_name(self.router) + ".", EXPERTS, *(self.module_name(t) for t in self.expert_rows))

    def stored_expert_prefix(self, layer: int) -> str | None:
        """On-disk prefix of layer `layer`'s per-expert tensors (`...experts.`, then the expert's number), or
        None where the experts are stored fused (gpt-oss)."""
        return f"{self.layers_prefix}.{layer}.{self.expert_names[0].split('{e}')[0]}" if self.expert_names else None

    def stored_expert_rows(self, layer: int) -> tuple:
        """On-disk prefixes of layer `layer`'s other tensors with one row per routed expert (the router's)."""
        return tuple(f"{self.layers_prefix}.{layer}.{t}" for t in (self.router + ".", *self.expert_rows))

    def module_name(self, disk: str) -> str:
        """A layer tensor's module-side name (relative to the layer) from its on-disk one."""
        for a, b in self.rename:
            disk = disk.replace(a, b)
        return disk


_STD = ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj", "mlp.experts.{e}.down_proj")
_W = tuple(f"block_sparse_moe.experts.{{e}}.{w}" for w in ("w1", "w3", "w2"))  # Mixtral's naming: w1 gate, w3 up
_MOE = (("block_sparse_moe.", "mlp."),)
ARCHS = {
    "deepseek_v3": Arch("model.layers", _STD),
    "kimi_k25": Arch("language_model.model.layers", _STD, text_config=True),
    "qwen3_moe": Arch("model.layers", _STD, n_experts_key="num_experts"),
    "qwen3_next": Arch("model.layers", _STD, n_experts_key="num_experts"),
    "mixtral": Arch("model.layers", _W, rename=_MOE, router="block_sparse_moe.gate", n_experts_key="num_local_experts"),
    # vLLM builds MiniMax-M2's MoE under the prefix `mlp` (its checkpoint says block_sparse_moe)
    "minimax_m2": Arch("model.layers", _W, rename=_MOE, router="block_sparse_moe.gate", n_experts_key="num_local_experts",
                       expert_rows=("block_sparse_moe.e_score_correction_bias",),
                       vllm_experts=tuple(f"mlp.experts.{{e}}.{w}" for w in ("w1", "w3", "w2"))),
    # Kimi-Linear: transformers joins the KDA layers' q/k/v convolutions and moves the forget gate's tensors;
    # vLLM looks its experts up as gate_proj/up_proj/down_proj
    "kimi_linear": Arch("model.layers", _W, rename=(*_MOE, *((f"self_attn.{t}", f"self_attn.forget_gate.{t}")
                                                           for t in ("f_a_proj.", "f_b_proj.", "dt_bias", "A_log"))),
                        router="block_sparse_moe.gate", n_experts_key="num_local_experts",
                        concat=(("self_attn.conv1d.weight", tuple(f"self_attn.{c}_conv1d.weight" for c in "qkv")),),
                        vllm_experts=tuple(f"block_sparse_moe.experts.{{e}}.{p}_proj" for p in ("gate", "up", "down"))),
    # gpt-oss: experts fused on disk (MXFP4 `_blocks`/`_scales`, `_bias`), one row per expert like the router's
    "gpt_oss": Arch("model.layers", (), router="mlp.router", expert_rows=("mlp.experts.",),
                    n_experts_key="num_local_experts",
                    no_quantize="its experts carry biases and a clamped, interleaved SwiGLU that gsq's 2-bit "
                                "quantizer does not model, and vLLM reads quantized gpt-oss experts only as its own "
                                "fused w13/w2 tensors (gsq.prune takes it)"),
}


def arch_of(config) -> Arch:
    if config.model_type not in ARCHS:
        raise InputError(f"unsupported architecture '{config.model_type}' (supported: {', '.join(ARCHS)})")
    return ARCHS[config.model_type]


def text_config(config):
    return config.text_config if arch_of(config).text_config else config


def swiglu_mid(x, gate, up):
    """The SwiGLU experts' intermediate silu(x gate^T) * (x up^T), batched over a leading expert dim or not."""
    t = lambda w: w.transpose(-1, -2)
    return F.silu(x @ t(gate)) * (x @ t(up))


def swiglu(x, gate, up, down):
    """SwiGLU experts: x `[T, H]`, gate/up `[I, H]`, down `[H, I]` -> `[T, H]`; or batched, with a leading
    expert dimension on all four."""
    return swiglu_mid(x, gate, up) @ down.transpose(-1, -2)


def embed(model, ids: torch.Tensor) -> torch.Tensor:
    return model.model.embed_tokens(ids)


def logits(model, h: torch.Tensor) -> torch.Tensor:
    """Next-token logits at the last layer's states: lm_head(final norm(h))."""
    return model.lm_head(model.model.norm(h))


def router(layer):
    """The MoE block's router module (gpt-oss calls it `router`), else None for a dense layer."""
    if not hasattr(layer.mlp, "experts"):
        return None
    return getattr(layer.mlp, "gate", None) or getattr(layer.mlp, "router", None)


def is_moe(layer) -> bool:
    return router(layer) is not None


def route(layer, x: torch.Tensor):
    """The model's own router on post-attention-norm hidden states `[T, H]`: (weights, indices) `[T, k]`.
    MiniMax-M2 keeps its score-correction bias on the MoE block and hands it to the router."""
    bias = getattr(layer.mlp, "e_score_correction_bias", None)
    _, weights, indices = router(layer)(x) if bias is None else router(layer)(x, bias)
    return weights, indices


def expert_weights(layer, e: int):
    """(gate, up, down) weights of routed expert e: `[I, H]`, `[I, H]`, `[H, I]`."""
    gate_up = layer.mlp.experts.gate_up_proj[e]
    inter = gate_up.shape[0] // 2
    return gate_up[:inter], gate_up[inter:], layer.mlp.experts.down_proj[e]


def expert_output(layer, e: int, x: torch.Tensor) -> torch.Tensor:
    """Routed expert e's output f_e(x) on tokens `[T, H]` (before the router weight): `[T, H]`."""
    experts = layer.mlp.experts
    if hasattr(experts, "gate_up_proj_bias"):  # gpt-oss: `[E, H, 2I]` weights, biases, its own gate function
        mid = experts._apply_gate(x @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e])
        return mid @ experts.down_proj[e] + experts.down_proj_bias[e]
    return swiglu(x, *expert_weights(layer, e))


def set_expert_weights(layer, e: int, gate, up, down):
    with torch.no_grad():
        experts = layer.mlp.experts
        experts.gate_up_proj[e].copy_(torch.cat([gate, up]).to(experts.gate_up_proj.dtype))
        experts.down_proj[e].copy_(down.to(experts.down_proj.dtype))


def num_experts(layer) -> int:
    return layer.mlp.experts.gate_up_proj.shape[0]


def expert_shape(layer) -> tuple:
    """(experts, intermediate size, hidden size) of a MoE layer's routed experts."""
    E, inter2, hidden = layer.mlp.experts.gate_up_proj.shape
    return E, inter2 // 2, hidden


def layer_state_from_checkpoint(arch: Arch, layer_idx: int, tensors: dict, num_routed: int) -> dict:
    """Map a layer's on-disk tensors (full names) to the module's state dict (fused experts). The routed
    experts are copied into the fused tensors one by one and dropped from `tensors` as they go, so the
    layer is held about once, not three times."""
    prefix = f"{arch.layers_prefix}.{layer_idx}."
    state = {}
    if num_routed and arch.expert_names:  # (gpt-oss stores its experts fused already)
        first = tensors[arch.expert_key(layer_idx, 0, 0) + ".weight"]
        inter, hidden = first.shape
        gate_up = torch.empty(num_routed, 2 * inter, hidden, dtype=first.dtype)
        down = torch.empty(num_routed, hidden, inter, dtype=first.dtype)
        for e in range(num_routed):
            g, u, d = (arch.expert_key(layer_idx, e, p) + ".weight" for p in range(3))
            gate_up[e, :inter].copy_(tensors.pop(g))
            gate_up[e, inter:].copy_(tensors.pop(u))
            down[e].copy_(tensors.pop(d))
        state[EXPERT_PARAMS[0]], state[EXPERT_PARAMS[1]] = gate_up, down
    for module, parts in arch.concat:
        if prefix + parts[0] in tensors:
            state[module] = torch.cat([tensors.pop(prefix + p) for p in parts])
    for key, value in tensors.items():
        if key.startswith(prefix):
            state[arch.module_name(key[len(prefix):])] = value
    return state


def positions(model, h: torch.Tensor) -> dict:
    """A decoder layer's position arguments for a block of windows `[B, S, H]`: position ids, and the
    rotary embeddings where the model has them (Kimi-Linear's MLA layers use none)."""
    pos = torch.arange(h.shape[1], device=h.device)[None]
    rotary = getattr(model.model, "rotary_emb", None)
    return dict(position_ids=pos, **({"position_embeddings": rotary(h, pos)} if rotary is not None else {}))


class _Zero(torch.nn.Module):
    def __init__(self, scores: bool):
        super().__init__()
        self.scores = scores

    def forward(self, x):
        return (torch.zeros_like(x), None) if self.scores else torch.zeros_like(x)


def _mlp(layer, x):
    y = layer.mlp(x)
    return y[0] if isinstance(y, tuple) else y  # gpt-oss's MoE block returns (hidden, router scores)


def attention_residual(layer, h: torch.Tensor, **positions) -> torch.Tensor:
    """The first half of a decoder layer on hidden states `[B, S, H]`: h + attention(input_norm(h)), whatever
    the token mixer (softmax attention, MLA, Qwen3-Next's gated DeltaNet, Kimi-Linear's KDA): the layer's
    own forward with its MLP block answering zero."""
    mlp = layer.mlp
    layer.mlp = _Zero(scores=hasattr(mlp, "router"))
    try:
        return layer(h, attention_mask=None, **positions)
    finally:
        layer.mlp = mlp


def moe_input(layer, residual: torch.Tensor) -> torch.Tensor:
    """What the MoE block (router and experts) sees: the post-attention norm of the residual, `[B*S, H]`."""
    x = layer.post_attention_layernorm(residual)
    return x.reshape(-1, x.shape[-1])


def moe_output(layer, residual: torch.Tensor) -> torch.Tensor:
    """The second half of a decoder layer: residual + MoE block(post-attention norm(residual))."""
    return residual + _mlp(layer, layer.post_attention_layernorm(residual))


def post_attention_states(layer, h: torch.Tensor, **positions) -> torch.Tensor:
    """The MoE block's input for hidden states `[B, S, H]`: attention + residual, then the norm; `[B*S, H]`."""
    return moe_input(layer, attention_residual(layer, h, **positions))


def check_context(tcfg, **lengths):
    """Refuse window lengths (flag name -> tokens) beyond the model's context, before any work."""
    limit = getattr(tcfg, "max_position_embeddings", None)
    for flag, n in lengths.items():
        if limit and n > limit:
            raise InputError(f"--{flag.replace('_', '-')} {n} is longer than the model's context "
                             f"(max_position_embeddings {limit})")


def check_quantizable(model, group_size: int):
    """Refuse, before any work, a model with no routed experts or expert dims off the group size."""
    moe = [layer for layer in model.model.layers if is_moe(layer)]
    if not moe:
        raise InputError(f"{model.config.model_type} model has no MoE layers with routed experts: nothing to quantize")
    why = getattr(ARCHS.get(model.config.model_type), "no_quantize", "")
    if why:
        hidden = model.config.hidden_size
        if hidden % group_size:  # the shipped gpt-oss: 2880 = 22.5 groups of 128
            why = f"its hidden_size {hidden} is not a multiple of --group-size {group_size}, and " + why
        raise InputError(f"{model.config.model_type} cannot be quantized to 2 bits: {why}")
    if not 16 <= group_size <= 1024 or group_size & (group_size - 1):
        raise InputError(f"--group-size must be a power of two in [16, 1024], got {group_size}")
    act = getattr(model.config, "hidden_act", "silu")
    if act != "silu":  # the experts are SwiGLU (swiglu above)
        raise InputError(f"{model.config.model_type} experts with hidden_act '{act}' cannot be quantized: gsq models "
                         "SiLU-gated (SwiGLU) experts")
    _, inter, hidden = expert_shape(moe[0])
    for name, dim in (("hidden_size", hidden), ("moe_intermediate_size", inter)):
        if dim % group_size:
            raise InputError(f"{name} {dim} is not divisible by --group-size {group_size}")
