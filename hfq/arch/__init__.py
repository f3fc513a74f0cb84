"""Architecture adapters: what each supported `model_type` looks like to a quantization method, one module per
family (`llama`, `moe`, `mamba`, `rwkv`, `vision`) on the base in `base.py`.

A new architecture is supported by adding an adapter, never by editing a method."""
from __future__ import annotations

from . import llama, mamba, moe, rwkv, vision
from .base import ArchAdapter, TransformLayout, marked_op
from .rwkv import RwkvAdapter

ADAPTERS: dict[str, ArchAdapter] = {**llama.ADAPTERS, **moe.ADAPTERS, **mamba.ADAPTERS, **rwkv.ADAPTERS,
                                    **vision.ADAPTERS}


def get_adapter(model) -> ArchAdapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise NotImplementedError(
            f"architecture {model_type!r} is not supported by hfq yet (supported: {', '.join(sorted(ADAPTERS))}); "
            f"add an ArchAdapter for it in hfq/arch/ (one module per family)")
    return ADAPTERS[model_type]


__all__ = ["ADAPTERS", "ArchAdapter", "RwkvAdapter", "TransformLayout", "get_adapter", "marked_op"]
