"""Vector (here scalar-codebook, 1-D) quantization: batched k-means and GPTVQ (van Baalen et al., 2024), the VQ
path of RWKVQuant (llm.md §5.2).

A weight [out, in] is cut into codebook groups of `rows_per_group` x `columns_per_group` weights; each group has
2^bits centroids, stored as 8-bit integers with one symmetric scale per column block (all codebooks of those
columns), and every weight stores the index of its centroid. `gptvq_quantize` walks the columns as GPTQ does, fitting
each column block's codebooks (k-means on the weights as updated by the error feedback so far) when it reaches the
block, rounding each column to its group's nearest centroid and pushing the error onto the columns not yet
quantized through the inverse Hessian; an M-step then refits the centroid values to the Hessian-weighted error.

Math only: the lifecycle lives in the method (quantizers/rwkvquant.py)."""
from __future__ import annotations

import torch

from .gptq import _inverse_upper_cholesky


def mahalanobis_init(x: torch.Tensor, k: int) -> torch.Tensor:
    """Initial centroids [G, k] of points x [G, n]: the points at evenly spaced ranks of their distance to the group
    mean (in 1-D, |x - mean| / std: the official code's Mahalanobis initialisation)."""
    order = torch.argsort((x - x.mean(-1, keepdim=True)).abs(), dim=-1)
    ranks = torch.linspace(0, x.shape[-1] - 1, k, device=x.device).round().long()
    return torch.gather(x, -1, order[:, ranks])


def nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid: x [G, n], centroids [G, k] -> [G, n]."""
    return (x.unsqueeze(-1) - centroids.unsqueeze(-2)).abs().argmin(-1)


@torch.no_grad()
def kmeans_1d(x: torch.Tensor, k: int, iters: int = 100, weights: torch.Tensor | None = None,
              init: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched 1-D k-means: x [G, n] (G independent groups) -> (centroids [G, k], assignment [G, n]).

    weights [G, n] (>= 0): the M-step's centroid = weighted mean of its points (RWKVQuant's importance-weighted
    codebooks for element-wise multipliers); the assignment is to the nearest centroid, unweighted. A centroid
    that loses all its points keeps its value. Stops early when the assignment no longer changes."""
    x = x.float()
    w = torch.ones_like(x) if weights is None else weights.float().expand_as(x)
    c = mahalanobis_init(x, k) if init is None else init.float().clone()
    assign = nearest(x, c)
    for _ in range(iters):
        onehot = torch.nn.functional.one_hot(assign, k).to(x.dtype) * w.unsqueeze(-1)  # [G, n, k]
        mass = onehot.sum(1)
        c = torch.where(mass > 0, (onehot * x.unsqueeze(-1)).sum(1) / mass.clamp(min=1e-30), c)
        new = nearest(x, c)
        if torch.equal(new, assign):
            break
        assign = new
    return c, assign


