"""MoE LLMs with transformers 5's fused 3-D experts (quantized as `QuantExperts`; the experts' call convention is
`ArchAdapter.expert_inputs` / `expert_intermediate`)."""
from .base import ArchAdapter

ADAPTERS = {t: ArchAdapter() for t in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")}
