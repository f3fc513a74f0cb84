"""Activation x activation operations with both operands quantized, each by its own `ActQuantizer` (static or
dynamic): `QuantMatMul` (attention's Q.K^T and P.V) and `QuantAdd` (e.g. image feature + position embedding, whose
operands live on very different ranges, so one shared scale would crush the smaller one)."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..quant import QuantArgs
from .act import ActQuantizer


class _TwoOperands(nn.Module):
    def __init__(self, a_args: QuantArgs, b_args: QuantArgs | None = None, dtype=torch.float32, device=None):
        super().__init__()
        self.a_quant = ActQuantizer(a_args, dtype=dtype, device=device)
        self.b_quant = ActQuantizer(b_args or a_args, dtype=dtype, device=device)

    def extra_repr(self) -> str:
        return f"a={self.a_quant.extra_repr()}, b={self.b_quant.extra_repr()}"


class QuantMatMul(_TwoOperands):
    """`torch.matmul(a, b)` on quantized operands."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.a_quant(a), self.b_quant(b))


class QuantAdd(_TwoOperands):
    """`a + b` on quantized operands (the sum is quantized by whatever consumes it)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.a_quant(a) + self.b_quant(b)


# what a model's own operation module declares to be quantized as (class attribute `hfq_op`; see hfq.arch)
OPS = {"add": QuantAdd, "matmul": QuantMatMul}