def quantize_codebook(c: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric integer codebook: c [..., k] -> (int8 values [..., k], one scale for all of them)."""
    qmax = 2 ** (bits - 1) - 1
    scale = (c.abs().max() / qmax).clamp(min=1e-12)
    return torch.clamp(torch.round(c / scale), -qmax - 1, qmax).to(torch.int8), scale.reshape(1)


@torch.no_grad()
def gptvq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int = 3, rows_per_group: int = 8,
                   columns_per_group: int = 32, damp: float = 0.01, kmeans_iters: int = 100, block_size: int = 128,
                   m_step_iters: int = 25, codebook_bits: int = 8):
    """GPTVQ with 1-D codebooks. Returns (indices int16 [out, in], codebooks int8 [in / cpg, out / rpg, 2^bits],
    codebook scales [in / cpg]): weight[r, c] ~ scale[c // cpg] * codebooks[c // cpg, r // rpg, indices[r, c]].

    Deviation from the released code (kept on purpose): each column block's codebooks are fitted on the weights as
    updated by the error feedback of every column before it (the released code and GPTVQ's fit the blocks that do
    not start a 128-column lazy batch on weights that miss that batch's feedback so far). M-step: `m_step_iters`
    Adam steps (lr 1e-3, as GPTVQ) on the centroid values against tr((W - Q) H (W - Q)^T), with the original W and
    the undamped H, then the codebooks are re-quantized; skipped when it does not lower that loss."""
    W = weight.detach().float().clone()
    H = hessian.detach().float()
    rows, cols = W.shape
    k = 2 ** bits
    if rows % rows_per_group or cols % columns_per_group:
        raise ValueError(f"a [{rows}, {cols}] weight does not split into codebook groups of {rows_per_group} rows x "
                         f"{columns_per_group} columns")
    if block_size % columns_per_group:
        raise ValueError(f"block_size {block_size} must be a multiple of columns_per_group {columns_per_group}")
    dead = torch.diag(H) == 0
    Hd = H.clone()
    Hd[dead, dead] = 1
    W[:, dead] = 0
    Hd.diagonal().add_(damp * torch.mean(torch.diag(Hd)))
    Hinv = _inverse_upper_cholesky([Hd])
    n_cb, n_rg = cols // columns_per_group, rows // rows_per_group
    codes = torch.empty(n_cb, n_rg, k, dtype=torch.int8, device=W.device)
    scales = torch.empty(n_cb, device=W.device)
    Q = torch.zeros_like(W)
    idx = torch.zeros(rows, cols, dtype=torch.int16, device=W.device)
    cents = None
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Err = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % columns_per_group == 0:  # fit this column block's codebooks on the updated weights
                g = col // columns_per_group
                pts = W1[:, i:i + columns_per_group].reshape(n_rg, -1)  # [row groups, rpg * cpg]
                c, _ = kmeans_1d(pts, k, kmeans_iters)
                codes[g], scales[g] = quantize_codebook(c, codebook_bits)
                cents = codes[g].float() * scales[g]  # [n_rg, k]
            w = W1[:, i]
            a = nearest(w.reshape(n_rg, rows_per_group), cents).reshape(-1)
            q = torch.gather(cents.repeat_interleave(rows_per_group, 0), 1, a[:, None])[:, 0]
            Q[:, col], idx[:, col] = q, a.to(torch.int16)
            err = (w - q) / Hinv1[i, i]
            W1[:, i + 1:] -= err[:, None] * Hinv1[i, i + 1:][None, :]
            Err[:, i] = err
        W[:, i2:] -= Err @ Hinv[i1:i2, i2:]
    if m_step_iters:
        codes, scales = _m_step(weight.detach().float(), H, idx, codes, scales, rows_per_group, columns_per_group,
                                m_step_iters, codebook_bits)
    return idx, codes, scales


def dequantize_vq(idx: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, rows_per_group: int,
                  columns_per_group: int) -> torch.Tensor:
    """Float weight [out, in] from `gptvq_quantize`'s indices, codebooks and scales."""
    cents = codes.float() * scales.float()[:, None, None]  # [n_cb, n_rg, k]
    table = cents.repeat_interleave(columns_per_group, 0).repeat_interleave(rows_per_group, 1)  # [in, out, k]
    return torch.gather(table, 2, idx.t().long().unsqueeze(-1))[..., 0].t()


def _m_step(W, H, idx, codes, scales, rpg, cpg, iters, codebook_bits):
    def loss_of(cents):
        table = cents.repeat_interleave(cpg, 0).repeat_interleave(rpg, 1)
        E = W - torch.gather(table, 2, idx.t().long().unsqueeze(-1))[..., 0].t()
        return ((E @ H) * E).sum()

    start = codes.float() * scales[:, None, None]
    before = loss_of(start)
    cents = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([cents], lr=1e-3)
    with torch.enable_grad():
        for _ in range(iters):
            opt.zero_grad()
            loss = loss_of(cents)
            loss.backward()
            opt.step()
    new_codes, new_scales = codes.clone(), scales.clone()
    for g in range(codes.shape[0]):
        new_codes[g], new_scales[g] = quantize_codebook(cents[g].detach(), codebook_bits)
    after = loss_of(new_codes.float() * new_scales[:, None, None])
    return (new_codes, new_scales) if after < before else (codes, scales)
