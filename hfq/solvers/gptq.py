"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's rounding error onto
the columns not yet quantized through the inverse Hessian of the layer's inputs, H = 2/N sum_t w_t x_t x_t^T.

Math only: the lifecycle (hooks, blocks, module swaps) lives in quantizers/gptq.py.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from hfq.quant import QuantArgs, compute_qparams


class Hessian:
    """Running sum of weighted input outer products in float32.

    `add(x, weight)`: x [..., in] (every leading position is a token), weight None (1 per token) or a tensor
    broadcastable to x's leading shape (one weight per sample or per token). Tokens of weight 0 are dropped
    before the product, so they leave H exactly as if they had never been seen."""

    def __init__(self, columns: int, device=None):
        self.sum = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.weight = 0.0  # total token weight

    def add(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1]).float()
        if weight is None:
            self.weight += x.shape[0]
        else:
            w = torch.as_tensor(weight, dtype=torch.float32, device=x.device)
            if w.shape != lead:
                if w.dim() != 1 or not lead or w.shape[0] != lead[0]:
                    raise ValueError(f"Hessian weights must have the inputs' leading shape {tuple(lead)} (one per "
                                     f"token) or [{lead[0] if lead else 1}] (one per sample), got {tuple(w.shape)}")
                w = w.reshape(-1, *[1] * (len(lead) - 1)).expand(lead)
            w = w.reshape(-1)
            if (w < 0).any():
                raise ValueError("Hessian sample weights must be >= 0")
            keep = w > 0
            x, w = x[keep], w[keep]
            self.weight += float(w.sum())
            x = x * w.sqrt()[:, None]
        if not x.shape[0]:
            return
        _add_gram_lower(self.sum, x.detach())

    @property
    def empty(self) -> bool:
        return self.weight == 0

    def matrix(self) -> torch.Tensor:
        """H = 2 / (sum of weights) * sum w x x^T (the scale does not change GPTQ's result; damping is relative)."""
        lower = self.sum.tril()
        return (lower + lower.tril(-1).t()) * (2.0 / max(self.weight, 1e-12))


