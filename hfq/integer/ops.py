"""Integer-only operators of I-LLM (Hu et al., 2024; llm.md §2.2, reconstructed from the paper: there is no official
code). Every input and output is an integer tensor; every scale is dyadic, s = m / 2^k with m an 8-bit integer and
k a small non-negative integer, so rescaling is a multiply and a shift. Element-wise work is vectorised torch integer
arithmetic (int64); matmuls are int8 x int8 -> int32 (`torch._int_mm`).

Conventions (ours where the paper is silent, tested in tests/test_integer_ops.py against float references):
- a quantized tensor is (q, m, k): real value q * m / 2^k, with m and k per token ([..., 1]) or per channel;
- activations are symmetric int8 per token (the paper's asymmetric DI-MatMul input is replaced by symmetric, which
  `torch._int_mm` takes directly); rounding is round-half-up via (x + 2^(s-1)) >> s.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

MANTISSA_BITS = 8
ALIGN_CAP = 20  # most bits a column is shifted left when columns with different scales are brought to one


class IntTensor(NamedTuple):
    """An integer tensor with its dyadic scale: real value q * m / 2^k (m, k int64, broadcastable to q)."""

    q: torch.Tensor
    m: torch.Tensor
    k: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.q, self.m, self.k)


def rshift_round(x: torch.Tensor, s: torch.Tensor | int) -> torch.Tensor:
    """round(x / 2^s) for integer x and s >= 0 (half up), by an add and an arithmetic shift."""
    s = torch.as_tensor(s, dtype=torch.int64, device=x.device)
    return (x + ((torch.ones_like(s) << s) >> 1)) >> s


def shift(x: torch.Tensor, s: torch.Tensor | int) -> torch.Tensor:
    """x * 2^s for integer x and integer s of any sign: a left shift, or a rounded right shift."""
    s = torch.as_tensor(s, dtype=torch.int64, device=x.device)
    return torch.where(s >= 0, x << s.clamp(min=0), rshift_round(x, (-s).clamp(min=0)))


def align(p: torch.Tensor, m: torch.Tensor, k: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Integers p whose entries along `dim` have their own dyadic scales m / 2^k (e.g. a matmul's output columns
    with per-channel weight scales, or key tokens with per-token scales) -> (p', K) with one scale 1 / 2^K along
    `dim`: p' = p * m * 2^(K - k). K is the finest k, or at most ALIGN_CAP bits above the coarsest, so no entry is
    shifted left by more than ALIGN_CAP (int64 headroom); entries finer than K are rounded."""
    k = torch.as_tensor(k, dtype=torch.int64, device=p.device)
    K = torch.minimum(k.amax(dim, keepdim=True), k.amin(dim, keepdim=True) + ALIGN_CAP)
    return shift(p.to(torch.int64) * m.to(torch.int64), K - k), K


_POW2 = torch.ones(63, dtype=torch.int64) << torch.arange(63)  # a constant for torch.compile (no guard on a cache)


def bit_length(x: torch.Tensor) -> torch.Tensor:
    """Number of bits of each non-negative int64 (0 for 0): how many powers of two are <= x, a compare-and-count
    that inductor fuses (torch.searchsorted is an extern op that splits its loops)."""
    x = x.to(torch.int64)
    pow2 = _POW2 if x.device.type == "cpu" else _POW2.to(x.device)
    return (x.unsqueeze(-1) >= pow2).sum(-1)


