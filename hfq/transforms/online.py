"""Run-time pieces of a rotated model: online Hadamard rotations (R4 before down_proj, R3 on Q/K after RoPE) and
the KV quantizer (K after R3 and V, fake-quantized where attention reads them).

They carry no tensors: their spec (Hadamard size and seed; KV `QuantArgs`) is written to
`model.config.hfq_online_rotations`, which save_pretrained keeps, and `restore_online_rotations(model)` rebuilds
them after from_pretrained (a non-persistent buffer would come back uninitialised from a meta-device load)."""
from __future__ import annotations

import sys

import torch
import torch.nn as nn

from hfq.quant import QuantArgs, fake_quantize

from .hadamard import apply_hadamard, random_signs

CONFIG_KEY = "hfq_online_rotations"
_ATTN_PREFIX = "hfq_qk_rotated_"


class OnlineHadamard(nn.Module):
    """x -> x @ diag(signs) @ H_n on the last dimension (plain H_n when seed is None), computed in float32."""

    def __init__(self, size: int, seed: int | None = None):
        super().__init__()
        self.size, self.seed = size, seed
        self._signs: dict = {}

    def _signs_for(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype)
        if key not in self._signs:
            self._signs[key] = random_signs(self.size, self.seed).to(device=x.device, dtype=x.dtype)
        return self._signs[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.seed is not None:
            x = x * self._signs_for(x)
        return apply_hadamard(x, self.size)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """y @ H_n^T @ diag(signs): undoes `forward` (the rotation is orthogonal)."""
        x = apply_hadamard(y, self.size, transpose=True)
        return x * self._signs_for(x) if self.seed is not None else x

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
        if rot is not None:  # q k^T is unchanged; the rotated K is what the KV quantizer sees
            query, key = rot(query), rot(key)
        kv = getattr(module, "kv_quant", None)
        if kv is not None:  # per token and head ([b, heads, seq, head_dim], last dim): idempotent on cached K/V
            key, value = fake_quantize(key, kv), fake_quantize(value, kv)
        impl = _eager_of(module) if base == "eager" else ALL_ATTENTION_FUNCTIONS[base]
        return impl(module, query, key, value, attention_mask, **kwargs)

    return attention


def use_rotated_attention(model) -> None:
    """Route attention through a wrapper that applies each attention module's `qk_rotation` after RoPE, then its
    `kv_quant` (QuantArgs) to K and V.

    Transformers' attention functions receive q and k after RoPE (and after the cache update), which is the only
    module-level point where R3 and the KV quantizer can act without copying the model's attention code. The cache
    itself stays in float (accuracy of a KV4 cache, as the papers measure it, not its memory)."""
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


def kv_quant_args(bits: int, symmetric: bool = False, clip_ratio: float = 1.0) -> QuantArgs:
    """Dynamic per-token, per-head quantization of K and V (the papers' KV4: asymmetric, group = head_dim)."""
    return QuantArgs(bits=bits, symmetric=symmetric, granularity="token", dynamic=True, clip_ratio=clip_ratio)


def record(model, kind: str, **spec) -> None:
    specs = dict(getattr(model.config, CONFIG_KEY, None) or {})
    specs[kind] = spec
    setattr(model.config, CONFIG_KEY, specs)


def online_spec(model) -> dict:
    return dict(getattr(model.config, CONFIG_KEY, None) or {})
