"""Round to nearest: the one place where a float weight becomes integers with observer scales (no data needed)."""
from __future__ import annotations

import torch

from hfq.quant import QuantArgs, compute_qparams, quantize


@torch.no_grad()
def rtn(weight: torch.Tensor, args: QuantArgs, qparams: tuple[torch.Tensor, torch.Tensor] | None = None):
    """(q int16, scale, zero) of `weight` [..., in] in `compute_qparams` layouts; `qparams` reuses given scales."""
    w = weight.detach().float()
    scale, zero = qparams if qparams is not None else compute_qparams(w, args)
    return quantize(w, scale, zero, args), scale, zero
