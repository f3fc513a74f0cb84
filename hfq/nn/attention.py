"""`QuantMultiheadAttention`: `nn.MultiheadAttention` (sequence-first, packed in-projection) written out so every
matmul has quantized operands: q/k/v/out projections are `QuantLinear`, Q.K^T and P.V are `QuantMatMul`. The
softmax probabilities lie in [0, 1], so P is quantized with the asymmetric (unsigned, zero point 0) version of the
activation args. `softmax`: None (float softmax) or a module over the masked logits (`hfq.nn.QuantSoftmax`:
FQ-PETR's quantized softmax input and exp table)."""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quant import QuantArgs
from .linear import QuantLinear
from .ops import QuantMatMul


class QuantMultiheadAttention(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, dropout: float, bias: bool, weight_args: QuantArgs,
                 act_args: QuantArgs, dtype=None, device=None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, dropout
        self.head_dim = embed_dim // num_heads
        proj = lambda: QuantLinear(embed_dim, embed_dim, bias, weight_args, act_args, "reference",  # noqa: E731
                                   dtype=dtype, device=device)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = proj(), proj(), proj(), proj()
        prob_args = dataclasses.replace(act_args, symmetric=False)
        self.qk = QuantMatMul(act_args, act_args, device=device)
        self.av = QuantMatMul(prob_args, act_args, device=device)
        self.softmax = None

    @staticmethod
    def check(mha: nn.MultiheadAttention):
        if mha.batch_first or mha.bias_k is not None or mha.add_zero_attn or not mha._qkv_same_embed_dim:
            raise NotImplementedError("only sequence-first nn.MultiheadAttention with a packed in-projection and no "
                                      "bias_k / add_zero_attn can be quantized")

    @classmethod
    def empty_like(cls, mha: nn.MultiheadAttention, weight_args: QuantArgs, act_args: QuantArgs, dtype=None,
                   device=None) -> "QuantMultiheadAttention":
        cls.check(mha)
        w = mha.in_proj_weight
        return cls(mha.embed_dim, mha.num_heads, mha.dropout, mha.in_proj_bias is not None, weight_args, act_args,
                   dtype=dtype or w.dtype, device=device if device is not None else w.device)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, weight_args: QuantArgs, act_args: QuantArgs):
        """Round-to-nearest of the four projections (q, k, v each with their own scales)."""
        module = cls.empty_like(mha, weight_args, act_args)
        d, b = mha.embed_dim, mha.in_proj_bias
        for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
            lin = nn.Linear(d, d, bias=b is not None, dtype=mha.in_proj_weight.dtype)
            lin.weight.data.copy_(mha.in_proj_weight.detach()[i * d:(i + 1) * d])
            if b is not None:
                lin.bias.data.copy_(b.detach()[i * d:(i + 1) * d])
            setattr(module, name, QuantLinear.from_linear(lin, weight_args, act_args, "reference"))
        module.out_proj = QuantLinear.from_linear(mha.out_proj, weight_args, act_args, "reference")
        return module

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None, **kwargs):
        if need_weights:
            raise NotImplementedError("QuantMultiheadAttention does not return attention weights; need_weights=False")
        L, B, d = query.shape
        S = key.shape[0]
        h, hd = self.num_heads, self.head_dim
        q = self.q_proj(query).reshape(L, B * h, hd).transpose(0, 1) * (1.0 / math.sqrt(hd))
        k = self.k_proj(key).reshape(S, B * h, hd).transpose(0, 1)
        v = self.v_proj(value).reshape(S, B * h, hd).transpose(0, 1)
        scores = self.qk(q, k.transpose(1, 2))  # (B*h, L, S)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros_like(attn_mask, dtype=scores.dtype).masked_fill(attn_mask, float("-inf"))
            scores = scores + (attn_mask if attn_mask.dim() == 3 else attn_mask[None])
        if key_padding_mask is not None:
            kpm = key_padding_mask.to(torch.bool).view(B, 1, 1, S).expand(B, h, 1, S).reshape(B * h, 1, S)
            scores = scores.masked_fill(kpm, float("-inf"))
        attn = scores.softmax(-1) if self.softmax is None else self.softmax(scores)
        if self.training and self.dropout > 0:
            attn = F.dropout(attn, self.dropout)
        out = self.av(attn, v).transpose(0, 1).reshape(L, B, d)
        return self.out_proj(out), None
