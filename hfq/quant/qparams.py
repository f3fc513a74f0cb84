"""Scales, zero points, quantize / dequantize and fake-quant with a straight-through gradient.

Layouts: a weight [out, in] gets scales [1, 1] (tensor), [out, 1] (channel) or [out, in // group] (group);
an activation [..., C] gets [..., 1] (token) or [1] (tensor). `quantize`/`dequantize` broadcast groups by
viewing the last dim as [n_groups, group]."""
from __future__ import annotations

import torch

from .args import QuantArgs


def _grouped(x: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """View x so that the reduced elements of each scale sit on the last dim."""
    if args.granularity == "group":
        if x.shape[-1] % args.group_size:
            raise ValueError(f"group_size {args.group_size} does not divide the last dimension {x.shape[-1]}")
        return x.reshape(*x.shape[:-1], x.shape[-1] // args.group_size, args.group_size)
    if args.granularity == "tensor":
        return x.reshape(1, -1)
    return x  # channel (weight rows) and token (activation rows) both reduce the last dim


def _range(g: torch.Tensor, args: QuantArgs):
    if args.observer in ("kl", "kl_improved"):
        if g.shape[0] != 1:
            raise ValueError(f"observer {args.observer!r} calibrates one threshold per tensor (activations); use "
                             f"granularity='tensor'")
        from .kl import improved_kl_threshold, kl_threshold

        pick = kl_threshold if args.observer == "kl" else improved_kl_threshold
        t = torch.tensor([[pick(g.reshape(-1).float(), num_quant_levels=args.qmax + 1)]], device=g.device)
        return -t * args.clip_ratio, t * args.clip_ratio
    if args.observer == "percentile":
        hi = torch.quantile(g.float(), args.percentile, dim=-1, keepdim=True)
        lo = torch.quantile(g.float(), 1 - args.percentile, dim=-1, keepdim=True)
    else:
        lo, hi = g.amin(-1, keepdim=True).float(), g.amax(-1, keepdim=True).float()
    return lo.clamp(max=0) * args.clip_ratio, hi.clamp(min=0) * args.clip_ratio


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, args: QuantArgs):
    """(scale, zero) of a given range [lo <= 0 <= hi] (e.g. learned clipping bounds); differentiable in lo / hi."""
    return _scale_zero(lo, hi, args)


def _scale_zero(lo, hi, args: QuantArgs):
    if args.symmetric:
        scale = torch.maximum(-lo, hi) / (args.qmax + (0.5 if args.sym_scale == "half" else 0))
        zero = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / (args.qmax - args.qmin)
        zero = torch.round(-lo / scale.clamp(min=1e-12)).clamp(args.qmin, args.qmax)
    return scale.clamp(min=1e-8), zero


def compute_qparams(x: torch.Tensor, args: QuantArgs):
    """Return (scale, zero) in float32 with the layout described in the module docstring."""
    g = _grouped(x.detach(), args)
    lo, hi = _range(g, args)
    scale, zero = _scale_zero(lo, hi, args)
    if args.observer == "mse":
        scale, zero = _mse_search(g, lo, hi, args, scale, zero, max_shrink=args.mse_max_shrink)
    return _ungroup_params(scale, x, args), _ungroup_params(zero, x, args)


def _ungroup_params(p: torch.Tensor, x: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    if args.granularity == "group":
        return p.squeeze(-1)  # [..., n_groups]
    if args.granularity == "tensor":
        return p.reshape(1)
    return p  # [..., 1]


def _mse_search(g, lo, hi, args, best_scale, best_zero, grid: int = 80, max_shrink: float = 0.8, norm: float = 2.4):
    """Shrink the range step by step and keep, per scale, the one with the least |x - Q(x)|^2.4 error: the clipping
    search of the GPTQ reference and QuaRot's WeightQuantizer (max_shrink 0.8, norm 2.4; they step 1/100, this 1/80),
    over the scale `args.sym_scale` gives. compressed-tensors' MSE observer shrinks by at most 0.2 (steps of 1/100)
    from max|x| / (qmax + 1/2): `QuantArgs(sym_scale="half", mse_max_shrink=0.2)` is that search."""
    best_err = torch.full_like(best_scale, float("inf"))
    g = g.float()
    for i in range(int(max_shrink * grid)):
        p = 1 - i / grid
        scale, zero = _scale_zero(lo * p, hi * p, args)
        q = torch.clamp(torch.round(g / scale) + zero, args.qmin, args.qmax)
        err = ((q - zero) * scale - g).abs().pow(norm).sum(-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _expand(p: torch.Tensor, x: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Broadcast a scale/zero over x: group scales repeat over their group; scalars stay scalars."""
    if args.granularity == "group" and p.dim() > 0:
        return p.repeat_interleave(args.group_size, dim=-1)
    return p


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Integers in [qmin, qmax] as int16 (wide enough for the unsigned 8-bit range)."""
    s, z = _expand(scale, x, args), _expand(zero, x, args)
    return torch.clamp(torch.round(x.float() / s) + z, args.qmin, args.qmax).to(torch.int16)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, args: QuantArgs,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    s, z = _expand(scale.float(), q, args), _expand(zero.float(), q, args)
    return ((q.float() - z) * s).to(dtype)


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def fake_quantize(x: torch.Tensor, args: QuantArgs, scale: torch.Tensor | None = None,
                  zero: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize in x's dtype; gradients pass straight through the rounding (and to the scale,
    LSQ-style, when the scale is a tensor that requires grad)."""
    if scale is None:
        scale, zero = compute_qparams(x, args)
    s, z = _expand(scale, x, args).to(x.dtype), _expand(zero, x, args).to(x.dtype)
    q = torch.clamp(_RoundSTE.apply(x / s) + z, args.qmin, args.qmax)
    return (q - z) * s


def fake_quantize_minmax(x: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Fake-quantization whose min/max scale stays in the graph (as QuaRot/SpinQuant/OSTQuant's quantizers): the
    rounding is straight-through and the gradient also reaches x through the scale, so training can learn to shrink
    the ranges (outliers). `fake_quantize` alone computes dynamic scales from a detached x."""
    g = _grouped(x, args)
    lo, hi = _range(g, args)
    scale, zero = _scale_zero(lo, hi, args)
    return fake_quantize(x, args, _ungroup_params(scale, x, args), _ungroup_params(zero.detach(), x, args))
