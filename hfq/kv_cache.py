"""A KV cache that stores K and V as packed integers: `HfqQuantizedCache`, a transformers `Cache` for `generate`
and any forward that takes `past_key_values`.

Each new token's K and V are quantized once, when they enter the cache, per token and head (the group is the head
dimension: the papers' KV4 and hfq's simulated KV quantizer, `hfq.transforms.online.kv_quant_args`), and appended;
nothing already stored is quantized again. Storage per layer: codes `hfq.quant.pack`ed (bits / 8 bytes per value),
a float32 scale per token and head (float16 scales flip ~1% of 4-bit codes against the simulated quantizer), and a
uint8 zero point when asymmetric: 37 bytes per token and head at 4 bits and head_dim 64, 0.29x float16's 128.
Attention reads the dequantized states.

A model whose config records a KV quantizer (OSTQuant's `kv_bits`) gets its settings by default, and where the model
rotates K after RoPE (OSTQuant's R3, `online_qk`) the cache stores K rotated, as the simulated quantizer sees it,
and hands attention R3^T of it, which the attention wrapper rotates again (R3 is orthogonal): the integers in memory
are the ones the simulated KV4 computes."""
from __future__ import annotations

import torch
from transformers.cache_utils import BaseQuantizedLayer, Cache

from .quant import QuantArgs, compute_qparams, dequantize, pack, quantize, unpack
from .transforms.online import kv_quant_args, online_spec


class QuantizedKVLayer(BaseQuantizedLayer):
    """One attention layer's cache: `args` (per-token dynamic QuantArgs), optional `rotation` applied to K before
    quantizing (undone on read)."""

    def __init__(self, args: QuantArgs, rotation=None):
        super().__init__()
        if args.granularity != "token" or not args.dynamic:
            raise ValueError(f"the KV cache quantizes per token (dynamic, granularity='token'), got {args}")
        self.args, self.rotation = args, rotation
        self._quantized_keys = self._quantized_values = None

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        self.dtype, self.head_dim = key_states.dtype, key_states.shape[-1]

    def _quantize(self, x: torch.Tensor) -> tuple:
        a = self.args
        scale, zero = compute_qparams(x.float(), a)
        q = quantize(x.float(), scale, zero, a)
        return pack(q, a.bits, a.qmin), scale, None if a.symmetric else (zero - a.qmin).to(torch.uint8)

    def _dequantize(self, stored: tuple) -> torch.Tensor:
        a = self.args
        codes, scale, zero = stored
        zero = torch.zeros((), device=codes.device) if zero is None else zero.float() + a.qmin
        return dequantize(unpack(codes, a.bits, a.qmin, self.head_dim), scale.float(), zero, a, self.dtype)

    @staticmethod
    def _append(old, new):
        if old is None:
            return new
        return tuple(None if o is None else torch.cat([o, n], dim=2) for o, n in zip(old, new))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        if self.rotation is not None:
            key_states = self.rotation(key_states)
        self._quantized_keys = self._append(self._quantized_keys, self._quantize(key_states))
        self._quantized_values = self._append(self._quantized_values, self._quantize(value_states))
        keys = self._dequantize(self._quantized_keys)
        if self.rotation is not None:
            keys = self.rotation.inverse(keys)
        return keys, self._dequantize(self._quantized_values)

    def nbytes(self) -> int:
        """Bytes the cache holds for this layer (codes, scales, zero points)."""
        return sum(t.numel() * t.element_size() for s in (self._quantized_keys, self._quantized_values)
                   if s is not None for t in s if t is not None)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for name in ("_quantized_keys", "_quantized_values"):
            stored = getattr(self, name)
            if stored is not None:
                setattr(self, name, tuple(None if t is None else t.index_select(0, beam_idx.to(t.device))
                                          for t in stored))


class HfqQuantizedCache(Cache):
    """`past_key_values=HfqQuantizedCache(model)` (settings from the model's recorded KV quantizer) or
    `HfqQuantizedCache(model, bits=4, symmetric=False)` for any model with full attention."""

    def __init__(self, model, bits: int | None = None, symmetric: bool | None = None, clip_ratio: float | None = None):
        from .arch import get_adapter
        from .transforms.fuse import transform_layout

        spec = online_spec(model)
        recorded = QuantArgs.from_dict(spec["kv"]) if "kv" in spec else None
        if bits is None and recorded is None:
            raise ValueError("HfqQuantizedCache needs bits= (4 or 8): this model records no KV quantizer")
        base = recorded or kv_quant_args(bits)
        args = kv_quant_args(bits if bits is not None else base.bits,
                             base.symmetric if symmetric is None else symmetric,
                             base.clip_ratio if clip_ratio is None else clip_ratio)
        config = model.config.get_text_config(decoder=True)
        types = set(getattr(config, "layer_types", None) or ["full_attention"])
        if types != {"full_attention"}:
            raise ValueError(f"HfqQuantizedCache supports full-attention layers only, this model has {sorted(types)}")
        rotations = [None] * config.num_hidden_layers
        if "qk" in spec:
            layout = transform_layout(model)
            rotations = [block.get_submodule(layout.attn).qk_rotation for block in get_adapter(model).get_blocks(model)]
        super().__init__(layers=[QuantizedKVLayer(args, rot) for rot in rotations])

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)
