"""`QuantConv2d` / `QuantConv1d`: `nn.Conv2d` / `nn.Conv1d` on the packed integer storage of `QuantLinear`
(`PackedWeight`): the weight [out, in/groups, *kernel] is quantized as rows [out, in/groups * prod(kernel)] (per
tensor or per output channel), the input through a static or dynamic `ActQuantizer`. Forward: dequantized weight,
float convolution."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quant import QuantArgs
from ..solvers.rtn import rtn
from .act import ActQuantizer
from .linear import PackedWeight


class _QuantConv(PackedWeight):
    @classmethod
    def from_conv(cls, conv: nn.Module, weight_args: QuantArgs, act_args: QuantArgs | None = None,
                  weight: torch.Tensor | None = None, qparams=None):
        """Round `weight` (default: conv.weight) to nearest with `qparams` (default: from the observer)."""
        module = cls.empty_like(conv, weight_args, act_args)
        w = conv.weight if weight is None else weight
        module.set_quantized(*rtn(w.reshape(w.shape[0], -1), weight_args, qparams))
        if conv.bias is not None:
            module.bias.data.copy_(conv.bias.detach())
        return module


class QuantConv2d(_QuantConv):
    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, weight_args: QuantArgs | None = None,
                 act_args: QuantArgs | None = None, dtype=None, device=None):
        super().__init__()
        if weight_args is None:
            raise TypeError("QuantConv2d needs weight_args")
        if weight_args.granularity not in ("tensor", "channel"):
            raise ValueError(f"convolution weights are quantized per tensor or per output channel, got "
                             f"{weight_args.granularity!r}")
        if isinstance(padding, str):
            raise NotImplementedError(f"padding={padding!r}: give the padding as integers")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.padding, self.dilation = (nn.modules.utils._pair(v) for v in
                                                                      (kernel_size, stride, padding, dilation))
        cols = in_channels // groups * self.kernel_size[0] * self.kernel_size[1]
        self._init_storage(out_channels, cols, bias, weight_args, act_args, dtype, device)

    @classmethod
    def empty_like(cls, conv: nn.Conv2d, weight_args: QuantArgs, act_args: QuantArgs | None = None, dtype=None,
                   device=None) -> "QuantConv2d":
        if conv.padding_mode != "zeros":
            raise NotImplementedError(f"{type(conv).__name__} with padding_mode={conv.padding_mode!r}")
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                   conv.groups, conv.bias is not None, weight_args, act_args, dtype=dtype or conv.weight.dtype,
                   device=device if device is not None else conv.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight(x.dtype).reshape(self.out_channels, self.in_channels // self.groups,
                                                     *self.kernel_size)
        return F.conv2d(self.quantize_input(x), w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, bias={self.bias is not None}, {self._scheme_repr()}")


class QuantConv1d(_QuantConv):
    """`nn.Conv1d` on the same storage: the weight [out, in/groups, k] quantized as rows [out, in/groups * k] (per
    tensor or per output channel), e.g. Mamba's depthwise causal convolution. A model code that reads the weight
    itself (Mamba's mixers call `causal_conv1d_fn(x, weight [C, k], bias)`) takes `dequantized_weight()` and
    `quantize_input(x)` instead of calling the module."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, groups: int = 1, bias: bool = True, weight_args: QuantArgs | None = None,
                 act_args: QuantArgs | None = None, dtype=None, device=None):
        super().__init__()
        if weight_args is None:
            raise TypeError("QuantConv1d needs weight_args")
        if weight_args.granularity not in ("tensor", "channel"):
            raise ValueError(f"convolution weights are quantized per tensor or per output channel, got "
                             f"{weight_args.granularity!r}")
        if isinstance(padding, str):
            raise NotImplementedError(f"padding={padding!r}: give the padding as an integer")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.padding, self.dilation = (nn.modules.utils._single(v)[0] for v in
                                                                      (kernel_size, stride, padding, dilation))
        self._init_storage(out_channels, in_channels // groups * self.kernel_size, bias, weight_args, act_args,
                           dtype, device)

    @classmethod
    def empty_like(cls, conv: nn.Conv1d, weight_args: QuantArgs, act_args: QuantArgs | None = None, dtype=None,
                   device=None) -> "QuantConv1d":
        if conv.padding_mode != "zeros":
            raise NotImplementedError(f"{type(conv).__name__} with padding_mode={conv.padding_mode!r}")
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0], conv.padding[0],
                   conv.dilation[0], conv.groups, conv.bias is not None, weight_args, act_args,
                   dtype=dtype or conv.weight.dtype, device=device if device is not None else conv.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight(x.dtype).reshape(self.out_channels, self.in_channels // self.groups,
                                                     self.kernel_size)
        return F.conv1d(self.quantize_input(x), w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, bias={self.bias is not None}, {self._scheme_repr()}")


class QuantCFWSConv2d(nn.Module):
    """CFWS's split convolution (arXiv 2312.10588; `hfq.quant.cfws`): a fused re-parameterized 3x3 convolution as
    two integer convolutions on one quantized input, summed in the accumulator: `coarse` holds the centre taps on
    their own grid as a 1x1 convolution (same stride, padding - dilation) with the bias (rounded to int16 as the
    official layer: one scale max|b| / 2^15), `fine` the 3x3 remainder (neighbours + the centre's rounding residual)
    on its own per-channel grid. Both are `QuantConv2d` storage; `input_quant` is their shared input quantizer."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=1, dilation=1,
                 groups: int = 1, bias: bool = True, weight_args: QuantArgs | None = None,
                 act_args: QuantArgs | None = None, dtype=None, device=None):
        super().__init__()
        k, p, d = (nn.modules.utils._pair(v) for v in (kernel_size, padding, dilation))
        if k[0] % 2 == 0 or k[1] % 2 == 0 or k == (1, 1):
            raise ValueError(f"the coarse / fine split needs an odd kernel with neighbour taps, got {k}")
        centre_pad = (p[0] - d[0] * (k[0] // 2), p[1] - d[1] * (k[1] // 2))
        if min(centre_pad) < 0:
            raise ValueError(f"padding {p} is smaller than the kernel's half width: the centre tap alone cannot be "
                             f"a 1x1 convolution")
        self.coarse = QuantConv2d(in_channels, out_channels, 1, stride, centre_pad, 1, groups, bias, weight_args,
                                  None, dtype=dtype, device=device)
        self.fine = QuantConv2d(in_channels, out_channels, k, stride, p, d, groups, False, weight_args, None,
                                dtype=dtype, device=device)
        self.input_quant = None if act_args is None else ActQuantizer(act_args, dtype=dtype or torch.float32,
                                                                      device=device)

    @classmethod
    def empty_like(cls, conv: nn.Conv2d, weight_args: QuantArgs, act_args: QuantArgs | None = None, dtype=None,
                   device=None) -> "QuantCFWSConv2d":
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                   conv.groups, conv.bias is not None, weight_args, act_args, dtype=dtype or conv.weight.dtype,
                   device=device if device is not None else conv.weight.device)

    @classmethod
    @torch.no_grad()
    def from_conv(cls, conv: nn.Conv2d, weight_args: QuantArgs, act_args: QuantArgs | None = None):
        """Split conv.weight (`hfq.quant.cfws.split_coarse_fine` on the weight args' bits and granularity)."""
        from ..quant.cfws import int16_bias, split_coarse_fine

        if not weight_args.symmetric:
            raise ValueError("the CFWS split is symmetric (as the official layer): use sym=True")
        module = cls.empty_like(conv, weight_args, act_args)
        split = split_coarse_fine(conv.weight, weight_args.bits, weight_args.granularity, weight_args.granularity)
        kh, kw = conv.kernel_size
        zero = torch.zeros(1)
        coarse_q = split.coarse[:, :, kh // 2, kw // 2].reshape(conv.out_channels, -1)
        module.coarse.set_quantized(coarse_q, split.coarse_scale.reshape(-1, 1), zero)
        module.fine.set_quantized(split.fine.reshape(conv.out_channels, -1), split.fine_scale.reshape(-1, 1), zero)
        if conv.bias is not None:
            q, scale = int16_bias(conv.bias)
            module.coarse.bias.data.copy_((q.float() * scale).to(module.coarse.bias.dtype))
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        return self.coarse(x) + self.fine(x)

    def dequantized_weight(self) -> torch.Tensor:
        """The float kernel the two integer kernels stand for (coarse at the centre + fine)."""
        w = self.fine.dequantized_weight().reshape(self.fine.out_channels, -1, *self.fine.kernel_size).clone()
        kh, kw = self.fine.kernel_size
        w[:, :, kh // 2, kw // 2] += self.coarse.dequantized_weight().reshape(w.shape[0], -1)
        return w
