"""CFWS math (hfq.quant.cfws: coarse & fine weight split of fused re-parameterized convs) and the activation
thresholds (hfq.quant.kl: TensorRT entropy calibration, the streaming |x| histogram, our improved KL)."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hfq.quant.cfws import (centre_neighbour_stats, cfws_conv2d, fold_input_channel_scales, int16_bias,
                            split_coarse_fine)
from hfq.quant.kl import AbsHistogram, improved_kl_threshold, kl_threshold, threshold_curves


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors, one intra-op thread


def _fuse(kernel, gen, eps=1e-5):
    """kernel * gamma / std, beta - mean * gamma / std of a BatchNorm with random eval statistics."""
    n = kernel.shape[0]
    gamma, beta = torch.rand(n, generator=gen) + 0.5, torch.randn(n, generator=gen) * 0.2
    mean, var = torch.randn(n, generator=gen) * 0.2, torch.rand(n, generator=gen) * 1.5 + 0.5
    t = gamma / torch.sqrt(var + eps)
    return kernel * t.reshape(-1, 1, 1, 1), beta - mean * t


def repvgg_fused(channels=32, seed=0):
    """A RepVGG block's fused kernel and bias: BN(conv3x3) + BN(conv1x1 padded to the centre) + BN(identity)."""
    g = torch.Generator().manual_seed(seed)
    k3 = torch.randn(channels, channels, 3, 3, generator=g) * math.sqrt(2 / (9 * channels))
    k1 = torch.randn(channels, channels, 1, 1, generator=g) * math.sqrt(2 / channels)
    kid = torch.zeros(channels, channels, 3, 3)
    kid[range(channels), range(channels), 1, 1] = 1.0
    parts = [_fuse(k3, g), _fuse(F.pad(k1, (1, 1, 1, 1)), g), _fuse(kid, g)]
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


def plain_int8(w):
    s = w.abs().amax((1, 2, 3), keepdim=True) / 127
    return torch.clamp(torch.round(w / s), -128, 127) * s


# ------------------------------------------------------------------ coarse & fine split
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_split_reconstructs_within_half_a_fine_step(granularity):
    """Catches a fine part that drops the centre's rounding residual (fine = neighbours only), a fine part built
    from the unrounded centre, or a fine scale not sized by the fine part: coarse + fine must give every weight
    back to within half a fine step, the centre tap included."""
    w, _ = repvgg_fused(16, seed=1)
    sp = split_coarse_fine(w, granularity=granularity)
    err = (sp.reconstruct() - w).abs()
    bound = sp.fine_scale / 2 + 1e-6 * w.abs().amax()
    assert bool((err <= bound).all()), f"max err / half step {float((err / (sp.fine_scale / 2)).max()):.3f}"
    centre_err = err[:, :, 1, 1]
    assert float(centre_err.max()) > 0  # the centre is not exact on the coarse grid alone ...
    assert sp.fine.abs().max() == 127  # ... and the fine grid is max|fine| / 127


def test_coarse_part_is_the_centre_on_its_max_grid():
    """Catches a coarse part that leaks off-centre taps, or a coarse grid that is not max|centre| / 127 per output
    channel (e.g. / 128, or sized by the whole kernel), or per tensor when asked."""
    w = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(2))  # the channel max is mostly off-centre
    sp = split_coarse_fine(w)
    off = sp.coarse.clone()
    off[:, :, 1, 1] = 0
    assert int(off.abs().sum()) == 0 and sp.coarse.dtype == torch.int16
    centre_max = w[:, :, 1, 1].abs().amax(1)
    torch.testing.assert_close(sp.coarse_scale.reshape(-1), centre_max / 127)
    assert bool((sp.coarse[:, :, 1, 1].abs().amax(1) == 127).all())  # every channel uses its full range
    spt = split_coarse_fine(w, granularity="tensor")
    assert spt.coarse_scale.numel() == 1 and float(spt.coarse_scale) == pytest.approx(float(centre_max.max()) / 127)
    assert spt.fine_scale.shape == (16, 1, 1, 1)  # the official fine part stays per channel


