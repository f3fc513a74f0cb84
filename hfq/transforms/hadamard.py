"""Orthonormal Hadamard matrices of any order 2^k * m with a Paley-constructible m, applied fast.

Rotations must fit hidden sizes such as SmolLM2's 576 = 16 * 36 or 1536 = 128 * 12, which power-of-two-only
implementations cannot. H_n is built as a Kronecker product of small factors (Sylvester 2^j blocks and one or more
Paley matrices), so `apply_hadamard` costs n * sum(factor sizes) per row instead of n^2."""
from __future__ import annotations

import functools
import math

import torch

_MAX_POW2_FACTOR = 64  # split 2^k into Sylvester blocks of at most this order (cheap small matmuls)


def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % d for d in range(2, math.isqrt(p) + 1))


def _legendre(q: int) -> torch.Tensor:
    """chi(a) for a in 0..q-1: 0, +1 for non-zero squares mod q, -1 otherwise (q prime)."""
    chi = -torch.ones(q, dtype=torch.float64)
    chi[sorted({(a * a) % q for a in range(1, q)})] = 1
    chi[0] = 0
    return chi


def _jacobsthal(q: int) -> torch.Tensor:
    i = torch.arange(q)
    return _legendre(q)[(i[None, :] - i[:, None]) % q]  # Q[i, j] = chi(j - i)


def _paley_kind(n: int) -> str | None:
    """Which Paley construction gives a Hadamard matrix of order n (prime q only, no prime powers)."""
    if n >= 4 and _is_prime(n - 1) and (n - 1) % 4 == 3:
        return "I"
    if n % 2 == 0 and n >= 12 and _is_prime(n // 2 - 1) and (n // 2 - 1) % 4 == 1:
        return "II"
    return None


@functools.lru_cache(maxsize=None)
def _paley(n: int) -> torch.Tensor:
    """Unnormalised ±1 Hadamard matrix of order n: Paley I (n = q+1, q ≡ 3 mod 4) or II (n = 2(q+1), q ≡ 1 mod 4)."""
    kind = _paley_kind(n)
    if kind == "I":
        q = n - 1
        s = torch.zeros(n, n, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
        h = s + torch.eye(n, dtype=torch.float64)
    elif kind == "II":
        q = n // 2 - 1
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
        zero_block = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        one_block = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        h = torch.kron(c, one_block) + torch.kron((c == 0).double(), zero_block)
    else:
        raise ValueError(f"no Paley construction for order {n}")
    v = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(h @ (h.T @ v), n * v), f"Paley construction failed for order {n}"  # O(n^2) check
    return h


@functools.lru_cache(maxsize=None)
def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.lru_cache(maxsize=None)
def _factor_orders(n: int) -> tuple[int, ...] | None:
    """n as a product of Hadamard orders: powers of two and Paley orders; one smallest Paley factor preferred."""
    if n < 1:
        return None
    if n & (n - 1) == 0:
        return (n,)
    pow2 = n & -n
    candidates = [b for b in range(4, n + 1, 4) if n % b == 0 and b & (b - 1) and _paley_kind(b)]
    for b in candidates:  # one Paley factor times a power of two
        if (n // b) & (n // b - 1) == 0:
            return (b, n // b)
    for b in candidates:  # several Paley factors (e.g. 144 * 2^k = 12 * 12 * 2^k)
        rest = _factor_orders(n // b)
        if rest is not None:
            return (b, *rest)
    return None


def hadamard_factors(n: int) -> list[torch.Tensor]:
    """Orthonormal factors F_1..F_r (float64) with H_n = F_1 ⊗ ... ⊗ F_r; ValueError naming n if none exist."""
    orders = _factor_orders(n)
    if orders is None:
        raise ValueError(
            f"no Hadamard matrix construction for size {n}: supported sizes are 2^k * m with m a product of Paley "
            f"orders (q+1 for primes q ≡ 3 mod 4, 2(q+1) for primes q ≡ 1 mod 4: 12, 20, 24, 28, 36, 44, ...); "
            f"use random_orthogonal({n}) or a block-diagonal rotation instead")
    out = []
    for o in orders:
        if o & (o - 1) == 0:
            while o > 1:
                b = min(o, _MAX_POW2_FACTOR)
                out.append(_sylvester(b) / math.sqrt(b))
                o //= b
        else:
            out.append(_paley(o) / math.sqrt(o))
    return out or [torch.ones(1, 1, dtype=torch.float64)]


@functools.lru_cache(maxsize=64)
def _factors_on(n: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    return tuple(f.to(device=device, dtype=dtype) for f in hadamard_factors(n))


def hadamard_matrix(n: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """Explicit orthonormal Hadamard matrix H_n (H H^T = I)."""
    h = functools.reduce(torch.kron, hadamard_factors(n))
    return h.to(dtype=dtype, device=device)


def apply_hadamard(x: torch.Tensor, n: int | None = None, transpose: bool = False) -> torch.Tensor:
    """x @ H_n (x @ H_n^T with `transpose`, its inverse) along the last dimension (n defaults to x.shape[-1]) without
    forming H_n.

    Computed in at least float32 (online rotations of fp16/bf16 activations lose accuracy otherwise), returned in
    x's dtype."""
    n = x.shape[-1] if n is None else n
    if x.shape[-1] != n:
        raise ValueError(f"apply_hadamard: last dimension {x.shape[-1]} != n={n}")
    work = torch.promote_types(x.dtype, torch.float32)
    factors = _factors_on(n, x.device, work)
    lead = x.shape[:-1]
    y = x.to(work).reshape(-1, *[f.shape[0] for f in factors])
    for axis, f in enumerate(factors, start=1):
        # y[..., i_axis, ...] -> sum_i y[..., i, ...] F[i, j]  (x @ (A ⊗ B) = reshape, contract each factor's axis)
        y = torch.movedim(torch.movedim(y, axis, -1) @ (f.t() if transpose else f), -1, axis)
    return y.reshape(*lead, n).to(x.dtype)


def random_hadamard(n: int, seed: int = 0, dtype=torch.float64, device=None) -> torch.Tensor:
    """diag(±1) @ H_n with signs from `seed` (CPU generator, so the same on every machine)."""
    return random_signs(n, seed, dtype)[:, None].to(device) * hadamard_matrix(n, dtype, device)


def random_signs(n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(dtype)


def random_orthogonal(n: int, seed: int = 0, dtype=torch.float64, device=None) -> torch.Tensor:
    """Haar-random orthogonal matrix: QR of a Gaussian with the signs of diag(R) folded into Q."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))[None, :]
    return q.to(dtype=dtype, device=device)


def klt_rotation(cov: torch.Tensor, descending: bool = True) -> torch.Tensor:
    """Karhunen–Loève rotation: eigenvectors of a symmetric covariance as columns, sorted by eigenvalue.

    x @ klt_rotation(cov) decorrelates x; OSTQuant/MambaQuant follow it with a Hadamard to spread the energy."""
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"klt_rotation needs a square covariance matrix, got shape {tuple(cov.shape)}")
    c = cov.to(torch.float64)
    evals, evecs = torch.linalg.eigh((c + c.T) / 2)  # ascending
    order = torch.argsort(evals, descending=descending)
    return evecs[:, order]
