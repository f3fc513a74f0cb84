"""Codebook-quantized storage (RWKVQuant's vector-quantized layers, `hfq.solvers.vq`).

`VQLinear`: drop-in for `nn.Linear`. The weight [out, in] is stored as centroid indices, packed like every hfq integer
tensor (`indices` uint8 [out, ceil(in / 8), bits]), 8-bit codebooks (`codebooks` int8 [in / cpg, out / rpg, 2^bits],
one per group of `rows_per_group` x `columns_per_group` weights) and one float scale per column block
(`codebook_scale` [in / cpg]). Forward: the dequantized weight, a float matmul.

`VQVector`: the same storage for a parameter a model multiplies element-wise (RWKV's token-shift mixes mu), installed
as a `torch.nn.utils.parametrize` parametrization, so the model's own code keeps reading `module.time_mix_key` while
the state dict holds indices and codebooks (`...parametrizations.time_mix_key.original` and `.0.codebooks`)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from ..quant import pack, packed_shape, unpack
from ..solvers.vq import dequantize_vq
from .act import ActQuantizer


class VQLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, rows_per_group: int,
                 columns_per_group: int, act_args=None, dtype=None, device=None):
        super().__init__()
        if out_features % rows_per_group or in_features % columns_per_group:
            raise ValueError(f"a [{out_features}, {in_features}] weight does not split into codebook groups of "
                             f"{rows_per_group} rows x {columns_per_group} columns")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.rows_per_group, self.columns_per_group = rows_per_group, columns_per_group
        dtype = dtype or torch.get_default_dtype()
        frozen = dict(requires_grad=False)
        self.indices = nn.Parameter(torch.empty(out_features, *packed_shape(in_features, bits), dtype=torch.uint8,
                                                device=device), **frozen)
        self.codebooks = nn.Parameter(torch.empty(in_features // columns_per_group, out_features // rows_per_group,
                                                  2**bits, dtype=torch.int8, device=device), **frozen)
        self.codebook_scale = nn.Parameter(torch.empty(in_features // columns_per_group, dtype=dtype, device=device),
                                           **frozen)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        self.input_quant = None if act_args is None else ActQuantizer(act_args, dtype=dtype, device=device)

    @classmethod
    def from_quantized(cls, idx: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, rows_per_group: int,
                       columns_per_group: int, bits: int, bias: torch.Tensor | None = None, act_args=None,
                       dtype=None) -> "VQLinear":
        """A module holding `hfq.solvers.vq.gptvq_quantize`'s result."""
        module = cls(idx.shape[1], idx.shape[0], bias is not None, bits, rows_per_group, columns_per_group, act_args,
                     dtype=dtype or (bias.dtype if bias is not None else None), device=idx.device)
        module.indices.data = pack(idx, bits, 0)
        module.codebooks.data = codes.to(torch.int8)
        module.codebook_scale.data = scales.to(module.codebook_scale.dtype)
        if bias is not None:
            module.bias.data.copy_(bias.detach())
        return module

    def dequantized_weight(self, dtype=None) -> torch.Tensor:
        idx = unpack(self.indices, self.bits, 0, self.in_features)
        w = dequantize_vq(idx, self.codebooks, self.codebook_scale, self.rows_per_group, self.columns_per_group)
        return w.to(dtype or self.codebook_scale.dtype)

    def bits_per_weight(self) -> float:
        """Everything stored per weight: indices, codebooks and their scales (at their stored widths)."""
        stored = self.bits * self.in_features * self.out_features + 8 * self.codebooks.numel() + \
            self.codebook_scale.element_size() * 8 * self.codebook_scale.numel()
        return stored / (self.in_features * self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"vq={self.bits}bit/{self.rows_per_group}x{self.columns_per_group}, "
                f"{self.bits_per_weight():.3f} bits/weight")


class VQVector(nn.Module):
    """Parametrization of a parameter (any shape, e.g. [1, 1, C] or RWKV-7's r_k [H, N]) quantized in groups of `group`
    consecutive elements (one codebook of 2^bits 8-bit centroids each, one scale for all). The parametrized tensor
    (`original`) holds the packed indices; this module holds the codebooks."""

    def __init__(self, shape: tuple[int, ...], bits: int, group: int, dtype=torch.float32, device=None):
        super().__init__()
        n = math.prod(shape)
        if n % group:
            raise ValueError(f"{n} channels do not split into codebook groups of {group}")
        self.shape, self.bits, self.group = tuple(shape), bits, group
        self.codebooks = nn.Parameter(torch.empty(n // group, 2**bits, dtype=torch.int8, device=device),
                                      requires_grad=False)
        self.codebook_scale = nn.Parameter(torch.empty(1, dtype=dtype, device=device), requires_grad=False)

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        n = math.prod(self.shape)
        idx = unpack(packed, self.bits, 0, n).long()  # [n]
        cents = self.codebooks.float() * self.codebook_scale.float()  # [n / group, k]
        values = torch.gather(cents, 1, idx.reshape(-1, self.group))
        return values.reshape(self.shape).to(self.codebook_scale.dtype)

    def bits_per_weight(self) -> float:
        n = math.prod(self.shape)
        return (self.bits * n + 8 * self.codebooks.numel() + 8 * self.codebook_scale.element_size()) / n


def install_vq_vector(module: nn.Module, name: str, bits: int, group: int, idx: torch.Tensor | None = None,
                      codes: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> VQVector:
    """Replace `module.<name>` by its codebook-quantized form (indices `idx` [numel], codebooks [numel / group, k],
    `scale` [1]); without them, an empty skeleton for a checkpoint to load into."""
    p = getattr(module, name)
    vq = VQVector(tuple(p.shape), bits, group, dtype=p.dtype, device=p.device)
    packed = torch.zeros(*packed_shape(p.numel(), bits), dtype=torch.uint8, device=p.device)
    if idx is not None:
        packed = pack(idx.reshape(-1), bits, 0)
        vq.codebooks.data = codes.to(torch.int8)
        vq.codebook_scale.data = scale.reshape(1).to(p.dtype)
    with torch.no_grad():
        setattr(module, name, nn.Parameter(packed, requires_grad=False))
    parametrize.register_parametrization(module, name, vq, unsafe=True)
    return vq
