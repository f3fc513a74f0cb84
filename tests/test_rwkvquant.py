"""RWKVQuant: the VQ solver and storage, the SQ / VQ proxies, mu codebooks, and quantize -> save -> reload on RWKV-4."""
import pytest
import torch
from conftest import build_tiny
from transformers import AutoModelForCausalLM

import hfq
from hfq.nn import QuantLinear
from hfq.nn.vq import VQLinear
from hfq.quant import QuantArgs, dequantize
from hfq.quantizers.rwkvquant.proxy import coarse_fine, crest_factor
from hfq.solvers import gptq_quantize
from hfq.solvers.vq import dequantize_vq, gptvq_quantize, kmeans_1d, quantize_codebook

CALIB = [torch.randint(0, 256, (64,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
IDS = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(9))
TINY = dict(group_size=32, block_size=32, mu_group=32, n_samples=4, seq_len=64)


def _problem(seed=0, rows=64, cols=128):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(1024, cols, generator=g) @ torch.randn(cols, cols, generator=g) * 0.3 + \
        torch.randn(1024, cols, generator=g)
    return W, 2 * X.T @ X / X.shape[0]


def _herr(W, Wq, H):
    E = W - Wq
    return float(((E @ H) * E).sum())


def test_gptvq_error_feedback_beats_plain_kmeans_and_decodes():
    """Catches a VQ solver without working error feedback (it must beat per-group k-means of the same codebook size
    on the Hessian-weighted error), an M-step that makes things worse, or indices / codebooks that do not decode to
    the weights the solver meant (8-bit codebooks, one scale per column block)."""
    W, H = _problem()
    idx, codes, scales = gptvq_quantize(W, H, bits=3, rows_per_group=8, columns_per_group=32)
    assert codes.dtype == torch.int8 and scales.shape == (4,) and int(idx.max()) < 8
    Wq = dequantize_vq(idx, codes, scales, 8, 32)
    blocks = W.reshape(8, 8, 4, 32).permute(2, 0, 1, 3).reshape(32, 256)  # the same codebook groups
    c, a = kmeans_1d(blocks, 8)
    plain = torch.gather(c, 1, a).reshape(4, 8, 8, 32).permute(1, 2, 0, 3).reshape(64, 128)
    assert _herr(W, Wq, H) < 0.8 * _herr(W, plain, H)
    idx0, codes0, scales0 = gptvq_quantize(W, H, bits=3, rows_per_group=8, columns_per_group=32, m_step_iters=0)
    assert _herr(W, Wq, H) <= _herr(W, dequantize_vq(idx0, codes0, scales0, 8, 32), H) + 1e-6


def test_gptvq_beats_gptq_on_gaussian_weights_at_similar_bits():
    """Catches a VQ path that loses to scalar GPTQ where clustering should win (bell-shaped weights, 3-bit indices
    with 256 weights per 8-entry codebook = 3.25 bits vs GPTQ 3-bit asymmetric g128)."""
    W, H = _problem(1)
    idx, codes, scales = gptvq_quantize(W, H, bits=3, rows_per_group=8, columns_per_group=32)
    a = QuantArgs(bits=3, symmetric=False, granularity="group", group_size=128)
    q, s, z = gptq_quantize(W, H, a, act_order=False)
    assert _herr(W, dequantize_vq(idx, codes, scales, 8, 32), H) < _herr(W, dequantize(q, s, z, a), H)


def test_weighted_kmeans_moves_centroids_to_important_points():
    """Catches the importance weights of the mu codebooks being ignored in the M-step."""
    x = torch.tensor([[0.0, 0.1, 0.2, 1.0, 1.1, 1.2]])
    w = torch.tensor([[1.0, 1.0, 100.0, 1.0, 1.0, 1.0]])
    c_plain, _ = kmeans_1d(x, 2, init=torch.tensor([[0.0, 1.0]]))
    c_w, _ = kmeans_1d(x, 2, weights=w, init=torch.tensor([[0.0, 1.0]]))
    assert abs(c_plain[0, 0] - 0.1) < 1e-6 and c_w[0, 0] > 0.19


def test_proxies_separate_uniform_from_outlier_weights():
    """Catches the coarse-to-fine proxy or the crest factor inverted or mis-normalised: uniform weights have hce and
    fine near their minimum and a small crest factor; weights with outliers score higher on all three."""
    g = torch.Generator().manual_seed(0)
    uniform = torch.linspace(-1, 1, 4096)[torch.randperm(4096, generator=g)].reshape(64, 64)
    heavy = torch.distributions.StudentT(2.0).sample((64, 64))
    hu, fu = coarse_fine(uniform)
    hh, fh = coarse_fine(heavy)
    assert hu < 1e-6 and fu < 1e-6 and hh > 0.5 and fh > 1.0
    assert crest_factor(uniform) < 2 < crest_factor(heavy)


def test_vqlinear_stores_what_it_computes():
    """Catches VQLinear storage that does not decode to the solver's weights, or a bits-per-weight that leaves out
    the codebooks and scales (its own, and hfq.eval.size's, which must count VQ layers)."""
    W, H = _problem(2, rows=16, cols=64)
    res = gptvq_quantize(W, H, bits=3, rows_per_group=8, columns_per_group=32)
    m = VQLinear.from_quantized(*res, 8, 32, 3, bias=torch.zeros(16))
    assert torch.equal(m.dequantized_weight(), dequantize_vq(*res, 8, 32))
    assert m.bits_per_weight() == pytest.approx(3 + (2 * 2 * 8 * 8 + 2 * 32) / (16 * 64))
    from hfq.eval.size import quantized_bytes  # what `hfq quantize`, model cards and benchmarks report

    assert quantized_bytes(torch.nn.Sequential(m))["bits_per_weight"] == pytest.approx(m.bits_per_weight())
    codes, scale = quantize_codebook(torch.tensor([-1.0, 0.5, 2.0]))
    assert torch.allclose(codes.float() * scale, torch.tensor([-1.0, 0.5, 2.0]), atol=2 / 127)


@pytest.mark.parametrize("proxy", ["vq", "sq", "crest"])
def test_rwkvquant_quantizes_saves_and_reloads(proxy, tmp_path):
    """Catches a checkpoint that does not rebuild RWKVQuant's modules: the proxy's per-layer choice (VQLinear vs
    QuantLinear) and the mu codebooks (parametrizations) must come back from the saved config, with identical
    logits; every block linear is quantized and the choices follow the proxy."""
    model = build_tiny("rwkv")
    with torch.no_grad():
        ref = model(IDS).logits
    hfq.quantize(model, hfq.RWKVQuantConfig(proxy=proxy, tau_crest=3.9, **TINY), calibration=CALIB)
    cfg = model.config.quantization_config
    choices = model.hf_quantizer.choices
    assert len(choices) == 14 and len(cfg.mu_params) == 10
    vq = {n for n, c in choices.items() if c["choice"] == "vq"}
    assert set(cfg.vq_modules) == vq
    expect = {"vq": set(choices), "sq": set(), "crest": {n for n, c in choices.items() if c["crest"] > 3.9}}[proxy]
    assert vq == expect
    for name in choices:
        assert isinstance(model.get_submodule(name), VQLinear if name in vq else QuantLinear)
    with torch.no_grad():
        out = model(IDS).logits
    assert 0 < (out - ref).abs().max() < ref.abs().max()
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, out)
    assert torch.equal(again.rwkv.blocks[0].attention.time_mix_key, model.rwkv.blocks[0].attention.time_mix_key)


def test_mu_codebooks_follow_the_importance_statistic():
    """Catches mu_importance being ignored (E[x^2] and |E[x]| weight the k-means differently, so the codebooks
    differ), and mu left float when mu_codebooks=True (at most 2^mu_bits distinct values per group)."""
    mus = {}
    for importance in ("mean_square", "abs_mean"):
        model = build_tiny("rwkv")
        hfq.quantize(model, hfq.RWKVQuantConfig(proxy="sq", mu_importance=importance, **TINY), calibration=CALIB)
        mu = model.rwkv.blocks[0].attention.time_mix_key.detach().reshape(-1)
        assert len(torch.unique(mu[:32])) <= 8
        mus[importance] = mu
    assert not torch.equal(mus["mean_square"], mus["abs_mean"])


def test_config_validation():
    """Catches silently accepted bad settings: unknown proxy or importance, activation bits on a weight-only
    method, a lazy batch that splits a VQ column block."""
    with pytest.raises(ValueError, match="proxy"):
        hfq.RWKVQuantConfig(proxy="entropy")
    with pytest.raises(ValueError, match="mu_importance"):
        hfq.RWKVQuantConfig(mu_importance="mean")
    with pytest.raises(ValueError, match="weights only"):
        hfq.RWKVQuantConfig(act_bits=8)
    with pytest.raises(ValueError, match="block_size"):
        hfq.RWKVQuantConfig(block_size=48, vq_columns_per_group=32)
    d = hfq.RWKVQuantConfig(proxy="crest", vq_modules=["a.b"]).to_dict()
    assert hfq.RWKVQuantConfig.from_dict(d).vq_modules == ["a.b"]
