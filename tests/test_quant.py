import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hfq.quant import QuantArgs, compute_qparams, dequantize, fake_quantize, pack, packed_shape, quantize, unpack


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), sym=st.booleans(), rows=st.integers(1, 4), n=st.integers(1, 70), seed=st.integers(0, 99))
def test_pack_unpack_round_trip(bits, sym, rows, n, seed):
    a = QuantArgs(bits=bits, symmetric=sym)
    q = torch.randint(a.qmin, a.qmax + 1, (rows, n), generator=torch.Generator().manual_seed(seed))
    packed = pack(q, bits, a.qmin)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, *packed_shape(n, bits))
    assert torch.equal(unpack(packed, bits, a.qmin, n), q.to(torch.int16))


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match="out of the 4-bit range"):
        pack(torch.tensor([[8]]), 4, -8)


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), sym=st.booleans(), gran=st.sampled_from(["tensor", "channel", "group"]),
       seed=st.integers(0, 99))
def test_quantize_dequantize_error_within_half_step(bits, sym, gran, seed):
    a = QuantArgs(bits=bits, symmetric=sym, granularity=gran, group_size=16 if gran == "group" else None)
    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(seed))
    scale, zero = compute_qparams(w, a)
    q = quantize(w, scale, zero, a)
    assert q.min() >= a.qmin and q.max() <= a.qmax
    err = (dequantize(q, scale, zero, a) - w).abs()
    step = scale.repeat_interleave(16, -1) if gran == "group" else scale
    assert torch.all(err <= step / 2 * (1 + 1e-5) + 1e-7)
    assert torch.equal(fake_quantize(w, a), dequantize(q, scale, zero, a))


def test_symmetric_absmax_grid():
    a = QuantArgs(bits=4, granularity="channel")
    w = torch.tensor([[-1.4, 0.7, 0.0], [0.35, -0.1, 0.2]])
    scale, zero = compute_qparams(w, a)
    assert torch.allclose(scale, torch.tensor([[0.2], [0.05]])) and torch.all(zero == 0)
    assert quantize(w, scale, zero, a).tolist() == [[-7, 4, 0], [7, -2, 4]]


def test_token_granularity_reduces_last_dim():
    x = torch.randn(2, 5, 32)
    scale, _ = compute_qparams(x, QuantArgs(bits=8, granularity="token", dynamic=True))
    assert scale.shape == (2, 5, 1)
    assert torch.allclose(scale, x.abs().amax(-1, keepdim=True) / 127)


def test_mse_and_percentile_observers_shrink_range_on_outliers():
    w = torch.randn(4, 256, generator=torch.Generator().manual_seed(0))
    w[:, 0] = 40.0
    base, _ = compute_qparams(w, QuantArgs(bits=4))
    for obs in ("mse", "percentile"):
        s, _ = compute_qparams(w, QuantArgs(bits=4, observer=obs))
        assert torch.all(s < base)
    a = QuantArgs(bits=4, observer="mse")
    s, z = compute_qparams(w, a)
    err = lambda sc: ((dequantize(quantize(w, sc, z, a), sc, z, a) - w).abs().pow(2.4)).sum()  # noqa: E731
    assert err(s) <= err(base)


def test_fake_quantize_straight_through_gradient():
    x = torch.randn(3, 16, requires_grad=True)
    fake_quantize(x, QuantArgs(bits=4, granularity="token", dynamic=True)).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=1), "bits must be an integer from 2 to 8"),
    (dict(bits=9), "bits must be an integer from 2 to 8"),
    (dict(bits=4.0), "bits must be an integer"),
    (dict(granularity="group"), "needs a positive integer group_size"),
    (dict(granularity="channel", group_size=64), "only applies to granularity='group'"),
    (dict(granularity="row"), "granularity must be one of"),
    (dict(clip_ratio=0.0), "clip_ratio"),
    (dict(observer="entropy"), "observer must be one of"),
])
def test_quant_args_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantArgs(**kwargs)


def test_quant_args_dict_round_trip():
    a = QuantArgs(bits=3, symmetric=False, granularity="group", group_size=32, observer="mse")
    assert QuantArgs.from_dict(a.to_dict()) == a
    with pytest.raises(ValueError, match="unknown QuantArgs fields"):
        QuantArgs.from_dict({"bitz": 4})


def test_half_symmetric_scale_uses_every_level_and_halves_the_worst_error():
    """Catches sym_scale="half" not reaching the grid (the scale still max/qmax, so the level -2^(b-1) stays unused and
    2-bit weights get 3 levels of 4), a rounding error above half a step, or the setting not surviving the config
    round trip (a reload would rebuild other scales)."""
    import hfq
    from hfq.quant import QuantArgs, compute_qparams, dequantize, quantize

    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    for bits in (2, 3, 4):
        errs = {}
        for rule in ("max", "half"):
            a = QuantArgs(bits=bits, granularity="channel", sym_scale=rule)
            s, z = compute_qparams(w, a)
            q = quantize(w, s, z, a)
            errs[rule] = (dequantize(q, s, z, a) - w).abs().amax(1)
            levels = {int(v) for v in q.unique()}
            assert (a.qmin in levels) == (rule == "half"), (bits, rule)
            assert bool((errs[rule] <= s[:, 0] / 2 + 1e-6).all())
        assert bool((errs["half"] < errs["max"]).all())
    cfg = hfq.RTNConfig(bits=2, group_size=32, sym_scale="half")
    assert hfq.RTNConfig.from_dict(cfg.to_dict()).weight_args().sym_scale == "half"
    with pytest.raises(ValueError, match="sym_scale"):
        hfq.RTNConfig(sym_scale="mid")


def test_mse_max_shrink_bounds_the_clip_search():
    """Catches mse_max_shrink not reaching the MSE observer (the search would clip heavy-tailed rows far below their
    range regardless) or not surviving the config round trip."""
    import hfq
    from hfq.quant import QuantArgs, compute_qparams

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * torch.where(torch.rand(64, 256, generator=g) < 0.01, 12.0, 1.0)
    full, _ = compute_qparams(w, QuantArgs(bits=3, granularity="channel"))
    wide, _ = compute_qparams(w, QuantArgs(bits=3, granularity="channel", observer="mse"))
    narrow, _ = compute_qparams(w, QuantArgs(bits=3, granularity="channel", observer="mse", mse_max_shrink=0.2))
    assert bool((wide < 0.8 * full).any())  # the default search clips the outlier rows hard
    assert bool((narrow >= 0.8 * full - 1e-6).all()) and bool((narrow <= full + 1e-6).all())
    cfg = hfq.GPTQConfig(bits=3, group_size=None, mse_clip=True, mse_max_shrink=0.2, sym_scale="half")
    args = hfq.GPTQConfig.from_dict(cfg.to_dict()).weight_args()
    assert (args.mse_max_shrink, args.sym_scale, args.observer) == (0.2, "half", "mse")
    with pytest.raises(ValueError, match="mse_max_shrink"):
        hfq.GPTQConfig(mse_max_shrink=1.5)
