"""Online (run-time) Hadamard rotations: R4 before down_proj and R3 on Q/K after RoPE.

They carry no tensors: the spec (size, seed) is written to `model.config.hfq_online_rotations`, which
save_pretrained keeps, and `restore_online_rotations(model)` rebuilds the modules after from_pretrained (a
non-persistent buffer would come back uninitialised from a meta-device load)."""
from __future__ import annotations

import sys

import torch
import torch.nn as nn

from .hadamard import apply_hadamard, random_signs

CONFIG_KEY = "hfq_online_rotations"
_ATTN_PREFIX = "hfq_qk_rotated_"


class OnlineHadamard(nn.Module):
    """x -> x @ diag(signs) @ H_n on the last dimension (plain H_n when seed is None), computed in float32."""

    def __init__(self, size: int, seed: int | None = None):
        super().__init__()
        self.size, self.seed = size, seed
        self._signs: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.seed is not None:
            key = (x.device, x.dtype)
            if key not in self._signs:
                self._signs[key] = random_signs(self.size, self.seed).to(device=x.device, dtype=x.dtype)
            x = x * self._signs[key]
        return apply_hadamard(x, self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}, seed={self.seed}"


def _rotate_input_hook(module, args, kwargs):
    return (module.online_rotation(args[0]), *args[1:]), kwargs


def attach_input_rotation(linear: nn.Module, rotation: OnlineHadamard) -> None:
    """Rotate the input of `linear` at run time (a forward pre-hook, so it also runs before any activation
    quantizer inside a replacement module). Idempotent; call again after replacing the module."""
    linear.online_rotation = rotation
    if not getattr(linear, "_hfq_rotation_hooked", False):
        linear.register_forward_pre_hook(_rotate_input_hook, with_kwargs=True)
        linear._hfq_rotation_hooked = True


def _eager_of(module):
    return getattr(sys.modules[type(module).__module__], "eager_attention_forward")


def _rotated_attention(base: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def attention(module, query, key, value, attention_mask, **kwargs):
        rot = getattr(module, "qk_rotation", None)
        if rot is not None:  # q k^T is unchanged; the rotated K is what a KV-cache quantizer sees
            query, key = rot(query), rot(key)
        impl = _eager_of(module) if base == "eager" else ALL_ATTENTION_FUNCTIONS[base]
        return impl(module, query, key, value, attention_mask, **kwargs)

    return attention


def use_rotated_attention(model) -> None:
    """Route attention through a wrapper that applies each attention module's `qk_rotation` after RoPE.

    Transformers' attention functions receive q and k after RoPE (and after the cache update), which is the only
    module-level point where R3 can be applied without copying the model's attention code."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    base = model.config._attn_implementation or "eager"
    if base.startswith(_ATTN_PREFIX):
        return
    name = _ATTN_PREFIX + base
    AttentionInterface.register(name, _rotated_attention(base))
    if base in ALL_MASK_ATTENTION_FUNCTIONS:  # without a mask function for the new name, masks would be dropped
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    model.set_attn_implementation(name)


def record(model, kind: str, size: int, seed: int | None) -> None:
    spec = dict(getattr(model.config, CONFIG_KEY, None) or {})
    spec[kind] = {"size": size, "seed": seed}
    setattr(model.config, CONFIG_KEY, spec)


def online_spec(model) -> dict:
    return dict(getattr(model.config, CONFIG_KEY, None) or {})
