"""`QuantLinear`: packed integer weights + scales (+ zero points) (`PackedWeight`, shared with `QuantConv2d`), an
optional static or dynamic activation quantizer, a reference dequantize path, and the integer kernels torch ships
for CPU (`hfq.nn.kernels`).

Kernels (`kernel=`):
- "reference": dequantize the weight (and fake-quantize activations), then a float matmul. Always valid.
- "int_mm": int8 activations x int8 weights -> int32 with `torch._int_mm`; needs symmetric per-channel weights
  (any bits <= 8: int4 is unpacked to int8 once) and symmetric 8-bit per-token/tensor activations (static or dynamic).
- "int4_weight_only": `torch._weight_int4pack_mm_for_cpu` in bf16; any bits and granularity (5..8 bits as two
  4-bit planes); in_features % 32 == 0, out_features % 16 == 0, group sizes multiples of 32.
- "int8_weight_only": `torch._weight_int8pack_mm` in bf16; symmetric per-channel / per-tensor weights.
  Both weight-only kernels also run quantized activations, fed as their exact integers (see `hfq.nn.kernels`).
- "auto" (default), chosen per call: inputs of up to `INT_MM_MIN_ROWS` rows (decode) take the weight-only kernel
  that reads the fewest bytes; longer inputs (prefill) take "int_mm" where it applies to 5..8-bit weights; CUDA
  inputs take "int_mm" or "reference". Measured in benchmarks/cpu_speed.py.
Inputs that need gradients (training, e.g. LoRA) always take the reference path: the integer kernels have no
backward. `set_kernel(model, "reference")` makes a whole model simulate exactly (tests of quantization math).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..integer.ops import IntTensor
from ..quant import QuantArgs, dequantize, pack, packed_shape, unpack
from ..solvers.rtn import rtn
from . import kernels
from .act import ActQuantizer

KERNELS = ("auto", "reference", "int_mm", "int8_weight_only", "int4_weight_only")
# "auto" runs inputs of more rows through int_mm (where it applies): at 512 rows int_mm takes 0.46 ms on a
# 1536x576 layer, the bf16 int8 kernel 3.1 ms; at 1 row the int8 kernel is 1.6x faster (it needs no int8 copy of x)
INT_MM_MIN_ROWS = 16


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


def kernel_problem(kernel: str, w: QuantArgs, a: QuantArgs | None, out_features: int | None = None,
                   in_features: int | None = None) -> str | None:
    """Why `kernel` cannot run these settings (and, given, this weight shape), or None when it can."""
    if kernel == "reference":
        return None
    if kernel == "int_mm":
        if a is None or a.bits != 8 or not a.symmetric or a.granularity not in ("token", "tensor"):
            return "needs symmetric 8-bit per-token or per-tensor activations"
        if not w.symmetric or w.granularity not in ("channel", "tensor"):
            return "needs symmetric per-channel weights"
        return None
    if not kernels.available():
        return f"needs torch's CPU weight-only ops (torch >= 2.5; this is {torch.__version__})"
    if kernel == "int8_weight_only" and not (w.symmetric and w.granularity in ("channel", "tensor")):
        return "needs symmetric per-channel (or per-tensor) weights"
    if kernel == "int4_weight_only" and w.granularity == "group" and w.group_size % 32:
        return f"needs a group_size that is a multiple of 32 (got {w.group_size})"
    if in_features is not None and in_features % 32:
        return f"needs in_features divisible by 32 (got {in_features})"
    if kernel == "int4_weight_only" and out_features is not None and out_features % 16:
        return f"needs out_features divisible by 16 (got {out_features})"
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

    def _problem(self, kernel: str) -> str | None:
        return kernel_problem(kernel, self.weight_args, self.act_args, self.out_features, self.in_features)

    def _pick_kernel(self, kernel: str) -> str:
        if kernel == "auto":
            fits = lambda k: self._problem(k) is None  # noqa: E731
            int8 = self.weight_args.bits > 4 and fits("int8_weight_only")
            small = "int8_weight_only" if int8 else "int4_weight_only" if fits("int4_weight_only") else None
            mm = "int_mm" if fits("int_mm") else None
            # (cpu decode, cpu prefill, other devices); 4-bit weights keep one cache (int4) for every length
            self._auto = (small or mm or "reference", (mm if small != "int4_weight_only" else None) or small or
                          "reference", mm or "reference")
            return kernel
        problem = self._problem(kernel)
        if problem:
            raise ValueError(f"kernel {kernel!r} {problem}")
        return kernel

    def set_kernel(self, kernel: str):
        self.kernel, self._kernel_cache = self._pick_kernel(kernel), None
        return self

    def kernel_for(self, rows: int, device: str = "cpu") -> str:
        """The kernel an input of `rows` rows on `device` runs through ("auto" resolved)."""
        if self.kernel != "auto":
            return self.kernel
        return self._auto[rows > INT_MM_MIN_ROWS] if device == "cpu" else self._auto[2]

    def kernel_bytes(self, rows: int = 1) -> int:
        """Bytes of the weights (kernel layout, + bias) that an input of `rows` rows reads: what a memory-bound
        decode step moves through this layer (the reference kernel: its packed weights, scales and zero points)."""
        kernel = self.kernel_for(rows)
        if kernel == "reference":
            tensors = [self.weight, self.weight_scale, self.weight_zero]
        elif kernel == "int4_weight_only":
            tensors = [t for plane in self._cached("int4", self._int4_planes)[1] for t in plane]
        else:
            w8, s32, s16 = self._cached("int8", self._int8_weight)
            tensors = [w8, s32 if kernel == "int_mm" else s16]
        return sum(t.nbytes for t in tensors + [self.bias] if t is not None)

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
        kernel, iq = self.kernel_for(x.numel() // self.in_features, x.device.type), self.input_quant
        if kernel == "reference" or (iq is not None and iq.observing) or (x.requires_grad and torch.is_grad_enabled()):
            # the integer kernels have no backward: training (e.g. LoRA) differentiates through the reference
            return F.linear(self.quantize_input(x), self.dequantized_weight(x.dtype), self.bias)
        shape = x.shape
        x2, x_scale = x.reshape(-1, shape[-1]), None
        if iq is not None:
            x2, x_scale = iq.integers(x2)
        if kernel == "int4_weight_only":
            y = kernels.int4_mm(x2, *self._cached("int4", self._int4_planes))
        elif kernel == "int8_weight_only":
            w8, _, scale = self._cached("int8", self._int8_weight)
            y = kernels.int8_mm(x2, w8, scale)
        else:  # int_mm
            w8, scale, _ = self._cached("int8", self._int8_weight)
            y, x_scale = torch._int_mm(x2.to(torch.int8), w8.t()).float() * (x_scale * scale), None
        if x_scale is not None:
            y = torch.mul(y, x_scale)  # bf16 x fp32 -> fp32
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def _int4_planes(self):
        return kernels.int4_planes(self.int_weight(), self.weight_scale, self.weight_zero, self.weight_args)

    def _int8_weight(self):
        return kernels.int8_weight(self.int_weight(), self.weight_scale)

    def _cached(self, key: str, build):
        """Kernel-layout weights, built once (dropped by .to() / set_quantized; rebuilt per call when offloaded:
        a cache would keep the weights resident)."""
        if getattr(getattr(self, "_hf_hook", None), "offload", False):
            return build()
        cache = self._kernel_cache
        if cache is None:
            cache = self._kernel_cache = {}
        if key not in cache:
            cache[key] = build()
        return cache[key]

    def _apply(self, fn, *args, **kwargs):
        self._kernel_cache = None  # built again on the new device / dtype
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self._scheme_repr()}, kernel={self.kernel}")


def set_kernel(model: nn.Module, kernel: str) -> nn.Module:
    """Set the kernel of every QuantLinear in `model` (e.g. "reference" to simulate exactly); returns the model."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.set_kernel(kernel)
    return model
