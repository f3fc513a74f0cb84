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