def dyadic(scale: torch.Tensor, bits: int = MANTISSA_BITS, up: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, k) int64 with m / 2^k the closest such value to each positive float `scale`, m < 2^bits: the one place a
    float scale (from calibration) becomes integer parameters. up=True: the smallest such value >= scale (the scale
    a float is quantized with, so its maximum never clips)."""
    scale = torch.as_tensor(scale, dtype=torch.float64)
    if (scale <= 0).any():
        raise ValueError("dyadic scales must be positive")
    rounding = torch.ceil if up else torch.round
    k = torch.floor(torch.log2((2**bits - 1) / scale)).to(torch.int64)
    m = rounding(scale * torch.pow(2.0, k.double())).to(torch.int64)
    over = m >= 2**bits  # rounding up past the mantissa range
    k, m = torch.where(over, k - 1, k), torch.where(over, rounding(scale * torch.pow(2.0, (k - 1).double())), m)
    return m.to(torch.int64), k


def requantize(p: torch.Tensor, m: torch.Tensor, k: torch.Tensor, bits: int = 8, precision: int = 30):
    """Integers p with real value p * m / 2^k -> (q, m_q, k_q): q symmetric `bits`-bit per row (last dim reduced),
    the dynamic integer requantisation of DI-MatMul. The new scale m * max|p| / (qmax * 2^k) is first encoded
    dyadically, rounded UP (m_q / 2^k_q, m_q 8-bit), then q = round(p * M / 2^S) with the integer multiplier
    M = floor(2^S * m / (2^(k - k_q) * m_q)) (S per row, M ~ 2^precision): q is exact for the scale it is stored
    with (no per-token gain error from the 8-bit mantissa) and never clips."""
    qmax = 2 ** (bits - 1) - 1
    p, m = p.to(torch.int64), m.to(torch.int64)
    t = (bit_length(p.abs().amax(-1, keepdim=True)) - 31).clamp(min=0)  # rows beyond 31 bits: drop low bits first,
    p, k = rshift_round(p, t), k - t  # so p * M stays inside int64
    a = p.abs().amax(-1, keepdim=True).clamp(min=1)
    num = m * a  # new scale = num / (qmax * 2^k)
    e = bit_length(num // qmax) - MANTISSA_BITS  # num / qmax in [2^(e + 7), 2^(e + 8))
    den = torch.where(e >= 0, qmax * (torch.ones_like(e) << e.clamp(min=0)), torch.full_like(e, qmax))
    m_q = (torch.where(e >= 0, num, num << (-e).clamp(min=0)) + den - 1) // den  # ceil(num / (qmax 2^e))
    big = m_q >= 2**MANTISSA_BITS  # the ceiling reached 2^8: one bit less
    m_q, e = torch.where(big, (m_q + 1) >> 1, m_q), torch.where(big, e + 1, e)
    sh = bit_length(a) + precision - bit_length(torch.tensor(qmax))  # M ~ 2^precision, p * M < 2^(31 + precision)
    M = shift(m, sh - e) // m_q  # ~ qmax * 2^sh / a
    q = rshift_round(p * M, sh).clamp(-qmax - 1, qmax)
    return q, m_q, k - e


LOG2E = 23637  # round(log2(e) * 2^14)
EXP_C1, EXP_C2 = 44281, 11682  # 2^-r ~ 1 - c1 r + c2 r^2 on [0, 1), least squares, 16 fractional bits
EXP_BITS = 16  # DI-Exp's output: e / 2^16
ISQRT_STEPS = 7


def di_exp(x: torch.Tensor, m: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """exp of non-positive integers x (real x * m / 2^k): -x log2(e) (an integer multiply, 14 fractional bits) split
    into an integer part q and a fraction r; 2^-r by a second-order integer polynomial, then a right shift by q.
    Returns (e, EXP_BITS): e / 2^16 ~ exp(x real), max abs error 0.003 (see tests).
    The paper's shift-only form (x log2 e ~ x + x/2 - x/16, 2^-r ~ 1 - r/2; llm.md §2.2, reconstructed) measured
    max error 0.043 and a 4% error of SiLU around x = -1; this keeps the same structure with a multiply."""
    x = x.to(torch.int64)
    if not torch.compiler.is_compiling() and bool((x > 0).any()):
        raise ValueError("di_exp takes non-positive inputs (subtract the row maximum first)")
    v = ((-x * m) * LOG2E) >> 14  # real -x log2(e) = v / 2^k >= 0
    q = v >> k
    r = shift(v - (q << k), EXP_BITS - k)  # the fraction with 16 fractional bits, in [0, 2^16]
    p = (torch.ones_like(r) << EXP_BITS) - ((r * (EXP_C1 - ((r * EXP_C2) >> EXP_BITS))) >> EXP_BITS)
    return p >> q.clamp(max=62), torch.full_like(k, EXP_BITS) if torch.is_tensor(k) else EXP_BITS


def clipped_exp(a: torch.Tensor, m: torch.Tensor, k: torch.Tensor, clip: float | None = 15.0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """The numerators of DI-ClippedSoftmax over the last dim of integer logits a (real a * m / 2^k): the row maximum
    subtracted, logits more than `clip` (real units) below it raised to max - clip, DI-Exp. mask (bool, True = keep):
    masked entries get 0 and do not count in the maximum. The exponentials' scale 2^-k cancels in the
    normalisation, so it is not returned."""
    a = a.to(torch.int64)
    if mask is not None:
        a = torch.where(mask, a, torch.iinfo(torch.int64).min // 2)
    x = a - a.amax(-1, keepdim=True)
    if clip is not None:  # -clip in the logits' integer units: floor(clip * 2^k / m)
        lo = -((torch.ones_like(m) << k) * int(round(clip * 2**16)) // (m * 2**16))
        x = torch.maximum(x, lo)
    e, _ = di_exp(x, m, k)
    return e if mask is None else torch.where(mask, e, 0)


def di_softmax(a: torch.Tensor, m: torch.Tensor, k: torch.Tensor, clip: float | None = 15.0,
               out_bits: int = 8) -> torch.Tensor:
    """DI-ClippedSoftmax over the last dim of integer logits a (real a * m / 2^k): `clipped_exp`, then an integer
    division. Returns probabilities as integers with scale 2^-out_bits (rows sum to about 2^out_bits)."""
    e = clipped_exp(a, m, k, clip)
    total = e.sum(-1, keepdim=True).clamp(min=1)
    return (((e << out_bits) + (total >> 1)) // total).clamp(max=2**out_bits - 1)  # rounded, not floored


def isqrt(n: torch.Tensor) -> torch.Tensor:
    """floor(sqrt(n)) of non-negative int64, by Newton's iteration from a power-of-two upper bound (integer ops).
    From that start, 5 updates reach the floor for every n < 2^62 (checked over 2^0 .. 2^62 and 300k random n);
    ISQRT_STEPS = 7 is a fixed count, so the loop has no data-dependent exit (torch.compile traces it whole)."""
    n = n.to(torch.int64)
    x = torch.ones_like(n) << ((bit_length(n) + 1) >> 1)  # >= sqrt(n)
    for _ in range(ISQRT_STEPS):
        x = torch.minimum(x, (x + n // x.clamp(min=1)) >> 1)
    return x


def di_rmsnorm(x: torch.Tensor, m: torch.Tensor, k: torch.Tensor, gamma_m: torch.Tensor, gamma_k: torch.Tensor,
               eps: float = 1e-6, frac_bits: int = 16, bits: int = 8):
    """Integer RMSNorm of x (real x * m / 2^k per token) with weight gamma = gamma_m / 2^gamma_k per channel (gamma_m
    signed; gamma_k one shift or one per channel):
    x / sqrt(mean(x^2) + eps) * gamma, requantised per token to `bits`. The token scale cancels in x / rms, so the
    integer path is x * 2^frac_bits // isqrt(mean of x^2 + eps in x's units), then the gamma multiplier."""
    x = x.to(torch.int64)
    t = (bit_length(x.abs().amax(-1, keepdim=True)) - 16).clamp(min=0)  # at most 16 bits: x^2 sums and the
    x, k = rshift_round(x, t), k - t  # 2 * frac_bits shifts below stay inside int64 (the norm is scale-free)
    d = x.shape[-1]
    ms = (x * x).sum(-1, keepdim=True) // d
    # eps / s^2 in x's integer units, s = m / 2^k: eps * 2^(2k) / m^2, with eps as eps_fixed / 2^40 (no overflow
    # for 2k < 80)
    eps_fixed = torch.full_like(ms, int(round(eps * 2**40)))
    shift = 2 * k - 40
    ms = ms + torch.where(shift >= 0, eps_fixed << shift.clamp(min=0), eps_fixed >> (-shift).clamp(min=0)) // (m * m)
    # x / rms with frac_bits fractional bits; rms is taken with 2*f extra bits so the division keeps precision
    f = frac_bits
    rms = isqrt(ms << (2 * f)).clamp(min=1)  # sqrt(ms) * 2^f
    y = (x << (2 * f)) // rms  # (x / sqrt(ms)) * 2^f
    p, K = align(y, gamma_m, gamma_k)  # real p / 2^(f + K)
    return requantize(p, torch.ones_like(m), K + f, bits)


