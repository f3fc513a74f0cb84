"""RepVGG custom-code image classifier: structural re-parameterisation, official variants and parameter counts,
config validation, save / fresh-process reload of the branch and fused forms, the official-checkpoint converter and
quantizer friendliness."""
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hfq.modeling.repvgg import (
    REPVGG_VARIANTS, RepVGGBlock, RepVGGConfig, RepVGGForImageClassification, config_from_official_checkpoint,
    convert_official_checkpoint, identity_kernel,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors, one intra-op thread


def tiny_config(**kw):
    """3 stages of 8 / 16 / 32 channels for 16 x 16 inputs (stem and stage 2 keep the resolution)."""
    base = dict(num_blocks=(2, 2, 1), width_multiplier=(1, 1, 1), base_channels=(8, 16, 32),
                stage_strides=(1, 2, 1, 2), num_labels=5, image_size=16)
    base.update(kw)
    return RepVGGConfig(**base)


def randomize_batchnorm(model, seed=0):
    """Non-trivial eval statistics in every BatchNorm: gamma, beta, running mean and variances down to 0.05 (where
    eps = 1e-5 moves the std by 1e-4 relative)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.95 + 0.05)
    return model


def images(cfg, batch=2, seed=0, size=None):
    g = torch.Generator().manual_seed(seed)
    size = size or cfg.image_size
    return torch.randn(batch, cfg.in_channels, size, size, generator=g)


# ------------------------------------------------------------------ structural re-parameterisation
@pytest.mark.parametrize("cin, cout, stride, groups", [(8, 8, 1, 1), (8, 16, 2, 1), (8, 8, 2, 1), (8, 8, 1, 2),
                                                       (6, 12, 1, 3)])
def test_block_fusion_equals_branches(cin, cout, stride, groups):
    """Catches a wrong fusion of one block: BN eps or running statistics ignored, the 1x1 kernel padded off the
    centre, the identity branch dropped or misplaced (also for grouped convolutions), or the stride / groups not
    carried over to the fused convolution; and an identity branch built where the width or stride changes."""
    torch.manual_seed(0)
    block = randomize_batchnorm(RepVGGBlock(cin, cout, stride, groups)).eval()
    assert (block.rbr_identity is not None) == (cin == cout and stride == 1)
    x = torch.randn(2, cin, 9, 9)
    with torch.no_grad():
        ref = block(x)
        block.reparameterize()
        out = block(x)
    assert [n for n, _ in block.named_children()] == ["rbr_reparam", "nonlinearity"]
    conv = block.rbr_reparam
    assert type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.bias is not None
    assert (conv.stride, conv.groups, conv.padding) == ((stride, stride), groups, (1, 1))
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_identity_kernel_has_the_centre_tap_on_the_diagonal():
    """Catches an identity kernel off the centre tap or off the (per-group) diagonal: output channel i must read
    input channel i % (C / groups) of its group at tap (1, 1), nothing else."""
    for channels, groups in ((4, 1), (6, 2), (6, 3)):
        k = identity_kernel(channels, groups)
        per = channels // groups
        assert k.shape == (channels, per, 3, 3) and k.sum() == channels
        for i in range(channels):
            assert k[i, i % per, 1, 1] == 1
        x = torch.randn(1, channels, 5, 5)
        torch.testing.assert_close(F.conv2d(x, k, padding=1, groups=groups), x, rtol=0, atol=0)
    # a block whose 3x3 and 1x1 branches are zero: the fused kernel is the identity BN's gamma / std on the diagonal
    block = randomize_batchnorm(RepVGGBlock(4, 4), seed=1).eval()
    with torch.no_grad():
        block.rbr_dense.conv.weight.zero_()
        block.rbr_1x1.conv.weight.zero_()
        kernel, bias = block.fused_kernel_bias()
    bn = block.rbr_identity
    t = (bn.weight / (bn.running_var + bn.eps).sqrt()).double()
    expected = torch.zeros(4, 4, 3, 3, dtype=torch.float64)
    expected[range(4), range(4), 1, 1] = t
    torch.testing.assert_close(kernel, expected)
    assert kernel.dtype == torch.float64 and bias.shape == (4,)


def test_fused_a0_equals_branches():
    """Catches a model-level fusion that differs from the training-time model in eval mode (any block, stride-2
    stage entries, identity blocks, the stem, the head), leaves a BatchNorm or a 1x1 branch behind, or forgets
    config.deploy; the whole RepVGG-A0 (22 blocks of widths 48, 48, 96, 192, 1280) at 32 x 32, 10 classes."""
    torch.manual_seed(0)
    cfg = RepVGGConfig.from_variant("A0", num_labels=10, image_size=32)
    model = randomize_batchnorm(RepVGGForImageClassification(cfg)).eval()
    blocks = model.blocks()
    firsts = [True] + [j == 0 for n in (2, 4, 14, 1) for j in range(n)]  # stem, first block of each stage
    assert [b.out_channels for b in blocks] == [48] + [48] * 2 + [96] * 4 + [192] * 14 + [1280]
    assert [b.stride for b in blocks] == [2 if first else 1 for first in firsts]
    assert [b.rbr_identity is not None for b in blocks] == [not first for first in firsts]
    x = images(cfg)
    with torch.no_grad():
        ref = model(x, output_hidden_states=True)
        assert model.reparameterize() is model and model.config.deploy
        out = model(x, output_hidden_states=True)
    kinds = {type(m) for m in model.modules()} - {RepVGGForImageClassification, type(model.repvgg), RepVGGBlock}
    assert kinds == {nn.ModuleList, nn.Sequential, nn.Conv2d, nn.ReLU, nn.AdaptiveAvgPool2d, nn.Linear}
    assert all(m.kernel_size == (3, 3) and m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))
    scale = ref.logits.abs().max()
    assert scale > 1e-3
    torch.testing.assert_close(out.logits / scale, ref.logits / scale, rtol=1e-5, atol=1e-5)
    for a, b in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(a / b.abs().max(), b / b.abs().max(), rtol=1e-5, atol=1e-5)
    # the fused model has the layout a deploy=True config builds
    fresh = RepVGGForImageClassification(RepVGGConfig(**{**cfg.to_dict(), "deploy": True}))
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.reparameterize()  # idempotent
        torch.testing.assert_close(model(x).logits, out.logits, rtol=0, atol=0)


def test_branch_model_trains_and_classifies():
    """Catches a classification loss that ignores the labels or the ImageClassifierOutput fields, and a graph
    that does not train end to end through the three branches."""
    torch.manual_seed(0)
    cfg = tiny_config()
    model = RepVGGForImageClassification(cfg).train()
    x, labels = images(cfg, batch=8), torch.arange(8) % cfg.num_labels
    out = model(x, labels=labels)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    assert out.logits.shape == (8, 5) and out.hidden_states is None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(x, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    block = model.blocks()[2]  # stage 1, block 1: keeps width and stride, so it has the identity branch
    for p in (block.rbr_dense.conv.weight, block.rbr_1x1.conv.weight, block.rbr_identity.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert losses[-1] < 0.7 * losses[0], losses
    loss, logits = model(x, labels=labels, return_dict=False)[:2]
    assert logits.shape == (8, 5) and loss.dim() == 0


# ------------------------------------------------------------------ official variants
# Official parameter counts in millions, training-time | deploy: the mmclassification RepVGG README (configs/repvgg,
# models converted from the official ones); the deploy counts also in the RepVGG paper, Table 4 (truncated there to
# 8.30 / 12.78 / 14.33 for A0 / A1 / B0) and the repository's table.PNG; OpenVINO's repvgg-a0 page: 8.3094 M.
OFFICIAL_MPARAMS = {
    "A0": (9.11, 8.31), "A1": (14.09, 12.79), "A2": (28.21, 25.50), "B0": (15.82, 14.34), "B1": (57.42, 51.83),
    "B1g2": (45.78, 41.36), "B1g4": (39.97, 36.13), "B2": (89.02, 80.32), "B2g4": (61.76, 55.78),
    "B3": (123.09, 110.96), "B3g4": (83.83, 75.63),
}
EXACT = {"A0": (9108968, 8309384), "A1": (14092264, 12789864), "B0": (15817960, 14339048)}


@pytest.mark.parametrize("name", list(OFFICIAL_MPARAMS))
def test_official_variant_parameter_counts(name):
    """Catches a variant whose layout differs from the official repvgg.py (blocks per stage, width multipliers, stem
    width min(64, 64a), groupwise blocks, identity BN on stride-2 blocks, head width) through the training-time and
    fused parameter counts of the official tables (built on the meta device, fused there by reparameterize)."""
    with torch.device("meta"):
        model = RepVGGForImageClassification(RepVGGConfig.from_variant(name))
        train = sum(p.numel() for p in model.parameters())
        deploy = sum(p.numel() for p in model.reparameterize().parameters())
    assert (round(train / 1e6, 2), round(deploy / 1e6, 2)) == OFFICIAL_MPARAMS[name]
    if name in EXACT:
        assert (train, deploy) == EXACT[name]


def test_official_variant_layouts():
    """Catches a variant table that drifts from the official create_RepVGG_* functions (A0 / A1 / B0 blocks and
    widths, the g2 / g4 maps on blocks 2, 4, ..., 26) or a JSON round trip that loses them."""
    a0, a1, b0 = (RepVGGConfig.from_variant(n) for n in ("A0", "RepVGG-A1", "B0"))
    assert a0.num_blocks == a1.num_blocks == [2, 4, 14, 1] and b0.num_blocks == [4, 6, 16, 1]
    assert a0.width_multiplier == [0.75, 0.75, 0.75, 2.5]
    assert a1.width_multiplier == b0.width_multiplier == [1, 1, 1, 2.5]
    assert (a0.stem_channels, a0.hidden_sizes) == (48, [48, 96, 192, 1280])
    assert (b0.stem_channels, b0.hidden_sizes, b0.num_labels) == (64, [64, 128, 256, 1280], 1000)
    assert a1.variant == "A1" and a0.stage_strides == [2, 2, 2, 2, 2] and not a0.deploy
    b1g4 = RepVGGConfig.from_variant("B1g4")
    assert b1g4.override_groups_map == {i: 4 for i in range(2, 27, 2)}
    assert RepVGGConfig.from_variant("B1").stem_channels == 64  # min(64, 128)
    again = RepVGGConfig.from_dict(b1g4.to_dict())  # JSON keys are strings
    assert again.override_groups_map == b1g4.override_groups_map and again.variant == "B1g4"
    assert set(REPVGG_VARIANTS) == {"A0", "A1", "A2", "B0", "B1", "B1g2", "B1g4", "B2", "B2g2", "B2g4", "B3", "B3g2",
                                    "B3g4"}


def test_config_errors():
    """Catches configs accepted although they cannot build (or silently contradict) the network they describe."""
    bad = [
        (dict(variant="C9"), ValueError, "unknown RepVGG variant"),
        (dict(variant="A0", num_blocks=(1, 1, 1, 1)), ValueError, "fixes num_blocks"),
        (dict(variant="B1g2", override_groups_map={}), ValueError, "fixes override_groups_map"),
        (dict(num_blocks=(2, 2), width_multiplier=(1, 1, 1)), ValueError, "one entry per stage"),
        (dict(num_blocks=(2, 0, 1, 1)), ValueError, "at least one block"),
        (dict(num_blocks=()), ValueError, "at least one stage"),
        (dict(stage_strides=(2, 2, 2, 2)), ValueError, "need 5 entries"),
        (dict(stage_strides=(2, 0, 2, 2, 2)), ValueError, "must be >= 1"),
        (dict(width_multiplier=(0.001, 1, 1, 1)), ValueError, "at least one channel"),
        (dict(override_groups_map={0: 2}), ValueError, "never grouped"),
        (dict(override_groups_map={22: 2}), ValueError, r"numbered 1\.\.21"),
        (dict(override_groups_map={2: 5}), ValueError, "must divide"),
        (dict(in_channels=0), ValueError, "must be >= 1"),
        (dict(deploy="yes"), TypeError, "deploy must be"),
    ]
    for kwargs, error, match in bad:
        with pytest.raises(error, match=match):
            RepVGGConfig(**kwargs)
    # the variant's own values are accepted, and a free config defaults to A0's layout
    assert RepVGGConfig(variant="A0", num_blocks=[2, 4, 14, 1]).variant == "A0"
    assert RepVGGConfig(num_labels=3).hidden_sizes == [48, 96, 192, 1280]


# ------------------------------------------------------------------ save / fresh-process reload
def test_save_pretrained_reload_branch_and_fused_in_fresh_process(tmp_path):
    """Catches shipped code that does not import without hfq, a fused model saved with deploy=False (it would
    reload as random branches), or weights / BN statistics / config fields that do not round-trip through
    save_pretrained + AutoModelForImageClassification.from_pretrained(trust_remote_code=True) (AutoModel: the
    body)."""
    torch.manual_seed(0)
    cfg = tiny_config(override_groups_map={2: 2})
    model = randomize_batchnorm(RepVGGForImageClassification(cfg)).eval()
    model.save_pretrained(tmp_path / "branch")
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert n_bn == 2 * 6 + 2  # 6 blocks with two conv-BN branches, 2 of them keep width and stride (identity BN)
    x = images(cfg)
    with torch.no_grad():
        ref_branch = model(x).logits
        model.reparameterize()
        ref_fused = model(x).logits
    model.save_pretrained(tmp_path / "fused")
    assert {"modeling_repvgg.py", "configuration_repvgg.py"} <= set(os.listdir(tmp_path / "fused"))
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        torch.set_num_threads(1)
        from transformers import AutoModelForImageClassification
        out = {{}}
        for kind in ("branch", "fused"):
            m, info = AutoModelForImageClassification.from_pretrained({str(tmp_path)!r} + "/" + kind,
                                                                      trust_remote_code=True, output_loading_info=True)
            m.eval()
            # safetensors hands out weights at unaligned offsets; fresh copies make CPU kernels round identically
            for t in list(m.parameters()) + list(m.buffers()):
                t.data = t.data.clone()
            with torch.no_grad():
                out[kind] = m(torch.load({str(tmp_path / 'x.pt')!r})).logits
            out[kind + "_info"] = {{k: list(v) for k, v in info.items() if k != "error_msgs"}}
            out[kind + "_cfg"] = (type(m).__name__, m.config.deploy, m.config.override_groups_map,
                                  sum(isinstance(b, torch.nn.BatchNorm2d) for b in m.modules()))
        from transformers import AutoModel
        body = AutoModel.from_pretrained({str(tmp_path / 'fused')!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            feats = body(torch.load({str(tmp_path / 'x.pt')!r})).pooler_output
        out["body"] = (type(body).__name__, torch.allclose(m.classifier(feats), out["fused"], rtol=1e-6, atol=1e-6))
        out["hfq"] = "hfq" in sys.modules
        torch.save(out, {str(tmp_path / 'out.pt')!r})
    """)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path, timeout=180)
    out = torch.load(tmp_path / "out.pt")
    assert not out["hfq"], "the shipped code must not need hfq"
    for kind in ("branch", "fused"):
        assert not any(out[kind + "_info"].values()), out[kind + "_info"]  # no missing / unexpected keys
    assert out["branch_cfg"] == ("RepVGGForImageClassification", False, {2: 2}, n_bn)
    assert out["fused_cfg"] == ("RepVGGForImageClassification", True, {2: 2}, 0)
    assert torch.equal(out["branch"], ref_branch) and torch.equal(out["fused"], ref_fused)
    assert out["body"] == ("RepVGGModel", True)  # AutoModel: the body of the same checkpoint


