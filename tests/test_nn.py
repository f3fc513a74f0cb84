import pytest
import torch
import torch.nn as nn

from hfq.nn import QuantLinear
from hfq.quant import QuantArgs

W = lambda **k: QuantArgs(**k)  # noqa: E731
A8 = QuantArgs(bits=8, granularity="token", dynamic=True)


def _linear(in_f=96, out_f=48, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


@pytest.mark.parametrize("kernel, w_args, a_args, tol", [
    ("int_mm", W(bits=8), A8, 1e-4),
    ("int_mm", W(bits=4), A8, 1e-4),
    ("int8_weight_only", W(bits=8), None, 1e-4),
    ("int4_weight_only", W(bits=4, granularity="group", group_size=32), None, 1e-4),
    ("int4_weight_only", W(bits=4, symmetric=False, granularity="group", group_size=32), None, 1e-4),
])
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_integer_kernels_agree_with_reference(kernel, w_args, a_args, tol, rows):
    lin = _linear()
    ref = QuantLinear.from_linear(lin, w_args, a_args, kernel="reference")
    fast = QuantLinear.from_linear(lin, w_args, a_args, kernel=kernel)
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows))
    with torch.no_grad():
        y_ref, y_fast = ref(x), fast(x)
    assert torch.allclose(y_fast, y_ref, atol=tol, rtol=tol), (y_fast - y_ref).abs().max()


def test_auto_kernel_choice():
    assert QuantLinear.from_linear(_linear(), W(bits=8), A8).kernel == "int_mm"
    assert QuantLinear.from_linear(_linear(), W(bits=4, granularity="group", group_size=32), A8).kernel == "reference"
    assert QuantLinear.from_linear(_linear(), W(bits=4), None).kernel == "reference"


@pytest.mark.parametrize("kernel, w_args, a_args, match", [
    ("int_mm", W(bits=8), None, "needs dynamic symmetric 8-bit"),
    ("int_mm", W(bits=4, granularity="group", group_size=32), A8, "needs symmetric per-channel weights"),
    ("int8_weight_only", W(bits=4), None, "needs symmetric per-channel 8-bit"),
    ("int4_weight_only", W(bits=4, granularity="group", group_size=48), None, "group_size 32, 64, 128 or 256"),
    ("int8_weight_only", W(bits=8), A8, "is weight-only"),
])
def test_kernel_refuses_what_it_cannot_run(kernel, w_args, a_args, match):
    with pytest.raises(ValueError, match=match):
        QuantLinear.from_linear(_linear(), w_args, a_args, kernel=kernel)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_reference_path_is_fake_quant_linear(bits, sym):
    lin = _linear()
    args = W(bits=bits, symmetric=sym, granularity="group", group_size=32)
    q = QuantLinear.from_linear(lin, args)
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


def test_static_activation_quantization_is_refused():
    with pytest.raises(NotImplementedError, match="static activation"):
        QuantLinear(8, 8, False, W(bits=4), QuantArgs(bits=8, granularity="tensor", dynamic=False))