def di_silu_mul(x1: torch.Tensor, m1: torch.Tensor, k1: torch.Tensor, x2: torch.Tensor, m2: torch.Tensor,
                k2: torch.Tensor, sigmoid_bits: int = 15, bits: int = 8, inv_s: tuple | None = None):
    """DI-SwiGLU: silu(x1) * x2 for integer x1, x2 (per-token dyadic scales), requantised per token.
    sigmoid(x) = e^(x - max(x, 0)) / (e^(-max(x, 0)) + e^(x - max(x, 0))): both exponents are <= 0 (DI-Exp).
    inv_s = (m_s [channels], k_s): FSBR's gate/up smoothing, x1 * sigmoid(x1 / s) * x2 with 1/s = m_s / 2^k_s per
    channel (the sigmoid's argument is x1's integers at the scale m1 * m_s / 2^(k1 + k_s))."""
    x1 = x1.to(torch.int64)
    ms, ks = (m1, k1) if inv_s is None else (m1 * inv_s[0], k1 + inv_s[1])
    pos = x1.clamp(min=0)
    a, _ = di_exp(x1 - pos, ms, ks)  # a and b share the scale, which cancels in a / (a + b)
    b, _ = di_exp(-pos, ms, ks)
    sig = (a << sigmoid_bits) // (a + b).clamp(min=1)  # sigmoid * 2^sigmoid_bits
    p = x1 * sig * x2.to(torch.int64)  # real p * m1 m2 / 2^(k1 + k2 + sigmoid_bits)
    return requantize(p, m1 * m2, k1 + k2 + sigmoid_bits, bits)


