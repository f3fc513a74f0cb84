"""The adapter base: what a method may ask of an architecture (blocks, attention dims, skipped-block outputs, the MoE
experts' call convention, where transforms fuse, layers that must stay float), and the marked-operation protocol."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F


@dataclass(frozen=True)
class TransformLayout:
    """Where equivalent transforms (rotations, smoothing scales) go, for `hfq.transforms`. Paths of embed /
    final_norm / lm_head are from the model root, the rest relative to one decoder block (attention and MLP
    names relative to `attn` / `mlp`).

    qk_norms: per-head RMSNorms on q and k before RoPE (Qwen3, Gemma3); q/k smoothing is folded into them.
    branch_norms: norms on a branch output before the residual add (Gemma2/3 sandwich norms); a residual rotation
    commutes with them only when their weight is uniform. norm_offset: the norm multiplies by (offset + weight),
    1.0 for Gemma's (1 + w) form.
    moe_inputs / moe_outputs: an MoE MLP, as the parameters (relative to `mlp`, fused 3-D experts included) whose
    input columns read the MLP norm's output (router, experts' gate_up, shared expert gate/up, shared-expert gate)
    and whose output rows write the residual stream (experts' down, shared expert down). Such layouts take R1 and R2
    (rotations), not the MLP scalings or the online down_proj Hadamard."""

    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    attn: str = "self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    mlp: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    qk_norms: tuple[str, str] | None = None
    branch_norms: tuple[str, ...] = ()
    norm_offset: float = 0.0
    moe_inputs: tuple[str, ...] = ()
    moe_outputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class ArchAdapter:
    """blocks: attribute path of the decoder block list. keep_float: module-name suffixes that must stay in
    floating point because the model's own code reads their `.weight` directly or edits it in place.
    transforms: where rotations/scalings can be fused (None: `hfq.transforms` refuses the architecture).
    gated_shared_experts: (shared expert, its gate) module paths relative to a block, where the shared expert's
    output is multiplied by sigmoid(gate(x)) (Qwen2-MoE): affinity-weighted calibration weights the shared expert's
    tokens by that gate, as routed experts by their routing weights.
    head_input_cast: the model's CausalLM casts the output embedding's input to `lm_head.weight.dtype` (transformers'
    Mamba family), which would turn the input of a packed lm_head into uint8; hfq then swaps in a forward without it.
    carried: keyword inputs a block receives from the block before it besides the hidden states (its outputs 1, 2,
    ...; see `carry`), so the block runner can hand them on while it runs one block at a time."""

    blocks: str = "model.layers"
    keep_float: tuple[str, ...] = field(default_factory=tuple)
    transforms: TransformLayout | None = None
    gated_shared_experts: tuple[tuple[str, str], ...] = ()
    carried: tuple[str, ...] = ()
    head_input_cast: bool = False

    def get_blocks(self, model):
        """The decoder block list."""
        return model.get_submodule(self.blocks)

    def float_only(self, model) -> tuple[str, ...]:
        """The `keep_float` suffixes that apply to this model (an adapter may drop some for some configs)."""
        return self.keep_float

    @staticmethod
    def attention_dims(model) -> tuple[int, int, int]:
        """(attention heads, KV heads, head_dim) from the model config."""
        cfg = model.config
        heads = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        return heads, kv, getattr(cfg, "head_dim", None) or cfg.hidden_size // heads

    @staticmethod
    def passthrough(hidden_states, args: tuple, kwargs: dict):
        """What a block returns when it is skipped (identity) while the runner captures block inputs: the model code
        after it must accept it. Decoder blocks of transformers 5 return the hidden states."""
        return hidden_states

    def carry(self, block_output, next_kwargs: dict) -> dict:
        """Keyword inputs of the next block once this block produced `block_output`: the `carried` ones (values a
        block hands to the blocks after it besides the hidden states, e.g. RWKV-7's v_first) taken from it, as
        `block_output[1 + position in carried]`."""
        return {**next_kwargs, **{name: block_output[1 + j] for j, name in enumerate(self.carried)}}

    # fused MoE experts (transformers 5: `experts(hidden, top_k_index, top_k_weights)`, weights gate_up_proj
    # [E, 2I, H] and down_proj [E, H, I], act_fn); an architecture that calls its experts otherwise overrides these
    @staticmethod
    def expert_inputs(args: tuple, kwargs: dict):
        """(hidden [tokens, H], top_k_index [tokens, k], top_k_weights [tokens, k]) of one experts call."""
        values = list(args) + list(kwargs.values())
        return values[0], values[1], values[2]

    @staticmethod
    def expert_intermediate(experts, e: int, x):
        """Input of expert e's down projection for its routed tokens x."""
        gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
        return experts.act_fn(gate) * up


def marked_op(module) -> str | None:
    """The operation a model's own module class declares itself to be, so that quantization finds it by type and not
    by name: a class attribute `hfq_op = "add"` (forward(a, b) = a + b) or `"matmul"` (forward(a, b) = a @ b), e.g.
    PETR's feature + position-embedding adds, or a one-input non-linear function named as in
    `hfq.quant.lut.FUNCTIONS` (`hfq_op = "sigmoid"`: forward(x) = sigmoid(x)). Models shipped as custom code stay free of hfq imports this way."""
    return getattr(type(module), "hfq_op", None)