def test_coarse_rounds_half_up_like_the_official_split():
    """Catches half-to-even rounding (torch.round) in the coarse split: the official divide_weight_headache rounds
    floor(x / step + 0.5), so a centre at exactly 2.5 steps goes to 3 (half-even: 2) and -2.5 to -2."""
    w = torch.zeros(1, 4, 3, 3)
    step = 2.0 ** -7
    w[0, :, 1, 1] = torch.tensor([127.0, 2.5, -2.5, 0.5]) * step  # max|centre| / 127 is exactly 2^-7
    w[0, 0, 0, 0] = 0.1 * step
    sp = split_coarse_fine(w)
    assert float(sp.coarse_scale) == step
    assert sp.coarse[0, :, 1, 1].tolist() == [127, 3, -2, 1]
    torch.testing.assert_close(sp.reconstruct(), w, rtol=0, atol=float(sp.fine_scale) / 2 + 1e-9)


def _official_two_stage(w, per_tensor_coarse):
    """The released RepVGGQuantConv2d, re-derived step by step: split the centre on max|centre| / 127 (half up),
    then fake-quantize each part with its own max|part| / 127 (the coarse one per tensor when asked)."""
    centre = w[:, :, 1:2, 1:2]
    step = centre.abs().amax() / 127 if per_tensor_coarse else centre.abs().amax((1, 2, 3), keepdim=True) / 127
    cc = torch.floor(centre / step + 0.5) * step
    coarse = F.pad(cc, (1, 1, 1, 1))
    fine = (w - F.pad(centre, (1, 1, 1, 1))) + F.pad(centre - cc, (1, 1, 1, 1))
    sc = coarse.abs().amax((1, 2, 3), keepdim=True) / 127
    if per_tensor_coarse:
        sc = sc.max().expand_as(sc)
    sf = fine.abs().amax((1, 2, 3), keepdim=True) / 127
    return (torch.clamp(torch.round(coarse / sc), -128, 127) * sc, torch.clamp(torch.round(fine / sf), -128, 127) * sf)


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_split_matches_the_official_two_stage_pipeline(granularity):
    """Catches a departure from the official layer: a coarse grid other than the one its second (per-part)
    quantization would use, a fine part quantized per tensor, a whole-kernel instead of a centre split."""
    w, _ = repvgg_fused(24, seed=3)
    ref_c, ref_f = _official_two_stage(w, granularity == "tensor")
    sp = split_coarse_fine(w, granularity=granularity)
    torch.testing.assert_close(sp.coarse_weight(), ref_c, rtol=1e-6, atol=1e-7)
    mismatch = (sp.fine_weight() - ref_f).abs() > 1e-6
    assert float(mismatch.float().mean()) < 1e-3  # only float-ulp ties at a rounding boundary may differ
    # re-quantizing the coarse part on its own max / 127 is lossless: same integers
    cw = sp.coarse_weight()
    s2 = cw.abs().amax() / 127 if granularity == "tensor" else cw.abs().amax((1, 2, 3), keepdim=True) / 127
    assert torch.equal(torch.round(cw / s2).to(torch.int16), sp.coarse)


def test_split_beats_plain_int8_on_a_fused_repvgg_kernel():
    """Catches a split that does not help a re-parameterized kernel (e.g. a fine grid sized by the whole kernel, or
    the centre kept on one grid with the neighbours): its weight and output errors must be clearly below plain
    per-channel int8 of the fused kernel; and the statistics must see the big centre."""
    w, b = repvgg_fused(32, seed=0)
    sp = split_coarse_fine(w)
    err_cfws = float((sp.reconstruct() - w).pow(2).mean())
    err_plain = float((plain_int8(w) - w).pow(2).mean())
    assert err_cfws < 0.25 * err_plain, f"CFWS weight MSE {err_cfws:.3e} vs plain per-channel int8 {err_plain:.3e}"
    x = torch.randn(2, 32, 12, 12, generator=torch.Generator().manual_seed(5))
    ref = F.conv2d(x, w, b, padding=1)
    q, s = int16_bias(b)
    out_cfws = cfws_conv2d(x, sp, q * s, padding=1)
    out_plain = F.conv2d(x, plain_int8(w), b, padding=1)
    e_cfws, e_plain = float((out_cfws - ref).pow(2).mean()), float((out_plain - ref).pow(2).mean())
    assert e_cfws < 0.25 * e_plain, f"CFWS output MSE {e_cfws:.3e} vs plain per-channel int8 {e_plain:.3e}"
    st = centre_neighbour_stats(w)
    assert st["centre_neighbour_ratio"] > 1.5 and st["neighbour_range_share"] < 0.7, st
    assert st["rel_error_cfws"] < 0.5 * st["rel_error_plain"], st
    plain_st = centre_neighbour_stats(torch.randn(32, 32, 3, 3, generator=torch.Generator().manual_seed(6)))
    assert plain_st["centre_neighbour_ratio"] < 1.2 and plain_st["neighbour_range_share"] > 0.9, plain_st


