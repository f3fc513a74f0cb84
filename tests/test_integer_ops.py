"""I-LLM's integer operators against float references over their input ranges (errors stated per operator)."""
import pytest
import torch

from hfq.integer.ops import (bit_length, dequantize, di_exp, di_linear, di_rmsnorm, di_silu_mul, di_softmax, dyadic,
                             isqrt, quantize_per_token, requantize)

INTS = (torch.int64, torch.int32, torch.int16, torch.int8)


def _row_rel(got, ref):
    return ((got - ref).abs().amax(-1) / ref.abs().amax(-1)).max().item()


def test_dyadic_scales_are_8_bit_mantissas_within_half_a_percent():
    """Catches a mantissa outside 8 bits (128..255) or a scale off by more than the 8-bit rounding (< 0.4%), over
    scales from 1e-6 to 100."""
    s = torch.rand(2000, generator=torch.Generator().manual_seed(0)).double() * \
        10 ** torch.empty(2000).uniform_(-6, 2, generator=torch.Generator().manual_seed(1)).double()
    m, k = dyadic(s)
    assert m.min() >= 128 and m.max() <= 255 and k.dtype == torch.int64
    assert ((m.double() / 2.0 ** k.double() - s).abs() / s).max() < 2 ** -8
    with pytest.raises(ValueError):
        dyadic(torch.tensor([0.0]))


def test_bit_length_and_isqrt_are_exact():
    """Catches an off-by-one in the integer square root (floor) or in the bit length it starts from, up to 2^62."""
    big = torch.randint(0, 2**62, (20000,), generator=torch.Generator().manual_seed(2))
    n = torch.cat([torch.arange(0, 2000), big])
    assert torch.equal(bit_length(n), torch.tensor([int(v).bit_length() for v in n.tolist()]))
    r = isqrt(n)
    assert bool((r * r <= n).all()) and bool(((r + 1) * (r + 1) > n).all())


def test_di_exp_max_error():
    """Catches a wrong integer exp (the log2(e) multiplier, the integer/fraction split, the second-order 2^-r
    polynomial): over x in [-15, 0] its absolute error stays under 0.003, it is exactly 1 at x = 0, and it never
    increases with x decreasing."""
    x = torch.linspace(-15, 0, 3001).double()
    m, k = dyadic(torch.tensor(15 / 2**15))
    q = torch.round(x / (m.double() / 2.0**k.double())).long()
    e, ek = di_exp(q, m, k)
    got = e.double() / 2.0**ek.double()
    ref = torch.exp(dequantize(q, m, k))
    assert (got - ref).abs().max() < 0.003 and got[-1] == 1.0
    assert bool((got[1:] >= got[:-1]).all())
    with pytest.raises(ValueError, match="non-positive"):
        di_exp(torch.tensor([1]), m, k)


def test_di_softmax_max_error_and_clip():
    """Catches a softmax that is not normalised per row, loses mass to floored divisions, ignores the clip, or
    leaves integers: 8-bit probabilities within 0.02 of the float softmax of the same logits."""
    a = torch.randn(64, 128, generator=torch.Generator().manual_seed(3)).double() * 3
    m, k = dyadic(torch.tensor(a.abs().max().item() / 2**20))
    qa = torch.round(a / (m.double() / 2.0**k.double())).long()
    p = di_softmax(qa, m, k, clip=15.0, out_bits=8)
    assert p.dtype in INTS and p.min() >= 0 and p.max() <= 255
    got = p.double() / 256
    assert (got - torch.softmax(dequantize(qa, m, k), -1)).abs().max() < 0.02
    assert (got.sum(-1) - 1).abs().max() < 0.06
    # a clip of 2 (real units) raises every logit more than 2 below the row max to max - 2
    tight = di_softmax(qa, m, k, clip=2.0).double() / 256
    x = dequantize(qa, m, k)
    ref = torch.softmax(torch.maximum(x, x.amax(-1, keepdim=True) - 2), -1)
    assert (tight - ref).abs().max() < 0.02