def _add_gram_lower(out: torch.Tensor, x: torch.Tensor) -> None:
    """out += x^T x on and below the diagonal only, as row strips (out[i:j, :j] += x[:, i:j]^T x[:, :j]), which
    take ~60% of a full product's time. Plain torch matmuls: BLAS syrk would halve the flops, but its own thread
    pool fights torch's OpenMP threads on CPU (measured: the calibration forwards ran 1.5x slower)."""
    n = x.shape[1]
    step = -(-n // max(1, min(8, n // 128)))
    for i in range(0, n, step):
        j = min(i + step, n)
        out[i:j, :j].addmm_(x[:, i:j].t(), x[:, :j])


def _inverse_upper_cholesky(H: list[torch.Tensor]) -> torch.Tensor:
    """Upper U with U^T U = H^-1, from one Cholesky and one triangular inverse: with J the reversal
    permutation and J H J = L L^T, U = J L^-1 J (GPTQ's usual chol(inv(H)) takes three factorizations).
    H comes in a one-element list that is emptied, so no caller reference keeps it alive: at most three
    [cols, cols] matrices exist at once (five before; 254 MB less at 5632 columns)."""
    flipped = H.pop().flip(0, 1)
    L = torch.linalg.cholesky(flipped)
    del flipped
    eye = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
    inv = torch.linalg.solve_triangular(L, eye, upper=False)
    del L, eye
    return inv.flip(0, 1)


def _qdq(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, args: QuantArgs):
    q = torch.clamp(torch.round(w / scale) + zero, args.qmin, args.qmax)
    return q, (q - zero) * scale


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, args: QuantArgs, damp: float = 0.01,
                  act_order: bool = False, static_groups: bool = False, block_size: int = 128):
    """Return (q int16 [out, in], scale, zero) in `compute_qparams` layouts ([out, 1] channel, [out, in // g] group),
    scales in the ORIGINAL column order.

    damp: fraction of the mean Hessian diagonal added to the diagonal. act_order: quantize columns by decreasing
    Hessian diagonal. static_groups: group scales from the whole (unupdated) weight up front (required with
    act_order + groups, since the packed format has no per-column group index). Scales come from `args.observer`
    (e.g. "mse": GPTQ's clipping search)."""
    if args.granularity not in ("channel", "group"):
        raise ValueError(f"GPTQ quantizes weights per channel or per group, not {args.granularity!r}")
    group = args.group_size if args.granularity == "group" else None
    if act_order and group and not static_groups:
        raise ValueError("act_order with group_size needs static_groups=True: hfq's packed format stores group scales "
                         "in the original column order and has no per-column group index")
    W = weight.detach().float().clone()
    H = hessian.detach().float()
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match weight columns {cols}")

    dead = torch.diag(H) == 0
    diag = torch.diag(H).clone()
    diag[dead] = 1
    W[:, dead] = 0

    if group is None or static_groups:
        scale, zero = compute_qparams(W, args)  # [out, 1] or [out, n_groups], original column order
    else:
        scale = torch.empty(rows, cols // group, device=W.device)
        zero = torch.empty_like(scale)
    group_args = replace(args, granularity="channel", group_size=None) if group else args

    perm = torch.argsort(diag, descending=True) if act_order else None
    # H is copied once (permuted or not) before it is changed in place: the caller's matrix stays as it was
    H = H[perm][:, perm] if perm is not None else H.clone()
    if perm is not None:
        W, dead = W[:, perm], dead[perm]
    H[dead, dead] = 1
    # column -> its group, in processing order
    col_group = (torch.arange(cols, device=W.device) // group) if group else torch.zeros(cols, dtype=torch.long,
                                                                                          device=W.device)
    if perm is not None:
        col_group = col_group[perm]

    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    holder = [H]
    del H
    Hinv = _inverse_upper_cholesky(holder)

    # groups must never straddle a lazy block: take blocks as a multiple of the group size
    bs = max(group, block_size - block_size % group) if group else block_size
    qmin, qmax = args.qmin, args.qmax
    WT = W.t().contiguous()  # [cols, rows]: each column GPTQ walks is contiguous (row updates ~2.5x faster)
    Q = torch.zeros_like(W)
    dynamic_groups = group is not None and not static_groups
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1 = WT[i1:i2].clone()
        Hinv1 = Hinv[i1:i2, i1:i2]
        inv_d_t = 1 / torch.diag(Hinv1)
        inv_d = inv_d_t.tolist()
        if dynamic_groups:  # filled at each group's first column, from the already updated weights
            s_blk, z_blk = torch.empty_like(W1), torch.zeros_like(W1)
        else:
            idx = col_group[i1:i2]
            s_blk, z_blk = scale[:, idx].t(), zero[:, idx].t()
        # W1[i] keeps its value at the time it is quantized (only columns > i are updated), so the block's
        # integers and errors are computed once after the loop, not column by column
        for i in range(i2 - i1):
            if dynamic_groups and (i1 + i) % group == 0:
                s, z = compute_qparams(W1[i:i + group].t(), group_args)
                scale[:, (i1 + i) // group], zero[:, (i1 + i) // group] = s[:, 0], z[:, 0]
                s_blk[i:i + group], z_blk[i:i + group] = s.t(), z.t()
            w, sc, zc = W1[i], s_blk[i], z_blk[i]  # _qdq, in place: this loop runs once per column
            err = w - torch.div(w, sc).round_().add_(zc).clamp_(qmin, qmax).sub_(zc).mul_(sc)
            W1[i + 1:].addr_(Hinv1[i, i + 1:], err.mul_(inv_d[i]), alpha=-1)
        q, dq = _qdq(W1, s_blk, z_blk, args)
        Q[:, i1:i2] = q.t()
        WT[i2:].addmm_(Hinv[i1:i2, i2:].t(), (W1 - dq) * inv_d_t[:, None], alpha=-1)

    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q.to(torch.int16), scale, zero