def quantize_per_token(x: torch.Tensor, bits: int = 8):
    """The float -> integer step at the model's input (after the embedding lookup): symmetric per token, dyadic
    scales. Returns (q, m, k)."""
    qmax = 2 ** (bits - 1) - 1
    s = x.abs().amax(-1, keepdim=True).double().clamp(min=1e-12) / qmax
    m, k = dyadic(s, up=True)
    scale = m.double() / torch.pow(2.0, k.double())
    return torch.round(x.double() / scale).clamp(-qmax - 1, qmax).to(torch.int64), m, k


def dequantize(q: torch.Tensor, m: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Real values of (q, m, k), for tests and the logits."""
    return q.double() * m.double() / torch.pow(2.0, k.double())


def di_linear(q: torch.Tensor, m: torch.Tensor, k: torch.Tensor, w_t: torch.Tensor, mw: torch.Tensor, kw: torch.Tensor,
              bits: int = 16):
    """DI-MatMul for a linear layer: activations q [..., in] of at most 8 bits with per-token (m, k) [..., 1], int8
    weights w_t [in, out] (transposed) with per-channel multipliers (mw, kw) [out]: P = q w (`torch._int_mm`, int32
    accumulator), the channel multipliers folded into one shift per row (`align`), then dynamic per-token
    requantisation to `bits`. Returns (q, m, k)."""
    shape = q.shape
    p = torch._int_mm(q.reshape(-1, shape[-1]).to(torch.int8), w_t).to(torch.int64)
    p, K = align(p, mw, kw)
    y = requantize(p, m.reshape(-1, 1), k.reshape(-1, 1) + K, bits)
    return tuple(t.reshape(*shape[:-1], -1) for t in y)