def test_cfws_conv_is_two_convolutions_with_the_bias_once():
    """Catches a CFWS forward that drops the fine convolution, adds the bias to both convolutions, or loses the
    stride / groups: it must equal one convolution with the reconstructed kernel."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(8, 4, 3, 3, generator=g)
    b = torch.randn(8, generator=g)
    x = torch.randn(2, 8, 9, 9, generator=g)
    sp = split_coarse_fine(w)
    out = cfws_conv2d(x, sp, b, stride=2, padding=1, groups=2)
    torch.testing.assert_close(out, F.conv2d(x, sp.reconstruct(), b, stride=2, padding=1, groups=2),
                               rtol=1e-5, atol=1e-5)


def test_int16_bias_official_scale_and_saturation():
    """Catches a bias scale of max|b| / 32767 instead of the official max|b| / 32768 (bias_qmax = 1 << 15), a
    missing clamp (the largest positive bias lands on 32768, outside int16), or an accumulator-aligned scale that
    is not input_scale * weight_scale."""
    b = torch.tensor([0.5, -1.0, 0.25, 1.0, 1e-3])
    q, s = int16_bias(b)
    assert float(s) == 1.0 / 32768
    assert int(q.max()) == 32767 and int(q.min()) == -32768
    assert float((q * s - b).abs()[b.abs() < 1].max()) <= float(s) / 2
    w_scale = torch.full((5, 1, 1, 1), 0.01)
    q2, s2 = int16_bias(b, input_scale=0.001, weight_scale=w_scale)
    torch.testing.assert_close(s2, torch.full((5,), 1e-5))
    assert q2.tolist() == [32767, -32768, 25000, 32767, 100]  # saturates beyond +-0.33


def test_fold_input_channel_scales_keeps_the_convolution():
    """Catches folding the input-scale ratios into the output channels, inverting the ratio, or mapping channels to
    the wrong group: conv(x / factor, W * factor) must equal conv(x, W), and the ratios are s / max(s)."""
    g = torch.Generator().manual_seed(8)
    w = torch.randn(6, 2, 3, 3, generator=g)
    s_in = torch.rand(4, generator=g) + 0.1
    x = torch.randn(1, 4, 7, 7, generator=g)
    wf, factor, s_max = fold_input_channel_scales(w, s_in, groups=2)
    torch.testing.assert_close(factor, s_in / s_in.max())
    assert float(s_max) == float(s_in.max())
    torch.testing.assert_close(F.conv2d(x / factor.reshape(1, -1, 1, 1), wf, padding=1, groups=2),
                               F.conv2d(x, w, padding=1, groups=2), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ KL thresholds
def brute_force_kl(counts, i, levels=128):
    """TensorRT's divergence for keeping bins[:i], written independently: level k holds bins ceil(k i / L) ..
    ceil((k + 1) i / L) - 1 of the raw histogram, spread over its nonzero bins; outliers folded into P only."""
    P = counts[:i].astype(np.float64).copy()
    P[i - 1] += counts[i:].sum()
    Q = np.zeros(i)
    for k in range(levels):
        lo, hi = -(-k * i // levels), -(-(k + 1) * i // levels)
        seg = counts[lo:hi]
        nz = seg > 0
        if nz.any():
            Q[lo:hi][nz] = seg.sum() / nz.sum()
    P, Q = P / P.sum(), Q / Q.sum()
    m = P > 0
    if (Q[m] == 0).any():
        return math.inf
    return float(np.sum(P[m] * np.log(P[m] / Q[m])))


def test_kl_threshold_on_gaussian_samples_matches_brute_force():
    """Catches a KL calibration that builds Q from the folded P, does not fold the outliers into P, merges the
    bins into the wrong levels or picks the wrong candidate: on N(0, 1), 1e5 samples, the threshold lies in
    2-5 sigma and its divergence is the minimum of an independently computed brute force."""
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    t = kl_threshold(x)
    assert 2.0 < t < 5.0, t
    a = x.abs().double().numpy()
    counts, edges = np.histogram(a, bins=2048, range=(0.0, a.max()))
    width = edges[1] - edges[0]
    curves = threshold_curves((counts, width))
    cands = sorted(set(range(128, 2049, 23)) | {2048, int(round(t / width))} |
                   set(range(int(round(t / width)) - 3, min(2049, int(round(t / width)) + 4))))
    for i in cands:
        mine, ref = float(curves["kl"][i - 128]), brute_force_kl(counts, i)
        assert mine == pytest.approx(ref, rel=1e-9, abs=1e-12) or (math.isinf(mine) and math.isinf(ref)), (i, mine, ref)
    best = min(brute_force_kl(counts, i) for i in cands)
    assert float(curves["kl"].min()) <= best + 1e-12
    t_np = kl_threshold((counts, width))
    assert abs(t_np - t) <= 3 * width, (t_np, t)  # np.histogram and AbsHistogram differ only at bin edges


def test_kl_threshold_clips_a_few_huge_outliers():
    """Catches a KL calibration that keeps a handful of huge outliers (e.g. outlier mass not folded into P, or the
    max returned): 10 values at 30 sigma among 1e5 Gaussian samples must not move the threshold far from the
    bulk."""
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(100_000, generator=g), torch.tensor([30.0, -30.0] * 5)])
    t = kl_threshold(x)
    assert 2.0 < t < 0.25 * 30.0, t


def test_streaming_histogram_rebins_exactly():
    """Catches a range-growing rebin that misplaces counts (merging the wrong bins, not doubling the width,
    losing the pending zeros): the accumulated histogram must be the histogram of all the data on the final grid,
    and its KL threshold that of the concatenated samples."""
    g = torch.Generator().manual_seed(2)
    batches = [torch.zeros(100), torch.randn(20_000, generator=g), torch.randn(20_000, generator=g) * 3,
               torch.randn(20_000, generator=g) * 0.5, torch.randn(20_000, generator=g) * 7]
    h = AbsHistogram(2048)
    for b in batches:
        h.update(b)
    allx = torch.cat(batches).abs().double()
    n = h.counts.numel()
    assert 1024 < n <= 2048 and h.width * n >= float(allx.max())
    ref = torch.bincount(torch.floor(allx / h.width).clamp(max=n - 1).long(), minlength=n).double()
    assert float(h.counts.sum()) == allx.numel()
    assert float((h.counts - ref).abs().sum()) <= 2 * len(batches)  # only values on an earlier top edge may move
    t_stream = kl_threshold(h)
    assert abs(t_stream - kl_threshold((ref, h.width))) <= 2 * h.width
    t_once = kl_threshold(torch.cat(batches))  # 2048 bins up to the max, not ~1300: a nearby threshold
    assert abs(t_stream - t_once) / t_once < 0.1, (t_stream, t_once)


def test_relative_mse_curve_is_the_fake_quant_error():
    """Catches a wrong MSE term in the improved KL (sawtooth integral, clipping error, scale t / 128 instead of
    t / 127, energy not E[x^2]): it must match fake-quantizing the samples themselves at several thresholds."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200_000, generator=g) * torch.rand(200_000, generator=g)  # a peaked, long-ish tail
    c = threshold_curves(x)
    a = x.abs().double()
    for k in (0, 300, 900, len(c["threshold"]) - 1):
        t = float(c["threshold"][k])
        s = t / 127
        direct = float(((a - torch.clamp(torch.round(a / s), max=127) * s) ** 2).mean() / (a ** 2).mean())
        assert float(c["relative_mse"][k]) == pytest.approx(direct, rel=3e-3), (t, float(c["relative_mse"][k]), direct)


