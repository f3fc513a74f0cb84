"""QSUR (quantization space utilisation rate, OSTQuant §3; formulas re-derived in llm.md §1.1).

QSUR = V_X / V_S: volume of the data's confidence ellipsoid over the volume of the smallest hyper-cube (one scale
for all d channels) that covers it. For x ~ N(mu, Sigma):
  V_X = pi^(d/2) / Gamma(d/2 + 1) * chi^d * prod(lambda_i)^(1/2),   V_S = (2 max_j(|mu_j| + chi sqrt(Sigma_jj)))^d,
chi^2 = the chi-square(d) quantile at `confidence` (chi cancels when mu = 0). The raw ratio underflows for LLM
widths (about 1e-300 at d = 576 even for isotropic data), so `qsur` returns its d-th root by default: the
per-dimension utilisation, monotone in QSUR and comparable across widths. A diagnostic only; OSTQuant does not
optimise it directly."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def _chi(d: int, confidence: float) -> float:
    """sqrt of the chi-square(d) quantile, Wilson–Hilferty approximation (no scipy needed)."""
    z = math.sqrt(2) * torch.erfinv(torch.tensor(2 * confidence - 1, dtype=torch.float64)).item()
    return math.sqrt(d * (1 - 2 / (9 * d) + z * math.sqrt(2 / (9 * d))) ** 3)


def _stats(x: torch.Tensor, mean: torch.Tensor | None):
    """(cov, mean) from a covariance matrix (square and symmetric) or from activations [..., d]."""
    x = x.detach().to(torch.float64)
    if x.ndim == 2 and x.shape[0] == x.shape[1] and torch.allclose(x, x.T):
        return x, (torch.zeros(x.shape[0], dtype=torch.float64) if mean is None else mean.to(torch.float64))
    flat = x.reshape(-1, x.shape[-1])
    mu = flat.mean(0)
    centred = flat - mu
    return centred.T @ centred / max(flat.shape[0] - 1, 1), mu


def log_qsur(cov_or_activations: torch.Tensor, mean: torch.Tensor | None = None, confidence: float = 0.99) -> float:
    """Natural log of the raw QSUR. A square symmetric input is a covariance (with `mean`, default 0); anything
    else is activations [..., d] whose mean and covariance are estimated. Eigenvalues are floored at 1e-12 * max
    so rank-deficient estimates stay finite."""
    cov, mu = _stats(cov_or_activations, mean)
    d = cov.shape[0]
    evals = torch.linalg.eigvalsh(cov)
    evals = evals.clamp_min(evals.max().clamp_min(1e-300) * 1e-12)
    chi = _chi(d, confidence)
    log_vx = d / 2 * math.log(math.pi) - math.lgamma(d / 2 + 1) + d * math.log(chi) + 0.5 * evals.log().sum().item()
    half_side = (mu.abs() + chi * torch.diagonal(cov).clamp_min(0).sqrt()).max().item()
    return log_vx - d * math.log(2 * half_side)


def qsur(cov_or_activations: torch.Tensor, mean: torch.Tensor | None = None, confidence: float = 0.99,
         normalize: bool = True) -> float:
    """QSUR^(1/d) (normalize=True, the default) or the raw QSUR. At most (pi^(d/2)/Gamma(d/2+1))^(1/d) / 2,
    reached by zero-mean isotropic data."""
    d = cov_or_activations.shape[-1]
    value = log_qsur(cov_or_activations, mean, confidence)
    return math.exp(value / d) if normalize else math.exp(value)


def max_qsur(d: int, normalize: bool = True) -> float:
    value = d / 2 * math.log(math.pi) - math.lgamma(d / 2 + 1) - d * math.log(2)
    return math.exp(value / d) if normalize else math.exp(value)


@torch.no_grad()
def model_qsur(model, calibration_ids, modules: list[str] | None = None, **kwargs) -> dict[str, float]:
    """QSUR of the input of each quantized linear's activation, per decoder layer: {module name: qsur}.

    Default modules: the first consumer of each distinct input in a block (q_proj, o_proj, up_proj, down_proj)
    where the architecture has a transform layout, else every nn.Linear inside the blocks. Inputs are read by
    forward pre-hooks, so they include any online rotation attached to the module. `calibration_ids`: a tensor
    [batch, seq] or a list of them. kwargs go to `qsur`."""
    from ..arch import get_adapter

    adapter = get_adapter(model)
    prefix = adapter.blocks
    if modules is None:
        layout = adapter.transforms
        blocks = model.get_submodule(prefix)
        if layout is not None:
            rel = [f"{layout.attn}.{layout.q}", f"{layout.attn}.{layout.o}", f"{layout.mlp}.{layout.up}",
                   f"{layout.mlp}.{layout.down}"]
            modules = [f"{prefix}.{i}.{r}" for i in range(len(blocks)) for r in rel]
        else:
            modules = [f"{prefix}.{n}" for n, m in blocks.named_modules() if isinstance(m, nn.Linear)]
    sums: dict[str, list] = {}

    def hook(name):
        def fn(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            s = sums.setdefault(name, [0, 0.0, 0.0])
            s[0] += x.shape[0]
            s[1] = s[1] + x.sum(0)
            s[2] = s[2] + x.T @ x
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in modules]
    try:
        for ids in ([calibration_ids] if torch.is_tensor(calibration_ids) else calibration_ids):
            model(input_ids=ids.to(model.device))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name in modules:
        n, sx, sxx = sums[name]
        mu = sx / n
        cov = (sxx - n * torch.outer(mu, mu)) / max(n - 1, 1)
        out[name] = qsur((cov + cov.T) / 2, mean=mu, **kwargs)
    return out
