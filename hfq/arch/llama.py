"""Dense decoder-only LLMs (Llama-like blocks at `model.layers`); those with a `TransformLayout` accept rotations."""
from .base import ArchAdapter, TransformLayout

_DENSE = ArchAdapter()
_LLAMA_T = ArchAdapter(transforms=TransformLayout())

ADAPTERS = {
    **{t: _DENSE for t in ("gemma", "gemma2", "phi3", "olmo2", "granite")},
    **{t: _LLAMA_T for t in ("llama", "mistral", "qwen2")},
    "qwen3": ArchAdapter(transforms=TransformLayout(qk_norms=("q_norm", "k_norm"))),
    # Gemma 3 text models; the multimodal "gemma3" (language model under model.language_model) has no adapter yet
    "gemma3_text": ArchAdapter(transforms=TransformLayout(
        mlp_norm="pre_feedforward_layernorm", qk_norms=("q_norm", "k_norm"),
        branch_norms=("post_attention_layernorm", "post_feedforward_layernorm"), norm_offset=1.0)),
}
