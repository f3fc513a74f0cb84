"""Learnable orthogonal matrices that stay exactly on the Stiefel manifold under any torch optimizer.

Uses torch's `orthogonal` parametrization (Cayley map around a base matrix), initialised from a given orthogonal
matrix such as a random Hadamard or a KLT. Plain Adam/SGD on it replaces geoopt's RiemannianAdam used by the
official OSTQuant code (not installed here); call `rebase_()` now and then to keep the Cayley step small."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils.parametrizations import orthogonal


class Rotation(nn.Module):
    """`rotation.weight` is orthogonal ([n, n] or a batch [b, n, n], e.g. one R2 per KV head)."""

    def __init__(self, init: torch.Tensor, orthogonal_map: str = "cayley"):
        super().__init__()
        if init.ndim < 2 or init.shape[-1] != init.shape[-2]:
            raise ValueError(f"Rotation needs square matrices, got shape {tuple(init.shape)}")
        self.weight = nn.Parameter(torch.empty_like(init))
        orthogonal(self, "weight", orthogonal_map=orthogonal_map)
        self.rebase_(init)

    @torch.no_grad()
    def rebase_(self, value: torch.Tensor | None = None):
        """Set the matrix (default: its current value) as the new base with a zero skew parameter."""
        self.weight = self.weight.detach().clone() if value is None else value.to(self.weight.dtype)
        return self

    def forward(self) -> torch.Tensor:
        return self.weight