# ------------------------------------------------------------------ official checkpoint converter
def official_keys(cfg, deploy=False):
    """The state-dict key set (name -> shape) of the official repvgg.py RepVGG for `cfg`: stage0 (stem block),
    stage1..4 nn.Sequential of RepVGGBlock, linear; block = rbr_dense / rbr_1x1 (conv_bn: .conv, .bn) and
    rbr_identity (BN, width kept and stride 1), or rbr_reparam (conv with bias) when deployed."""
    keys = {}

    def bn(prefix, n):
        for s in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{prefix}.{s}"] = (n,)
        keys[f"{prefix}.num_batches_tracked"] = ()

    for stage, j, cin, cout, stride, groups in cfg.block_layout():
        p = "stage0" if stage == 0 else f"stage{stage}.{j}"
        if deploy:
            keys[f"{p}.rbr_reparam.weight"], keys[f"{p}.rbr_reparam.bias"] = (cout, cin // groups, 3, 3), (cout,)
            continue
        if cin == cout and stride == 1:
            bn(f"{p}.rbr_identity", cin)
        keys[f"{p}.rbr_dense.conv.weight"] = (cout, cin // groups, 3, 3)
        bn(f"{p}.rbr_dense.bn", cout)
        keys[f"{p}.rbr_1x1.conv.weight"] = (cout, cin // groups, 1, 1)
        bn(f"{p}.rbr_1x1.bn", cout)
    keys["linear.weight"], keys["linear.bias"] = (cfg.num_labels, cfg.num_features), (cfg.num_labels,)
    return keys


def to_official(key):
    """Our state-dict name -> the official one (stem = stage0, head = linear)."""
    key = re.sub(r"^repvgg\.stages\.0\.0\.", "stage0.", key)
    key = re.sub(r"^repvgg\.stages\.(\d+)\.(\d+)\.", r"stage\1.\2.", key)
    return re.sub(r"^classifier\.", "linear.", key)


def random_state(keys, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {n: torch.randn(*s, generator=g) if s else torch.tensor(7) for n, s in keys.items()}
    for n, v in out.items():
        if n.endswith("running_var"):
            v.abs_().add_(0.1)
    return out


def test_converter_loads_official_keys_and_reads_the_architecture():
    """Catches a converter that misses, invents or misplaces an official key (stem, stage blocks, identity BN,
    deploy rbr_reparam, linear head) or a config read off a checkpoint that does not rebuild it (the full A0 / B1g2
    key sets on meta tensors, a tiny grouped one with values)."""
    cfg = RepVGGConfig(num_blocks=(1, 2, 2, 1), width_multiplier=(1, 1, 1, 1), base_channels=(8, 16, 16, 32),
                       override_groups_map={3: 2}, num_labels=7)
    official = random_state(official_keys(cfg))
    converted = convert_official_checkpoint({"state_dict": {"module." + k: v for k, v in official.items()}}, cfg)
    model = RepVGGForImageClassification(cfg).eval()
    model.load_state_dict(converted, strict=True)
    sd = model.state_dict()
    assert torch.equal(sd["repvgg.stages.0.0.rbr_dense.conv.weight"], official["stage0.rbr_dense.conv.weight"])
    assert torch.equal(sd["repvgg.stages.2.1.rbr_identity.running_var"], official["stage2.1.rbr_identity.running_var"])
    assert torch.equal(sd["repvgg.stages.3.0.rbr_1x1.bn.bias"], official["stage3.0.rbr_1x1.bn.bias"])
    assert torch.equal(model.classifier.weight, official["linear.weight"])
    inferred = config_from_official_checkpoint(official)
    assert (inferred.num_blocks, inferred.hidden_sizes, inferred.override_groups_map, inferred.num_labels,
            inferred.variant, inferred.deploy) == ([1, 2, 2, 1], [8, 16, 16, 32], {3: 2}, 7, None, False)
    # the deploy form of the same network, fused from our model, converts and reproduces it
    with torch.no_grad():
        x = torch.randn(1, 3, 32, 32)
        ref = model(x).logits
        fused = {to_official(k): v for k, v in model.reparameterize().state_dict().items()}
        ref_fused = model(x).logits
    scale = ref.abs().max()
    torch.testing.assert_close(ref_fused / scale, ref / scale, rtol=1e-5, atol=1e-5)
    assert set(fused) == set(official_keys(cfg, deploy=True))
    dcfg = config_from_official_checkpoint(fused)
    assert dcfg.deploy and dcfg.override_groups_map == {3: 2}
    deployed = RepVGGForImageClassification(dcfg).eval()
    deployed.load_state_dict(convert_official_checkpoint(fused, dcfg), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x).logits, ref_fused, rtol=0, atol=0)
    # full official key sets, meta tensors only
    for name, deploy in (("A0", False), ("B1g2", False), ("B0", True)):
        full = RepVGGConfig.from_variant(name, deploy=deploy)
        meta = {k: torch.empty(s, device="meta") for k, s in official_keys(full, deploy).items()}
        assert config_from_official_checkpoint(meta).to_dict() == full.to_dict()
        convert_official_checkpoint(meta, full)  # raises on a missing / unexpected key or a shape mismatch


def test_converter_errors():
    """Catches a converter that silently drops unknown keys (RepVGGplus / SE checkpoints) or accepts a checkpoint
    that does not fit the config (deploy form into a branch config, wrong widths or classes)."""
    cfg = tiny_config()
    official = random_state(official_keys(cfg))
    with pytest.raises(ValueError, match="no RepVGG counterpart"):
        convert_official_checkpoint({**official, "stage1.0.se.down.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="missing"):
        convert_official_checkpoint({k: v for k, v in official.items() if "rbr_identity" not in k}, cfg)
    with pytest.raises(ValueError, match="unexpected"):
        convert_official_checkpoint(random_state(official_keys(cfg, deploy=True)), cfg)
    with pytest.raises(ValueError, match="shape mismatches"):
        convert_official_checkpoint(official, tiny_config(num_labels=6))
    with pytest.raises(ValueError, match="not an official RepVGG"):
        config_from_official_checkpoint({"linear.weight": torch.zeros(2, 2)})


# ------------------------------------------------------------------ quantizer friendliness
def test_branch_batchnorms_fold_and_fused_model_takes_w8a8_ptq():
    """Catches branch BatchNorms that hfq's folding pass cannot pair with their convolutions (only the identity BN
    has none), and a fused model whose layers generic quantizers cannot reach (a functional or non-nn.Conv2d
    convolution, a BatchNorm left behind) or that quantizes far from the float model."""
    import hfq
    from hfq.transforms.batchnorm import conv_bn_pairs

    torch.manual_seed(0)
    model = randomize_batchnorm(RepVGGForImageClassification(tiny_config())).eval()
    pairs = conv_bn_pairs(model)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    n_identity = sum(b.rbr_identity is not None for b in model.blocks())
    assert len(pairs) == n_bn - n_identity == 2 * len(model.blocks())
    model.reparameterize()
    calib, test = images(model.config, batch=4, seed=1), images(model.config, batch=4, seed=2)
    with torch.no_grad():
        ref = model(test).logits
    q = hfq.quantize(model, hfq.PTQConfig(weight_granularity="channel"), calibration=[{"pixel_values": calib}])
    left = {type(m).__name__ for m in q.modules()}
    assert {"QuantConv2d", "QuantLinear"} <= left and not left & {"Conv2d", "Linear", "BatchNorm2d"}, left
    with torch.no_grad():
        out = q(test).logits
    assert 0 < ((out - ref).norm() / ref.norm()).item() < 0.1
