"""W8A8 round-to-nearest fake quantization for PETR-style camera 3D detectors.

`quantize_petr_w8a8(model, calib_batches)` rewrites a model in place:
- BatchNorm after a convolution is folded into it first (what an int8 deployment does);
- every `nn.Conv2d` / `nn.Linear` -> `FakeQuantConv2d` / `FakeQuantLinear`: the weight is rounded once to
  per-tensor symmetric int8 (RTN) and the input goes through a static per-tensor activation quantizer;
- every `nn.MultiheadAttention` -> `FakeQuantMultiheadAttention`: the q/k/v/out projections as above, plus
  static quantizers on both operands of the two attention matmuls (Q.K^T and attn.V);
- every position-embedding add (`PetrPositionAdd`: image feature + 3D PE, query + query PE) ->
  `FakeQuantAdd`: each operand gets its own static scale (Q-PETR's magnitude gap shows up here; the
  observed ranges are kept for reporting, see `position_add_stats`).

Static scales come from a min/max observer over the calibration batches only; a quantizer that was never
calibrated refuses to run. Everything is quantize-dequantize in float (`hfq.quant` primitives), i.e. it
measures the accuracy of integer arithmetic, not its speed. LayerNorm, softmax, sigmoid and ReLU stay float.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quant import QuantArgs, compute_qparams, dequantize, fake_quantize
from ..solvers.rtn import rtn

W8 = QuantArgs(bits=8, symmetric=True, granularity="tensor")
A8 = QuantArgs(bits=8, symmetric=True, granularity="tensor", dynamic=False, observer="minmax")
# softmax outputs are in [0, 1]: an asymmetric 8-bit range with min 0 is unsigned int8 (zero point 0)
P8 = QuantArgs(bits=8, symmetric=False, granularity="tensor", dynamic=False, observer="minmax")


def quantize_weight(w: torch.Tensor, args: QuantArgs = W8) -> torch.Tensor:
    """RTN: integers with the scale of the whole tensor, dequantized back to w's dtype."""
    q, scale, zero = rtn(w, args)
    return dequantize(q, scale, zero, args, dtype=w.dtype)


class StaticActQuantizer(nn.Module):
    """Per-tensor static activation fake-quant. While `calibrating`, records the running min/max (and,
    with `keep_stats`, a subsample of |x| for percentiles) and passes x through; after `freeze()` applies
    quantize-dequantize with the frozen scale. Running before calibration is an error."""

    def __init__(self, args: QuantArgs = A8, name: str = "", keep_stats: bool = False, max_samples: int = 200_000):
        super().__init__()
        if args.dynamic or args.granularity != "tensor":
            raise ValueError(f"StaticActQuantizer needs static per-tensor QuantArgs, got {args}")
        self.args, self.name = args, name
        self.calibrating = False
        self.keep_stats, self.max_samples = keep_stats, max_samples
        self.register_buffer("lo", torch.tensor(float("inf")))
        self.register_buffer("hi", torch.tensor(float("-inf")))
        self.register_buffer("scale", torch.zeros(1))
        self.register_buffer("zero", torch.zeros(1))
        self.register_buffer("calibrated", torch.tensor(False))
        self._abs_samples = []
        self.num_calib_batches = 0

    def forward(self, x):
        if self.calibrating:
            xd = x.detach()
            self.lo = torch.minimum(self.lo, xd.min().float())
            self.hi = torch.maximum(self.hi, xd.max().float())
            self.num_calib_batches += 1
            if self.keep_stats:
                flat = xd.abs().flatten().float()
                if flat.numel() > self.max_samples:
                    g = torch.Generator().manual_seed(self.num_calib_batches)
                    flat = flat[torch.randint(flat.numel(), (self.max_samples,), generator=g)]
                self._abs_samples.append(flat.cpu())
            return x
        if not bool(self.calibrated):
            raise RuntimeError(f"activation quantizer {self.name or '?'} has no calibrated scale; run "
                               "quantize_petr_w8a8(model, calib_batches) with calibration data first.")
        return fake_quantize(x, self.args, self.scale.to(x.device), self.zero.to(x.device))

    def freeze(self):
        if self.num_calib_batches == 0 or not torch.isfinite(self.lo):
            raise RuntimeError(f"activation quantizer {self.name or '?'} saw no calibration data (is the module "
                               "on the forward path of the calibration batches?)")
        scale, zero = compute_qparams(torch.stack([self.lo, self.hi]), self.args)  # min/max observer
        self.scale.copy_(scale.reshape(1))
        self.zero.copy_(zero.reshape(1))
        self.calibrated.fill_(True)
        self.calibrating = False

    def stats(self) -> dict:
        """Observed range: min, max, absmax, 99.9th percentile of |x| (needs keep_stats) and the int8 step."""
        out = {"min": float(self.lo), "max": float(self.hi), "absmax": float(max(-self.lo, self.hi))}
        if self._abs_samples:
            a = torch.cat(self._abs_samples).numpy()
            out["abs_p99.9"] = float(np.percentile(a, 99.9))
            out["abs_p99"] = float(np.percentile(a, 99.0))
            out["abs_mean"] = float(a.mean())
        if bool(self.calibrated):
            out["scale"] = float(self.scale)
        return out