def test_improved_kl_keeps_outliers_that_carry_energy():
    """Catches an improved KL that is not KL + relative fake-quant MSE as documented: with mse_weight 0 it must be
    plain KL exactly; on a Gaussian it stays near plain KL; when 20 values at 40 sigma hold ~24% of E[x^2], plain KL
    clips them and the improved metric keeps them, with a lower fake-quant MSE."""
    g = torch.Generator().manual_seed(4)
    gauss = torch.randn(100_000, generator=g)
    assert improved_kl_threshold(gauss, mse_weight=0.0) == kl_threshold(gauss)
    t_kl, t_imp = kl_threshold(gauss), improved_kl_threshold(gauss)
    assert abs(t_imp - t_kl) / t_kl < 0.15, (t_kl, t_imp)
    x = torch.cat([gauss, torch.tensor([40.0, -40.0] * 10)])
    t_kl, t_imp = kl_threshold(x), improved_kl_threshold(x)
    assert t_kl < 10.0 and t_imp > 35.0, (t_kl, t_imp)

    def fq_mse(t):
        s = t / 127
        return float((x - torch.clamp(torch.round(x / s), -128, 127) * s).pow(2).mean())

    assert fq_mse(t_imp) < 0.2 * fq_mse(t_kl), (fq_mse(t_imp), fq_mse(t_kl))


