"""Integer-only inference of a quantized Llama-family causal LM (I-LLM, llm.md §2.2): after the embedding lookup and
until the logits every tensor that flows between modules is an `IntTensor` (integers + dyadic scale m / 2^k).

`to_integer(model)` switches a model whose linears are `QuantLinear` (symmetric per-channel weights) into this mode
in place: each decoder module's class is swapped for a subclass whose forward is integer-only (parameters, names
and the checkpoint layout are unchanged; `to_float(model)` swaps back), and the float scales are compiled once into
integer constants (non-persistent buffers): weight scales and norm weights into dyadic multipliers, the RoPE
cos/sin into integer tables (ROPE_BITS fractional bits), the softmax 1/sqrt(head_dim) into a dyadic constant.

Data flow of one decoder block (our choices where the paper is silent, see docs/illm.md):
- residual stream: `residual_bits` (16) symmetric per token; every matmul operand is at most 8 bits (int8 into
  `torch._int_mm`), linear inputs at the config's activation bits, everything else at 16 bits per token;
- RMSNorm: DI-Norm (integer sum of squares, integer square root, per-channel dyadic gamma) -> linear input;
- q / k / v: DI-MatMul (int32 accumulator, per-channel weight multipliers, dynamic per-token requantisation); RoPE
  with integer tables, q and k requantised to 8 bits per (token, head); v to 8 bits per (token, head);
- Q.K^T per head in int8 -> int32, key-token scales folded per column (`align`), requantised per row to 16 bits;
- DI-ClippedSoftmax numerators (`clipped_exp`); the normalisation is deferred: the numerators, weighted by the
  value tokens' scales, are requantised per row to 8 bits, multiplied with V in int8, and the integer division by
  the row sum is folded into the output multiplier;
- SwiGLU: DI-SwiGLU (sigmoid from two DI-Exps and an integer division; FSBR's gate/up smoothing as a per-channel
  dyadic multiplier inside the sigmoid);
- residual adds: both operands brought to a common power-of-two scale, summed, requantised per token.
The KV cache (transformers' DynamicCache) stores per (token, head) int16 rows: head_dim int8 values + their m, k."""
from __future__ import annotations

import torch
import torch.nn as nn
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ..nn import QuantLinear
from ..nn.act import ScaledSiLU, is_silu
from .ops import (IntTensor, align, bit_length, clipped_exp, di_linear, di_rmsnorm, di_silu_mul, dyadic,
                  quantize_per_token, requantize, rshift_round)

ROPE_BITS = 14
INNER_BITS = 16
MATMUL_BITS = 8
MAX_ROPE_POSITIONS = 32768
SMALL_ROWS = 4


