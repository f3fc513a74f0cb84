"""MambaQuant: hfq's Mamba / Mamba2 mixers, the exact fusion of each rotation and smoothing, and the method's
quantize -> save -> reload cycle on tiny Mamba, FalconMamba and Mamba2 models."""
import pytest
import torch
import torch.nn as nn
from conftest import build_tiny
from transformers import AutoModelForCausalLM

import hfq
from hfq.nn import QuantConv1d, ScaledSiLU
from hfq.nn.mamba import SSMOutput, to_hfq_mixers
from hfq.quant import QuantArgs
from hfq.quantizers.mambaquant import _klt_hadamard, _smooth, plan_transforms
from hfq.transforms import random_hadamard, random_orthogonal
from hfq.transforms.mamba import MixerTransform, fuse_mamba_

CALIB = [torch.randint(0, 256, (48,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))


def _model(arch):
    """A tiny model whose norms are not uniform (uniform norms would hide a norm that is not folded before R1)."""
    model = build_tiny(arch)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model


@torch.no_grad()
def _logits_with_decode(model, ids=IDS, prefill=12):
    """Logits of a full forward, and of a prefill followed by one-token decode steps through the cache."""
    full = model(ids).logits
    out = model(ids[:, :prefill], use_cache=True)
    steps = [out.logits]
    for t in range(prefill, ids.shape[1]):
        out = model(ids[:, t:t + 1], cache=out.cache, use_cache=True)
        steps.append(out.logits)
    return full, torch.cat(steps, dim=1)


def _rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)).double() * 3 + 0.2


@pytest.mark.parametrize("arch", ["mamba", "falcon_mamba", "mamba2"])
def test_hfq_mixer_matches_transformers(arch):
    """Catches a divergence of hfq's re-written mixer forward from transformers' (the D skip, dt bias / softplus,
    Mamba2's group expansion of B and C or its gated norm, FalconMamba's dt/B/C norms, the conv cache in decode
    steps): logits of a forward and of cached decoding are unchanged by the class swap."""
    model = _model(arch)
    ref_full, ref_steps = _logits_with_decode(model)
    to_hfq_mixers(model)
    full, steps = _logits_with_decode(model)
    assert (full - ref_full).abs().max() < 1e-4 * ref_full.abs().max()
    assert (steps - ref_steps).abs().max() < 1e-4 * ref_steps.abs().max()


def _fusions(arch):
    cfg = build_tiny(arch).config
    d = cfg.hidden_size
    if arch == "mamba2":
        E, N, G = cfg.expand * d, cfg.state_size, cfg.n_groups
        conv = E + 2 * G * N
        return {"R1": dict(r1=random_orthogonal(d, 1)),
                "S7": dict(layer=dict(s_conv=_rand(conv))),
                "S4+R4": dict(layer=dict(s_state=_rand(G, N)), state_seed=3),
                "S2+R2": dict(layer=dict(s_out=_rand(E)), out_seed=4),
                "R2 stored": dict(layer=dict(r_out=random_orthogonal(E, 6)))}
    E, N, R = cfg.intermediate_size, cfg.state_size, cfg.time_step_rank
    fusions = {"R1": dict(r1=random_orthogonal(d, 1)),
               "S7": dict(layer=dict(s_conv=_rand(E))),
               "S5": dict(layer=dict(s_dt=_rand(R))),
               "R5": dict(layer=dict(r_dt=random_orthogonal(R, 2))),
               "S4+R4": dict(layer=dict(s_state=_rand(N)), state_seed=3),
               "S2+R2": dict(layer=dict(s_out=_rand(E)), out_seed=4),
               "R2 stored": dict(layer=dict(r_out=random_orthogonal(E, 6)))}
    if arch == "falcon_mamba":  # its dt / B / C norms do not commute with S5 / S4
        fusions.pop("S5")
        fusions["R4"] = dict(state_seed=3)
        fusions.pop("S4+R4")
    return fusions


@pytest.mark.parametrize("arch,fusion", [(a, f) for a in ("mamba", "falcon_mamba", "mamba2") for f in _fusions(a)])
def test_each_fusion_is_exact_with_cached_decoding(arch, fusion):
    """Catches a fusion that is not an equivalence: R5 applied as R^T on one side only, S4 scaling B and C the same
    way (or forgetting Mamba2's conv bias and ScaledSiLU), S2 with the gate SiLU's scale inverted, R4 rotating h
    online without C, R1 without folding the norms or untying the head, and decode steps that skip an online piece.
    Each fusion alone leaves the logits of a forward and of prefill + cached decode steps unchanged (1e-4)."""
    model = _model(arch)
    ref_full, ref_steps = _logits_with_decode(model)
    f = _fusions(arch)[fusion]
    layers = [MixerTransform(**f.get("layer", {})) for _ in range(model.config.num_hidden_layers)]
    fuse_mamba_(model, f.get("r1"), layers, out_hadamard_seed=f.get("out_seed"),
                state_hadamard_seed=f.get("state_seed"))
    full, steps = _logits_with_decode(model)
    assert (full - ref_full).abs().max() < 1e-4 * ref_full.abs().max(), fusion
    assert (steps - ref_steps).abs().max() < 1e-4 * ref_steps.abs().max(), fusion


