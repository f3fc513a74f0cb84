"""PETR custom-code model, official-checkpoint converter, synthetic nuScenes data and devkit evaluation."""
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hfq.data.synthetic_nuscenes import (
    CAMERAS, CLASSES, NuScenesTables, SyntheticNuScenesDataset, _name_of, collate, generate_synthetic_nuscenes,
    quat_to_matrix,
)
from hfq.modeling.petr import PetrConfig, PetrForObjectDetection3D, convert_official_checkpoint
from hfq.modeling.petr.petr_geometry import (
    depth_bins, frustum_points, frustum_to_channels, inverse_sigmoid, normalize_bbox, pos2posemb3d, sine_encoding_3d,
)
from hfq.modeling.petr.petr_loss import hungarian_match, petr_loss

ALL_CLASSES = list(CLASSES)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors, one intra-op thread


def tiny_config(**kw):
    base = dict(backbone_type="simple", simple_channels=[8, 16, 16, 32, 32], neck_channels=32, embed_dims=32,
                num_queries=24, num_decoder_layers=2, num_heads=4, ffn_dims=64, depth_num=8, dropout=0.0,
                input_size=(64, 128), max_num=50)
    base.update(kw)
    return PetrConfig(**base)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic_nuscenes"))
    generate_synthetic_nuscenes(root, num_scenes={"synthetic_train": 1, "synthetic_val": 2}, samples_per_scene=3,
                                image_size=(90, 160), classes=ALL_CLASSES, objects_per_scene=(10, 10),
                                class_cycle=True, seed=3)
    return root


# ------------------------------------------------------------------ position embedding
def test_lid_depth_bins():
    d = depth_bins(64, 1.0, 61.2, use_lid=True).numpy()
    i = np.arange(64)
    np.testing.assert_allclose(d, 1 + (61.2 - 1) / (64 * 65) * i * (i + 1), rtol=1e-6)
    assert d[0] == 1.0 and abs(d[-1] - 59.35) < 0.01


