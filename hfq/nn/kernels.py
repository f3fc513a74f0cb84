"""CPU matmuls on packed weights through torch's own weight-only kernels (no compiled extension of ours).

torch ships `_weight_int4pack_mm_for_cpu` (4-bit, group scales + zero offsets) and `_weight_int8pack_mm` (8-bit,
per-channel scales). Both are fast only in bfloat16: on this machine (2 threads, AVX512-BF16) the 210 linears of
SmolLM2-135M at one token take 2.5 ms (int4) / 4.7 ms (int8) in bf16, against 25.6 ms for fp32 `F.linear` and
85 / 36 ms for the same kernels in fp32 (fp16: slower still). So every call runs in bf16 and casts back: the
activations (and the kernel's scales) are rounded to bf16, an extra relative error of ~0.3% per output, far below
the 4-bit weight error (measured as perplexity in benchmarks/cpu_speed.py).

Every packed format maps onto them exactly:
- bits <= 4, any granularity: one int4 "plane". tinygemm computes (u - 8) * s + z per group of `gs` (32..256)
  inputs, u the unsigned code; hfq's w = (q - zero) * s with q = v + qmin, v unsigned, so u = v and
  z = (8 + qmin - zero) * s. Per-channel / per-tensor scales and group sizes that are multiples of 32 repeat over
  tinygemm groups.
- 5..8 bits with group scales or zero points: two int4 planes, v = 16 h + l: (h, 16 s, (128 + qmin - zero) s) and
  (l, s, 8 s); the two products add up to x @ w.T.
- 5..8 bits, symmetric per channel / tensor: `_weight_int8pack_mm` (one 8-bit read instead of two 4-bit ones).
Quantized activations enter as their integers x_int = q - zero (|x_int| <= 255: exact in bf16) and the output is
multiplied by the activation scale in fp32 — the same sum as the reference's fake-quantized x @ dequantized w.
"""
from __future__ import annotations

import torch

from ..quant import QuantArgs

INT4_GROUPS = (256, 128, 64, 32)


def available() -> bool:
    """Whether this torch has the CPU weight-only ops (torch >= 2.5)."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_weight_int8pack_mm")


def _tinygemm_group(args: QuantArgs, in_features: int) -> int:
    span = args.group_size if args.granularity == "group" else in_features
    return next(g for g in INT4_GROUPS if span % g == 0)


def int4_planes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, args: QuantArgs):
    """Integer weights q [N, K] (values in [qmin, qmax]), scale [N, n_groups] (or [1, 1] / [N, 1]) and uint8 zero
    points (asymmetric) -> (tinygemm group size, [(packed int4 weight, bf16 scale-and-zero [K/gs, N, 2])]).

    The kernel's zero term is rounded to bf16 like its scale, and its error is relative to the term, not to the
    weight: so wherever the signed integers d = q - zero fit the kernel's own signed range (u - 8 in [-8, 7], or
    16 h + l with h in [-8, 7] for two planes) they are stored as such with a zero term of 0 (or 8 s, exact).
    Only 4-bit and 8-bit asymmetric weights (d up to +-15 / +-255) carry (8 + qmin - zero) s as the zero term
    (4-bit: one plane instead of two, at ~0.5% relative output error instead of ~0.2%: tests/test_nn.py)."""
    n, k = q.shape
    gs = _tinygemm_group(args, k)
    per = lambda t: t.float().expand(n, -1).repeat_interleave(k // gs // t.shape[1], dim=1)  # noqa: E731  [N, K/gs]
    s = per(scale)
    z = torch.zeros_like(s) if zero is None else per(zero)
    q = q.to(torch.int32)
    if args.symmetric:
        d, wide = q, args.bits
    else:
        d, wide = q - z.to(torch.int32).repeat_interleave(gs, dim=1), args.bits + 1  # d in [-(2^b - 1), 2^b - 1]
    v, offset = q - args.qmin, args.qmin - z  # unsigned codes: w = (v + offset) s
    if wide <= 4:  # one plane, u - 8 = d
        planes = [(d + 8, s, torch.zeros_like(s))]
    elif args.bits <= 4:  # 4-bit asymmetric: one plane of the codes, the zero point in the zero term
        planes = [(v, s, (8 + offset) * s)]
    elif wide <= 8:  # two planes, d = 16 h + l, h in [-8, 7], l in [0, 15]
        planes = [((d >> 4) + 8, 16 * s, torch.zeros_like(s)), (d & 15, s, 8 * s)]
    else:  # 8-bit asymmetric: two planes of the codes
        planes = [(v >> 4, 16 * s, (128 + offset) * s), (v & 15, s, 8 * s)]
    return gs, [(torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.contiguous(), 1),
                 torch.stack([sp.t(), zp.t()], -1).to(torch.bfloat16).contiguous()) for u, sp, zp in planes]


def int4_mm(x: torch.Tensor, gs: int, planes) -> torch.Tensor:
    """x [M, K] (any float dtype) @ the planes' weight.T -> [M, N] (bf16 for one plane, float32 for two)."""
    xb = x.to(torch.bfloat16).contiguous()
    y = None
    for w, sz in planes:
        p = torch._weight_int4pack_mm_for_cpu(xb, w, gs, sz)
        y = p if y is None else y.float() + p
    return y


def int8_weight(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric integer weights [N, K] and their per-channel / per-tensor scale -> (int8 [N, K], fp32 scale [N],
    bf16 scale [N]); int8 [N, K] also serves `torch._int_mm` as w8.t() (a view: measured as fast as a copy)."""
    s = scale.float().reshape(-1).expand(q.shape[0]).contiguous()
    return q.to(torch.int8).contiguous(), s, s.to(torch.bfloat16)


def int8_mm(x: torch.Tensor, w8: torch.Tensor, scale_bf16: torch.Tensor) -> torch.Tensor:
    """x [M, K] (any float dtype) @ (w8 * scale).T -> bf16 [M, N]."""
    return torch._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), w8, scale_bf16)