def _signed_dyadic(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element dyadic (m, k) of a float tensor of any sign (m carries the sign; zeros -> m = 0)."""
    x = x.detach().double()
    m, k = dyadic(x.abs().clamp(min=1e-30))
    return torch.where(x == 0, 0, m * torch.sign(x).long()), k


def _buffer(module: nn.Module, name: str, value: torch.Tensor) -> None:
    module.register_buffer(name, value, persistent=False)


# ------------------------------------------------------------------------------------------------ linear
def _linear(q, m, k, lin, bits: int = INNER_BITS):
    """DI-MatMul with a linear's integer constants lin = (w int8 [in, out], mw [out], kw [out])."""
    return di_linear(q, m, k, *lin, bits)


def integer_linear(module: QuantLinear, x: IntTensor, bits: int = INNER_BITS) -> IntTensor:
    """A `QuantLinear` called on an IntTensor (e.g. lm_head): DI-MatMul."""
    if not hasattr(module, "int_w"):
        raise RuntimeError("this QuantLinear has no integer constants; call hfq.integer.llama.to_integer(model) first")
    return IntTensor(*_linear(*x, _lin(module), bits))


def _lin(module: QuantLinear):
    return module.int_w, module.int_mw, module.int_kw


def compile_linear(module: QuantLinear) -> None:
    a = module.weight_args
    if not a.symmetric or a.granularity not in ("channel", "tensor") or a.bits > 8 or module.bias is not None:
        raise NotImplementedError(f"integer-only inference needs symmetric per-channel weights of at most 8 bits and "
                                  f"no bias (DI-MatMul); got {module.extra_repr()}")
    _buffer(module, "int_w", module.int_weight().to(torch.int8).t().contiguous())
    m, k = dyadic(module.weight_scale.detach().double().reshape(-1).expand(module.out_features))
    _buffer(module, "int_mw", m)
    _buffer(module, "int_kw", k)


# ------------------------------------------------------------------------------------------------ helpers
def _add(aq, am, ak, bq, bm, bk, bits: int):
    """a + b (per-token scales) on the coarser operand's power-of-two scale, requantised per token to `bits`."""
    K = torch.minimum(ak, bk)
    total = rshift_round(aq * am, ak - K) + rshift_round(bq * bm, bk - K)
    return requantize(total, torch.ones_like(K), K, bits)


def merge_heads(x: IntTensor, bits: int) -> IntTensor:
    """[b, t, heads, head_dim] with per-(token, head) scales -> [b, t, heads * head_dim] per token."""
    p, K = align(x.q, x.m, x.k, dim=-2)
    b, t = p.shape[:2]
    return IntTensor(*requantize(p.reshape(b, t, -1), torch.ones_like(K).reshape(b, t, 1), K.reshape(b, t, 1), bits))


def rope(x: IntTensor, cos: torch.Tensor, sin: torch.Tensor, bits: int = MATMUL_BITS) -> IntTensor:
    """Rotary embedding on integers [b, heads, t, hd] (scales [b, 1, t, 1]) with integer tables cos/sin
    [b, 1, t, hd] (ROPE_BITS fractional bits), requantised per (token, head)."""
    q = x.q
    half = q.shape[-1] // 2
    rot = torch.cat([-q[..., half:], q[..., :half]], -1)
    r = q * cos + rot * sin
    return IntTensor(*requantize(r, x.m, x.k + ROPE_BITS, bits))


def pack_cache(x: IntTensor) -> torch.Tensor:
    """[b, heads, t, hd] int8 values + per-row m, k -> int16 [b, heads, t, hd + 2] (what the KV cache stores)."""
    shape = (*x.q.shape[:-1], 1)
    return torch.cat([x.q, x.m.expand(shape), x.k.expand(shape)], -1).to(torch.int16)


def unpack_cache(c: torch.Tensor) -> IntTensor:
    c = c.to(torch.int64)  # contiguous pieces: one stride pattern for torch.compile with or without a cache
    return IntTensor(c[..., :-2].contiguous(), c[..., -2:-1].contiguous(), c[..., -1:].contiguous())


def _per_head_int_mm(a: torch.Tensor, b: torch.Tensor, groups: int) -> torch.Tensor:
    """a [B, H, t, d] x b [B, KV, d, s] (head h reads KV head h // groups), int8 values -> int64 [B, H, t, s].
    Up to SMALL_ROWS rows (decoding) as one broadcast int32 multiply-sum over all heads (inductor fuses it into one
    loop; a `torch._int_mm` per head cost ~9 us x 18 calls per layer), else int8 `torch._int_mm` per head."""
    B, H, t, d = a.shape
    if t <= SMALL_ROWS:
        kv, s = b.shape[1], b.shape[-1]
        prod = a.to(torch.int32).reshape(B, kv, groups, t, d, 1) * b.to(torch.int32).reshape(B, kv, 1, 1, d, s)
        return prod.sum(-2, dtype=torch.int64).reshape(B, H, t, s)
    a8, b8 = a.to(torch.int8), b.to(torch.int8)
    out = [torch._int_mm(a8[i, h].contiguous(), b8[i, h // groups].contiguous()) for i in range(B) for h in range(H)]
    return torch.stack(out).reshape(B, H, t, -1).to(torch.int64)


# ------------------------------------------------------------------------------------------------ modules
class IntegerRMSNorm:
    """DI-Norm as a module (the final norm); `int_bits` is the output's bits."""

    def compile(self, out_bits: int):
        m, k = _signed_dyadic(self.weight)
        _buffer(self, "int_gm", m)
        _buffer(self, "int_gk", k)
        self.int_bits = out_bits

    def forward(self, x: IntTensor) -> IntTensor:
        return IntTensor(*di_rmsnorm(*x, self.int_gm, self.int_gk, eps=self.variance_epsilon, bits=self.int_bits))


def _attn_in(qq, qm, qk, kq, km, kk, vq, vm, vk, cos, sin, hd: int):
    """q / k / v linear outputs [b, t, n * hd] (per-token scales) -> [b, n, t, hd] per (token, head) at 8 bits,
    q and k rotated (RoPE)."""
    b, t = qq.shape[:2]

    def heads(y, m, k):  # scales [b, t, 1] -> [b, 1, t, 1]
        return y.reshape(b, t, -1, hd).transpose(1, 2), m[:, None], k[:, None]

    q = rope(IntTensor(*heads(qq, qm, qk)), cos, sin)
    k = rope(IntTensor(*heads(kq, km, kk)), cos, sin)
    v = requantize(*heads(vq, vm, vk), MATMUL_BITS)
    return q, k, v


def _attn(qq, qm, qk, kq, km, kk, vq, vm, vk, mask, sm, sk, clip: float | None, act_bits: int):
    """Attention of one layer on integers: q [b, H, t, hd], k / v [b, KV, s, hd] (8 bits, per (token, head)
    scales), mask [b, 1, t, s] -> the o_proj input [b, t, H * hd] per token at `act_bits`."""
    groups = qq.shape[1] // kq.shape[1]
    # Q.K^T: int8 x int8 per head; key-token scales folded per column, the query's and 1/sqrt(hd) per row
    acc = _per_head_int_mm(qq, kq.transpose(-1, -2), groups)
    acc, K = align(acc, *(t_.transpose(-1, -2).repeat_interleave(groups, 1) for t_ in (km, kk)))  # [b, H, 1, s]
    acc = torch.where(mask, acc, 0)
    lq, lm, lk = requantize(acc, qm * sm, qk + K + sk, INNER_BITS)
    e = clipped_exp(lq, lm, lk, clip, mask)
    # P.V with the division deferred: numerators times the value tokens' scales, per row to 8 bits
    w, K2 = align(e, *(t_.transpose(-1, -2).repeat_interleave(groups, 1) for t_ in (vm, vk)))
    wq, wm, wk = requantize(w, torch.ones_like(K2), torch.zeros_like(K2), MATMUL_BITS)
    acc2 = _per_head_int_mm(wq, vq, groups)  # [b, H, t, hd]
    total = e.sum(-1, keepdim=True).clamp(min=1)
    extra = bit_length(total) + 16  # (wm << extra) // total keeps ~24 bits of the quotient
    oq, om, ok = requantize(acc2, (wm << extra) // total, wk + K2 + extra, INNER_BITS)
    return merge_heads(IntTensor(oq.transpose(1, 2), om.transpose(1, 2), ok.transpose(1, 2)), act_bits)


def _layer_front(h, norm, q_lin, k_lin, v_lin, cos, sin, hd: int, eps: float, act_bits: int):
    """Attention norm, q / k / v projections, RoPE: the cache-free first half of a decoder layer."""
    x = di_rmsnorm(*h, *norm, eps=eps, bits=act_bits)
    return _attn_in(*_linear(*x, q_lin), *_linear(*x, k_lin), *_linear(*x, v_lin), cos, sin, hd)


def _layer_back(h, q, k, v, mask, sm, sk, o_lin, norm, gate_lin, up_lin, down_lin, inv_s, eps: float,
                clip: float | None, act_bits: int, residual_bits: int):
    """Attention (on the cached k / v), o_proj, residual add, MLP norm, SwiGLU MLP, residual add."""
    o = _linear(*_attn(*q, *k, *v, mask, sm, sk, clip, act_bits), o_lin)
    h = _add(*h, *o, residual_bits)
    x = di_rmsnorm(*h, *norm, eps=eps, bits=act_bits)
    y = di_silu_mul(*_linear(*x, gate_lin), *_linear(*x, up_lin), bits=act_bits, inv_s=inv_s)
    return _add(*h, *_linear(*y, down_lin), residual_bits)


class IntegerDecoderLayer:
    """One decoder layer as two integer kernels around the KV-cache update (`_layer_front`, `_layer_back`); the
    constants are compiled from its modules: norm weights -> per-channel dyadic gammas, linears -> int8 weights and
    multipliers (`compile_linear`), 1/sqrt(head_dim) -> dyadic, FSBR's ScaledSiLU scale -> a per-channel 1/s."""

    def compile(self, act_bits: int, residual_bits: int, clip: float | None):
        attn, mlp = self.self_attn, self.mlp
        if any(n in dict(attn.named_children()) for n in ("q_norm", "k_norm")):
            raise NotImplementedError("integer-only inference does not implement per-head q/k norms (Qwen3)")
        self.int_act_bits, self.int_residual_bits, self.int_clip = act_bits, residual_bits, clip
        for name in ("input_layernorm", "post_attention_layernorm"):
            m, k = _signed_dyadic(getattr(self, name).weight)
            _buffer(self, f"int_{name}_m", m)
            _buffer(self, f"int_{name}_k", k)
        m, k = dyadic(torch.tensor(float(attn.scaling)))
        _buffer(self, "int_sm", m)
        _buffer(self, "int_sk", k)
        act = mlp.act_fn
        if isinstance(act, ScaledSiLU):  # 1/s per channel, mantissas brought to one shift (the largest)
            m, k = dyadic(1.0 / act.scale.detach().double())
            _buffer(self, "int_inv_sm", m << (k.max() - k))
            _buffer(self, "int_inv_sk", k.max())
        elif is_silu(act):
            self.int_inv_sm = None
        else:
            raise NotImplementedError(f"integer-only inference implements SwiGLU (silu); this MLP uses {act!r}")

    def forward(self, h: IntTensor, cos=None, sin=None, mask=None, cache=None, **kwargs) -> IntTensor:
        attn, mlp = self.self_attn, self.mlp
        eps = self.input_layernorm.variance_epsilon
        q, k, v = _kernel("front")(h, (self.int_input_layernorm_m, self.int_input_layernorm_k), _lin(attn.q_proj),
                                   _lin(attn.k_proj), _lin(attn.v_proj), cos, sin, attn.head_dim, eps,
                                   self.int_act_bits)
        if cache is not None:
            kc, vc = cache.update(pack_cache(IntTensor(*k)), pack_cache(IntTensor(*v)), attn.layer_idx)
            k, v = unpack_cache(kc), unpack_cache(vc)
        inv_s = None if self.int_inv_sm is None else (self.int_inv_sm, self.int_inv_sk)
        out = _kernel("back")(h, q, k, v, mask, self.int_sm, self.int_sk, _lin(attn.o_proj),
                              (self.int_post_attention_layernorm_m, self.int_post_attention_layernorm_k),
                              _lin(mlp.gate_proj), _lin(mlp.up_proj), _lin(mlp.down_proj), inv_s,
                              self.post_attention_layernorm.variance_epsilon, self.int_clip, self.int_act_bits,
                              self.int_residual_bits)
        return IntTensor(*out)


class IntegerLlamaModel:
    def compile(self, residual_bits: int):
        self.int_residual_bits = residual_bits
        n = min(self.config.max_position_embeddings, MAX_ROPE_POSITIONS)
        pos = torch.arange(n, device=self.embed_tokens.weight.device)[None]
        x = torch.zeros(1, 1, dtype=torch.float32, device=pos.device)
        cos, sin = self.rotary_emb(x, pos)
        _buffer(self, "int_cos", torch.round(cos[0].double() * 2**ROPE_BITS).to(torch.int32))
        _buffer(self, "int_sin", torch.round(sin[0].double() * 2**ROPE_BITS).to(torch.int32))

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, **kwargs):
        from transformers.cache_utils import DynamicCache

        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        b, t = x.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = (torch.arange(t, device=x.device) + past)[None].expand(b, t)
        if int(position_ids.max()) >= self.int_cos.shape[0]:
            raise ValueError(f"position {int(position_ids.max())} is beyond the integer RoPE table "
                             f"({self.int_cos.shape[0]} positions)")
        cos = self.int_cos[position_ids].to(torch.int64)[:, None]
        sin = self.int_sin[position_ids].to(torch.int64)[:, None]
        s = past + t
        key_pos = torch.arange(s, device=x.device)
        mask = key_pos[None, None, None, :] <= position_ids[:, None, :, None]  # [b, 1, t, s]
        if attention_mask is not None and attention_mask.dim() == 2:
            mask = mask & attention_mask[:, None, None, -s:].to(torch.bool)
        h = IntTensor(*quantize_per_token(x, self.int_residual_bits))
        for layer in self.layers[: self.config.num_hidden_layers]:
            h = layer(h, cos=cos, sin=sin, mask=mask, cache=cache)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(h), cache=cache)


class IntegerCausalLM:
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         inputs_embeds=inputs_embeds, use_cache=use_cache)
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = IntTensor(*(t_[:, -logits_to_keep:] for t_ in h))
        elif not isinstance(logits_to_keep, int):
            h = IntTensor(*(t_[:, logits_to_keep] for t_ in h))
        logits = self.lm_head(h).dequantize().float()  # the one integer -> float step, at the very end
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)


# the integer kernels: pure functions of tensors (and a few Python constants), so `use_compiled_kernels` can hand
# them to torch.compile (inductor fuses each one's element-wise integer chain into one C++ loop) with one trace for
# every layer; eager is the default and what the tests check
KERNELS = {"front": _layer_front, "back": _layer_back}
_ACTIVE = dict(KERNELS)


def _kernel(name: str):
    return _ACTIVE[name]


def use_compiled_kernels(enabled: bool = True) -> None:
    """Run the integer kernels through torch.compile (dynamic shapes; compiled on first use, a C++ compiler is
    needed) or eagerly (False). Process-wide; the arithmetic is the same integer arithmetic either way."""
    _ACTIVE.update({n: torch.compile(f, dynamic=True) for n, f in KERNELS.items()} if enabled else KERNELS)


_SWAPPED: dict[tuple[type, type], type] = {}


def _swap(module: nn.Module, mixin: type) -> None:
    cls = type(module)
    if getattr(cls, "_hfq_integer", False):
        return
    key = (mixin, cls)
    if key not in _SWAPPED:  # same name as the float class, so save_pretrained writes the same architecture
        _SWAPPED[key] = type(cls.__name__, (mixin, cls), {"_hfq_integer": True, "_hfq_float_class": cls,
                                                          "__module__": cls.__module__})
    module.__class__ = _SWAPPED[key]


def is_integer(model: nn.Module) -> bool:
    return bool(getattr(type(model), "_hfq_integer", False))


def to_integer(model: nn.Module, act_bits: int = 8, residual_bits: int = 16, clip: float | None = 15.0) -> nn.Module:
    """Switch a quantized Llama-family causal LM to integer-only inference in place (see the module docstring).
    act_bits: bits of every linear's input (A of WxAy). clip: DI-ClippedSoftmax's clip (real units)."""
    if model.config.model_type not in ("llama", "mistral", "qwen2", "qwen3"):
        raise NotImplementedError(f"integer-only inference supports Llama-family decoders; got "
                                  f"{model.config.model_type!r}")
    if not 2 <= act_bits <= 8:
        raise ValueError(f"act_bits must be 2..8 (int8 matmul operands), got {act_bits}")
    base = model.model
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if linears:
        raise ValueError(f"integer-only inference needs every linear quantized; {sorted(linears)[:3]} are float "
                         f"(quantize lm_head too: quantize_lm_head=True)")
    for m in model.modules():
        if isinstance(m, QuantLinear):
            compile_linear(m)
    for layer in base.layers:
        _swap(layer, IntegerDecoderLayer)
        layer.compile(act_bits, residual_bits, clip)
    _swap(base.norm, IntegerRMSNorm)
    base.norm.compile(MATMUL_BITS)
    _swap(base, IntegerLlamaModel)
    base.compile(residual_bits)
    _swap(model, IntegerCausalLM)
    model.hfq_integer = {"act_bits": act_bits, "residual_bits": residual_bits, "clip": clip}
    return model


def to_float(model: nn.Module) -> nn.Module:
    """Undo `to_integer` (the fake-quant float forward of the same quantized weights)."""
    for m in model.modules():
        cls = type(m)
        if getattr(cls, "_hfq_integer", False):
            m.__class__ = cls._hfq_float_class
    return model