def test_position_embedding_matches_numpy():
    """Frustum points, normalisation, channel layout and inverse sigmoid against a direct re-derivation."""
    rng = np.random.default_rng(0)
    B, N, H, W, D = 1, 2, 3, 5, 4
    pad_h, pad_w = 48, 80
    rng_ = [-61.2, -61.2, -10.0, 61.2, 61.2, 10.0]
    l2i = np.zeros((B, N, 4, 4))
    for n in range(N):
        K = np.array([[60.0, 0, 40, 0], [0, 60, 24, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
        yaw = rng.uniform(-3, 3)
        R = np.array([[math.sin(yaw), -math.cos(yaw), 0], [0, 0, -1], [math.cos(yaw), math.sin(yaw), 0]])
        ext = np.eye(4)
        ext[:3, :3] = R
        ext[:3, 3] = rng.normal(size=3)
        l2i[0, n] = K @ ext
    depths = depth_bins(D, 1.0, 61.2)
    pts = frustum_points(torch.tensor(l2i, dtype=torch.float32), (H, W), (pad_h, pad_w), depths, rng_)
    coords = inverse_sigmoid(frustum_to_channels(pts)).numpy()

    ref = np.zeros((B * N, D * 3, H, W))
    for n in range(N):
        inv = np.linalg.inv(l2i[0, n])
        for h in range(H):
            for w in range(W):
                for di, d in enumerate(depths.numpy().astype(np.float64)):
                    u, v = w * pad_w / W, h * pad_h / H
                    p = inv @ np.array([u * d, v * d, d, 1.0])
                    for a in range(3):
                        x = (p[a] - rng_[a]) / (rng_[a + 3] - rng_[a])
                        x = min(max(x, 0.0), 1.0)
                        ref[n, di * 3 + a, h, w] = math.log(max(x, 1e-5) / max(1 - x, 1e-5))
    np.testing.assert_allclose(coords, ref, atol=2e-3)


def test_sine_encodings_match_numpy():
    mask = torch.zeros(1, 2, 2, 3, dtype=torch.bool)
    pe = sine_encoding_3d(mask, num_feats=4).numpy()  # (1, 2, 12, 2, 3)
    dim_t = 10000 ** (2 * (np.arange(4) // 2) / 4)
    n, y, x = 1, 0, 2  # camera 1, row 0, col 2
    vals = [(n + 1) / (2 + 1e-6), (y + 1) / (2 + 1e-6), (x + 1) / (3 + 1e-6)]
    expect = []
    for v in vals:  # official 5-D stack(dim=4): the sines of even dims first, then the cosines of odd dims
        p = v * 2 * math.pi / dim_t
        expect += [math.sin(p[0]), math.sin(p[2]), math.cos(p[1]), math.cos(p[3])]
    np.testing.assert_allclose(pe[0, n, :, y, x], expect, atol=1e-5)

    ref = torch.tensor([[0.1, 0.7, 0.3]])
    emb = pos2posemb3d(ref, num_pos_feats=4).numpy()[0]
    expect = []
    for v in (0.7, 0.1, 0.3):  # order (y, x, z), interleaved sin/cos
        p = v * 2 * math.pi / dim_t
        expect += [math.sin(p[0]), math.cos(p[1]), math.sin(p[2]), math.cos(p[3])]
    np.testing.assert_allclose(emb, expect, atol=1e-5)


# ------------------------------------------------------------------ converter
def official_state_dict(cfg, resnet, seed=0):
    """Key layout and shapes of an mmdet3d PETR checkpoint (vision.md 1.7) for a small config."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sd = {}
    emb, hid = resnet["embedding_size"], resnet["hidden_sizes"]
    sd["img_backbone.conv1.weight"] = r(emb, 3, 7, 7)

    def bn(prefix, c):
        sd.update({f"{prefix}.weight": r(c), f"{prefix}.bias": r(c), f"{prefix}.running_mean": r(c),
                   f"{prefix}.running_var": r(c).abs(), f"{prefix}.num_batches_tracked": torch.tensor(5)})

    bn("img_backbone.bn1", emb)
    cin = emb
    for i, cout in enumerate(hid, start=1):
        mid = cout // 4
        p = f"img_backbone.layer{i}.0"
        for k, shape in enumerate([(mid, cin, 1, 1), (mid, mid, 3, 3), (cout, mid, 1, 1)], start=1):
            sd[f"{p}.conv{k}.weight"] = r(*shape)
            bn(f"{p}.bn{k}", shape[0])
        if cin != cout or i > 1:
            sd[f"{p}.downsample.0.weight"] = r(cout, cin, 1, 1)
            bn(f"{p}.downsample.1", cout)
        cin = cout
    C, d = cfg.neck_channels, cfg.embed_dims
    for i, c in enumerate(hid[-2:]):
        sd[f"img_neck.lateral_convs.{i}.conv.weight"], sd[f"img_neck.lateral_convs.{i}.conv.bias"] = r(C, c, 1, 1), r(C)
    sd["img_neck.fpn_convs.0.conv.weight"], sd["img_neck.fpn_convs.0.conv.bias"] = r(C, C, 3, 3), r(C)
    h = "pts_bbox_head."
    sd[h + "input_proj.weight"], sd[h + "input_proj.bias"] = r(d, C, 1, 1), r(d)
    shared_cls = {f"{j}.weight": r(d, d) for j in (0, 3)} | {f"{j}.bias": r(d) for j in (0, 1, 3, 4)}
    shared_cls |= {"1.weight": r(d), "4.weight": r(d), "6.weight": r(cfg.num_classes, d), "6.bias": r(cfg.num_classes)}
    shared_reg = {f"{j}.weight": r(d, d) for j in (0, 2)} | {f"{j}.bias": r(d) for j in (0, 2)}
    shared_reg |= {"4.weight": r(10, d), "4.bias": r(10)}
    for layer in range(cfg.num_decoder_layers):  # PETRv1: one shared module listed per layer
        sd.update({f"{h}cls_branches.{layer}.{k}": v for k, v in shared_cls.items()})
        sd.update({f"{h}reg_branches.{layer}.{k}": v for k, v in shared_reg.items()})
        t = f"{h}transformer.decoder.layers.{layer}."
        for a in (0, 1):
            sd[f"{t}attentions.{a}.attn.in_proj_weight"] = r(3 * d, d)
            sd[f"{t}attentions.{a}.attn.in_proj_bias"] = r(3 * d)
            sd[f"{t}attentions.{a}.attn.out_proj.weight"] = r(d, d)
            sd[f"{t}attentions.{a}.attn.out_proj.bias"] = r(d)
        sd[f"{t}ffns.0.layers.0.0.weight"], sd[f"{t}ffns.0.layers.0.0.bias"] = r(cfg.ffn_dims, d), r(cfg.ffn_dims)
        sd[f"{t}ffns.0.layers.1.weight"], sd[f"{t}ffns.0.layers.1.bias"] = r(d, cfg.ffn_dims), r(d)
        for k in range(3):
            sd[f"{t}norms.{k}.weight"], sd[f"{t}norms.{k}.bias"] = r(d), r(d)
    sd[h + "transformer.decoder.post_norm.weight"], sd[h + "transformer.decoder.post_norm.bias"] = r(d), r(d)
    sd[h + "adapt_pos3d.0.weight"], sd[h + "adapt_pos3d.0.bias"] = r(4 * d, d * 3 // 2, 1, 1), r(4 * d)
    sd[h + "adapt_pos3d.2.weight"], sd[h + "adapt_pos3d.2.bias"] = r(d, 4 * d, 1, 1), r(d)
    sd[h + "position_encoder.0.weight"], sd[h + "position_encoder.0.bias"] = r(4 * d, 3 * cfg.depth_num, 1, 1), r(4 * d)
    sd[h + "position_encoder.2.weight"], sd[h + "position_encoder.2.bias"] = r(d, 4 * d, 1, 1), r(d)
    sd[h + "reference_points.weight"] = torch.rand(cfg.num_queries, 3, generator=g)
    sd[h + "query_embedding.0.weight"], sd[h + "query_embedding.0.bias"] = r(d, d * 3 // 2), r(d)
    sd[h + "query_embedding.2.weight"], sd[h + "query_embedding.2.bias"] = r(d, d), r(d)
    sd[h + "code_weights"] = torch.tensor(cfg.code_weights)
    return sd


def resnet_config():
    return {"model_type": "resnet", "layer_type": "bottleneck", "embedding_size": 8, "hidden_sizes": [16, 32, 64, 128],
            "depths": [1, 1, 1, 1], "out_features": ["stage3", "stage4"]}


def test_converter_maps_official_keys():
    cfg = tiny_config(backbone_type="resnet", backbone_config=resnet_config(), yaw_convention="mmdet3d_v017")
    official = official_state_dict(cfg, resnet_config())
    converted = convert_official_checkpoint({"state_dict": official, "meta": {}}, cfg)
    model = PetrForObjectDetection3D(cfg)
    model.load_state_dict(converted, strict=True)
    h = "pts_bbox_head.transformer.decoder.layers.1."
    layer = model.model.decoder.layers[1]
    assert torch.equal(layer.cross_attn.in_proj_weight, official[h + "attentions.1.attn.in_proj_weight"])
    assert torch.equal(model.model.decoder.layers[1].ffn.fc1.weight, official[h + "ffns.0.layers.0.0.weight"])
    assert torch.equal(model.cls_branches[0][6].bias, official["pts_bbox_head.cls_branches.1.6.bias"])
    assert torch.equal(model.model.backbone.encoder.stages[2].layers[0].layer[1].convolution.weight,
                       official["img_backbone.layer3.0.conv2.weight"])
    assert torch.equal(model.model.backbone.encoder.stages[1].layers[0].shortcut.normalization.running_var,
                       official["img_backbone.layer2.0.downsample.1.running_var"])
    assert torch.equal(model.model.neck.fpn_convs[0].weight, official["img_neck.fpn_convs.0.conv.weight"])
    # pre-v2 names are remapped like the official head does
    legacy = {k.replace(".attentions.0.", ".self_attn.").replace(".attentions.1.", ".multihead_attn."): v
              for k, v in official.items()}
    assert convert_official_checkpoint(legacy, cfg).keys() == converted.keys()


def official_vovnet_keys(spec):
    """img_backbone.* keys and shapes of an official VoVNet-eSE checkpoint (PETR's vovnet.py naming, vision.md 1.7),
    enumerated from the spec's channel table: stem_1..3 conv/norm, stageN.OSAN_b.layers.i.OSAN_b_i/conv+norm,
    .concat.OSAN_b_concat/conv+norm, .ese.fc (conv with bias)."""
    out = {}

    def conv_bn(prefix, cout, cin, k):
        out[f"{prefix}/conv.weight"] = (cout, cin, k, k)
        out.update({f"{prefix}/norm.{n}": (cout,) for n in ("weight", "bias", "running_mean", "running_var")})
        out[f"{prefix}/norm.num_batches_tracked"] = ()

    s = spec["stem"]
    for i, (cin, cout) in enumerate(zip((3,) + s[:2], s), start=1):
        conv_bn(f"img_backbone.stem.stem_{i}", cout, cin, 3)
    cin = s[2]
    for n, stage_ch, out_ch, blocks in zip(range(2, 6), spec["stage_ch"], spec["out_ch"], spec["blocks"]):
        for b in range(1, blocks + 1):
            p = f"img_backbone.stage{n}.OSA{n}_{b}"
            block_in = cin if b == 1 else out_ch
            for i in range(spec["layers"]):
                conv_bn(f"{p}.layers.{i}.OSA{n}_{b}_{i}", stage_ch, block_in if i == 0 else stage_ch, 3)
            conv_bn(f"{p}.concat.OSA{n}_{b}_concat", out_ch, block_in + spec["layers"] * stage_ch, 1)
            out[f"{p}.ese.fc.weight"], out[f"{p}.ese.fc.bias"] = (out_ch, out_ch, 1, 1), (out_ch,)
        cin = out_ch
    return out


def test_converter_loads_the_official_vovnet99_key_set():
    """Catches a VoVNet module tree whose names or shapes differ from the official checkpoints (e.g. timm's
    naming): the full V-99-eSE key set (stem, 16 OSA blocks of 5 layers, concat, eSE) must load with no missing or
    unexpected key, and the converted tensors must sit where the official names say."""
    from hfq.modeling.petr.vovnet import VOVNET_SPECS

    cfg = tiny_config(backbone_type="vovnet", vovnet_spec="V-99-eSE", neck_channels=32, yaw_convention="mmdet3d_v017")
    head = {k: v for k, v in official_state_dict(cfg, resnet_config()).items() if not k.startswith("img_")}
    g = torch.Generator().manual_seed(0)
    backbone = {k: torch.randn(*shape, generator=g) if shape else torch.tensor(7)
                for k, shape in official_vovnet_keys(VOVNET_SPECS["V-99-eSE"]).items()}
    assert len(backbone) == 3 * 6 + 16 * (6 * 6 + 2)  # stem conv-BNs, 16 blocks x (6 conv-BN of 6 tensors + eSE)
    neck = {}
    for i, c in enumerate((768, 1024)):  # the official p4 config: stage4 + stage5 into the CPFPN
        neck[f"img_neck.lateral_convs.{i}.conv.weight"] = torch.randn(32, c, 1, 1, generator=g)
        neck[f"img_neck.lateral_convs.{i}.conv.bias"] = torch.randn(32, generator=g)
    neck["img_neck.fpn_convs.0.conv.weight"] = torch.randn(32, 32, 3, 3, generator=g)
    neck["img_neck.fpn_convs.0.conv.bias"] = torch.randn(32, generator=g)
    official = {**backbone, **neck, **head}
    converted = convert_official_checkpoint({"state_dict": official}, cfg)  # checks keys and shapes against cfg
    model = PetrForObjectDetection3D(cfg).eval()
    model.load_state_dict(converted, strict=True)
    block = model.model.backbone.stage3.OSA3_2
    assert torch.equal(block.layers[4].get_submodule("OSA3_2_4/conv").weight,
                       official["img_backbone.stage3.OSA3_2.layers.4.OSA3_2_4/conv.weight"])
    assert torch.equal(model.model.backbone.stage5.OSA5_3.ese.fc.bias, official["img_backbone.stage5.OSA5_3.ese.fc.bias"])
    assert block.identity and not model.model.backbone.stage3.OSA3_1.identity
    with torch.no_grad():
        feats = model.model.backbone(torch.randn(1, 3, 64, 128))
    assert [tuple(f.shape[1:]) for f in feats] == [(768, 4, 8), (1024, 2, 4)]  # strides 16 and 32


def test_converter_loads_r50_dcn_and_the_deformable_conv_is_dcnv2():
    """Catches the R50-DCN checkpoints being refused or mis-mapped (conv_offset of every stage-3/4 bottleneck must load
    with no missing or unexpected key), and a deformable convolution whose offset / mask channels are split in another
    order than mmcv's (offsets first as (dy, dx) pairs per kernel tap, then mask logits through a sigmoid)."""
    from hfq.modeling.petr.modeling_petr import PetrDeformConv2d

    res = {**resnet_config(), "downsample_in_bottleneck": True}  # caffe style, as the R50-DCN configs
    cfg = tiny_config(backbone_type="resnet", backbone_config=res, dcn_stages=(3, 4), yaw_convention="mmdet3d_v017")
    official = official_state_dict(cfg, resnet_config())
    g = torch.Generator().manual_seed(1)
    for stage, mid in ((3, 16), (4, 32)):  # hidden_sizes 64 / 128 -> bottleneck width // 4
        official[f"img_backbone.layer{stage}.0.conv2.conv_offset.weight"] = torch.randn(27, mid, 3, 3, generator=g)
        official[f"img_backbone.layer{stage}.0.conv2.conv_offset.bias"] = torch.randn(27, generator=g)
    model = PetrForObjectDetection3D(cfg).eval()
    model.load_state_dict(convert_official_checkpoint(official, cfg), strict=True)
    dcn = model.model.backbone.encoder.stages[3].layers[0].layer[1].convolution
    assert isinstance(dcn, PetrDeformConv2d)
    assert torch.equal(dcn.conv_offset.bias, official["img_backbone.layer4.0.conv2.conv_offset.bias"])
    assert torch.equal(dcn.weight, official["img_backbone.layer4.0.conv2.weight"])

    conv = torch.nn.Conv2d(4, 5, 3, padding=1, bias=False)
    d = PetrDeformConv2d(conv)
    x = torch.randn(1, 4, 6, 7)
    with torch.no_grad():
        ref = F.conv2d(x, conv.weight, padding=1)
        d.conv_offset.weight.zero_()
        d.conv_offset.bias.zero_()
        assert torch.allclose(d(x), 0.5 * ref, atol=1e-5)  # no offset, mask sigmoid(0)
        d.conv_offset.bias[18:] = 30.0  # mask ~1
        assert torch.allclose(d(x), ref, atol=1e-4)
        d.conv_offset.bias[1:18:2] = 1.0  # every tap samples one column to the right (dx = +1)
        assert torch.allclose(d(x)[..., 1:-2], ref[..., 2:-1], atol=1e-4)
        d.conv_offset.bias[:18] = 0.0
        d.conv_offset.bias[0:18:2] = 1.0  # one row down (dy = +1)
        assert torch.allclose(d(x)[..., 1:-2, :], ref[..., 2:-1, :], atol=1e-4)
        strided = PetrDeformConv2d(torch.nn.Conv2d(4, 5, 3, stride=2, padding=1, bias=False))
        strided.conv_offset.weight.zero_()
        strided.conv_offset.bias.fill_(30.0)
        strided.conv_offset.bias[:18] = 0.0
        assert torch.allclose(strided(x), F.conv2d(x, strided.weight, stride=2, padding=1), atol=1e-4)


def test_official_weights_need_the_mmdet3d_v017_yaw_and_it_rotates_boxes_as_official():
    """Catches converted official weights running with the nuScenes yaw (every box rotated by -2 yaw - pi/2) and a
    wrong v0.17 mapping: an official LiDAR-frame yaw of 0.3 must leave as nuScenes heading -0.3 - pi/2."""
    from hfq.modeling.petr.petr_geometry import boxes_to_nuscenes

    cfg = tiny_config(backbone_type="resnet", backbone_config=resnet_config())  # yaw_convention="nuscenes"
    with pytest.raises(ValueError, match="yaw_convention='mmdet3d_v017'"):
        convert_official_checkpoint(official_state_dict(cfg, resnet_config()), cfg)
    box = torch.tensor([[10.0, 2.0, -1.0, 1.9, 4.5, 1.6, 0.3, 0.0, 0.0]])
    identity = ([0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0])
    out = boxes_to_nuscenes({"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}, ["car"],
                            identity, identity, "mmdet3d_v017")[0]
    R = quat_to_matrix(out["rotation"])
    heading = math.atan2(R[1, 0], R[0, 0])
    expected = math.remainder(-0.3 - math.pi / 2, 2 * math.pi)
    assert heading == pytest.approx(expected, abs=1e-6)
    assert out["size"] == pytest.approx([1.9, 4.5, 1.6])  # (w, l, h) passed through as the official export does


def test_converter_errors():
    cfg = tiny_config(backbone_type="resnet", backbone_config=resnet_config(), yaw_convention="mmdet3d_v017")
    official = official_state_dict(cfg, resnet_config())
    with pytest.raises(ValueError, match="no PETR counterpart"):
        convert_official_checkpoint({**official, "pts_bbox_head.foo.weight": torch.zeros(1)})
    missing = {k: v for k, v in official.items() if "post_norm" not in k}
    with pytest.raises(ValueError, match="missing"):
        convert_official_checkpoint(missing, cfg)
    diverged = dict(official)
    diverged["pts_bbox_head.reg_branches.1.4.bias"] = torch.zeros(10)
    with pytest.raises(ValueError, match="share_branches=False"):
        convert_official_checkpoint(diverged, cfg)
    cfg_v2 = tiny_config(backbone_type="resnet", backbone_config=resnet_config(), yaw_convention="mmdet3d_v017", share_branches=False)
    unshared = convert_official_checkpoint(diverged, cfg_v2)
    assert torch.equal(unshared["reg_branches.1.4.bias"], torch.zeros(10))
    with pytest.raises(ValueError, match="unexpected.*conv_offset"):  # a DCN checkpoint into a config without DCN
        convert_official_checkpoint({**official, "img_backbone.layer3.0.conv2.conv_offset.weight": torch.zeros(1)},
                                    cfg)


# ------------------------------------------------------------------ save / fresh-process reload
def test_save_pretrained_reload_in_fresh_process(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config()
    model = PetrForObjectDetection3D(cfg).eval()
    model.save_pretrained(tmp_path / "m")
    shipped = set(os.listdir(tmp_path / "m"))
    assert {"modeling_petr.py", "configuration_petr.py", "petr_geometry.py", "petr_loss.py",
            "image_processing_petr.py"} <= shipped
    inputs = {"pixel_values": torch.randn(1, 6, 3, 64, 128), "lidar2img": torch.eye(4).repeat(1, 6, 1, 1) * 40}
    inputs["lidar2img"][..., 3, 3] = 1
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        ref = model(**inputs)
    script = textwrap.dedent(f"""
        import sys, torch
        assert "hfq" not in sys.modules
        from transformers import AutoModel
        m = AutoModel.from_pretrained({str(tmp_path / 'm')!r}, trust_remote_code=True).eval()
        assert "hfq" not in sys.modules, "the shipped code must not need hfq"
        x = torch.load({str(tmp_path / 'inputs.pt')!r})
        with torch.no_grad():
            o = m(**x)
        torch.save({{"logits": o.logits, "boxes": o.pred_boxes, "cls": type(m).__name__}}, {str(tmp_path / 'out.pt')!r})
    """)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path, timeout=120)
    out = torch.load(tmp_path / "out.pt")
    assert out["cls"] == "PetrForObjectDetection3D"
    assert torch.equal(out["logits"], ref.logits) and torch.equal(out["boxes"], ref.pred_boxes)


def test_streampetr_memory_and_petrv2_options():
    torch.manual_seed(0)
    cfg = tiny_config(memory_len=16, num_propagated=8, num_frames=2, with_fpe=True, share_branches=False)
    model = PetrForObjectDetection3D(cfg).eval()
    x, l2i = torch.randn(1, 12, 3, 64, 128), torch.eye(4).repeat(1, 12, 1, 1) * 40
    l2i[..., 3, 3] = 1
    with torch.no_grad():
        o1 = model(x, l2i)
        assert o1.memory["embedding"].shape == (1, 8, cfg.embed_dims)
        shift = torch.eye(4)[None]
        shift[0, 0, 3] = 2.0  # ego moved: memory points move 2 m in x in the new LiDAR frame
        o2 = model(x, l2i, memory=o1.memory, ego_transform=shift)
    assert o2.logits.shape[2] == cfg.num_queries + cfg.num_propagated  # propagated queries appended
    assert o2.memory["embedding"].shape == (1, 16, cfg.embed_dims)
    aligned = model.model.align_memory(o1.memory, shift)["reference_points"]
    span = cfg.pc_range[3] - cfg.pc_range[0]
    moved = (aligned - o1.memory["reference_points"])[..., 0] * span
    inside = (o1.memory["reference_points"][..., 0] * span + 2 < span)
    torch.testing.assert_close(moved[inside], torch.full_like(moved[inside], 2.0), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="num_frames"):
        model(torch.randn(1, 5, 3, 64, 128), torch.eye(4).repeat(1, 5, 1, 1))


def test_query_denoising():
    torch.manual_seed(0)
    cfg = tiny_config(dn_groups=3)
    model = PetrForObjectDetection3D(cfg).train()
    x, l2i = torch.randn(2, 6, 3, 64, 128), torch.eye(4).repeat(2, 6, 1, 1) * 40
    l2i[..., 3, 3] = 1
    labels = [{"boxes": torch.tensor([[5.0, 3, -1, 2, 4, 1.5, 0.3, 1, 0], [-9, 4, -1, 0.7, 0.7, 1.7, 0, 0, 0]]),
               "class_labels": torch.tensor([0, 8])},
              {"boxes": torch.tensor([[12.0, -6, -1, 2.5, 7, 3, 1.0, 0, 0]]), "class_labels": torch.tensor([1])}]
    out = model(x, l2i, labels=labels)
    assert out.logits.shape == (2, 2, cfg.num_queries, 10)  # denoising queries are split off
    assert "loss_dn_cls_1" in out.loss_dict and torch.isfinite(out.loss)
    dn = model.prepare_denoising(labels, x.device)
    assert dn["reference_points"].shape == (2, 3 * 2, 3) and len(dn["labels"]) == 3 * 3
    mask = model.model.denoising_mask(6, 6 + cfg.num_queries, 0, x.device)
    assert mask[6:, :6].all() and not mask[6:, 6:].any()  # learned queries never see the noisy gt
    assert not mask[2:4, 2:4].any() and mask[2:4, :2].all() and mask[2:4, 4:6].all()  # groups isolated
    assert not mask[:6, 6:].any()
    model.eval()
    assert model(x, l2i, labels=labels).loss_dict.keys().isdisjoint({"loss_dn_cls_0"})  # training only


# ------------------------------------------------------------------ matching / loss
def test_hungarian_matching_and_loss():
    torch.manual_seed(0)
    cfg = tiny_config()
    gt = torch.tensor([[10.0, 5, -1, 1.9, 4.6, 1.7, 0.3, 1, 0], [-8, 3, -1, 0.7, 0.7, 1.8, -1.0, 0, 0],
                       [2, -15, -0.5, 2.5, 7, 3, 2.0, 0, 2]])
    labels = torch.tensor([0, 8, 1])
    Q = 6
    perm = torch.tensor([4, 0, 2])  # query perm[i] predicts gt i
    code = normalize_bbox(torch.randn(Q, 9).abs() + 0.5)
    code[perm] = normalize_bbox(gt)
    logits = torch.full((Q, 10), -6.0)
    logits[perm, labels] = 6.0
    q, g = hungarian_match(logits, code, labels, normalize_bbox(gt))
    assert dict(zip(g.tolist(), q.tolist())) == dict(enumerate(perm.tolist()))
    good, _ = petr_loss(logits[None, None], code[None, None], [gt], [labels], cfg)
    bad_code = code.clone()
    bad_code[perm, 0] += 3.0
    bad, parts = petr_loss(logits[None, None], bad_code[None, None], [gt], [labels], cfg)
    assert good < 0.05 and bad > good + 0.2  # 0.25 * 3 m * 3 boxes / 3 positives = 0.75 more
    torch.testing.assert_close(bad - good, torch.tensor(0.75), atol=1e-3, rtol=0)
    empty, _ = petr_loss(logits[None, None].requires_grad_(), code[None, None], [torch.zeros(0, 9)],
                         [torch.zeros(0, dtype=torch.long)], cfg)
    empty.backward()
    assert torch.isfinite(empty) and empty > 0  # all queries are pushed to background


# ------------------------------------------------------------------ synthetic data + devkit
def test_synthetic_tables_load_in_devkit(synthetic_root):
    import nuscenes
    nusc = nuscenes.NuScenes(version="v1.0-synthetic", dataroot=synthetic_root, verbose=False)
    assert len(nusc.scene) == 3 and len(nusc.sample) == 9
    sample = nusc.sample[1]
    assert set(sample["data"]) == {"LIDAR_TOP"} | {c[0] for c in CAMERAS}
    ann = nusc.get("sample_annotation", sample["anns"][0])
    db = NuScenesTables(synthetic_root)
    np.testing.assert_allclose(nusc.box_velocity(ann["token"]), db.velocity(ann), atol=1e-9)
    from nuscenes.utils.splits import get_scenes_of_custom_split
    assert len(get_scenes_of_custom_split("synthetic_val", nusc)) == 2


def test_dataset_lidar2img_matches_devkit_projection(synthetic_root):
    """A box centre projected with the dataset's lidar2img lands where the devkit's calibration chain
    (global -> ego -> camera -> intrinsics) plus the resize/crop puts it."""
    from hfq.modeling.petr import PetrImageProcessor

    proc = PetrImageProcessor(final_size=(64, 128))
    ds = SyntheticNuScenesDataset(synthetic_root, "synthetic_val", proc, ALL_CLASSES)
    item = ds[0]
    assert item["pixel_values"].shape == (6, 3, 64, 128)
    db = ds.db
    token = ds.samples[0]
    boxes = item["labels"]["boxes"]
    assert len(boxes) > 0
    anns = [a for a in db.anns_by_sample[token] if a["num_lidar_pts"] > 0]
    sd = db.sd_by_sample[token]["CAM_FRONT"]
    cs = db.tables["calibrated_sensor"][sd["calibrated_sensor_token"]]
    resize = max(64 / 90, 128 / 160)
    crop_h = int(90 * resize) - 64
    for box, ann in zip(boxes, anns):
        cam = np.linalg.inv(db.sensor_to_global(sd)) @ np.append(ann["translation"], 1.0)
        if cam[2] < 1:
            continue
        uv = np.array(cs["camera_intrinsic"]) @ cam[:3]
        uv = uv[:2] / uv[2] * resize - np.array([0, crop_h])
        p = item["lidar2img"][0].double().numpy() @ np.append(box[:3].numpy(), 1.0)
        np.testing.assert_allclose(p[:2] / p[2], uv, atol=1e-2)
    # yaw in the LiDAR frame: rotating the global box by global->lidar gives the target heading
    g2l = np.linalg.inv(item["lidar2global"].double().numpy())
    R = g2l[:3, :3] @ quat_to_matrix(anns[0]["rotation"])
    assert abs(math.atan2(R[1, 0], R[0, 0]) - float(boxes[0, 6])) < 1e-4
    batch = collate([item, ds[1]])
    assert batch["pixel_values"].shape == (2, 6, 3, 64, 128)


def _perfect_results(db, split):
    res = {}
    for tok in db.split_samples(split):
        res[tok] = []
        for a in db.anns_by_sample.get(tok, []):
            if a["num_lidar_pts"] == 0:
                continue  # a perfect camera detector cannot see fully hidden boxes
            attr = db.tables["attribute"][a["attribute_tokens"][0]]["name"] if a["attribute_tokens"] else ""
            res[tok].append({"sample_token": tok, "translation": a["translation"], "size": a["size"],
                             "rotation": a["rotation"], "velocity": np.nan_to_num(db.velocity(a)[:2]).tolist(),
                             "detection_name": _name_of(db.category_of_instance[a["instance_token"]]),
                             "detection_score": 0.9, "attribute_name": attr})
    return res


def test_cli_eval_nuscenes_matches_the_library(synthetic_root, tmp_path, capsys):
    """Catches `hfq eval nuscenes` not loading a saved custom-code model, reading another split, or printing other
    figures than `evaluate_detection` computes."""
    from hfq.cli import main
    from hfq.eval.nuscenes import evaluate_detection

    torch.manual_seed(0)
    model = PetrForObjectDetection3D(tiny_config(class_names=ALL_CLASSES, input_size=(90, 160))).eval()
    model.save_pretrained(tmp_path / "m")
    assert main(["eval", "nuscenes", str(tmp_path / "m"), "--data", synthetic_root, "--split", "synthetic_val",
                 "--json", "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    direct = evaluate_detection(model, synthetic_root, split="synthetic_val", output_dir=str(tmp_path / "e"))
    for key in ("mAP", "NDS", "mATE", "mAOE"):
        assert printed[key] == pytest.approx(direct[key], abs=1e-12), key


def test_detection_eval_perfect_predictions(synthetic_root, tmp_path):
    from hfq.eval.nuscenes import run_detection_eval

    db = NuScenesTables(synthetic_root)
    m = run_detection_eval(_perfect_results(db, "synthetic_val"), synthetic_root, "synthetic_val",
                           output_dir=str(tmp_path))
    assert m["mAP"] > 0.99, m["per_class_AP"]
    assert m["NDS"] > 0.99 and m["mATE"] < 1e-6 and m["mAOE"] < 1e-6


def test_post_process_round_trips_to_global_boxes(synthetic_root):
    """Decoding a code built from a GT box through boxes_to_nuscenes gives back the global annotation."""
    from hfq.modeling.petr.petr_geometry import boxes_to_nuscenes

    ds = SyntheticNuScenesDataset(synthetic_root, "synthetic_val", lambda *a, **k: {}, ALL_CLASSES)
    item = ds[1]
    box, label = item["labels"]["boxes"][0], item["labels"]["class_labels"][0]
    out = boxes_to_nuscenes({"boxes": box[None].double(), "scores": torch.tensor([0.5]), "labels": label[None]},
                            ALL_CLASSES, item["lidar2ego"], item["ego2global"])[0]
    ann = [a for a in ds.db.anns_by_sample[ds.samples[1]] if a["num_lidar_pts"] > 0][0]
    np.testing.assert_allclose(out["translation"], ann["translation"], atol=1e-4)
    R1, R2 = quat_to_matrix(out["rotation"]), quat_to_matrix(ann["rotation"])
    np.testing.assert_allclose(R1, R2, atol=1e-4)
    assert out["detection_name"] == ALL_CLASSES[int(label)]


def test_oracle_gt_through_box_coder_and_decoder(synthetic_root, tmp_path):
    """Oracle: val ground truth -> dataset LiDAR-frame targets -> the loss's target code (normalize_bbox) ->
    the model's evaluation decoding (post_process: top-k, denormalize, LiDAR -> ego -> global) -> devkit.
    Any frame / yaw / size-order / centre mismatch between the data path and the decode path shows here."""
    from hfq.eval.nuscenes import run_detection_eval
    from hfq.modeling.petr.modeling_petr import PetrDetectionOutput

    cfg = tiny_config(class_names=ALL_CLASSES, num_queries=16, max_num=300)
    model = PetrForObjectDetection3D(cfg).eval()
    ds = SyntheticNuScenesDataset(synthetic_root, "synthetic_val", lambda *a, **k: {}, cfg.class_names)
    results = {}
    for i in range(len(ds)):
        item = ds[i]
        boxes, labels = item["labels"]["boxes"], item["labels"]["class_labels"]
        Q = max(len(boxes), 1)
        code = torch.zeros(Q, cfg.code_size)
        code[:, [2, 3, 5, 7]] = 0.0  # unit boxes, yaw 0 for unused queries (scored out below)
        logits = torch.full((Q, cfg.num_classes), -20.0)
        if len(boxes):
            code[: len(boxes)] = normalize_bbox(boxes)
            logits[torch.arange(len(boxes)), labels] = 5.0
        out = PetrDetectionOutput(logits=logits[None, None], pred_boxes=code[None, None])
        dets = model.post_process(out, [item["lidar2ego"]], [item["ego2global"]], [item["sample_token"]])[0]
        results[item["sample_token"]] = [d for d in dets if d["detection_score"] > 0.5]
    m = run_detection_eval(results, synthetic_root, "synthetic_val", output_dir=str(tmp_path))
    assert m["mAP"] > 0.95, m["per_class_AP"]
    assert m["mATE"] < 1e-3 and m["mAOE"] < 1e-3 and m["mASE"] < 1e-3, m
    assert m["mAVE"] < 1e-3 and m["mAAE"] < 1e-3 and m["NDS"] > 0.99, m  # velocity and attribute rule too


# ------------------------------------------------------------------ W8A8 fake quantization
def _random_inputs(B=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 6, 3, 64, 128, generator=g)
    K = torch.tensor([[40.0, 0, 64, 0], [0, 40, 32, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    l2i = []
    for n in range(6):  # six cameras around the LiDAR, looking outwards
        yaw = n * math.pi / 3
        ext = torch.eye(4)
        ext[:3, :3] = torch.tensor([[math.sin(yaw), -math.cos(yaw), 0], [0, 0, -1], [math.cos(yaw), math.sin(yaw), 0]])
        l2i.append(K @ ext)
    return {"pixel_values": x, "lidar2img": torch.stack(l2i)[None].repeat(B, 1, 1, 1)}


def test_w8a8_petr_close_to_fp_and_needs_calibration():
    """Catches: quantizing without calibration data (static scales would be garbage), a conv / linear / attention /
    position add left float, BatchNorm not folded, activation scales taken from the test input instead of the
    calibration range, weights off the per-tensor int8 grid, and a quantized model far from the float one."""
    import hfq
    from hfq.nn import QuantAdd, QuantConv2d, QuantLinear, QuantMultiheadAttention

    torch.manual_seed(0)
    # with the projection prior (a float mask in the quantized attention); the training-only aux head stays float
    model = PetrForObjectDetection3D(tiny_config(attn_prior_sigma=1.0, aux_2d_weight=1.0)).eval()
    calib, test = _random_inputs(2, seed=1), _random_inputs(1, seed=2)
    with torch.no_grad():
        ref = model(**test)
    import copy
    for empty in (None, []):
        with pytest.raises(ValueError, match="calibration"):
            hfq.quantize(copy.deepcopy(model), hfq.PTQConfig(), calibration=empty)
    key_add = model.model.decoder.layers[0].key_pos_add
    seen = []
    hook = key_add.register_forward_pre_hook(lambda m, args: seen.append(args[1].abs().max()))
    with torch.no_grad():
        model(**calib)
    hook.remove()
    qmodel = hfq.quantize(model, hfq.PTQConfig(), calibration=[calib])
    kinds = {type(m) for m in qmodel.modules()}
    assert {QuantConv2d, QuantLinear, QuantMultiheadAttention, QuantAdd} <= kinds
    left = {type(m).__name__ for n, m in qmodel.named_modules() if not n.startswith("aux_head")}
    assert not left & {"Conv2d", "Linear", "MultiheadAttention", "BatchNorm2d", "PetrPositionAdd"}, left
    layer = qmodel.model.decoder.layers[0]
    pe_quant = layer.key_pos_add.b_quant
    lo, hi = pe_quant.observed_range()  # on the calibration batch, after the (quantized) position encoder
    assert float(pe_quant.scale) == pytest.approx(max(-lo, hi) / 127, rel=1e-6)
    assert float(pe_quant.scale) == pytest.approx(float(seen[0]) / 127, rel=0.05)  # float PE range, nearly
    w = layer.cross_attn.out_proj
    assert w.weight.dtype == torch.uint8 and w.weight_scale.numel() == 1  # per-tensor int8
    with torch.no_grad():
        out = qmodel(**test)
    for a, b in ((out.logits, ref.logits), (out.pred_boxes, ref.pred_boxes)):
        rel = ((a - b).norm() / b.norm()).item()
        assert 0 < rel < 0.05, rel


def test_weight_only_rtn_leaves_multihead_attention_whole():
    """Catches a weight-only method replacing nn.MultiheadAttention's out_proj by a packed module: the attention
    reads out_proj.weight directly and would fail or compute garbage."""
    import hfq
    from hfq.nn import QuantLinear

    torch.manual_seed(0)
    model = PetrForObjectDetection3D(tiny_config()).eval()
    x = _random_inputs(1, seed=2)
    with torch.no_grad():
        ref = model(**x)
    hfq.quantize(model, hfq.RTNConfig(bits=8, group_size=None))
    attn = model.model.decoder.layers[0].cross_attn
    assert type(attn) is torch.nn.MultiheadAttention and not isinstance(attn.out_proj, QuantLinear)
    assert isinstance(model.model.decoder.layers[0].ffn.fc1, QuantLinear)
    with torch.no_grad():
        out = model(**x)
    assert ((out.logits - ref.logits).norm() / ref.logits.norm()) < 0.02


def test_quantized_petr_reloads_in_fresh_process(tmp_path):
    """Catches a quantized PETR that cannot be saved or reloaded exactly: quantize-on-load of the custom-code model
    with calibration batches, int8 (packed uint8) weights on disk with no float conv / linear weight left, the load
    skeleton missing the folded BatchNorm layout or the static scales, and a fresh process (hfq imported by the
    shipped config because the checkpoint is hfq-quantized) giving other outputs."""
    import hfq
    from safetensors.torch import load_file
    from transformers import AutoModel

    torch.manual_seed(0)
    PetrForObjectDetection3D(tiny_config()).eval().save_pretrained(tmp_path / "fp")
    calib, test = _random_inputs(2, seed=1), _random_inputs(1, seed=2)
    q = AutoModel.from_pretrained(tmp_path / "fp", trust_remote_code=True,
                                  quantization_config=hfq.PTQConfig(dataset=[calib])).eval()
    assert q.config.quantization_config.quant_method == "hfq_ptq"
    q.save_pretrained(tmp_path / "q")
    saved = json.load(open(tmp_path / "q" / "config.json"))["quantization_config"]
    assert saved["quant_method"] == "hfq_ptq" and saved["dataset"] is None  # batches are not written to config.json
    sd = load_file(tmp_path / "q" / "model.safetensors")
    convs = [k for k in sd if k.endswith(".weight") and "backbone" in k]
    assert convs and all(sd[k].dtype == torch.uint8 for k in convs)
    assert not [k for k in sd if "running_mean" in k or "in_proj_weight" in k]
    assert any(k.endswith("key_pos_add.b_quant.scale") for k in sd)
    torch.save(test, tmp_path / "inputs.pt")
    with torch.no_grad():
        ref = q(**test)
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModel
        m = AutoModel.from_pretrained({str(tmp_path / 'q')!r}, trust_remote_code=True).eval()
        assert "hfq" in sys.modules and type(m).__module__.startswith("transformers_modules")
        x = torch.load({str(tmp_path / 'inputs.pt')!r})
        with torch.no_grad():
            o = m(**x)
        torch.save({{"logits": o.logits, "boxes": o.pred_boxes}}, {str(tmp_path / 'out.pt')!r})
    """)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path, timeout=120)
    out = torch.load(tmp_path / "out.pt")
    assert torch.equal(out["logits"], ref.logits) and torch.equal(out["boxes"], ref.pred_boxes)


# ------------------------------------------------------------------ from-scratch training options
def test_projection_prior_peaks_at_the_anchor_projection():
    cfg = tiny_config(attn_prior_sigma=1.0)
    model = PetrForObjectDetection3D(cfg).eval()
    inputs = _random_inputs(1)
    l2i = inputs["lidar2img"]
    lo, hi = torch.tensor(cfg.pc_range[:3]), torch.tensor(cfg.pc_range[3:])
    point = torch.tensor([10.0, -1.1, -0.6])  # ahead of camera 0 (yaw 0 looks along +x), inside a cell
    ref = ((point - lo) / (hi - lo))[None, None]
    H, W = 8, 16  # 64x128 input, stride 8
    bias = model.model.projection_prior(ref, l2i, (H, W), (64, 128))
    assert bias.shape == (1, cfg.num_heads, 1, 6 * H * W)
    b = bias[0, 0, 0].view(6, H, W)
    p = l2i[0, 0] @ torch.cat([point, torch.ones(1)])
    u, v = p[0] / p[2], p[1] / p[2]
    n, h, w = np.unravel_index(int(b.argmax()), b.shape)
    assert n == 0 and h == int(v // 8) and w == int(u // 8)
    assert b[3].max() == -30.0  # camera 3 looks backwards: the anchor is behind it
    assert (bias[0, 1] >= bias[0, 0]).all()  # wider Gaussian on the next head
    with torch.no_grad():
        out = model(**inputs)
    assert torch.isfinite(out.logits).all()


def test_aux_2d_targets_and_loss():
    from hfq.modeling.petr.petr_loss import aux_2d_targets

    inputs = _random_inputs(1)
    box = torch.tensor([[10.0, 0.0, -1.0, 2.0, 4.0, 1.5, 0.0, 0.0, 0.0]])  # 10 m ahead of camera 0
    cls, depth = aux_2d_targets(inputs["lidar2img"][0], box, torch.tensor([3]), (8, 16), (64, 128), 10)
    assert (cls[0] == 3).any() and (cls[3] == 10).all()  # seen ahead, not by the camera looking back
    covered = depth[0][cls[0] == 3]
    assert torch.allclose(covered, torch.full_like(covered, 10.0), atol=1e-4)
    cfg = tiny_config(aux_2d_weight=1.0, attn_prior_sigma=1.0)
    model = PetrForObjectDetection3D(cfg).train()
    out = model(**inputs, labels=[{"boxes": box, "class_labels": torch.tensor([3])}])
    assert out.loss_dict["loss_aux_cls"] > 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.aux_head.weight.grad.abs().sum() > 0
