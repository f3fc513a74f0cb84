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

import torch

MANTISSA_BITS = 8


def rshift_round(x: torch.Tensor, s: torch.Tensor | int) -> torch.Tensor:
    """round(x / 2^s) for integer x and s >= 0 (half up), by an add and an arithmetic shift."""
    s = torch.as_tensor(s, dtype=torch.int64, device=x.device)
    half = torch.where(s > 0, torch.ones_like(s) << (s - 1).clamp(min=0), torch.zeros_like(s))
    return (x + half) >> s


def bit_length(x: torch.Tensor) -> torch.Tensor:
    """Number of bits of each non-negative int64 (0 for 0), by a binary search of shifts."""
    x = x.to(torch.int64)
    n = torch.zeros_like(x)
    for step in (32, 16, 8, 4, 2, 1):
        big = (x >> step) > 0
        n = n + big * step
        x = torch.where(big, x >> step, x)
    return n + (x > 0)


def dyadic(scale: torch.Tensor, bits: int = MANTISSA_BITS) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, k) int64 with m / 2^k the closest such value to each positive float `scale`, m < 2^bits: the one place a
    float scale (from calibration) becomes integer parameters."""
    scale = torch.as_tensor(scale, dtype=torch.float64)
    if (scale <= 0).any():
        raise ValueError("dyadic scales must be positive")
    k = torch.floor(torch.log2((2**bits - 1) / scale)).to(torch.int64)
    m = torch.round(scale * torch.pow(2.0, k.double())).to(torch.int64)
    over = m >= 2**bits  # rounding up past the mantissa range
    k, m = torch.where(over, k - 1, k), torch.where(over, torch.round(scale * torch.pow(2.0, (k - 1).double())), m)
    return m.to(torch.int64), k


def requantize(p: torch.Tensor, m: torch.Tensor, k: torch.Tensor, bits: int = 8, shift: int = 30):
    """Integers p with real value p * m / 2^k -> (q, m_q, k_q): q symmetric `bits`-bit per row (last dim reduced),
    the dynamic integer requantisation of DI-MatMul: q = round(p * M / 2^S), M = floor(2^S * qmax / max|p|) with S
    per row such that M has about `shift` bits,
    and the new scale m * max|p| / (qmax * 2^k) re-encoded dyadically with integer arithmetic only."""
    qmax = 2 ** (bits - 1) - 1
    p = p.to(torch.int64)
    t = (bit_length(p.abs().amax(-1, keepdim=True)) - 31).clamp(min=0)  # rows beyond 31 bits: drop low bits first,
    p, k = rshift_round(p, t), k - t  # so p * M stays inside int64 and M keeps its precision
    a = p.abs().amax(-1, keepdim=True).clamp(min=1)
    sh = bit_length(a) + shift - bit_length(torch.tensor(qmax))  # M ~ 2^shift: p * M < 2^(31 + shift + 1)
    M = (torch.ones_like(a) << sh) * qmax // a
    q = rshift_round(p * M, sh).clamp(-qmax - 1, qmax)
    # new scale = num / (qmax * 2^k), num = m * a: choose k_q with m_q = num * 2^k_q / (qmax * 2^k) in [128, 255]
    num = m.to(torch.int64) * a
    e = bit_length(num // qmax) - MANTISSA_BITS  # num / qmax in [2^(e + 7), 2^(e + 8))
    k_q = k - e
    m_q = torch.where(e >= 0, rshift_round(num // qmax, e.clamp(min=0)), (num << (-e).clamp(min=0)) // qmax)
    while bool((m_q >= 2**MANTISSA_BITS).any()):  # at most one step: the bit-length estimate is off by one
        big = m_q >= 2**MANTISSA_BITS
        m_q, k_q = torch.where(big, rshift_round(m_q, 1), m_q), torch.where(big, k_q - 1, k_q)
    return q, m_q, k_q


def di_exp(x: torch.Tensor, m: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """exp of non-positive integers x (real x * m / 2^k) by shifts: x log2(e) ~ x + x/2 - x/16, split into integer
    part q and fraction r, 2^-r ~ 1 - r/2. Returns (e, k): e * 2^-k ~ exp(x real)."""
    x = x.to(torch.int64)
    if (x > 0).any():
        raise ValueError("di_exp takes non-positive inputs (subtract the row maximum first)")
    t = x + (x >> 1) - (x >> 4)  # ~ 1.4375 x
    v = -t * m  # real -x log2(e) = v / 2^k >= 0
    q = v >> k
    r = v - (q << k)
    one = torch.ones_like(r) << k
    return (one - (r >> 1)) >> q.clamp(max=62), k


def di_softmax(a: torch.Tensor, m: torch.Tensor, k: torch.Tensor, clip: float | None = 15.0,
               out_bits: int = 8) -> torch.Tensor:
    """DI-ClippedSoftmax over the last dim of integer logits a (real a * m / 2^k): the row maximum subtracted, logits
    more than `clip` (real units) below it clipped, DI-Exp, then an integer division. Returns probabilities as
    integers with scale 2^-out_bits (rows sum to about 2^out_bits)."""
    a = a.to(torch.int64)
    x = a - a.amax(-1, keepdim=True)
    if clip is not None:  # -clip in the logits' integer units: floor(clip * 2^k / m)
        lo = -((torch.ones_like(m) << k) * int(round(clip * 2**16)) // (m * 2**16))
        x = torch.maximum(x, lo)
    e, _ = di_exp(x, m, k)  # the exponentials' scale cancels in the division
    total = e.sum(-1, keepdim=True).clamp(min=1)
    return (((e << out_bits) + (total >> 1)) // total).clamp(max=2**out_bits - 1)  # rounded, not floored


def isqrt(n: torch.Tensor) -> torch.Tensor:
    """floor(sqrt(n)) of non-negative int64, by Newton's iteration from a power-of-two upper bound (integer ops)."""
    n = n.to(torch.int64)
    x = torch.ones_like(n) << ((bit_length(n) + 1) >> 1)  # >= sqrt(n)
    for _ in range(40):  # converges quadratically; 40 bounds the worst case, the loop stops when nothing moves
        y = (x + n // x.clamp(min=1)) >> 1
        done = y >= x
        x = torch.where(done, x, y)
        if bool(done.all()):
            break
    return x


def di_rmsnorm(x: torch.Tensor, m: torch.Tensor, k: torch.Tensor, gamma_m: torch.Tensor, gamma_k: torch.Tensor,
               eps: float = 1e-6, frac_bits: int = 16, bits: int = 8):
    """Integer RMSNorm of x (real x * m / 2^k per token) with weight gamma = gamma_m / 2^gamma_k per channel:
    x / sqrt(mean(x^2) + eps) * gamma, requantised per token to `bits`. The token scale cancels in x / rms, so the
    integer path is x * 2^frac_bits // isqrt(mean of x^2 + eps in x's units), then the gamma multiplier."""
    x = x.to(torch.int64)
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
    p = y * gamma_m  # real y * gamma_m / 2^(f + gamma_k)
    return requantize(p, torch.ones_like(m), gamma_k + f, bits)


def di_silu_mul(x1: torch.Tensor, m1: torch.Tensor, k1: torch.Tensor, x2: torch.Tensor, m2: torch.Tensor,
                k2: torch.Tensor, sigmoid_bits: int = 15, bits: int = 8):
    """DI-SwiGLU: silu(x1) * x2 for integer x1, x2 (per-token dyadic scales), requantised per token.
    sigmoid(x) = e^(x - max(x, 0)) / (e^(-max(x, 0)) + e^(x - max(x, 0))): both exponents are <= 0 (DI-Exp)."""
    x1 = x1.to(torch.int64)
    pos = x1.clamp(min=0)
    a, _ = di_exp(x1 - pos, m1, k1)  # a and b share the scale, which cancels in a / (a + b)
    b, _ = di_exp(-pos, m1, k1)
    sig = (a << sigmoid_bits) // (a + b).clamp(min=1)  # sigmoid * 2^sigmoid_bits
    p = x1 * sig * x2.to(torch.int64)  # real p * m1 m2 / 2^(k1 + k2 + sigmoid_bits)
    return requantize(p, m1 * m2, k1 + k2 + sigmoid_bits, bits)


def quantize_per_token(x: torch.Tensor, bits: int = 8):
    """The float -> integer step at the model's input (after the embedding lookup): symmetric per token, dyadic
    scales. Returns (q, m, k)."""
    qmax = 2 ** (bits - 1) - 1
    s = x.abs().amax(-1, keepdim=True).double().clamp(min=1e-12) / qmax
    m, k = dyadic(s)
    scale = m.double() / torch.pow(2.0, k.double())
    return torch.round(x.double() / scale).clamp(-qmax - 1, qmax).to(torch.int64), m, k


def dequantize(q: torch.Tensor, m: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Real values of (q, m, k), for tests and the logits."""
    return q.double() * m.double() / torch.pow(2.0, k.double())


def di_linear(x: torch.Tensor, mx: torch.Tensor, kx: torch.Tensor, w: torch.Tensor, mw: torch.Tensor,
              kw: int, bits: int = 8):
    """DI-MatMul for a linear layer: int8 activations x [t, in] (per-token m_x, k_x), int8 weights w [out, in] with
    per-channel multipliers mw [out] and one shift kw: P = x w^T (torch._int_mm, int32), P * mw folded per
    channel, then dynamic per-token requantisation to `bits`. Returns (q, m, k)."""
    p = torch._int_mm(x.to(torch.int8).contiguous(), w.to(torch.int8).t().contiguous()).to(torch.int64)
    return requantize(p * mw.to(torch.int64), mx, kx + kw, bits)