class FakeQuantLinear(nn.Module):
    """nn.Linear with an RTN per-tensor int8 weight and a static per-tensor int8 input."""

    def __init__(self, linear: nn.Linear, weight_args: QuantArgs = W8, act_args: QuantArgs = A8, name: str = ""):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(quantize_weight(linear.weight, weight_args), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.input_quant = StaticActQuantizer(act_args, f"{name}.input")

    def forward(self, x):
        return F.linear(self.input_quant(x), self.weight, self.bias)


class FakeQuantConv2d(nn.Module):
    """nn.Conv2d with an RTN per-tensor int8 weight and a static per-tensor int8 input."""

    def __init__(self, conv: nn.Conv2d, weight_args: QuantArgs = W8, act_args: QuantArgs = A8, name: str = ""):
        super().__init__()
        if conv.padding_mode != "zeros":
            raise NotImplementedError(f"padding_mode={conv.padding_mode!r}")
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.weight = nn.Parameter(quantize_weight(conv.weight, weight_args), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.input_quant = StaticActQuantizer(act_args, f"{name}.input")

    def forward(self, x):
        return F.conv2d(self.input_quant(x), self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class FakeQuantAdd(nn.Module):
    """x + pos with each operand on its own static int8 scale (the sum is quantized by whatever consumes it,
    e.g. the attention's key projection)."""

    def __init__(self, act_args: QuantArgs = A8, name: str = "", keep_stats: bool = False):
        super().__init__()
        self.x_quant = StaticActQuantizer(act_args, f"{name}.x", keep_stats)
        self.pos_quant = StaticActQuantizer(act_args, f"{name}.pos", keep_stats)

    def forward(self, x, pos):
        return self.x_quant(x) + self.pos_quant(pos)


class FakeQuantMultiheadAttention(nn.Module):
    """nn.MultiheadAttention (seq-first, packed in_proj, no bias_k / add_zero_attn) written out so that every
    matmul has quantized operands: q/k/v/out projections (int8 weights, static int8 inputs), Q.K^T (static
    int8 scaled queries and keys) and attn.V (static unsigned-int8 probabilities, static int8 values)."""

    def __init__(self, mha: nn.MultiheadAttention, weight_args: QuantArgs = W8, act_args: QuantArgs = A8,
                 prob_args: QuantArgs = P8, name: str = ""):
        super().__init__()
        if mha.batch_first or mha.bias_k is not None or mha.add_zero_attn or not mha._qkv_same_embed_dim:
            raise NotImplementedError("only seq-first nn.MultiheadAttention with a packed in_proj is supported")
        d = mha.embed_dim
        self.embed_dim, self.num_heads, self.dropout = d, mha.num_heads, mha.dropout
        self.head_dim = d // mha.num_heads
        w, b = mha.in_proj_weight.detach(), mha.in_proj_bias
        projs = []
        for i in range(3):  # q, k, v: three linears, each with its own per-tensor scale
            lin = nn.Linear(d, d, bias=b is not None)
            lin.weight.data.copy_(w[i * d:(i + 1) * d])
            if b is not None:
                lin.bias.data.copy_(b.detach()[i * d:(i + 1) * d])
            projs.append(FakeQuantLinear(lin, weight_args, act_args, f"{name}.{'qkv'[i]}_proj"))
        self.q_proj, self.k_proj, self.v_proj = projs
        self.out_proj = FakeQuantLinear(mha.out_proj, weight_args, act_args, f"{name}.out_proj")
        self.qk_q = StaticActQuantizer(act_args, f"{name}.qk.q")
        self.qk_k = StaticActQuantizer(act_args, f"{name}.qk.k")
        self.av_attn = StaticActQuantizer(prob_args, f"{name}.av.attn")
        self.av_v = StaticActQuantizer(act_args, f"{name}.av.v")

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None, **kwargs):
        L, B, d = query.shape
        S = key.shape[0]
        h, hd = self.num_heads, self.head_dim
        q = self.q_proj(query).reshape(L, B * h, hd).transpose(0, 1) * (1.0 / math.sqrt(hd))
        k = self.k_proj(key).reshape(S, B * h, hd).transpose(0, 1)
        v = self.v_proj(value).reshape(S, B * h, hd).transpose(0, 1)
        scores = torch.bmm(self.qk_q(q), self.qk_k(k).transpose(1, 2))  # (B*h, L, S)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros_like(attn_mask, dtype=scores.dtype).masked_fill(attn_mask, float("-inf"))
            scores = scores + (attn_mask if attn_mask.dim() == 3 else attn_mask[None])
        if key_padding_mask is not None:
            kpm = key_padding_mask.to(torch.bool).view(B, 1, 1, S).expand(B, h, 1, S).reshape(B * h, 1, S)
            scores = scores.masked_fill(kpm, float("-inf"))
        attn = scores.softmax(-1)
        if self.training and self.dropout > 0:
            attn = F.dropout(attn, self.dropout)
        out = torch.bmm(self.av_attn(attn), self.av_v(v))  # (B*h, L, hd)
        out = out.transpose(0, 1).reshape(L, B, d)
        return self.out_proj(out), None


def fold_batchnorm(model: nn.Module) -> int:
    """Fold eval-mode BatchNorm2d into the Conv2d right before it (nn.Sequential neighbours, or a module with
    `convolution` + `normalization` like transformers' ResNetConvLayer). Returns the number folded."""
    def fuse(conv, bn):
        std = (bn.running_var + bn.eps).sqrt()
        gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
        w = conv.weight * (gamma / std).reshape(-1, 1, 1, 1)
        b = conv.bias if conv.bias is not None else torch.zeros_like(std)
        b = (b - bn.running_mean) * gamma / std + beta
        conv.weight = nn.Parameter(w.detach())
        conv.bias = nn.Parameter(b.detach())

    count = 0
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            children = list(module._modules.items())
            for (_, a), (name_b, b) in zip(children, children[1:]):
                if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
                    fuse(a, b)
                    module._modules[name_b] = nn.Identity()
                    count += 1
        conv, bn = getattr(module, "convolution", None), getattr(module, "normalization", None)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            fuse(conv, bn)
            module.normalization = nn.Identity()
            count += 1
    return count


def _replace(module: nn.Module, prefix: str, weight_args, act_args, prob_args, add_types, keep_stats,
             skip=()) -> int:
    count = 0
    for name, child in list(module.named_children()):
        full = f"{prefix}.{name}" if prefix else name
        if any(s in full.split(".") for s in skip):
            continue
        if isinstance(child, nn.MultiheadAttention):
            new = FakeQuantMultiheadAttention(child, weight_args, act_args, prob_args, full)
        elif isinstance(child, nn.Linear):
            new = FakeQuantLinear(child, weight_args, act_args, full)
        elif isinstance(child, nn.Conv2d):
            new = FakeQuantConv2d(child, weight_args, act_args, full)
        elif add_types and isinstance(child, add_types):
            new = FakeQuantAdd(act_args, full, keep_stats)
        else:
            count += _replace(child, full, weight_args, act_args, prob_args, add_types, keep_stats, skip)
            continue
        setattr(module, name, new)
        count += 1
    return count


def act_quantizers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, StaticActQuantizer)]


