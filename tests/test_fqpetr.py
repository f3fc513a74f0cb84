"""FQ-PETR: QFPE position embedding, DULUT lookup tables, QANS softmax, hfq.FQPETRConfig save / reload."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_petr import _random_inputs, synthetic_root, tiny_config  # noqa: F401  (fixture re-used)

import hfq
from hfq.modeling.petr import PetrConfig, PetrForObjectDetection3D
from hfq.modeling.petr.modeling_petr import PetrQFPE
from hfq.nn import LUTFunction, QuantSoftmax
from hfq.quant.lut import FUNCTIONS, dulut, fit_dulut, fit_single, linear_lut, table_error


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors, one intra-op thread


# ------------------------------------------------------------------ QFPE
def test_qfpe_interpolates_bounded_anchors():
    """Catches a QFPE embedding that is not the linear interpolation between the two anchors bracketing t (wrong
    anchor index, weight reversed, last interval read past the end at t = 1) or that is not bounded by gamma."""
    torch.manual_seed(0)
    qfpe = PetrQFPE(num_anchors=3, dims=4, gamma=0.8)
    torch.nn.init.normal_(qfpe.anchors, 0, 3.0)  # large raw anchors: the bound must come from gamma * tanh
    table = 0.8 * torch.tanh(qfpe.anchors.detach())
    cases = [(0.0, table[:, 0]), (0.25, (table[:, 0] + table[:, 1]) / 2), (0.5, table[:, 1]),
             (0.9, 0.2 * table[:, 1] + 0.8 * table[:, 2]), (1.0, table[:, 2]), (1.7, table[:, 2]), (-0.3, table[:, 0])]
    t = torch.tensor([c[0] for c in cases])
    out = qfpe(t[:, None, None, None].expand(-1, 1, 1, 3)).detach()  # (M, 12, 1, 1)
    for i, (v, expect) in enumerate(cases):
        torch.testing.assert_close(out[i, :, 0, 0], expect.reshape(-1), msg=f"t={v}")
    assert out.abs().max() <= 0.8


def test_qfpe_model_feeds_bounded_inputs_to_the_official_position_encoder():
    """Catches pe_type="qfpe" still feeding the inverse-sigmoid frustum (+-11.5) to the position encoder, a QFPE
    input width other than the official 3 * depth_num, and bad QFPE settings accepted silently."""
    torch.manual_seed(0)
    seen = {}
    for pe in ("petr", "qfpe"):
        model = PetrForObjectDetection3D(tiny_config(pe_type=pe)).eval()
        conv = model.model.position_encoder[0]
        assert conv.in_channels == 3 * model.config.depth_num
        hook = conv.register_forward_pre_hook(lambda m, a, pe=pe: seen.update({pe: a[0].abs().max()}))
        with torch.no_grad():
            model(**_random_inputs(1))
        hook.remove()
    assert seen["qfpe"] <= 0.8 < 11 < seen["petr"]
    # PETRv2 (two frames, feature-guided PE) and the StreamPETR memory queue run on QFPE too
    for variant in (dict(num_frames=2, with_fpe=True), dict(memory_len=8, num_propagated=4)):
        model = PetrForObjectDetection3D(tiny_config(pe_type="qfpe", **variant)).eval()
        x = _random_inputs(1)
        if variant.get("num_frames") == 2:
            x = {k: torch.cat([v, v], 1) for k, v in x.items()}
        with torch.no_grad():
            out = model(**x)
            if model.config.memory_len:
                out = model(**x, memory=out.memory)
        assert torch.isfinite(out.pred_boxes).all()
    for bad in (dict(pe_type="sine"), dict(pe_type="qfpe", qfpe_num_anchors=1), dict(pe_type="qfpe", qfpe_gamma=0)):
        with pytest.raises(ValueError, match="pe_type|QFPE"):
            PetrConfig(**bad)


# ------------------------------------------------------------------ lookup tables
def test_linear_lut_interpolates_between_uniform_entries():
    """Catches an off-by-one index or a wrong interpolation weight in the linear LUT, and inputs outside the range
    not saturating."""
    values = torch.tensor([0.0, 10.0, 30.0, 60.0])  # entries at x = 0, 1, 2, 3
    x = torch.tensor([0.0, 0.5, 1.0, 2.25, 3.0, 5.0, -1.0])
    torch.testing.assert_close(linear_lut(x, 0.0, 3.0, values), torch.tensor([0.0, 5.0, 10.0, 37.5, 60.0, 60.0, 0.0]))


@pytest.mark.parametrize("fn,lo,hi", [("exp", -20.0, 0.0), ("sigmoid", -8.0, 8.0), ("gelu", -8.0, 8.0)])
def test_dulut_split_merge_beats_a_uniform_32_table_and_is_exact_at_breakpoints(fn, lo, hi):
    """Catches a split / merge search that does nothing or makes the table worse (its mean error must beat the
    uniform 32-entry linear table it starts from, in mean and max), and a cascade whose LUT-1 does not rise
    linearly across each LUT-2 segment (then the cascade would not interpolate f between breakpoints)."""
    index, values = fit_dulut(fn, lo, hi, 32, 32)
    assert index.shape == (32,) and values.shape == (32,)
    assert bool((index.diff() >= 0).all()) and float(index[0]) == 0 and float(index[-1]) == 31
    uniform = fit_single(fn, lo, hi, 32)
    e_dulut = table_error(lambda x: dulut(x, lo, hi, index, values), fn, lo, hi)
    e_uniform = table_error(lambda x: linear_lut(x, lo, hi, uniform), fn, lo, hi)
    assert e_dulut["mean"] < 0.8 * e_uniform["mean"] and e_dulut["max"] < e_uniform["max"], (e_dulut, e_uniform)
    # LUT-2 holds f at its breakpoints: at each LUT-1 input whose index is an integer, the cascade equals f
    knots = torch.linspace(lo, hi, 32)
    whole = (index - index.round()).abs() < 1e-4
    torch.testing.assert_close(dulut(knots[whole], lo, hi, index, values), FUNCTIONS[fn](knots[whole]),
                               atol=1e-4, rtol=1e-4)


def test_lut_function_calibrates_refuses_uncalibrated_and_saturates():
    """Catches a table used before calibration (NaN tables must refuse, not return garbage), a table fitted on
    another range than the observed one, and inputs beyond the calibrated range extrapolating instead of
    saturating."""
    lut = LUTFunction("sigmoid", "dulut")
    with pytest.raises(RuntimeError, match="not calibrated"):
        lut(torch.zeros(3))
    lut.observe()
    lut(torch.linspace(-6, 4, 100))
    lut.freeze("t")
    assert lut.input_range.tolist() == pytest.approx([-6.0, 4.0])
    x = torch.linspace(-6, 4, 1001)
    assert (lut(x) - torch.sigmoid(x)).abs().max() < 5e-3
    assert float(lut(torch.tensor([100.0]))) == pytest.approx(float(torch.sigmoid(torch.tensor(4.0))), abs=1e-3)


# ------------------------------------------------------------------ QANS
def test_qans_clips_after_subtracting_the_max_and_picks_the_closest_beta():
    """Catches QANS quantizing z instead of z - max(z), masked keys leaking probability, rows not normalised, a
    beta chosen other than the candidate with the smallest softmax deviation, and the plain int8 (raw) input being
    as good as QANS when a large offset dominates the logit range (the paper's point)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 50, generator=g) * 3 + 40  # large common offset: raw int8 spends its levels on it
    z[:, -5:] = float("-inf")  # masked keys
    qans, raw = QuantSoftmax("qans"), QuantSoftmax("raw")
    for sm in (qans, raw):
        sm.observe()
        sm(z)
        sm.freeze()
    devs = qans.deviations
    assert float(qans.clip) == min(devs, key=devs.get)
    assert devs[2.0] > devs[float(qans.clip)] < devs[32.0]  # too tight truncates, too wide rounds coarsely
    ref = z.softmax(-1)
    p_qans, p_raw = qans(z), raw(z)
    for p in (p_qans, p_raw):
        assert torch.equal(p[:, -5:], torch.zeros(64, 5))
        torch.testing.assert_close(p.sum(-1), torch.ones(64))
    err_qans, err_raw = (p_qans - ref).abs().sum(-1).mean(), (p_raw - ref).abs().sum(-1).mean()
    assert err_qans < 0.5 * err_raw, (err_qans, err_raw)


# ------------------------------------------------------------------ the quantizer
def test_fqpetr_quantizes_every_part_and_reloads_exactly(tmp_path):
    """Catches a marked non-linear left in float under lut="dulut", an attention without its QANS softmax, tables or
    clips missing from the checkpoint (must refuse to load, not run NaN), a reload that rebuilds softmax / tables
    differently (outputs must be identical), and FQ-PETR far from the float model."""
    from transformers import AutoModel

    torch.manual_seed(0)
    model = PetrForObjectDetection3D(tiny_config(pe_type="qfpe", with_fpe=True)).eval()
    calib, test = _random_inputs(2, seed=1), _random_inputs(1, seed=2)
    with torch.no_grad():
        ref = model(**test)
    q = hfq.quantize(copy.deepcopy(model), hfq.FQPETRConfig(), calibration=[calib]).eval()
    tables = {n: m for n, m in q.named_modules() if isinstance(m, LUTFunction)}
    assert {"model.fpe.gate", "anchor_logit", "centre_sigmoid"} <= set(tables)
    for layer in q.model.decoder.layers:
        for attn in (layer.self_attn, layer.cross_attn):
            assert isinstance(attn.softmax, QuantSoftmax) and attn.softmax.mode == "qans"
            assert float(attn.softmax.clip) in attn.softmax.beta_candidates
            assert isinstance(attn.softmax.exp_table, LUTFunction) and attn.softmax.exp_table.calibrated()
    with torch.no_grad():
        out = q(**test)
    rel = ((out.logits - ref.logits).norm() / ref.logits.norm()).item()
    assert 0 < rel < 0.1, rel
    q.save_pretrained(tmp_path / "q")
    assert json.load(open(tmp_path / "q" / "config.json"))["quantization_config"]["quant_method"] == "hfq_fqpetr"
    r = AutoModel.from_pretrained(tmp_path / "q", trust_remote_code=True).eval()
    with torch.no_grad():
        out2 = r(**test)
    assert torch.equal(out.logits, out2.logits) and torch.equal(out.pred_boxes, out2.pred_boxes)
    sd = load_file(tmp_path / "q" / "model.safetensors")
    key = next(k for k in sd if k.endswith("cross_attn.softmax.exp_table.values"))
    del sd[key]
    save_file(sd, tmp_path / "q" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing"):
        AutoModel.from_pretrained(tmp_path / "q", trust_remote_code=True)


def test_fqpetr_config_errors_and_baseline_switches():
    """Catches invalid FQ-PETR settings accepted silently, and lut=None / softmax_input=None not giving the plain
    W8A8 model (no tables, float softmax)."""
    for bad, match in ((dict(softmax_input="int4"), "softmax_input"), (dict(lut="poly"), "lut"),
                       (dict(beta_candidates=[0, 4]), "beta"), (dict(act_dynamic=True), "static"),
                       (dict(lut_value_entries=16), "lut_value_entries")):
        with pytest.raises(ValueError, match=match):
            hfq.FQPETRConfig(**bad)
    torch.manual_seed(0)
    model = PetrForObjectDetection3D(tiny_config()).eval()
    q = hfq.quantize(model, hfq.FQPETRConfig(softmax_input=None, lut=None), calibration=[_random_inputs(1)])
    assert not any(isinstance(m, (LUTFunction, QuantSoftmax)) for m in q.modules())
    assert q.model.decoder.layers[0].cross_attn.softmax is None


def test_fqpetr_on_load_from_a_nuscenes_folder(synthetic_root, tmp_path):
    """Catches `dataset=<nuScenes-format folder>` not being read as calibration data (quantize-on-load of the
    custom-code checkpoint must calibrate from the folder's train split through the model's image processor)."""
    from transformers import AutoModel

    torch.manual_seed(0)
    PetrForObjectDetection3D(tiny_config(class_names=list(CLASS_NAMES))).eval().save_pretrained(tmp_path / "fp")
    cfg = hfq.FQPETRConfig(dataset=synthetic_root, n_samples=2, batch_size=1)
    q = AutoModel.from_pretrained(tmp_path / "fp", trust_remote_code=True, quantization_config=cfg).eval()
    softmax = q.model.decoder.layers[0].cross_attn.softmax
    assert softmax.calibrated() and q.centre_sigmoid.calibrated()
    with pytest.raises(ValueError, match="calibration samples"):
        AutoModel.from_pretrained(tmp_path / "fp", trust_remote_code=True,
                                  quantization_config=hfq.FQPETRConfig(dataset=synthetic_root, n_samples=99))


CLASS_NAMES = ["car", "truck", "construction_vehicle", "bus", "trailer", "barrier", "motorcycle", "bicycle",
               "pedestrian", "traffic_cone"]


def test_smoothquant_style_divides_inputs_and_scales_weights(tmp_path):
    """Catches the SmoothQuant-style baseline computing s other than absmax(x)^a / absmax(w)^(1-a) per input channel
    of the float calibration pass, weights not multiplied by s (or inputs not divided: then W x would change), and a
    reload that drops the divisors."""
    from transformers import AutoModel

    torch.manual_seed(0)
    model = PetrForObjectDetection3D(tiny_config()).eval()
    calib, test = _random_inputs(2, seed=1), _random_inputs(1, seed=2)
    seen = []
    attn = model.model.decoder.layers[1].cross_attn
    hook = attn.register_forward_pre_hook(lambda m, args: seen.append(args[1].detach().abs().amax((0, 1))))
    with torch.no_grad():
        ref = model(**calib)
    hook.remove()
    d = attn.embed_dim
    w_k = attn.in_proj_weight.detach()[d:2 * d].clone()
    expect = (seen[0].clamp(min=1e-5) ** 0.5 / w_k.abs().amax(0).clamp(min=1e-5) ** 0.5)
    cfg = hfq.FQPETRConfig(smooth_alpha=0.5, softmax_input=None, lut=None)
    q = hfq.quantize(copy.deepcopy(model), cfg, calibration=[calib]).eval()
    k_proj = q.model.decoder.layers[1].cross_attn.k_proj
    torch.testing.assert_close(k_proj.input_quant.smooth, expect, rtol=1e-5, atol=1e-6)
    w = k_proj.dequantized_weight() / expect  # back to the float weight, up to int8 rounding
    assert ((w - w_k).norm() / w_k.norm()) < 0.02
    with torch.no_grad():
        out = q(**calib)
    assert ((out.logits - ref.logits).norm() / ref.logits.norm()) < 0.05
    q.save_pretrained(tmp_path / "q")
    r = AutoModel.from_pretrained(tmp_path / "q", trust_remote_code=True).eval()
    torch.testing.assert_close(r.model.decoder.layers[1].cross_attn.k_proj.input_quant.smooth, expect, rtol=1e-5,
                               atol=1e-6)
    with torch.no_grad():
        assert torch.equal(r(**test).logits, q(**test).logits)


def test_recipe_builds_the_default_fqpetr_config():
    """Catches the shipped recipe drifting from FQ-PETR's defaults (QANS + DULUT, 32 calibration samples)."""
    from hfq.recipe import load_recipe

    cfg = load_recipe("recipes/fqpetr-w8a8.yaml")
    assert isinstance(cfg, hfq.FQPETRConfig) and cfg.to_dict() == hfq.FQPETRConfig(n_samples=32).to_dict()
