"""Bit packing: every 8 values of `bits` bits become `bits` bytes, so 2/3/4/5/6/7/8-bit tensors all share one
layout ([..., n] -> uint8 [..., ceil(n/8) * bits]; 8 bits: one byte each, no padding). Values are stored
offset to unsigned."""
from __future__ import annotations

import torch


def packed_size(n: int, bits: int) -> int:
    return n if bits == 8 else (n + 7) // 8 * bits


def pack(q: torch.Tensor, bits: int, qmin: int) -> torch.Tensor:
    """q: integers in [qmin, qmin + 2^bits - 1] along the last dim -> uint8."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    u = (q.to(torch.int64) - qmin)
    if u.numel() and (u.min() < 0 or u.max() >= 2**bits):
        raise ValueError(f"values out of the {bits}-bit range starting at {qmin}")
    if bits == 8:
        return u.to(torch.uint8)
    n = u.shape[-1]
    pad = (-n) % 8
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    u = u.reshape(*u.shape[:-1], -1, 8)
    shifts = torch.arange(8, device=u.device) * bits
    word = (u << shifts).sum(-1, keepdim=True)  # 8*bits <= 64 bits per word
    byte_shifts = torch.arange(bits, device=u.device) * 8
    out = (word >> byte_shifts) & 0xFF
    return out.reshape(*u.shape[:-2], -1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, qmin: int, n: int) -> torch.Tensor:
    """Inverse of `pack`; returns int16 values of the original last dimension n."""
    if bits == 8:
        return packed.to(torch.int16) + qmin
    if 8 % bits == 0:  # 2 and 4 bits: whole values per byte, cheap uint8 shifts
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        u = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)
        return u.reshape(*packed.shape[:-1], -1)[..., :n].to(torch.int16) + qmin
    p = packed.to(torch.int64).reshape(*packed.shape[:-1], -1, bits)
    word = (p << (torch.arange(bits, device=p.device) * 8)).sum(-1, keepdim=True)
    u = (word >> (torch.arange(8, device=p.device) * bits)) & (2**bits - 1)
    u = u.reshape(*packed.shape[:-1], -1)[..., :n]
    return (u + qmin).to(torch.int16)
