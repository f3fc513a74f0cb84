"""Architecture adapters: what each supported `model_type` looks like to a quantization method.

A new architecture is supported by adding an adapter here, never by editing a method."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ArchAdapter:
    """blocks: attribute path of the decoder block list. keep_float: module-name suffixes that must stay in
    floating point because the model's own code reads their `.weight` directly or edits it in place."""

    blocks: str = "model.layers"
    keep_float: tuple[str, ...] = field(default_factory=tuple)


_DENSE = ArchAdapter()
ADAPTERS: dict[str, ArchAdapter] = {
    **{t: _DENSE for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text",
                           "phi3", "olmo2", "granite")},
    **{t: _DENSE for t in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")},  # fused 3-D experts -> QuantExperts
    # slow path computes `self.dt_proj.weight @ ...` (modeling_mamba)
    "mamba": ArchAdapter(blocks="backbone.layers", keep_float=("dt_proj",)),
    "falcon_mamba": ArchAdapter(blocks="backbone.layers", keep_float=("dt_proj",)),
    # eval-mode `_rescale_layers` divides these weights in place (modeling_rwkv)
    "rwkv": ArchAdapter(blocks="rwkv.blocks", keep_float=("attention.output", "feed_forward.value")),
}


def get_adapter(model) -> ArchAdapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise NotImplementedError(
            f"architecture {model_type!r} is not supported by hfq yet (supported: {', '.join(sorted(ADAPTERS))}); "
            f"add an ArchAdapter for it in hfq/arch/__init__.py")
    return ADAPTERS[model_type]