def test_falcon_mamba_refuses_s4_and_s5():
    """Catches S4 / S5 silently fused into FalconMamba, whose weightless dt / B / C RMS norms undo a scaling."""
    model = _model("falcon_mamba")
    with pytest.raises(NotImplementedError, match="FalconMamba"):
        fuse_mamba_(model, None, [MixerTransform(s_dt=_rand(8)) for _ in range(2)])


def test_klt_hadamard_aligns_channel_variances():
    """Catches a KLT-enhanced rotation built in the wrong order (H K instead of K H) or without the eigenvectors:
    x K H must have every channel's variance equal to the mean eigenvalue (MambaQuant's "variance alignment"),
    which a Hadamard alone does not give for correlated channels."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 16, generator=g, dtype=torch.float64) @ torch.randn(16, 16, generator=g, dtype=torch.float64)
    cov = torch.cov(x.T)
    var = torch.diagonal((r := _klt_hadamard(cov, None, 0)).T @ cov @ r)
    assert torch.allclose(r @ r.T, torch.eye(16, dtype=torch.float64), atol=1e-10)
    assert (var.max() - var.min()) / var.mean() < 1e-8
    h = random_hadamard(16, 0)
    var_h = torch.diagonal(h.T @ cov @ h)
    assert (var_h.max() - var_h.min()) / var_h.mean() > 0.05


def test_state_output_quantizes_per_token():
    """Catches the scan output matmul quantized per tensor (or not at all): each batch row's h gets its own scale, so
    a row with small values stays accurate next to a large one, and 4-bit quantization does change the output."""
    h = torch.randn(2, 1, 8, 4, generator=torch.Generator().manual_seed(0))
    h[1] *= 1000
    c = torch.randn(2, 1, 4, generator=torch.Generator().manual_seed(1))
    exact = SSMOutput()(h, c)
    q = SSMOutput(QuantArgs(bits=8, symmetric=False, granularity="token", dynamic=True))(h, c)
    assert (q[0] - exact[0]).abs().max() < 0.02 * exact[0].abs().max()
    q4 = SSMOutput(QuantArgs(bits=4, symmetric=False, granularity="token", dynamic=True))(h, c)
    assert not torch.allclose(q4, exact)


def test_quant_conv1d_matches_conv1d_on_its_weights():
    """Catches a QuantConv1d whose weight layout or forward differs from nn.Conv1d (depthwise, padded)."""
    conv = nn.Conv1d(6, 6, 4, groups=6, padding=3)
    q = QuantConv1d.from_conv(conv, QuantArgs(bits=8, granularity="channel"))
    ref = nn.Conv1d(6, 6, 4, groups=6, padding=3)
    ref.weight.data = q.dequantized_weight().reshape(6, 1, 4)
    ref.bias.data = conv.bias.data
    x = torch.randn(2, 6, 10)
    assert torch.allclose(q(x), ref(x), atol=1e-6)
    assert (q(x) - conv(x)).abs().max() < 0.02 * conv(x).abs().max()


def test_statistics_are_taken_in_the_original_basis():
    """Catches statistics collected from the wrong tensor (the conv input vs in_proj's gate half, the out_proj input
    after a transform, C vs B): S7's and S2's scales equal SmoothQuant's formula on maxima computed directly."""
    model = _model("mamba")
    with torch.no_grad():
        h = model.backbone.embeddings(torch.stack(CALIB))
        mixer = model.backbone.layers[0].mixer
        x, z = mixer.in_proj(model.backbone.layers[0].norm(h)).chunk(2, dim=-1)
        conv_w, out_w = mixer.conv1d.weight.clone(), mixer.out_proj.weight.clone()
        captured = []
        to_hfq_mixers(model)
        handle = mixer.out_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
        model(torch.stack(CALIB))
        handle.remove()
    _, layers, _, _ = plan_transforms(model, hfq.MambaQuantConfig(rotation=None, smooth=True, batch_size=2), CALIB)
    s_conv = _smooth(x.abs().amax(dim=(0, 1)), conv_w.abs().amax(dim=(1, 2)), 0.5)
    s_out = _smooth(captured[0].abs().amax(dim=(0, 1)), out_w.abs().amax(dim=0), 0.5)
    assert torch.allclose(layers[0].s_conv, s_conv, rtol=1e-5) and torch.allclose(layers[0].s_out, s_out, rtol=1e-5)


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_quantize_save_reload_exact(arch, tmp_path):
    """Catches a checkpoint that does not rebuild the method: the skeleton without the ScaledSiLU / stored R2 tensors
    or QuantConv1d, online rotations or h / C quantizers not restored, the untied head re-tied. The reloaded model
    gives the same logits and greedy tokens; every linear (dt_proj and lm_head included) and conv1d is packed."""
    model = _model(arch)
    with torch.no_grad():
        ref = model(IDS).logits
    hfq.quantize(model, hfq.MambaQuantConfig.preset("w4a8", n_samples=4, seq_len=48), calibration=CALIB)
    mixer = model.backbone.layers[0].mixer
    assert isinstance(mixer.conv1d, QuantConv1d) and type(model.lm_head).__name__ == "QuantLinear"
    assert mixer.ssm_out.h_quant is not None and type(mixer.out_rotation).__name__ == "OnlineRotation"
    assert isinstance(mixer.conv_act if arch == "mamba2" else mixer.gate_act, ScaledSiLU)
    if arch == "mamba":
        assert type(mixer.dt_proj).__name__ == "QuantLinear"
    with torch.no_grad():
        q = model(IDS).logits
    assert 0 < (q - ref).abs().max() < 0.5 * ref.abs().max()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, q)
    gen = dict(max_new_tokens=4, do_sample=False)
    assert torch.equal(loaded.generate(IDS[:, :6], **gen), model.generate(IDS[:, :6], **gen))


