"""Bit packing: every 8 values of `bits` bits become `bits` bytes, so 2..8-bit tensors all share one layout:
[..., n] -> uint8 [..., ceil(n/8), bits] (`packed_shape`). Values are stored offset to unsigned.

The trailing `bits` dimension is deliberate: a packed weight always has one dimension more than the float weight
it replaces, so a checkpoint written by hfq can never fit a float model's parameter. transformers then refuses it
with a size mismatch in a process that does not know the hfq quantizers, instead of loading random weights."""
from __future__ import annotations

import torch


def packed_shape(n: int, bits: int) -> tuple[int, int]:
    return (n + 7) // 8, bits


def pack(q: torch.Tensor, bits: int, qmin: int) -> torch.Tensor:
    """q: integers in [qmin, qmin + 2^bits - 1] along the last dim -> uint8 [..., ceil(n/8), bits]."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    u = (q.to(torch.int64) - qmin)
    if u.numel() and (u.min() < 0 or u.max() >= 2**bits):
        raise ValueError(f"values out of the {bits}-bit range starting at {qmin}")
    pad = (-u.shape[-1]) % 8
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    u = u.reshape(*u.shape[:-1], -1, 8)
    if bits == 8:
        return u.to(torch.uint8)
    shifts = torch.arange(8, device=u.device) * bits
    word = (u << shifts).sum(-1, keepdim=True)  # 8*bits <= 64 bits per word
    byte_shifts = torch.arange(bits, device=u.device) * 8
    return ((word >> byte_shifts) & 0xFF).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, qmin: int, n: int) -> torch.Tensor:
    """Inverse of `pack`; returns int16 values of the original last dimension n."""
    if packed.shape[-1] != bits:
        raise ValueError(f"a {bits}-bit packed tensor ends in a dimension of {bits} bytes, got shape "
                         f"{tuple(packed.shape)}")
    lead = packed.shape[:-2]
    if bits == 8:
        return packed.reshape(*lead, -1)[..., :n].to(torch.int16) + qmin
    if 8 % bits == 0:  # 2 and 4 bits: whole values per byte, cheap uint8 shifts
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        u = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)
        return u.reshape(*lead, -1)[..., :n].to(torch.int16) + qmin
    p = packed.to(torch.int64)
    word = (p << (torch.arange(bits, device=p.device) * 8)).sum(-1, keepdim=True)
    u = (word >> (torch.arange(8, device=p.device) * bits)) & (2**bits - 1)
    u = u.reshape(*lead, -1)[..., :n]
    return (u + qmin).to(torch.int16)
