"""RWKVQuant's per-matrix proxies for choosing scalar (GPTQ) or vector (GPTVQ) quantization (llm.md §5.1).

Scalar quantization suits weights spread uniformly without outliers; clustering (VQ) suits the rest. Two proxies:
- "coarse_fine", the paper's coarse-to-fine proxy: sort the weights, take the gaps between consecutive distinct
  values, normalise them to a distribution G (n entries). Coarse: hce = log n + sum G log G (log n minus the
  entropy of the gaps; 0 when every gap is equal, i.e. perfectly uniform weights). Fine: f = n^2/2 |E(G - 1/n)^2| +
  n^3/6 |E(G - 1/n)^3| + n^4/12 |E(G - 1/n)^4| (higher moments of the gap distribution: outliers). Scalar when
  hce < tau_coarse and f < tau_fine, else vector. The released code's branch for it cannot run (an undefined
  variable, a float threshold indexed as a pair) and publishes no thresholds: hfq derives it from the paper's
  formulas, and the thresholds are chosen on a validation range (`benchmarks/rwkvquant.py`).
- "crest", what the released README command runs: crest factor max|W| / RMS(W); scalar when <= tau_crest (8)."""
from __future__ import annotations

import math

import torch


def crest_factor(weight: torch.Tensor) -> float:
    w = weight.detach().double()
    return float(w.abs().max() / w.pow(2).mean().sqrt())


def coarse_fine(weight: torch.Tensor) -> tuple[float, float]:
    """(hce, fine) of the paper's coarse-to-fine proxy, in float64."""
    values = torch.unique(weight.detach().double().flatten())  # sorted, distinct
    gaps = values.diff()
    gaps = gaps[gaps > 0]
    n = gaps.numel()
    if n < 2:
        return 0.0, 0.0
    g = gaps / gaps.sum()
    hce = math.log(n) + float((g * g.log()).sum())
    d = g - 1.0 / n
    fine = (n**2 / 2 * d.pow(2).mean().abs() + n**3 / 6 * d.pow(3).mean().abs() + n**4 / 12 * d.pow(4).mean().abs())
    return hce, float(fine)


def proxy_values(weight: torch.Tensor) -> dict:
    hce, fine = coarse_fine(weight)
    return {"hce": hce, "fine": fine, "crest": crest_factor(weight)}
