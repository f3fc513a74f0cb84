"""FlashOcc / Panoptic-FlashOcc custom-code model: BEV pooling, geometry, heads, clustering, loss, converter,
pre-processing, save / fresh-process reload and a short training run."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from hfq.modeling.flashocc import (
    OFFICIAL_CENTER_HEADS, FlashOccConfig, FlashOccForOccupancy, FlashOccImageProcessor, convert_official_checkpoint,
    flashocc_m0_kwargs, panoptic_tiny_kwargs,
)
from hfq.modeling.flashocc.configuration_flashocc import NUSC_CLASS_FREQUENCIES
from hfq.modeling.flashocc.flashocc_geometry import (
    bev_pool, create_frustum, depth_targets, frustum_to_ego, voxel_indices,
)
from hfq.modeling.flashocc.flashocc_panoptic import assign_instances, decode_centers


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors, one intra-op thread


TINY_RESNET = {"model_type": "resnet", "layer_type": "bottleneck", "embedding_size": 8,
               "hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 1, 1], "out_features": ["stage3", "stage4"]}


def tiny_config(**kw):
    """100 x 100 BEV grid of 0.8 m cells, Dz = 8 occupancy slices, 64 x 128 input, 10 depth bins."""
    base = dict(backbone_type="simple", simple_channels=[8, 8, 16, 16, 32], neck_channels=32, input_size=(64, 128),
                depth_bins=(1.0, 41.0, 4.0), grid_x=(-40.0, 40.0, 0.8), grid_y=(-40.0, 40.0, 0.8), bev_channels=8,
                bev_backbone_channels=(16, 32, 64), bev_neck_channels=32, occ_head_channels=32, num_occ_z=8,
                center_share_channels=16, center_head_channels=16, aspp_mid_channels=8)
    base.update(kw)
    return FlashOccConfig(**base)


def camera_inputs(B=1, N=2, seed=0):
    """Two cameras 1.5 m ahead / behind the ego origin, 1.6 m high, looking forward / backward."""
    g = torch.Generator().manual_seed(seed)
    K = torch.tensor([[60.0, 0, 64], [0, 60, 32], [0, 0, 1]]).expand(B, N, 3, 3).clone()
    cam_to_ego = torch.tensor([[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]])  # x right, y down, z fwd -> x fwd, y left, z up
    s2e = torch.eye(4).repeat(B, N, 1, 1)
    for n in range(N):
        yaw = torch.eye(3) if n % 2 == 0 else torch.diag(torch.tensor([-1.0, -1, 1]))
        s2e[:, n, :3, :3] = yaw @ cam_to_ego
        s2e[:, n, :3, 3] = torch.tensor([1.5 if n % 2 == 0 else -1.5, 0.0, 1.6])
    return {"pixel_values": torch.randn(B, N, 3, 64, 128, generator=g), "intrinsics": K, "sensor2ego": s2e}


# ------------------------------------------------------------------ BEV pooling and geometry
def naive_bev_pool(depth, feat, points, lower, cell, size):
    """One point at a time: int() truncates toward zero like the official `.long()`; layout (B, C, Dz, Dy, Dx) then
    z stacked in front of the channels."""
    B, N, D, fh, fw = depth.shape
    dx, dy, dz = size
    out = torch.zeros(B, feat.shape[2], dz, dy, dx, dtype=torch.float64)
    for b in range(B):
        for n in range(N):
            for d in range(D):
                for v in range(fh):
                    for u in range(fw):
                        i = [int((float(points[b, n, d, v, u, a]) - lower[a]) / cell[a]) for a in range(3)]
                        if all(0 <= i[a] < size[a] for a in range(3)):
                            out[b, :, i[2], i[1], i[0]] += float(depth[b, n, d, v, u]) * feat[b, n, :, v, u].double()
    return torch.cat(out.unbind(dim=2), dim=1)


def test_bev_pool_equals_naive_loop():
    """Catches a wrong BEV-pool index rule (floor instead of the official truncation toward zero, wrong cell rank),
    a dropped or double-counted point, or a channel layout other than the official z-major (B, C*Dz, Dy, Dx)."""
    g = torch.Generator().manual_seed(1)
    B, N, D, fh, fw, C = 2, 2, 3, 2, 3, 4
    lower, cell, size = [-2.0, -1.0, -1.0], [1.0, 0.5, 1.0], (4, 4, 2)  # 4 x 4 cells, 2 z bins
    depth = torch.rand(B, N, D, fh, fw, generator=g)
    feat = torch.randn(B, N, C, fh, fw, generator=g)
    points = torch.rand(B, N, D, fh, fw, 3, generator=g) * torch.tensor([5.0, 3.0, 2.6])
    points += torch.tensor([-2.5, -1.4, -1.3])
    points[0, 0, 0, 0, 0] = torch.tensor([-2.3, 0.1, 0.2])  # x 0.3 cell below the grid: truncation keeps it in cell 0
    points[0, 0, 1, 0, 0] = torch.tensor([-2.3, 0.1, 0.2])  # same cell again: contributions add up
    points[1, 1, 2, 1, 2] = torch.tensor([-3.1, 0.1, 0.2])  # 1.1 cells below: dropped
    out = bev_pool(depth, feat, points, lower, cell, size)
    ref = naive_bev_pool(depth, feat, points, lower, cell, size)
    assert out.shape == (B, C * 2, 4, 4)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    idx, kept = voxel_indices(points[0, 0, 0, 0, 0], lower, cell, size)
    assert idx.tolist() == [0, 2, 1] and bool(kept)


def test_frustum_point_lands_in_hand_computed_cell():
    """Catches a wrong lift (image augmentation not undone, K^-1 / rotation / translation / BEV-augmentation in the
    wrong order) or x / y swapped in the pooled map, on a camera pose whose cell is computed by hand."""
    # front camera at ego (1.5, 0, 1.6) looking +x; original image 256 x 512, f = 200, principal point (256, 160);
    # network input 64 x 128 = resize 0.25, no crop; frustum u = linspace(0, 127, 8), v = linspace(0, 63, 4)
    K = torch.tensor([[[[200.0, 0, 256], [0, 200, 160], [0, 0, 1]]]])
    s2e = torch.eye(4).view(1, 1, 4, 4).clone()
    s2e[0, 0, :3, :3] = torch.tensor([[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]])
    s2e[0, 0, :3, 3] = torch.tensor([1.5, 0.0, 1.6])
    post_rots = torch.diag(torch.tensor([0.25, 0.25, 1.0])).view(1, 1, 3, 3)
    post_trans = torch.zeros(1, 1, 3)
    frustum = create_frustum((5.0, 25.0, 5.0), (64, 128), 16)  # depths 5, 10, 15, 20
    pts = frustum_to_ego(frustum, s2e, K, post_rots, post_trans, torch.eye(3).view(1, 3, 3))
    # bin d = 20, row 2 (v = 42 -> original 168), column 7 (u = 127 -> original 508):
    # camera (x, y, z) = ((508 - 256) * 20 / 200, (168 - 160) * 20 / 200, 20) = (25.2, 0.8, 20)
    # ego = (20 + 1.5, -25.2, -0.8 + 1.6) = (21.5, -25.2, 0.8)
    torch.testing.assert_close(pts[0, 0, 3, 2, 7], torch.tensor([21.5, -25.2, 0.8]), rtol=0, atol=1e-4)
    depth = torch.zeros(1, 1, 4, 4, 8)
    depth[0, 0, 3, 2, 7] = 1.0
    feat = torch.zeros(1, 1, 1, 4, 8)
    feat[0, 0, 0, 2, 7] = 1.0
    grid = ([-40.0, -40.0, -1.0], [0.8, 0.8, 6.4], (100, 100, 1))
    bev = bev_pool(depth, feat, pts, *grid)[0, 0]
    # cell x = int((21.5 + 40) / 0.8) = 76, y = int((-25.2 + 40) / 0.8) = 18
    assert bev[18, 76] == 1 and bev.sum() == 1
    flip_x = torch.diag(torch.tensor([-1.0, 1.0, 1.0])).view(1, 3, 3)  # BEV augmentation: x -> -x
    pts = frustum_to_ego(frustum, s2e, K, post_rots, post_trans, flip_x)
    bev = bev_pool(depth, feat, pts, *grid)[0, 0]
    assert bev[18, int((-21.5 + 40) / 0.8)] == 1  # cell 23


def test_precomputed_bev_plan_gives_the_same_logits():
    """Catches a `bev_plan` that is not what forward computes from the same camera inputs (other geometry, batch or
    camera order) or that forward ignores: logits with the precomputed plan must equal the default ones exactly,
    and a plan of other cameras must change them."""
    torch.manual_seed(0)
    model = FlashOccForOccupancy(tiny_config()).eval()
    inputs, other = camera_inputs(B=2, seed=1), camera_inputs(B=2, seed=1)
    other["sensor2ego"] = other["sensor2ego"].flip(1)  # cameras swapped
    with torch.no_grad():
        ref = model(**inputs).logits
        plan = model.model.bev_plan(**inputs)
        assert all(t.dtype == torch.int64 and t.dim() == 1 for t in plan) and len({len(t) for t in plan}) == 1
        assert torch.equal(model(**inputs, bev_plan=plan).logits, ref)
        assert not torch.equal(model(**inputs, bev_plan=model.model.bev_plan(**other)).logits, ref)


# ------------------------------------------------------------------ occupancy head and loss
def test_channel_to_height_reshape_is_z_major_class_minor():
    """Catches the channel-to-height head viewing Dz*C as class-major, or reading the BEV map as (y, x) instead of
    the official (B, Dx, Dy, Dz, C) order."""
    torch.manual_seed(0)
    cfg = tiny_config()
    head = FlashOccForOccupancy(cfg).occ_head.eval()
    C, Z = cfg.num_classes, cfg.num_occ_z
    with torch.no_grad():
        head.predicter[2].weight.zero_()
        head.predicter[2].bias.copy_(torch.arange(Z * C, dtype=torch.float32))
        out = head(torch.randn(1, cfg.bev_neck_channels, 3, 5))
    assert out.shape == (1, 5, 3, Z, C)  # (B, Dx, Dy, Dz, C) from (B, C, Dy=3, Dx=5)
    z, c = torch.meshgrid(torch.arange(Z), torch.arange(C), indexing="ij")
    assert torch.equal(out[0, 4, 2], (z * C + c).float())
    head = FlashOccForOccupancy(cfg).occ_head.eval()
    feat = torch.randn(1, cfg.bev_neck_channels, 3, 5)
    with torch.no_grad():
        out = head(feat)
        cell = head.predicter(torch.relu(head.final_conv(feat))[0, :, 1, 4]).view(Z, C)  # y = 1, x = 4
    torch.testing.assert_close(out[0, 4, 1], cell)


def test_loss_uses_only_masked_voxels():
    """Catches an occupancy loss that averages over all voxels, or lets voxels outside mask_camera contribute."""
    torch.manual_seed(0)
    model = FlashOccForOccupancy(tiny_config())
    logits = torch.randn(2, 4, 4, 3, 18)
    target = torch.randint(0, 18, (2, 4, 4, 3))
    mask = torch.rand(2, 4, 4, 3) > 0.6
    loss = model.occupancy_loss(logits, target, mask)
    ce = torch.nn.functional.cross_entropy(logits[mask], target[mask], reduction="sum") / mask.sum()
    torch.testing.assert_close(loss, ce)
    noisy = logits.clone()
    noisy[~mask] = torch.randn(int((~mask).sum()), 18) * 10
    torch.testing.assert_close(model.occupancy_loss(noisy, target, mask), loss)
    with pytest.raises(ValueError, match="mask_camera"):
        model.occupancy_loss(logits, target)
    balanced = FlashOccForOccupancy(tiny_config(class_balance=True))
    w = 1 / torch.log(torch.tensor(NUSC_CLASS_FREQUENCIES, dtype=torch.float64) + 1e-3)
    ce = torch.nn.functional.cross_entropy(logits[mask], target[mask], weight=w.float(), reduction="sum")
    torch.testing.assert_close(balanced.occupancy_loss(logits, target, mask), ce / w[target[mask]].sum().float())


def test_depth_targets_pick_the_nearest_point_bin():
    """Catches BEVDepth depth supervision on the wrong bin (off by one, nearest point not taken, out-of-range depths
    or empty patches given a target)."""
    dmap = torch.zeros(1, 1, 32, 48)  # 2 x 3 cells of 16 x 16 pixels
    dmap[0, 0, 3, 4], dmap[0, 0, 9, 1] = 12.0, 7.3  # cell (0, 0): nearest 7.3 -> bin (7.3 - 1) // 0.5 = 12
    dmap[0, 0, 20, 20] = 50.0  # cell (1, 1): beyond 45 m -> no target
    dmap[0, 0, 5, 40] = 1.0  # cell (0, 2): the first bin
    t = depth_targets(dmap, 16, (1.0, 45.0, 0.5))
    assert t.shape == (6, 88)
    assert t[0].argmax() == 12 and t[0].sum() == 1 and t[2].argmax() == 0 and t[2].sum() == 1
    assert t[[1, 3, 4, 5]].sum() == 0


# ------------------------------------------------------------------ panoptic
def test_panoptic_clustering_assigns_nearest_centre_of_the_right_class():
    """Catches clustering that ignores the class (a car voxel joining a nearer truck centre), picks a far centre,
    numbers instances other than 18 + rank in the class-sorted centre list, or touches stuff / centre-less voxels."""
    cfg = tiny_config(panoptic=True)  # heatmap channels: car 0, truck 1, bus 3; occupancy: car 4, truck 10, bus 3
    sem = torch.full((12, 12, 4), 17)
    car_a = [(1, 1, 0), (2, 1, 1), (1, 2, 0)]
    car_b = [(9, 9, 0), (10, 9, 1)]
    car_near_truck = (6, 2, 0)  # right next to the truck centre, nearer car A (dist^2 26) than car B (dist^2 58)
    for v in car_a + car_b + [car_near_truck]:
        sem[v] = 4
    sem[6, 3, 0] = 10  # truck voxel
    sem[3, 9, 0] = 3  # bus voxel, far from the bus centre: still its instance
    sem[5, 5, 0] = 7  # pedestrian: no pedestrian centre -> keeps its semantic id
    sem[4, 4, 0] = 1  # barrier: not a thing class
    origin, voxel = (-40.0, -40.0, -1.0), (0.8, 0.8, 0.8)

    def xyz(i, j, k):
        return [origin[0] + (i + 0.5) * voxel[0], origin[1] + (j + 0.5) * voxel[1], origin[2] + (k + 0.5) * voxel[2]]

    centers = torch.tensor([xyz(0, 10, 0), xyz(1, 1, 0), xyz(6, 2, 0), xyz(10, 10, 0)])
    labels = torch.tensor([3, 0, 1, 0])  # bus, car A, truck, car B -> sorted: car A 18, car B 19, truck 20, bus 21
    inst = assign_instances(sem, centers, labels, cfg.center_to_occ, cfg.thing_occ_classes, origin, voxel, 18)
    assert all(inst[v] == 18 for v in car_a) and all(inst[v] == 19 for v in car_b)
    assert inst[car_near_truck] == 18 and inst[6, 3, 0] == 20 and inst[3, 9, 0] == 21
    assert inst[5, 5, 0] == 7 and inst[4, 4, 0] == 1 and inst[0, 0, 0] == 17
    # the official table reads channel 2 (construction_vehicle in the configs' order) as trailer (occ 9)
    assert cfg.center_to_occ[2] == 5 and tiny_config(center_class_map="official").center_to_occ[2] == 9


def test_centre_decoding_from_a_hand_built_heatmap():
    """Catches centre decoding with x / y swapped, the offset or the cell size mis-applied, or a missing
    score threshold / 3x3 peak suppression."""
    cfg = tiny_config(panoptic=True)
    heat = torch.full((1, 10, 100, 100), -10.0)
    heat[0, 1, 30, 70] = 3.0  # truck peak at row (y) 30, column (x) 70
    heat[0, 1, 30, 71] = 2.0  # its neighbour: suppressed by the 3x3 max-pool NMS
    heat[0, 4, 80, 20] = -1.0  # sigmoid 0.27 < 0.3: dropped
    offset = torch.zeros(1, 2, 100, 100)
    offset[0, :, 30, 70] = torch.tensor([0.25, 0.5])
    height = torch.full((1, 1, 100, 100), 1.2)
    (res,) = decode_centers(heat, offset, height, cfg)
    assert res["labels"].tolist() == [1]
    torch.testing.assert_close(res["centers"][0], torch.tensor([(70.25 * 0.8) - 40, (30.5 * 0.8) - 40, 1.2]))


# ------------------------------------------------------------------ converter
def _bn(keys, prefix, c):
    keys.update({f"{prefix}.{n}": (c,) for n in ("weight", "bias", "running_mean", "running_var")})
    keys[f"{prefix}.num_batches_tracked"] = ()


def official_keys(cfg):
    """Keys and shapes of an official checkpoint for `cfg`, enumerated from the official module definitions:
    mmdet ResNet (torchvision names), CustomFPN (ConvModule .conv), LSSViewTransformer depth_net (1x1 conv) or
    BEVDepth DepthNet, CustomResNet (mmdet BasicBlock conv1/bn1/conv2/bn2, Conv2d downsample), FPN_LSS (Sequential
    indices), BEVOCCHead2D (ConvModule final_conv, predicter), Centerness_Head (ConvModule shared_conv, SeparateHead
    task_heads.0.<name>.<i>)."""
    k = {}
    r = cfg.backbone_config
    e = r["embedding_size"]
    k["img_backbone.conv1.weight"] = (e, 3, 7, 7)
    _bn(k, "img_backbone.bn1", e)
    cin = e
    for s, (cout, n) in enumerate(zip(r["hidden_sizes"], r["depths"]), start=1):
        mid = cout // 4
        for b in range(n):
            p = f"img_backbone.layer{s}.{b}"
            for j, shape in enumerate([(mid, cin, 1, 1), (mid, mid, 3, 3), (cout, mid, 1, 1)], start=1):
                k[f"{p}.conv{j}.weight"] = shape
                _bn(k, f"{p}.bn{j}", shape[0])
            if b == 0:
                k[f"{p}.downsample.0.weight"] = (cout, cin, 1, 1)
                _bn(k, f"{p}.downsample.1", cout)
            cin = cout
    C = cfg.neck_channels
    for i, c in enumerate(r["hidden_sizes"][-2:]):
        k[f"img_neck.lateral_convs.{i}.conv.weight"], k[f"img_neck.lateral_convs.{i}.conv.bias"] = (C, c, 1, 1), (C,)
    k["img_neck.fpn_convs.0.conv.weight"], k["img_neck.fpn_convs.0.conv.bias"] = (C, C, 3, 3), (C,)
    D, T = cfg.num_depth_bins, cfg.bev_channels
    dn = "img_view_transformer.depth_net."
    if cfg.depth_net_type == "lss":
        k[dn + "weight"], k[dn + "bias"] = (D + T, C, 1, 1), (D + T,)
    else:
        m, a = C, cfg.aspp_mid_channels
        k[dn + "reduce_conv.0.weight"], k[dn + "reduce_conv.0.bias"] = (m, C, 3, 3), (m,)
        _bn(k, dn + "reduce_conv.1", m)
        k[dn + "context_conv.weight"], k[dn + "context_conv.bias"] = (T, m, 1, 1), (T,)
        _bn(k, dn + "bn", 27)
        for mlp in ("depth_mlp", "context_mlp"):
            k[f"{dn}{mlp}.fc1.weight"], k[f"{dn}{mlp}.fc1.bias"] = (m, 27), (m,)
            k[f"{dn}{mlp}.fc2.weight"], k[f"{dn}{mlp}.fc2.bias"] = (m, m), (m,)
        for se in ("depth_se", "context_se"):
            for conv in ("conv_reduce", "conv_expand"):
                k[f"{dn}{se}.{conv}.weight"], k[f"{dn}{se}.{conv}.bias"] = (m, m, 1, 1), (m,)
        for i in range(3):
            for j in (1, 2):
                k[f"{dn}depth_conv.{i}.conv{j}.weight"] = (m, m, 3, 3)
                _bn(k, f"{dn}depth_conv.{i}.bn{j}", m)
        for i, ks in enumerate((1, 3, 3, 3), start=1):
            k[f"{dn}depth_conv.3.aspp{i}.atrous_conv.weight"] = (a, m, ks, ks)
            _bn(k, f"{dn}depth_conv.3.aspp{i}.bn", a)
        k[dn + "depth_conv.3.global_avg_pool.1.weight"] = (a, m, 1, 1)
        _bn(k, dn + "depth_conv.3.global_avg_pool.2", a)
        k[dn + "depth_conv.3.conv1.weight"] = (m, 5 * a, 1, 1)
        _bn(k, dn + "depth_conv.3.bn1", m)
        k[dn + "depth_conv.4.weight"], k[dn + "depth_conv.4.bias"] = (D, m, 1, 1), (D,)
    cin = cfg.bev_in_channels
    for i, (c, n) in enumerate(zip(cfg.bev_backbone_channels, cfg.bev_backbone_layers)):
        for b in range(n):
            p = f"img_bev_encoder_backbone.layers.{i}.{b}"
            k[f"{p}.conv1.weight"], k[f"{p}.conv2.weight"] = (c, cin, 3, 3), (c, c, 3, 3)
            _bn(k, f"{p}.bn1", c)
            _bn(k, f"{p}.bn2", c)
            if b == 0:
                k[f"{p}.downsample.weight"], k[f"{p}.downsample.bias"] = (c, cin, 3, 3), (c,)
            cin = c
    o = cfg.bev_neck_channels
    cat = cfg.bev_backbone_channels[0] + cfg.bev_backbone_channels[2]
    nk = "img_bev_encoder_neck."
    k[nk + "conv.0.weight"], k[nk + "conv.3.weight"] = (2 * o, cat, 3, 3), (2 * o, 2 * o, 3, 3)
    _bn(k, nk + "conv.1", 2 * o)
    _bn(k, nk + "conv.4", 2 * o)
    k[nk + "up2.1.weight"], k[nk + "up2.4.weight"], k[nk + "up2.4.bias"] = (o, 2 * o, 3, 3), (o, o, 1, 1), (o,)
    _bn(k, nk + "up2.2", o)
    h = cfg.occ_head_channels
    k["occ_head.final_conv.conv.weight"], k["occ_head.final_conv.conv.bias"] = (h, o, 3, 3), (h,)
    k["occ_head.predicter.0.weight"], k["occ_head.predicter.0.bias"] = (2 * h, h), (2 * h,)
    k["occ_head.predicter.2.weight"] = (cfg.num_occ_z * cfg.num_classes, 2 * h)
    k["occ_head.predicter.2.bias"] = (cfg.num_occ_z * cfg.num_classes,)
    if cfg.panoptic:
        s, hc = cfg.center_share_channels, cfg.center_head_channels
        k["aux_centerness_head.shared_conv.conv.weight"] = (s, o, 3, 3)
        _bn(k, "aux_centerness_head.shared_conv.bn", s)
        # the official checkpoints always hold all five CenterPoint branches (+ heatmap)
        heads = dict(OFFICIAL_CENTER_HEADS, heatmap=[len(cfg.center_class_names), cfg.center_heatmap_convs])
        for name, (ch, convs) in heads.items():
            p, c_in = f"aux_centerness_head.task_heads.0.{name}", s
            for i in range(convs - 1):
                k[f"{p}.{i}.conv.weight"] = (hc, c_in, 3, 3)
                _bn(k, f"{p}.{i}.bn", hc)
                c_in = hc
            k[f"{p}.{convs - 1}.weight"], k[f"{p}.{convs - 1}.bias"] = (ch, hc, 3, 3), (ch,)
    return k


def random_state(keys, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(*s, generator=g) if s else torch.tensor(3) for n, s in keys.items()}


@pytest.mark.parametrize("kind", ["flashocc", "panoptic"])
def test_converter_covers_official_keys(kind):
    """Catches a converter or module tree that misses, invents or mis-shapes an official key (tiny sizes load into
    the model; the full official M1 / M0 / panoptic-tiny key sets are checked on meta tensors), or misplaces one."""
    extra = panoptic_tiny_kwargs() | {"aspp_mid_channels": 8} if kind == "panoptic" else {}
    cfg = tiny_config(backbone_type="resnet", backbone_config=TINY_RESNET, **extra)
    official = random_state(official_keys(cfg))
    converted = convert_official_checkpoint({"state_dict": official, "meta": {}}, cfg)
    model = FlashOccForOccupancy(cfg)
    model.load_state_dict(converted, strict=True)
    sd = model.state_dict()
    assert torch.equal(sd["model.img_backbone.encoder.stages.2.layers.0.layer.1.convolution.weight"],
                       official["img_backbone.layer3.0.conv2.weight"])
    assert torch.equal(sd["model.bev_backbone.layers.1.0.conv2.normalization.running_var"],
                       official["img_bev_encoder_backbone.layers.1.0.bn2.running_var"])
    assert torch.equal(model.occ_head.predicter[2].bias, official["occ_head.predicter.2.bias"])
    if kind == "panoptic":
        assert torch.equal(model.center_head.heads["heatmap"][1].weight,
                           official["aux_centerness_head.task_heads.0.heatmap.1.weight"])
        assert set(model.center_head.heads) == {"reg", "height", "heatmap"}  # dim / rot / vel dropped by default
        keep = tiny_config(backbone_type="resnet", backbone_config=TINY_RESNET, center_heads=OFFICIAL_CENTER_HEADS,
                           **extra)
        with_box = FlashOccForOccupancy(keep)
        with_box.load_state_dict(convert_official_checkpoint(official, keep), strict=True)
        assert torch.equal(with_box.center_head.heads["vel"][1].bias,
                           official["aux_centerness_head.task_heads.0.vel.1.bias"])
        assert torch.equal(sd["model.view_transformer.depth_net.depth_conv.3.project.normalization.bias"],
                           official["img_view_transformer.depth_net.depth_conv.3.bn1.bias"])
        full = FlashOccConfig(**panoptic_tiny_kwargs())
    else:
        assert torch.equal(model.model.view_transformer.depth_net.weight,
                           official["img_view_transformer.depth_net.weight"])
        full = FlashOccConfig()
        m0 = FlashOccConfig(**flashocc_m0_kwargs())
        meta = {n: torch.empty(s, device="meta") for n, s in official_keys(m0).items()}
        convert_official_checkpoint(meta, m0)
        with torch.device("meta"):  # the official README: FlashOcc M0 has 39.94 M parameters
            assert round(sum(p.numel() for p in FlashOccForOccupancy(m0).parameters()) / 1e6, 2) == 39.94
    meta = {n: torch.empty(s, device="meta") for n, s in official_keys(full).items()}
    assert full.num_depth_bins == (88 if kind == "flashocc" else 44)
    convert_official_checkpoint(meta, full)  # raises on any missing / unexpected key or shape mismatch


def test_converter_errors():
    """Catches a converter that silently drops unknown keys or accepts a checkpoint that does not fit the config."""
    cfg = tiny_config(backbone_type="resnet", backbone_config=TINY_RESNET)
    official = random_state(official_keys(cfg))
    with pytest.raises(ValueError, match="no FlashOcc counterpart"):
        convert_official_checkpoint({**official, "img_view_transformer.cv_frustum_net.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="missing"):
        convert_official_checkpoint({n: v for n, v in official.items() if "predicter" not in n}, cfg)
    with pytest.raises(ValueError, match="shape mismatches"):
        convert_official_checkpoint(official, tiny_config(backbone_type="resnet", backbone_config=TINY_RESNET,
                                                          num_occ_z=4))


# ------------------------------------------------------------------ pre-processing
def test_image_processor_reproduces_official_test_pipeline():
    """Catches losing the official BGR quirk (PIL RGB normalised by mmcv with to_rgb=True), a resize / crop other
    than 704 / 1600 keeping the bottom 256 rows, or an img_aug matrix that does not match it."""
    import cv2
    from PIL import Image

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (900, 1600, 3), dtype=np.uint8)
    proc = FlashOccImageProcessor()
    out = proc([img], np.eye(3)[None], np.eye(4)[None])
    assert out["pixel_values"].shape == (1, 3, 256, 704)
    np.testing.assert_allclose(out["img_aug"][0].numpy(), [[0.44, 0, 0], [0, 0.44, -140], [0, 0, 1]], atol=1e-6)
    # official: PIL resize to (704, 396), crop (0, 140, 704, 396), then mmcv imnormalize(to_rgb=True) on the RGB array
    ref = np.asarray(Image.fromarray(img).resize((704, 396)).crop((0, 140, 704, 396))).astype(np.float32)
    ref = cv2.cvtColor(ref, cv2.COLOR_BGR2RGB)  # what mmcv's to_rgb does: swap channels 0 and 2
    ref = (ref - np.array([123.675, 116.28, 103.53], np.float32)) / np.array([58.395, 57.12, 57.375], np.float32)
    np.testing.assert_allclose(out["pixel_values"][0].numpy(), ref.transpose(2, 0, 1), atol=1e-4)
    blue = np.asarray(Image.fromarray(img).resize((704, 396)).crop((0, 140, 704, 396)))[..., 2]
    np.testing.assert_allclose(out["pixel_values"][0, 0].numpy(), (blue - 123.675) / 58.395, atol=1e-4)
    rgb = FlashOccImageProcessor(bgr=False)([img], np.eye(3)[None], np.eye(4)[None])["pixel_values"]
    assert not torch.allclose(rgb, out["pixel_values"])
    # the matrix maps original pixels onto the network image (a bright dot at original (800, 700))
    dot = np.zeros((900, 1600, 3), np.uint8)
    dot[690:711, 790:811] = 255
    px = proc([dot], np.eye(3)[None], np.eye(4)[None])["pixel_values"][0, 0].numpy()
    ys, xs = np.nonzero(px > (px.max() + px.min()) / 2)
    u, v, _ = out["img_aug"][0].numpy() @ np.array([800.0, 700.0, 1.0])
    assert abs(xs.mean() - u) <= 1 and abs(ys.mean() - v) <= 1
    flips = set()
    for seed in range(4):  # training: random resize, crop column, flip, rotation about the crop centre
        rng = np.random.default_rng(seed)
        flips.add(bool(proc.augmentation((900, 1600), True, np.random.default_rng(seed))[3]))
        aug = proc([dot], np.eye(3)[None], np.eye(4)[None], train=True, rng=rng)
        px = aug["pixel_values"][0, 0].numpy()
        ys, xs = np.nonzero(px > (px.max() + px.min()) / 2)
        u, v, _ = aug["img_aug"][0].numpy() @ np.array([800.0, 700.0, 1.0])
        assert abs(xs.mean() - u) <= 1.5 and abs(ys.mean() - v) <= 1.5, (seed, xs.mean(), u, ys.mean(), v)
    assert flips == {True, False}


# ------------------------------------------------------------------ quantizer friendliness
def test_every_batchnorm_folds_into_its_convolution():
    """Catches a BatchNorm2d that the project's folding pass cannot pair with its convolution (e.g. applied
    functionally or stored apart from it), which would leave float normalisation in a quantized model."""
    from hfq.transforms.batchnorm import conv_bn_pairs, fold_batchnorm

    torch.manual_seed(0)
    model = FlashOccForOccupancy(tiny_config(panoptic=True, depth_net_type="bevdepth")).eval()
    for m in model.modules():  # non-trivial statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert len(conv_bn_pairs(model)) == n_bn
    inputs = camera_inputs()
    with torch.no_grad():
        ref = model(**inputs)
        assert fold_batchnorm(model) == n_bn
        out = model(**inputs)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-3, atol=1e-3)


def test_w8a8_ptq_reaches_every_layer():
    """Catches a layer generic quantizers cannot reach (functional weights, a branch off the calibration forward
    path, a BatchNorm2d left unfolded) or a quantized FlashOcc far from the float one."""
    import hfq

    torch.manual_seed(0)
    model = FlashOccForOccupancy(tiny_config(**(panoptic_tiny_kwargs() | {"aspp_mid_channels": 8}))).eval()
    calib, test = camera_inputs(seed=1), camera_inputs(seed=2)
    with torch.no_grad():
        ref = model(**test)
    q = hfq.quantize(model, hfq.PTQConfig(), calibration=[calib])
    left = {type(m).__name__ for m in q.modules()}
    assert {"QuantConv2d", "QuantLinear"} <= left and not left & {"Conv2d", "Linear", "BatchNorm2d"}, left
    with torch.no_grad():
        out = q(**test)
    for a, b in ((out.logits, ref.logits), (out.center_heatmap, ref.center_heatmap)):
        assert 0 < ((a - b).norm() / b.norm()).item() < 0.1


# ------------------------------------------------------------------ save / fresh-process reload
def test_save_pretrained_reload_in_fresh_process(tmp_path):
    """Catches shipped code that does not import without hfq, a missing helper file, or weights / config fields that
    do not round-trip through save_pretrained + AutoModel.from_pretrained(trust_remote_code=True)."""
    torch.manual_seed(0)
    cfg = tiny_config(**(panoptic_tiny_kwargs() | {"aspp_mid_channels": 8}))
    model = FlashOccForOccupancy(cfg).eval()
    model.save_pretrained(tmp_path / "m")
    shipped = set(os.listdir(tmp_path / "m"))
    assert {"modeling_flashocc.py", "configuration_flashocc.py", "flashocc_geometry.py", "flashocc_panoptic.py",
            "image_processing_flashocc.py"} <= shipped
    inputs = camera_inputs()
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        ref = model(**inputs)
    script = textwrap.dedent(f"""
        import sys, torch
        torch.set_num_threads(1)
        from transformers import AutoModel
        m = AutoModel.from_pretrained({str(tmp_path / 'm')!r}, trust_remote_code=True).eval()
        assert "hfq" not in sys.modules, "the shipped code must not need hfq"
        # safetensors hands out weights at unaligned offsets of its mapping, and CPU matmul kernels round differently
        # on unaligned data (last-bit differences); fresh copies make the comparison exact
        for t in list(m.parameters()) + list(m.buffers()):
            t.data = t.data.clone()
        x = torch.load({str(tmp_path / 'inputs.pt')!r})
        with torch.no_grad():
            o = m(**x)
        res = m.post_process(o)[0]
        torch.save({{"logits": o.logits, "heat": o.center_heatmap, "cls": type(m).__name__,
                     "inst": res["instances"], "proc": type(m.get_image_processor()).__name__}},
                   {str(tmp_path / 'out.pt')!r})
    """)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path, timeout=120)
    out = torch.load(tmp_path / "out.pt")
    assert out["cls"] == "FlashOccForOccupancy" and out["proc"] == "FlashOccImageProcessor"
    assert torch.equal(out["logits"], ref.logits) and torch.equal(out["heat"], ref.center_heatmap)
    assert torch.equal(out["inst"], model.post_process(ref)[0]["instances"])


# ------------------------------------------------------------------ training
def test_a_few_training_steps_reduce_the_loss():
    """Catches a graph that does not train end to end (gradients cut in the BEV pooling or the heads, a loss that
    does not depend on the predictions) on a tiny panoptic config."""
    torch.manual_seed(0)
    cfg = tiny_config(panoptic=True, use_mask=True)
    model = FlashOccForOccupancy(cfg).train()
    inputs = camera_inputs(B=2)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 18, (2, 100, 100, 8), generator=g)
    mask = torch.rand(2, 100, 100, 8, generator=g) > 0.5
    boxes = [{"boxes": torch.tensor([[10.0, 5.0, 1.0, 4.0, 2.0, 1.5]]), "class_labels": torch.tensor([0])},
             {"boxes": torch.tensor([[-8.0, 3.0, 0.5, 1.0, 1.0, 1.8]]), "class_labels": torch.tensor([8])}]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(8):
        out = model(**inputs, labels=labels, mask_camera=mask, center_labels=boxes)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append((out.loss.item(), out.loss_dict["loss_occ"].item()))
    assert set(out.loss_dict) == {"loss_occ", "loss_heatmap", "loss_center_xy", "loss_center_z"}
    grad = model.model.view_transformer.depth_net.weight.grad  # rows: D depth logits, then the context features
    assert grad[:cfg.num_depth_bins].abs().sum() > 0 and grad[cfg.num_depth_bins:].abs().sum() > 0  # via the pooling
    assert losses[-1][0] < 0.7 * losses[0][0] and losses[-1][1] < losses[0][1] - 0.1, losses
