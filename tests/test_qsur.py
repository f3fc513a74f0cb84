"""QSUR: analytic values on Gaussians, rotation/whitening effects, and per-layer model statistics."""
import math

import torch

from hfq.eval.qsur import log_qsur, max_qsur, model_qsur, qsur
from hfq.transforms import hadamard_matrix, klt_rotation, random_orthogonal


def test_isotropic_is_the_maximum():
    assert math.isclose(qsur(torch.eye(2), normalize=False), math.pi / 4, rel_tol=1e-12)  # disc in a square
    d = 8
    assert math.isclose(qsur(torch.eye(d)), max_qsur(d), rel_tol=1e-12)
    assert math.isclose(log_qsur(3.0 * torch.eye(d)), log_qsur(torch.eye(d)), rel_tol=1e-12)  # scale-free
    q = random_orthogonal(d, seed=0)
    aniso = q @ torch.diag(torch.linspace(0.1, 5, d, dtype=torch.float64)) @ q.T
    assert qsur(aniso) < max_qsur(d)


def test_zero_mean_formula():
    d = 6
    lam = torch.tensor([4.0, 1, 1, 1, 0.5, 0.25], dtype=torch.float64)
    expected = (d / 2 * math.log(math.pi) - math.lgamma(d / 2 + 1) + 0.5 * lam.log().sum().item()
                - d * math.log(2) - d / 2 * math.log(4.0))
    assert math.isclose(log_qsur(torch.diag(lam)), expected, rel_tol=1e-12)


def test_hadamard_raises_qsur_on_outliers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 64, generator=g, dtype=torch.float64)
    x[:, :3] *= 30  # a few outlier channels, as in LLM activations
    base = qsur(x)
    rotated = qsur(x @ hadamard_matrix(64))
    assert rotated > 1.5 * base
    # KLT then Hadamard equalises the diagonal: about the best an orthogonal transform can do
    cov = torch.cov(x.T)
    assert qsur(x @ klt_rotation(cov) @ hadamard_matrix(64)) >= rotated * 0.99
    assert qsur(x @ hadamard_matrix(64)) < max_qsur(64)


def test_activations_match_their_covariance():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 16, generator=g, dtype=torch.float64) @ random_orthogonal(16, seed=2)
    cov = torch.cov(x.T)
    assert math.isclose(qsur(x), qsur(cov, mean=x.mean(0)), rel_tol=1e-9)


def test_model_qsur_per_layer():
    from tests.conftest import build_tiny

    model = build_tiny("llama")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    out = model_qsur(model, ids)
    assert len(out) == 2 * 4 and all(k.startswith("model.layers.") for k in out)
    assert all(0 < v <= max_qsur(model.get_submodule(k).in_features) for k, v in out.items())
    assert model_qsur(model, [ids[:1], ids[1:]]).keys() == out.keys()