def test_di_rmsnorm_max_error():
    """Catches an integer RMSNorm whose token scale does not cancel, whose eps term overflows or is in the wrong
    units, or whose gamma multiplier is misapplied: within 1.5% of the row maximum over rows whose magnitudes span
    1e-2 .. 1e2."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(16, 256, generator=g).double() * torch.logspace(-2, 2, 16).double()[:, None]
    gamma = torch.rand(256, generator=g).double() + 0.5
    q, m, k = quantize_per_token(x)
    gk = int(dyadic(gamma)[1].max())
    gm = torch.round(gamma * 2.0**gk).long()
    yq, ym, yk = di_rmsnorm(q, m, k, gm, torch.tensor(gk))
    assert yq.dtype in INTS and yq.abs().max() <= 128
    ref = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * gamma
    assert _row_rel(dequantize(yq, ym, yk), ref) < 0.015


def test_di_silu_mul_max_error():
    """Catches a wrong integer sigmoid (the two non-positive exponents of sigmoid(x) = e^(x - max(x,0)) /
    (e^-max(x,0) + e^(x - max(x,0)))) or a wrong output scale: SiLU(x1) * x2 within 0.6% of the row maximum (one
    8-bit output step is 0.4%); with FSBR's per-channel 1/s inside the sigmoid, x1 sigmoid(x1 / s) x2 likewise."""
    g = torch.Generator().manual_seed(5)
    x1, x2 = torch.randn(16, 256, generator=g).double() * 4, torch.randn(16, 256, generator=g).double()
    q1, m1, k1 = quantize_per_token(x1)
    q2, m2, k2 = quantize_per_token(x2)
    zq, zm, zk = di_silu_mul(q1, m1, k1, q2, m2, k2)
    ref = torch.nn.functional.silu(dequantize(q1, m1, k1)) * dequantize(q2, m2, k2)
    assert _row_rel(dequantize(zq, zm, zk), ref) < 0.006
    s = torch.rand(256, generator=g).double() * 4 + 0.25
    ms, ks = dyadic(1 / s)
    ks_max = ks.max()
    zq, zm, zk = di_silu_mul(q1, m1, k1, q2, m2, k2, inv_s=(ms << (ks_max - ks), ks_max))
    x1r = dequantize(q1, m1, k1)
    ref = x1r * torch.sigmoid(x1r / s) * dequantize(q2, m2, k2)
    assert _row_rel(dequantize(zq, zm, zk), ref) < 0.006


def test_di_linear_equals_the_dequantized_matmul_up_to_requantisation():
    """Catches DI-MatMul folding the per-channel weight multipliers (each channel its own shift) or the token scales
    wrongly, an output scale off its dyadic encoding (8-bit mantissa), or an int8 overflow: within one output step
    (1/127 of the row max)."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(32, 256, generator=g).double()
    w = torch.randn(64, 256, generator=g).double() * torch.logspace(-3, 0, 64).double()[:, None]
    qx, mx, kx = quantize_per_token(x)
    mw, kw = dyadic(w.abs().amax(1) / 127)
    qw = torch.round(w / (mw.double() / 2.0**kw.double())[:, None]).clamp(-128, 127).long()
    yq, ym, yk = di_linear(qx, mx, kx, qw.to(torch.int8).t().contiguous(), mw, kw, bits=8)
    assert yq.abs().max() <= 127 and ym.min() >= 128 and ym.max() <= 255
    ref = dequantize(qx, mx, kx) @ (qw.double() * (mw.double() / 2.0**kw.double())[:, None]).t()
    assert _row_rel(dequantize(yq, ym, yk), ref) < 1 / 127


def test_requantize_keeps_integers_in_range():
    """Catches requantisation outputs outside the signed range or scales that do not describe them, a scale that
    clips the row maximum (its 8-bit mantissa must be rounded up), and a per-row gain error (the integers must be
    exact for the stored scale: within half a step of the value, as a float requantisation would be)."""
    p = torch.randint(-2**40, 2**40, (8, 64), generator=torch.Generator().manual_seed(7))
    m, k = torch.full((8, 1), 200), torch.full((8, 1), 30)
    q, mq, kq = requantize(p, m, k, bits=4)
    assert q.min() >= -8 and q.max() <= 7
    assert _row_rel(dequantize(q, mq, kq), dequantize(p, m, k)) < 1 / 7
    p = torch.randint(-2**20, 2**20, (64, 256), generator=torch.Generator().manual_seed(8))
    for m, k in ((torch.full((64, 1), 173), torch.full((64, 1), 25)), (torch.full((64, 1), 3 << 20), torch.full((64, 1), 40))):
        q, mq, kq = requantize(p, m, k, bits=8)
        real, step = dequantize(p, m, k), dequantize(torch.ones_like(mq), mq, kq)
        assert ((dequantize(q, mq, kq) - real).abs() <= step / 2 * (1 + 1e-9)).all()
        assert (real.abs().amax(-1, keepdim=True) <= 127 * step * (1 + 1e-12)).all()