def test_quantize_on_load_and_w8a8_close_to_float(tiny_fp_dir):
    """Catches quantize-on-load not running the method's transforms (from_pretrained with the config must give what
    hfq.quantize gives), and a W8A8 MambaQuant that is far from the float model."""
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_fp_dir("mamba"))
    with torch.no_grad():
        ref = ref_model(IDS).logits
    cfg = dict(n_samples=4, seq_len=48, dataset=[c.tolist() for c in CALIB])
    loaded = AutoModelForCausalLM.from_pretrained(tiny_fp_dir("mamba"), quantization_config=hfq.MambaQuantConfig(**cfg))
    direct = hfq.quantize(AutoModelForCausalLM.from_pretrained(tiny_fp_dir("mamba")), hfq.MambaQuantConfig(**cfg))
    with torch.no_grad():
        a, b = loaded(IDS).logits, direct(IDS).logits
    assert torch.equal(a, b)
    assert (a - ref).abs().max() < 0.05 * ref.abs().max()


def test_reload_without_spec_refuses(tmp_path):
    """Catches a checkpoint whose config.json lost the hfq_mamba entry loading with its online pieces missing
    (wrong outputs without an error)."""
    import json

    model = _model("mamba")
    hfq.quantize(model, hfq.MambaQuantConfig(n_samples=4, seq_len=48), calibration=CALIB)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["hfq_mamba"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="hfq_mamba"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_config_validation():
    """Catches silently accepted bad settings: unknown rotation, alpha outside [0, 1], calibration data handed to a
    config that uses none."""
    with pytest.raises(ValueError, match="rotation"):
        hfq.MambaQuantConfig(rotation="klt")
    with pytest.raises(ValueError, match="alpha"):
        hfq.MambaQuantConfig(alpha=2)
    with pytest.raises(ValueError, match="preset"):
        hfq.MambaQuantConfig.preset("w4a4")
    with pytest.raises(ValueError, match="no calibration"):
        hfq.quantize(_model("mamba"), hfq.MambaQuantConfig(rotation="hadamard", smooth=False), calibration=CALIB)
    assert hfq.MambaQuantConfig.from_dict(hfq.MambaQuantConfig.preset("w4a8").to_dict()).bits == 4


def test_recipes_load():
    """Catches a recipe that no longer builds its config (renamed field, wrong method name)."""
    from pathlib import Path

    from hfq.recipe import load_recipe

    root = Path(__file__).resolve().parent.parent / "recipes"
    cfgs = {p.stem: load_recipe(p) for p in root.glob("mambaquant-*.yaml")}
    assert {"mambaquant-w8a8", "mambaquant-w4a8", "mambaquant-hadamard-w8a8"} <= set(cfgs)
    assert cfgs["mambaquant-w4a8"].bits == 4 and cfgs["mambaquant-w8a8"].rotation == "klt_hadamard"
    assert cfgs["mambaquant-hadamard-w8a8"].rotation == "hadamard" and not cfgs["mambaquant-hadamard-w8a8"].smooth


def test_round_to_nearest_baseline_reloads_with_untied_head(tmp_path):
    """Catches the no-transform baseline quantizing a tied lm_head without untying it in the config (the reload would
    tie the packed head to the float embeddings, or load random weights)."""
    model = _model("mamba")
    assert model.config.tie_word_embeddings
    hfq.quantize(model, hfq.MambaQuantConfig(rotation=None, smooth=False))
    assert not model.config.tie_word_embeddings
    with torch.no_grad():
        q = model(IDS).logits
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path)(IDS).logits, q)
