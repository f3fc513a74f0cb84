import pytest
import torch
import torch.nn as nn

from hfq.nn import QuantLinear
from hfq.nn.linear import kernel_problem
from hfq.quant import QuantArgs

W = lambda **k: QuantArgs(**k)  # noqa: E731
A8 = QuantArgs(bits=8, granularity="token", dynamic=True)


def _linear(in_f=96, out_f=48, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


A8_ASYM = QuantArgs(bits=8, symmetric=False, granularity="token", dynamic=True)
# one per path of hfq.nn.kernels: int4 one signed plane (sym <= 4 bits, asym <= 3 bits), one unsigned plane with a
# zero term (asym 4-bit), two signed planes (sym / asym 5..7 bits), two unsigned planes (asym 8-bit); int8; int_mm
FORMATS = [
    (W(bits=8), A8), (W(bits=4), A8), (W(bits=8), None), (W(bits=4, granularity="group", group_size=32), None),
    (W(bits=4, symmetric=False, granularity="group", group_size=32), None), (W(bits=2), None),
    (W(bits=3, symmetric=False, granularity="group", group_size=64), A8_ASYM), (W(bits=4, granularity="tensor"), A8),
    (W(bits=6, granularity="group", group_size=32), None), (W(bits=7, symmetric=False), None),
    (W(bits=8, symmetric=False, granularity="group", group_size=96), A8), (W(bits=5, granularity="tensor"), None),
]


@pytest.mark.parametrize("kernel, w_args, a_args", [
    (k, w, a) for w, a in FORMATS for k in ("int_mm", "int8_weight_only", "int4_weight_only", "auto")
    if kernel_problem(k, w, a, 48, 192) is None])  # every kernel on every format it accepts
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_integer_kernels_agree_with_reference(kernel, w_args, a_args, rows):
    """Catches a kernel whose weights or activations are not the reference's: a wrong int4 plane split or zero term,
    a dropped activation scale or zero point, scales of the wrong group. int_mm multiplies the same integers exactly;
    the bf16 weight-only kernels round x and their scales to bf16 (relative error ~0.3%, ~0.5-1% with a 4-bit zero
    point in the kernel's bf16 zero term; any such bug is >5%)."""
    lin = _linear(in_f=192)
    ref = QuantLinear.from_linear(lin, w_args, a_args, kernel="reference")
    fast = QuantLinear.from_linear(lin, w_args, a_args, kernel=kernel)
    x = torch.randn(rows, 192, generator=torch.Generator().manual_seed(rows))
    with torch.no_grad():
        y_ref, y_fast = ref(x), fast(x)
    if fast.kernel_for(rows) == "int_mm":
        assert torch.allclose(y_fast, y_ref, atol=1e-4, rtol=1e-4), (y_fast - y_ref).abs().max()
    else:
        assert (y_fast - y_ref).norm() / y_ref.norm() < 2e-2, (y_fast - y_ref).norm() / y_ref.norm()


def test_auto_kernel_choice():
    """Catches "auto" leaving a fast kernel unused: decode (few rows) takes the weight-only kernel reading the fewest
    bytes, prefill takes int_mm for 8-bit weights, 4-bit weights keep int4 (one cache), CUDA never gets the CPU-only
    kernels, shapes the kernels cannot take fall back to the reference path."""
    w8a8 = QuantLinear.from_linear(_linear(), W(bits=8), A8)
    assert (w8a8.kernel, w8a8.kernel_for(1), w8a8.kernel_for(64), w8a8.kernel_for(1, "cuda")) == (
        "auto", "int8_weight_only", "int_mm", "int_mm")
    w4a8 = QuantLinear.from_linear(_linear(), W(bits=4), A8)
    assert (w4a8.kernel_for(1), w4a8.kernel_for(64), w4a8.kernel_for(64, "cuda")) == (
        "int4_weight_only", "int4_weight_only", "int_mm")
    g32 = QuantLinear.from_linear(_linear(), W(bits=4, granularity="group", group_size=32))
    assert (g32.kernel_for(1), g32.kernel_for(64), g32.kernel_for(1, "cuda")) == (
        "int4_weight_only", "int4_weight_only", "reference")
    w8 = QuantLinear.from_linear(_linear(), W(bits=8))
    assert (w8.kernel_for(1), w8.kernel_for(64)) == ("int8_weight_only", "int8_weight_only")
    assert QuantLinear.from_linear(_linear(), W(bits=4, granularity="group", group_size=48)).kernel_for(1) == "reference"
    assert QuantLinear.from_linear(_linear(in_f=40), W(bits=4)).kernel_for(1) == "reference"


@pytest.mark.parametrize("kernel, w_args, a_args, in_f, match", [
    ("int_mm", W(bits=8), None, 96, "needs symmetric 8-bit per-token or per-tensor"),
    ("int_mm", W(bits=4, granularity="group", group_size=32), A8, 96, "needs symmetric per-channel weights"),
    ("int8_weight_only", W(bits=4, granularity="group", group_size=32), None, 96, "needs symmetric per-channel"),
    ("int4_weight_only", W(bits=4, granularity="group", group_size=48), None, 96, "multiple of 32"),
    ("int4_weight_only", W(bits=4), None, 40, "in_features divisible by 32"),
    ("int8_weight_only", W(bits=8), None, 40, "in_features divisible by 32"),
])
def test_kernel_refuses_what_it_cannot_run(kernel, w_args, a_args, in_f, match):
    """Catches a kernel accepting a layout it computes wrongly (torch's int8 kernel returns inf for in_features 40
    and crashes for 50)."""
    with pytest.raises(ValueError, match=match):
        QuantLinear.from_linear(_linear(in_f=in_f), w_args, a_args, kernel=kernel)


def test_kernel_cache_follows_new_weights_and_dtype():
    """Catches a stale kernel cache: after set_quantized (new integers) or .to(bfloat16) the kernel must compute
    with what the module now holds."""
    lin, other = _linear(), _linear(seed=1)
    args = W(bits=4, granularity="group", group_size=32)
    q = QuantLinear.from_linear(lin, args)
    x = torch.randn(2, 96)
    with torch.no_grad():
        q(x)  # builds the cache
        from hfq.solvers.rtn import rtn
        q.set_quantized(*rtn(other.weight, args))
        ref = QuantLinear.from_linear(other, args, kernel="reference")
        ref.bias.data.copy_(q.bias)
        assert (q(x) - ref(x)).norm() / ref(x).norm() < 1e-2
        q(x)
        q.to(torch.bfloat16)
        assert q._kernel_cache is None and q(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("a_args", [A8, A8_ASYM, QuantArgs(bits=8, granularity="tensor", dynamic=True),
                                    QuantArgs(bits=6, granularity="token", dynamic=True, observer="percentile")])
def test_activation_integers_times_scale_is_the_fake_quantized_input(a_args):
    """Catches the activation integers the kernels read (`ActQuantizer.integers`, with its fast path for dynamic
    symmetric min/max scales) differing from what the reference path fake-quantizes."""
    from hfq.nn import ActQuantizer

    q = ActQuantizer(a_args)
    x = 3 * torch.randn(7, 96, generator=torch.Generator().manual_seed(0))
    ints, scale = q.integers(x)
    assert torch.equal(ints, ints.round()) and ints.abs().max() <= 2 ** a_args.bits
    assert torch.allclose(ints * scale, q(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_reference_path_is_fake_quant_linear(bits, sym):
    lin = _linear()
    args = W(bits=bits, symmetric=sym, granularity="group", group_size=32)
    q = QuantLinear.from_linear(lin, args, kernel="reference")
    from hfq.quant import fake_quantize
    x = torch.randn(4, 96)
    with torch.no_grad():
        assert torch.equal(q(x), nn.functional.linear(x, fake_quantize(lin.weight, args), lin.bias))
    assert q.weight.dtype == torch.uint8 and q.weight.shape == (48, 96 // 8, bits)
    assert (q.weight_zero is None) == sym


def test_dynamic_activation_quantization_changes_output_like_fake_quant():
    lin = _linear(bias=False)
    q = QuantLinear.from_linear(lin, W(bits=8), A8, kernel="reference")
    x = torch.randn(3, 96)
    from hfq.quant import fake_quantize
    with torch.no_grad():
        expected = nn.functional.linear(fake_quantize(x, A8), q.dequantized_weight())
        assert torch.equal(q(x), expected)


A8_STATIC = QuantArgs(bits=8, granularity="tensor", dynamic=False)


def test_static_activation_scale_comes_from_calibration_only():
    """Catches a static quantizer that computes its scale from the input it quantizes (i.e. dynamic in disguise), one
    that runs before calibration, and a min/max observer that forgets earlier calibration batches."""
    from hfq.nn import calibrate_static

    lin = QuantLinear.from_linear(_linear(), W(bits=8), A8_STATIC, kernel="reference")
    x = torch.randn(4, 96)
    with pytest.raises(RuntimeError, match="no calibrated scale"):
        lin(x)
    big, small = 3 * torch.randn(4, 96), 0.1 * torch.randn(4, 96)
    calibrate_static(lin, lambda: (lin(big), lin(small)))
    scale = float(lin.input_quant.scale)
    assert scale == pytest.approx(float(big.abs().max()) / 127, rel=1e-6)  # the larger batch's range was kept
    from hfq.quant import fake_quantize
    with torch.no_grad():
        y = lin(small)
        ref = torch.nn.functional.linear(fake_quantize(small, A8_STATIC, torch.tensor([scale]), torch.zeros(1)),
                                         lin.dequantized_weight(), lin.bias)
    assert torch.equal(y, ref)
    with pytest.raises(RuntimeError, match="saw no calibration data"):
        calibrate_static(lin, lambda: None)


def test_static_int_mm_kernel_matches_reference():
    """Catches the integer kernel using a per-input scale instead of the calibrated one."""
    from hfq.nn import calibrate_static

    lin = _linear()
    ref = QuantLinear.from_linear(lin, W(bits=8), A8_STATIC, kernel="reference")
    fast = QuantLinear.from_linear(lin, W(bits=8), A8_STATIC, kernel="int_mm")
    calib = 2 * torch.randn(16, 96)
    for m in (ref, fast):
        calibrate_static(m, lambda: m(calib))
    x = torch.randn(5, 96)
    with torch.no_grad():
        assert torch.allclose(fast(x), ref(x), atol=1e-4)


@pytest.mark.parametrize("observer", ["percentile", "mse"])
def test_static_observers_clip_outliers(observer):
    """Catches the percentile / MSE observers silently falling back to min/max (a lone outlier must not set the
    scale: clipping it costs less error than coarse steps for the other 50k values)."""
    from hfq.nn import ActQuantizer

    q = ActQuantizer(QuantArgs(bits=4, granularity="tensor", dynamic=False, observer=observer)).observe()
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(0))
    x[0] = 20.0
    q(x)
    q.freeze()
    assert float(q.scale) < 0.5 * 20 / 7


def test_quant_conv2d_matches_fake_quant_conv():
    """Catches a wrong row layout of conv weights (per output channel over in/groups*kh*kw), lost stride / padding /
    groups, and a packed weight that could be loaded as the float one."""
    from hfq.nn import QuantConv2d
    from hfq.quant import fake_quantize

    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=2)
    args = W(bits=4)
    q = QuantConv2d.from_conv(conv, args)
    assert q.weight.dtype == torch.uint8 and q.weight.shape[0] == 12 and q.weight.dim() == 3
    x = torch.randn(2, 8, 9, 11)
    w_ref = fake_quantize(conv.weight.reshape(12, -1), args).reshape(conv.weight.shape)
    with torch.no_grad():
        ref = torch.nn.functional.conv2d(x, w_ref, conv.bias, 2, 1, 1, 2)
        assert torch.allclose(q(x), ref, atol=1e-5)
    with pytest.raises(ValueError, match="per tensor or per output channel"):
        QuantConv2d.from_conv(conv, W(bits=4, granularity="group", group_size=8))


def test_quant_matmul_and_add_quantize_each_operand_on_its_own_scale():
    """Catches two operands sharing one scale (the small one would be crushed, Q-PETR's feature + PE case)."""
    from hfq.nn import QuantAdd, QuantMatMul, calibrate_static

    a, b = 0.05 * torch.randn(6, 8), 100 * torch.randn(6, 8)
    add = QuantAdd(A8_STATIC)
    calibrate_static(add, lambda: add(a, b))
    assert float(add.a_quant.scale) == pytest.approx(float(a.abs().max()) / 127, rel=1e-6)
    assert float(add.b_quant.scale) == pytest.approx(float(b.abs().max()) / 127, rel=1e-6)
    assert ((add(a, b) - (a + b)).abs().max() <= float(add.b_quant.scale) / 2 + float(add.a_quant.scale) / 2 + 1e-6)
    mm = QuantMatMul(QuantArgs(bits=8, granularity="token", dynamic=True))
    y = mm(a, b.t())
    assert y.shape == (6, 6) and ((y - a @ b.t()).norm() / (a @ b.t()).norm()) < 0.02


def test_quant_multihead_attention_matches_torch_while_observing():
    """Catches a wrong split of the packed in-projection, head layout, scaling, masks (bool attn_mask,
    key_padding_mask) in the written-out attention: while its quantizers observe, only the int8 weights differ."""
    from hfq.nn import QuantMultiheadAttention, act_quantizers

    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 4).eval()
    q, k = torch.randn(5, 2, 16), torch.randn(7, 2, 16)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[1, 5:] = True
    mask = torch.zeros(5, 7, dtype=torch.bool)
    mask[0, :2] = True
    with torch.no_grad():
        ref = mha(q, k, k, key_padding_mask=kpm, attn_mask=mask, need_weights=False)[0]
        qa = QuantMultiheadAttention.from_mha(mha, W(bits=8), A8_STATIC)
        for a in act_quantizers(qa).values():
            a.observe()
        out = qa(q, k, k, key_padding_mask=kpm, attn_mask=mask)[0]
    assert (out - ref).abs().max() < 0.02 * ref.abs().max()
    assert not qa.av.a_quant.args.symmetric  # softmax probabilities on the unsigned grid