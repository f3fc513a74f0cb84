"""`QuantLinear`: packed integer weights + scales (+ zero points) (`PackedWeight`, shared with `QuantConv2d`), an
optional static or dynamic activation quantizer, a reference dequantize path, and the integer kernels torch ships
for CPU.

Kernels (`kernel=`):
- "reference": dequantize the weight (and fake-quantize activations), then a float matmul. Always valid.
- "int_mm": int8 activations x int8 weights -> int32 with `torch._int_mm`; needs symmetric per-channel weights
  (any bits <= 8: int4 is unpacked to int8 once) and symmetric 8-bit per-token/tensor activations (static or dynamic).
- "int8_weight_only": `torch._weight_int8pack_mm`; symmetric per-channel 8-bit weights, no activation quantization.
- "int4_weight_only": `torch._weight_int4pack_mm_for_cpu`; 4-bit group-wise weights, no activation quantization.
- "auto": "int_mm" where it applies, else "reference" (torch's weight-only CPU kernels measured slower than fp32).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..integer.ops import IntTensor
from ..quant import QuantArgs, dequantize, pack, packed_shape, unpack
from ..solvers.rtn import rtn
from .act import ActQuantizer

KERNELS = ("auto", "reference", "int_mm", "int8_weight_only", "int4_weight_only")


def scale_shape(out_features: int, in_features: int, args: QuantArgs) -> tuple[int, int]:
    if args.granularity == "group":
        if in_features % args.group_size:
            raise ValueError(f"group_size {args.group_size} does not divide in_features {in_features}")
        return out_features, in_features // args.group_size
    if args.granularity == "channel":
        return out_features, 1
    if args.granularity == "tensor":
        return 1, 1
    raise ValueError(f"weights cannot use granularity {args.granularity!r}; use tensor, channel or group")


def kernel_problem(kernel: str, w: QuantArgs, a: QuantArgs | None) -> str | None:
    """Why `kernel` cannot run these settings, or None when it can."""
    if kernel == "reference":
        return None
    if kernel == "int_mm":
        if a is None or a.bits != 8 or not a.symmetric or a.granularity not in ("token", "tensor"):
            return "needs symmetric 8-bit per-token or per-tensor activations"
        if not w.symmetric or w.granularity not in ("channel", "tensor"):
            return "needs symmetric per-channel weights"
        return None
    if a is not None:
        return "is weight-only; activation quantization needs 'reference' or 'int_mm'"
    if kernel == "int8_weight_only" and not (w.bits == 8 and w.symmetric and w.granularity == "channel"):
        return "needs symmetric per-channel 8-bit weights"
    if kernel == "int4_weight_only" and not (w.bits == 4 and w.granularity == "group" and w.group_size in (32, 64, 128, 256)):
        return "needs 4-bit weights with group_size 32, 64, 128 or 256"
    return None


class PackedWeight(nn.Module):
    """Integer weight storage shared by the quantized layers: the weight viewed as rows [out, cols] (a conv's
    [out, in/groups * kh * kw]) is stored packed as `weight` uint8 [out, ceil(cols/8), bits] (`hfq.quant.pack`:
    never the float weight's shape, so a process without hfq refuses the checkpoint), `weight_scale`
    [out, n_groups] (or [1, 1] per tensor), `weight_zero` uint8 (asymmetric only), `bias`; and the input's
    activation quantizer `input_quant` (`ActQuantizer`, static or dynamic; None when weight-only)."""

    def _init_storage(self, rows: int, cols: int, bias: bool, weight_args: QuantArgs, act_args: QuantArgs | None,
                      dtype, device):
        self.weight_args, self.act_args, self._cols = weight_args, act_args, cols
        dtype = dtype or torch.get_default_dtype()
        s_rows, s_cols = scale_shape(rows, cols, weight_args)
        frozen = dict(requires_grad=False)
        self.weight = nn.Parameter(torch.empty(rows, *packed_shape(cols, weight_args.bits), dtype=torch.uint8,
                                               device=device), **frozen)
        self.weight_scale = nn.Parameter(torch.empty(s_rows, s_cols, dtype=dtype, device=device), **frozen)
        self.weight_zero = (None if weight_args.symmetric else
                            nn.Parameter(torch.empty(s_rows, s_cols, dtype=torch.uint8, device=device), **frozen))
        self.bias = nn.Parameter(torch.empty(rows, dtype=dtype, device=device)) if bias else None
        self.input_quant = None if act_args is None else ActQuantizer(act_args, dtype=dtype, device=device)
        self._kernel_cache = None

    def set_quantized(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
        """Store integer weights q (the weight's shape, or [out, cols]) with their scale/zero (`compute_qparams`
        layouts of the [out, cols] view)."""
        a = self.weight_args
        self.weight.data = pack(q.reshape(q.shape[0], -1), a.bits, a.qmin)
        self.weight_scale.data = scale.reshape(self.weight_scale.shape).to(self.weight_scale.dtype)
        if self.weight_zero is not None:
            self.weight_zero.data = zero.reshape(self.weight_zero.shape).to(torch.uint8)
        self._kernel_cache = None

    def int_weight(self) -> torch.Tensor:
        """Integer weights [out, cols]."""
        a = self.weight_args
        return unpack(self.weight, a.bits, a.qmin, self._cols)

    def _zero(self) -> torch.Tensor:
        if self.weight_zero is None:
            return torch.zeros((), device=self.weight_scale.device)
        return self.weight_zero.float()

    def dequantized_weight(self, dtype=None) -> torch.Tensor:
        """Float weights [out, cols]."""
        a = self.weight_args
        scale = self.weight_scale.reshape(1) if a.granularity == "tensor" else self.weight_scale
        return dequantize(self.int_weight(), scale, self._zero(), a, dtype or self.weight_scale.dtype)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quant is None else self.input_quant(x)

    def _scheme_repr(self) -> str:
        a = self.weight_args
        g = f"/g{a.group_size}" if a.group_size else ""
        act = f", act={self.input_quant.extra_repr()}" if self.input_quant is not None else ""
        return f"w={a.bits}bit/{a.granularity}{g}{'' if a.symmetric else '/asym'}{act}"


class QuantLinear(PackedWeight):
    """Drop-in for `nn.Linear` on the `PackedWeight` storage. `dequantized_weight()` gives the float weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool, weight_args: QuantArgs,
                 act_args: QuantArgs | None = None, kernel: str = "auto", dtype=None, device=None):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.in_features, self.out_features = in_features, out_features
        self._init_storage(out_features, in_features, bias, weight_args, act_args, dtype, device)
        self.kernel = self._pick_kernel(kernel)

    def _pick_kernel(self, kernel: str) -> str:
        if kernel == "auto":
            return "int_mm" if kernel_problem("int_mm", self.weight_args, self.act_args) is None else "reference"
        problem = kernel_problem(kernel, self.weight_args, self.act_args)
        if problem:
            raise ValueError(f"kernel {kernel!r} {problem}")
        return kernel

    def set_kernel(self, kernel: str):
        self.kernel, self._kernel_cache = self._pick_kernel(kernel), None
        return self

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_args: QuantArgs, act_args: QuantArgs | None = None,
                    kernel: str = "auto", weight: torch.Tensor | None = None, qparams=None) -> "QuantLinear":
        """Round `weight` (default: linear.weight) to nearest with `qparams` (default: from the observer)."""
        w = linear.weight if weight is None else weight
        return cls.from_quantized(*rtn(w, weight_args, qparams), weight_args, act_args, linear.bias, kernel,
                                  dtype=linear.weight.dtype)

    @classmethod
    def from_quantized(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, weight_args: QuantArgs,
                       act_args: QuantArgs | None = None, bias: torch.Tensor | None = None, kernel: str = "auto",
                       dtype=None) -> "QuantLinear":
        """A module holding integer weights q [out, in] with their scale/zero (layouts from `compute_qparams`),
        as any solver (RTN, GPTQ, ...) returns them."""
        module = cls(q.shape[1], q.shape[0], bias is not None, weight_args, act_args, kernel,
                     dtype=dtype or (bias.dtype if bias is not None else None), device=q.device)
        module.set_quantized(q, scale, zero)
        if bias is not None:
            module.bias.data.copy_(bias.detach())
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, IntTensor):  # integer-only inference (hfq.integer.to_integer)
            from ..integer.llama import integer_linear
            return integer_linear(self, x)
        if self.kernel == "reference" or (self.input_quant is not None and self.input_quant.observing):
            return F.linear(self.quantize_input(x), self.dequantized_weight(x.dtype), self.bias)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y = getattr(self, f"_forward_{self.kernel}")(x2)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def _cache(self, build):
        if getattr(getattr(self, "_hf_hook", None), "offload", False):  # offloaded: a cache would keep it resident
            return build()
        if self._kernel_cache is None or self._kernel_cache[0].device != self.weight.device:
            self._kernel_cache = build()
        return self._kernel_cache

    def _forward_int_mm(self, x):
        w_t, w_scale = self._cache(lambda: (self.int_weight().to(torch.int8).t().contiguous(),
                                            self.weight_scale.float().reshape(1, -1)))
        x = self.input_quant.smoothed(x)
        scale, _ = self.input_quant.qparams(x)
        xq = torch.clamp(torch.round(x.float() / scale), -128, 127).to(torch.int8)
        return (torch._int_mm(xq, w_t).float() * (scale * w_scale)).to(x.dtype)

    def _forward_int8_weight_only(self, x):
        (w,) = self._cache(lambda: (self.int_weight().to(torch.int8).contiguous(),))
        return torch._weight_int8pack_mm(x, w, self.weight_scale.reshape(-1).to(x.dtype))

    def _forward_int4_weight_only(self, x):
        def build():
            a = self.weight_args
            u = (self.int_weight().to(torch.int32) - a.qmin)  # unsigned 0..15
            # tinygemm dequantizes (u - 8) * s + z, so z = (8 - zero_unsigned) * s
            zero_u = self._zero() - a.qmin if self.weight_zero is not None else torch.full_like(self.weight_scale, 8.0)
            s = self.weight_scale.float()
            sz = torch.stack([s.t(), ((8 - zero_u) * s).t()], -1).contiguous()
            return torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1), sz
        w, sz = self._cache(build)
        return torch._weight_int4pack_mm_for_cpu(x, w, self.weight_args.group_size, sz.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self._scheme_repr()}, kernel={self.kernel}")
