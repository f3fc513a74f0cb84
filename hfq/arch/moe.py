"""MoE LLMs with transformers 5's fused 3-D experts (quantized as `QuantExperts`; the experts' call convention is
`ArchAdapter.expert_inputs` / `expert_intermediate`). Routers stay float: they are not `nn.Linear` modules in
transformers 5 (a `.weight` read by the router's own forward) and hold < 0.1% of the weights.

Rotations (R1 on the residual stream, R2 per KV head) fuse into the router, every expert and the shared expert;
DeepSeek-V3 (MLA attention with inner norms) has no transform layout yet. GPT-OSS is not supported: its experts are
stored transposed with interleaved gate/up, biases and a clamped SwiGLU, which `QuantExperts` does not hold."""
from .base import ArchAdapter, TransformLayout

_ROUTED = dict(moe_inputs=("gate.weight", "experts.gate_up_proj"), moe_outputs=("experts.down_proj",))
_SHARED = dict(moe_inputs=_ROUTED["moe_inputs"] + ("shared_expert.gate_proj.weight", "shared_expert.up_proj.weight",
                                                   "shared_expert_gate.weight"),
               moe_outputs=_ROUTED["moe_outputs"] + ("shared_expert.down_proj.weight",))


ADAPTERS = {
    "mixtral": ArchAdapter(transforms=TransformLayout(**_ROUTED)),
    # OLMoE's q_norm / k_norm normalise the whole projection (not per head): R2 (v / o) leaves them alone
    "olmoe": ArchAdapter(transforms=TransformLayout(**_ROUTED)),
    "qwen3_moe": ArchAdapter(transforms=TransformLayout(qk_norms=("q_norm", "k_norm"), **_ROUTED)),
    # the shared expert's output is scaled by sigmoid(shared_expert_gate(x)): AGQ weights its tokens by that gate
    "qwen2_moe": ArchAdapter(transforms=TransformLayout(**_SHARED),
                             gated_shared_experts=(("mlp.shared_expert", "mlp.shared_expert_gate"),)),
    # sigmoid router with correction bias and group-limited top-k, dense first layers, ungated shared experts
    "deepseek_v3": ArchAdapter(),
}