@torch.no_grad()
def quantize_petr_w8a8(model: nn.Module, calib_batches, weight_args: QuantArgs = W8, act_args: QuantArgs = A8,
                       prob_args: QuantArgs = P8, keep_stats: bool = True, device=None,
                       skip=("aux_head",)) -> nn.Module:
    """W8A8 RTN with static per-tensor activation scales, in place; returns the model (eval mode).

    calib_batches: iterable of dicts with `pixel_values` (B, N, 3, H, W) and `lidar2img` (B, N, 4, 4) (other
    keys are ignored). At least one batch is required: static scales come only from calibration.
    keep_stats keeps |x| subsamples at the position-embedding adds for percentile reporting.
    skip: module names left in float (the training-only 2-D auxiliary head is not on the inference path).
    """
    batches = list(calib_batches) if calib_batches is not None else []
    if not batches:
        raise ValueError("quantize_petr_w8a8 needs calibration batches: static activation scales are observed "
                         "on real inputs (pass e.g. a few training samples).")
    for b in batches:
        if not isinstance(b, dict) or "pixel_values" not in b or "lidar2img" not in b:
            raise ValueError("each calibration batch must be a dict with 'pixel_values' and 'lidar2img'.")
    model.eval()
    fold_batchnorm(model)
    add_types = tuple(type(m) for m in model.modules() if type(m).__name__ == "PetrPositionAdd")
    n = _replace(model, "", weight_args, act_args, prob_args, tuple(set(add_types)), keep_stats, tuple(skip))
    if n == 0:
        raise ValueError("no Conv2d / Linear / MultiheadAttention found to quantize")
    quantizers = act_quantizers(model)
    for _, q in quantizers:
        q.calibrating = True
    device = device or next(model.parameters()).device
    for b in batches:
        model(pixel_values=b["pixel_values"].to(device), lidar2img=b["lidar2img"].to(device))
    for _, q in quantizers:
        q.freeze()
    model.hfq_w8a8 = {"weight": weight_args.to_dict(), "activation": act_args.to_dict(),
                      "attention_probs": prob_args.to_dict(), "calibration_batches": len(batches),
                      "quantized_modules": n, "activation_quantizers": len(quantizers)}
    return model


def position_add_stats(model: nn.Module) -> dict:
    """Observed ranges of both operands of every position-embedding add, by module name."""
    return {n: {"feature" if "key_pos" in n else "query": m.x_quant.stats(), "pe": m.pos_quant.stats()}
            for n, m in model.named_modules() if isinstance(m, FakeQuantAdd)}