# ------------------------------------------------------------------ the quantizer (hfq.CFWSConfig)
def _tiny_repvgg():
    from hfq.modeling.repvgg import RepVGGConfig, RepVGGForImageClassification

    torch.manual_seed(0)
    cfg = RepVGGConfig(num_blocks=[1, 2, 2, 1], width_multiplier=[0.25, 0.25, 0.25, 0.5], num_labels=10,
                       image_size=32)
    model = RepVGGForImageClassification(cfg).eval()
    for m in model.modules():  # trained-like BatchNorm statistics: the fused centre taps then dominate
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
    return model


def test_cfws_quantizer_splits_every_fused_3x3_and_reloads(tmp_path):
    """Catches hfq.CFWSConfig quantizing the branch model instead of the fused one, a fused 3x3 conv left unsplit
    (or the 1x1 head / stem split), a split layer whose two integer kernels do not add up to the fused kernel within
    the fine grid, and a checkpoint whose skeleton rebuilds plain convolutions (reload must give identical logits)."""
    from transformers import AutoModelForImageClassification

    import hfq
    from hfq.nn import QuantCFWSConv2d

    model = _tiny_repvgg()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    fused = copy.deepcopy(model).reparameterize()
    q = hfq.quantize(copy.deepcopy(model), hfq.CFWSConfig(act_observer="minmax"), calibration=[{"pixel_values": x}])
    assert q.config.deploy
    split = {n: m for n, m in q.named_modules() if isinstance(m, QuantCFWSConv2d)}
    convs = {n: m for n, m in fused.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert set(split) == set(convs) and len(split) == 7
    for n, m in split.items():
        w = convs[n].weight
        step = m.fine.weight_scale.reshape(-1, 1, 1, 1)
        assert ((m.dequantized_weight() - w).abs() <= step / 2 + 1e-6).all(), n
    with torch.no_grad():
        ref, out = fused(pixel_values=x).logits, q(pixel_values=x).logits
    assert ((out - ref).norm() / ref.norm()) < 0.1
    q.save_pretrained(tmp_path / "q")
    r = AutoModelForImageClassification.from_pretrained(tmp_path / "q", trust_remote_code=True).eval()
    assert isinstance(r.get_submodule(next(iter(split))), QuantCFWSConv2d)
    with torch.no_grad():
        assert torch.equal(r(pixel_values=x).logits, out)


def test_kl_observers_set_static_scales_below_the_max():
    """Catches the "kl" / "kl_improved" activation observers being ignored (scale = max / 127 as min/max) or
    accepted for per-token activations, where one threshold per tensor does not apply."""
    from hfq.quant import QuantArgs, compute_qparams

    x = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    x[:5] = 20.0
    minmax = float(compute_qparams(x, QuantArgs(bits=8, granularity="tensor"))[0])
    kl = float(compute_qparams(x, QuantArgs(bits=8, granularity="tensor", observer="kl"))[0])
    assert kl < 0.5 * minmax and abs(kl * 127 - kl_threshold(x)) < 1e-4
    with pytest.raises(ValueError, match="per tensor"):
        compute_qparams(x.reshape(100, 1000), QuantArgs(bits=8, granularity="token", dynamic=True, observer="kl"))


def test_cfws_recipe_builds_the_default_config():
    """Catches the shipped CFWS recipe drifting from CFWSConfig's defaults (split, min/max, 32 calibration images)."""
    import hfq
    from hfq.recipe import load_recipe

    cfg = load_recipe("recipes/cfws-w8a8.yaml")
    assert isinstance(cfg, hfq.CFWSConfig) and cfg.to_dict() == hfq.CFWSConfig(n_samples=32).to_dict()
