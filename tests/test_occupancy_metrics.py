"""hfq.eval.occupancy: Occ3D mIoU, RayIoU and RayPQ on hand-built grids with hand-counted answers."""
import math
import time

import numpy as np
import pytest
import torch

from hfq.eval.occupancy import (
    FREE_LABEL,
    OCC3D_GRID,
    MIoU,
    OccupancyGrid,
    RayIoU,
    RayPQ,
    cast_rays,
    evaluate_occupancy,
    lidar_ray_directions,
    render_rays,
    select_ray_origins,
)



pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors, one intra-op thread


CAR, BARRIER, BUS, ROAD, MANMADE, PED, VEG = 4, 1, 3, 11, 15, 7, 16
# a 24 x R x 1 corridor of 0.4 m voxels; one +x ray per row, starting at the centre of voxel (0, row, 0)
X_RAY = [[1.0, 0.0, 0.0]]


def corridor(rows, layers=1):
    grid = OccupancyGrid(pc_range=(0.0, 0.0, 0.0, 9.6, 0.4 * rows, 0.4 * layers), voxel_size=0.4)
    origins = [[0.2, 0.4 * r + 0.2, 0.2] for r in range(rows)]
    return grid, origins, np.full(grid.shape, FREE_LABEL, np.int64)


def street_scene(grid, seed=0):
    """Ground, buildings, trees and a few cars / pedestrians with instance ids (stuff instance id 0)."""
    rng = np.random.default_rng(seed)
    X, Y, Z = grid.shape
    sem = np.full(grid.shape, FREE_LABEL, np.int64)
    inst = np.zeros(grid.shape, np.int64)
    zg = max(1, Z // 8)
    sem[:, :, :zg] = ROAD
    sem[: X // 3, :, :zg] = 13  # sidewalk
    sem[:, : Y // 10, : Z // 2] = MANMADE
    sem[-X // 10:, :, : Z // 2] = VEG
    for i in range(1, 13):
        cls = CAR if i % 3 else PED
        x, y = rng.integers(X // 5, 4 * X // 5), rng.integers(Y // 5, 4 * Y // 5)
        dx, dy = (max(2, X // 20), max(1, Y // 40)) if cls == CAR else (1, 1)
        sem[x:x + dx, y:y + dy, zg:zg + max(1, Z // 4)] = cls
        inst[x:x + dx, y:y + dy, zg:zg + max(1, Z // 4)] = i
    return sem, inst


@pytest.mark.parametrize("grid", [OCC3D_GRID, OCC3D_GRID.with_voxel_size(0.8)], ids=["200x200x16", "100x100x8"])
def test_perfect_prediction_scores_one(grid):
    """Catches normalisation / ray-alignment bugs that keep a perfect prediction below 1 (e.g. GT and prediction
    rays cast from different directions, a RayIoU denominator without "- TP", SQ mis-normalised, absent classes
    averaged as 0), on both the Occ3D grid and a scaled 100x100x8 grid of 0.8 m voxels."""
    sem, inst = street_scene(grid)
    mask = np.random.default_rng(1).random(grid.shape) < 0.7
    t0 = time.perf_counter()
    res = evaluate_occupancy([sem], [sem], [mask], [inst], [inst], grid=grid)
    elapsed = time.perf_counter() - t0
    for key in ("mIoU", "RayIoU", "RayIoU@1", "RayIoU@2", "RayIoU@4", "RayPQ", "RayPQ@1", "RayPQ@2", "RayPQ@4"):
        assert res[key] == pytest.approx(1.0), key
    # classes present score 1, classes absent everywhere are NaN and the free class is never reported
    assert res["per_class"]["IoU"]["car"] == 1.0 and math.isnan(res["per_class"]["IoU"]["bus"])
    assert "free" not in res["per_class"]["IoU"] and "free" not in res["per_class"]["RayIoU@1"]
    assert res["per_class"]["PQ@1"]["pedestrian"] == 1.0
    assert elapsed < 5.0, elapsed  # two casts of 14040 rays + metrics; ~0.3 s on one core


def test_miou_camera_mask_hand_counted():
    """Catches the camera mask being ignored (or applied to one side only), FP/FN swapped in the IoU
    denominator, and classes predicted but absent from GT being skipped instead of scoring 0."""
    gt = np.full((4, 4, 2), FREE_LABEL)
    pred = np.full((4, 4, 2), FREE_LABEL)
    mask = np.ones((4, 4, 2), bool)
    A, B, C, D, E, F, G, H = (0, 0, 0), (0, 1, 0), (0, 2, 0), (1, 0, 0), (1, 1, 0), (2, 0, 0), (2, 1, 0), (3, 0, 1)
    for v, g, p in [(A, CAR, CAR), (B, CAR, CAR), (C, CAR, FREE_LABEL), (D, ROAD, ROAD), (E, ROAD, CAR),
                    (F, FREE_LABEL, CAR), (G, FREE_LABEL, ROAD), (H, FREE_LABEL, BARRIER)]:
        gt[v], pred[v] = g, p
    mask[B] = mask[G] = False
    m = MIoU()
    m.update(pred, gt, mask)
    r = m.compute()
    # visible voxels: car  TP {A}, GT {A, C}, pred {A, E, F}      -> 1 / (2 + 3 - 1) = 1/4
    #                 road TP {D}, GT {D, E}, pred {D}  (G masked) -> 1 / (2 + 1 - 1) = 1/2
    #                 barrier TP 0, GT 0, pred {H}                -> 0 / 1 = 0 (counted, not NaN)
    assert r["per_class"]["car"] == pytest.approx(0.25)
    assert r["per_class"]["driveable_surface"] == pytest.approx(0.5)
    assert r["per_class"]["barrier"] == 0.0
    assert r["mIoU"] == pytest.approx((0.25 + 0.5 + 0.0) / 3)
    # without the mask: car 2/(3+4-2) = 2/5, road 1/(2+2-1) = 1/3, barrier 0
    m2 = MIoU()
    m2.update(torch.from_numpy(pred), torch.from_numpy(gt))
    assert m2.compute()["mIoU"] == pytest.approx((0.4 + 1 / 3 + 0.0) / 3)


def test_miou_accumulates_counts_over_dataset():
    """Catches averaging per-sample IoUs instead of summing the confusion matrix over the dataset."""
    gt1, pred1 = np.full((2, 2, 1), FREE_LABEL), np.full((2, 2, 1), FREE_LABEL)
    gt1[0, 0, 0] = pred1[0, 0, 0] = CAR                    # sample 1: car TP 1 -> IoU 1
    gt2, pred2 = gt1.copy(), np.full((2, 2, 1), CAR)        # sample 2: car TP 1, FP 3 -> IoU 1/4
    m = MIoU()
    m.update(pred1, gt1)
    m.update(pred2, gt2)
    # dataset: TP 2, GT 2, pred 5 -> 2 / (2 + 5 - 2) = 0.4 (the mean of per-sample IoUs would be 0.625)
    assert m.compute()["per_class"]["car"] == pytest.approx(0.4)


def test_miou_free_never_counts_and_absent_classes_are_nan():
    """Catches the free class (17) entering the mIoU mean and classes absent everywhere counting as 0."""
    gt = np.full((3, 3, 2), FREE_LABEL)
    pred = gt.copy()
    gt[0, 0, 0] = pred[0, 0, 0] = CAR   # car IoU 1
    pred[1, 1, 1] = BARRIER             # barrier IoU 0; free IoU = 16/17
    m = MIoU()
    m.update(pred, gt)
    r = m.compute()
    assert r["mIoU"] == pytest.approx(0.5)  # (1 + 0) / 2; with free: (1 + 0 + 16/17) / 3; absent as 0: 1/17
    assert "free" not in r["per_class"] and math.isnan(r["per_class"]["bus"]) and len(r["per_class"]) == 17
    empty = MIoU()
    empty.update(np.full((2, 2, 2), FREE_LABEL), np.full((2, 2, 2), FREE_LABEL))
    assert math.isnan(empty.compute()["mIoU"])


def test_single_ray_exit_depth_and_label():
    """Catches depth measured at the voxel entry (1.8 m) or centre (2.0 m) instead of the exit (2.2 m), a hit
    test that skips the origin's voxel, and a no-hit ray not reporting the last in-grid voxel's exit."""
    grid, origins, sem = corridor(3)
    sem[5, 1, 0] = CAR          # voxel 5 spans x in [2.0, 2.4] m; the ray starts at x = 0.2 m
    r = render_rays(sem, origins[1], X_RAY, grid)
    assert r["labels"].tolist() == [CAR] and r["depths"][0].item() == pytest.approx(2.2, abs=1e-9)
    vox, depth, hit, entered = cast_rays(torch.from_numpy(sem != FREE_LABEL), origins[1], X_RAY, grid)
    assert vox[0].tolist() == [5, 1, 0] and bool(hit[0]) and bool(entered[0])
    # nothing on row 0: the last in-grid voxel (23) is reported, free, leaving the grid at x = 9.6 m
    r0 = render_rays(sem, origins[0], X_RAY, grid)
    assert r0["labels"].tolist() == [FREE_LABEL] and r0["depths"][0].item() == pytest.approx(9.4, abs=1e-9)
    # backwards along -x from voxel 0: leaves at x = 0 -> 0.2 m; an occupied origin voxel is itself the hit
    rb = render_rays(sem, origins[1], [[-1.0, 0.0, 0.0]], grid)
    assert rb["labels"].tolist() == [FREE_LABEL] and rb["depths"][0].item() == pytest.approx(0.2, abs=1e-9)
    sem[0, 1, 0] = BUS
    r2 = render_rays(sem, origins[1], X_RAY, grid)
    assert r2["labels"].tolist() == [BUS] and r2["depths"][0].item() == pytest.approx(0.2, abs=1e-9)


def _reference_cast(occ, grid, origin, direction):
    """Exact reference without stepping: sort every plane crossing, the voxel of each interval is the one
    holding its midpoint; returns (voxel, exit distance, entered)."""
    lower, vs, shape = np.array(grid.lower), np.array(grid.voxel_size), np.array(grid.shape)
    o, u = np.asarray(origin, float), np.asarray(direction, float) / np.linalg.norm(direction)
    ts = [0.0]
    for a in range(3):
        if u[a] != 0:
            t = (lower[a] + np.arange(shape[a] + 1) * vs[a] - o[a]) / u[a]
            ts.extend(t[t > 0])
    ts = np.unique(ts)
    mids = (ts[:-1] + ts[1:]) / 2
    idx = np.floor((o + mids[:, None] * u - lower) / vs).astype(int)
    inside = ((idx >= 0) & (idx < shape)).all(1)
    idx, exits = idx[inside], ts[1:][inside]
    if len(idx) == 0:
        return None, 0.0, False
    occupied = occ[idx[:, 0], idx[:, 1], idx[:, 2]]
    k = int(np.argmax(occupied)) if occupied.any() else len(idx) - 1
    return tuple(idx[k]), exits[k], True


def test_cast_rays_matches_exact_reference_on_oblique_rays():
    """Catches traversal bugs on oblique rays (wrong tMax / tDelta update, wrong step sign, voxel-unit vs
    metre mix-ups on anisotropic voxels, rays that start outside the grid entering at the wrong voxel or
    never-entering rays not being flagged) against an exact sort-based reference."""
    grid = OccupancyGrid(pc_range=(-3.0, -2.0, -1.0, 3.0, 2.0, 0.5), voxel_size=(0.5, 0.4, 0.25))
    rng = np.random.default_rng(0)
    occ = rng.random(grid.shape) < 0.08
    inside_origins = rng.uniform([-2.9, -1.9, -0.9], [2.9, 1.9, 0.4], (4, 3))
    outside_origins = np.array([[-4.0, 0.3, -0.2], [1.0, 3.5, 0.1]])
    dirs = rng.normal(size=(60, 3))
    for origins in (inside_origins, outside_origins):
        vox, depth, hit, entered = cast_rays(occ, origins, dirs, grid)
        n_entered = 0
        for i, (o, u) in enumerate((o, u) for o in origins for u in dirs):  # origin-major order
            ref_vox, ref_exit, ref_entered = _reference_cast(occ, grid, o, u)
            assert bool(entered[i]) == ref_entered, i
            if ref_entered:
                n_entered += 1
                assert tuple(vox[i].tolist()) == ref_vox, i
                assert depth[i].item() == pytest.approx(ref_exit, rel=1e-9, abs=1e-9), i
                assert bool(hit[i]) == bool(occ[ref_vox]), i
        assert n_entered > 0
    assert not entered.all()  # some rays from outside miss the grid and must be flagged, not crash or loop


def test_ties_follow_the_official_walk():
    """Catches a tie-break different from the official DVR kernel, which on equal boundary distances steps z
    before y before x (so a 45-degree ray through a voxel corner visits (0,1) before (1,0))."""
    grid = OccupancyGrid(pc_range=(0.0, 0.0, 0.0, 2.0, 2.0, 2.0), voxel_size=1.0)
    sem = np.full(grid.shape, FREE_LABEL)
    sem[0, 1, 0], sem[1, 0, 0], sem[0, 0, 1] = BARRIER, BUS, CAR
    r = render_rays(sem, [0.5, 0.5, 0.5], [[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]], grid)
    assert r["labels"].tolist() == [BARRIER, CAR]  # x/y tie -> y first; y/z tie -> z first
    # both corner voxels are left at the corner itself: distance sqrt(0.5^2 + 0.5^2)
    assert r["depths"].tolist() == pytest.approx([math.sqrt(0.5), math.sqrt(0.5)])


def test_rayiou_thresholds_hand_computed():
    """Catches a depth threshold applied wrongly (0.4 m error must pass at 1 m, 3.2 m only at 4 m), rays with a
    free GT label not being dropped, class mismatches counted as TP, and absent classes averaged as 0."""
    grid, origins, gt = corridor(4)
    pred = gt.copy()
    gt[5, 0, 0], pred[6, 0, 0] = CAR, CAR            # row 0: car, prediction 1 voxel (0.4 m) farther
    gt[5, 1, 0], pred[13, 1, 0] = CAR, CAR           # row 1: car, prediction 8 voxels (3.2 m) farther
    gt[10, 2, 0], pred[10, 2, 0] = ROAD, MANMADE     # row 2: right depth, wrong class
    pred[3, 3, 0] = CAR                              # row 3: GT ray sees nothing (free) -> dropped
    m = RayIoU(grid=grid, origins=origins, directions=X_RAY)
    m.update(pred, gt)
    r = m.compute()
    # car: GT 2 rays, pred 2 rays; TP@1 = TP@2 = 1 (row 0), TP@4 = 2 -> IoU 1/3, 1/3, 1
    # road: GT 1, pred 0 -> 0; manmade: GT 0, pred 1 -> 0; every other class NaN
    car = {t: r["per_class"][f"RayIoU@{t}"]["car"] for t in (1, 2, 4)}
    assert car == pytest.approx({1: 1 / 3, 2: 1 / 3, 4: 1.0})
    assert r["per_class"]["RayIoU@1"]["driveable_surface"] == 0.0 and r["per_class"]["RayIoU@1"]["manmade"] == 0.0
    assert math.isnan(r["per_class"]["RayIoU@4"]["bus"])
    assert r["RayIoU@1"] == pytest.approx(1 / 9) and r["RayIoU@2"] == pytest.approx(1 / 9)
    assert r["RayIoU@4"] == pytest.approx(1 / 3)
    assert r["RayIoU"] == pytest.approx((1 / 9 + 1 / 9 + 1 / 3) / 3)  # 5/27


def test_rayiou_threshold_is_strict():
    """Catches |d_pred - d_gt| <= tau instead of the official strict < tau."""
    m = RayIoU(grid=OCC3D_GRID, directions=X_RAY)
    m.update_rays([CAR] * 4, [10.0, 11.0, 12.0, 14.0], [CAR] * 4, [10.0] * 4)  # errors 0, 1, 2, 4 m exactly
    r = m.compute()
    # TP@1 = 1, TP@2 = 2, TP@4 = 3 of GT 4 / pred 4 -> 1/7, 2/6, 3/5
    assert (r["RayIoU@1"], r["RayIoU@2"], r["RayIoU@4"]) == pytest.approx((1 / 7, 1 / 3, 3 / 5))


def test_raypq_merged_instances_ray_level():
    """Catches PQ errors on a merge: the larger GT car must match (IoU 0.6) and the smaller be an FN, depth
    errors must shrink the intersection (no match at 1 m), segments under min_segment_size must be neither FP
    nor FN, and a stuff class must be one segment whatever its GT instance ids."""
    # 50 rays: GT car 1 (30 rays), GT car 2 (20 rays); the prediction merges them into car 7
    gl, gi = [CAR] * 50, [1] * 30 + [2] * 20
    pl, pi = [CAR] * 50, [7] * 50
    gd = [10.0] * 50
    pd = [11.5] * 10 + [10.0] * 40           # 10 rays of car 1 are 1.5 m off
    # 5 rays: a small GT car 3 predicted as car 9 but 10 m off -> no overlap; both under 10 rays -> ignored
    gl, gi, pl, pi = gl + [CAR] * 5, gi + [3] * 5, pl + [CAR] * 5, pi + [9] * 5
    gd, pd = gd + [5.0] * 5, pd + [15.0] * 5
    # 20 road rays whose GT instance ids alternate (stuff: must still be a single segment)
    gl, gi, pl, pi = gl + [ROAD] * 20, gi + [0, 5] * 10, pl + [ROAD] * 20, pi + [3] * 20
    gd, pd = gd + [8.0] * 20, pd + [8.0] * 20
    # one GT-free ray predicted as car: dropped
    gl, gi, pl, pi, gd, pd = gl + [FREE_LABEL], gi + [0], pl + [CAR], pi + [7], gd + [3.0], pd + [3.0]

    m = RayPQ(directions=X_RAY)
    m.update_rays(pl, pi, pd, gl, gi, gd)
    r = m.compute()
    # tau = 1: car 1 ∩ car 7 = 20 rays, union 30 + 50 - 20 = 60 -> 1/3; car 2: 20 / 50 -> no match
    #          TP 0, FN 2 (30, 20 rays), FP 1 (50 rays) -> PQ 0
    # tau = 2, 4: car 1 ∩ car 7 = 30, union 50 -> IoU 0.6 match; car 2 FN -> SQ 0.6, RQ 1/1.5, PQ 0.4
    # road: one 20-ray segment each side, IoU 1 -> PQ 1 at every tau
    pq = r["per_class"]
    assert [pq[f"PQ@{t}"]["car"] for t in (1, 2, 4)] == pytest.approx([0.0, 0.4, 0.4])
    assert pq["SQ@2"]["car"] == pytest.approx(0.6) and pq["RQ@2"]["car"] == pytest.approx(2 / 3)
    assert [pq[f"PQ@{t}"]["driveable_surface"] for t in (1, 2, 4)] == [1.0, 1.0, 1.0]
    assert math.isnan(pq["PQ@1"]["bus"])
    assert r["RayPQ@1"] == pytest.approx(0.5) and r["RayPQ@4"] == pytest.approx(0.7)
    assert r["RayPQ"] == pytest.approx((0.5 + 0.7 + 0.7) / 3)
    # counting every segment: at tau = 2 car 3 becomes an FN and car 9 an FP -> RQ 1 / (1 + 0.5 + 1)
    m1 = RayPQ(directions=X_RAY, min_segment_size=1)
    m1.update_rays(pl, pi, pd, gl, gi, gd)
    assert m1.compute()["per_class"]["PQ@2"]["car"] == pytest.approx(0.6 * 0.4)


def test_raypq_merged_instances_through_ray_casting():
    """Catches instance ids not being read at each ray's hit voxel (GT and prediction) on a voxel-level merge:
    every other voxel carries its own distinct instance id, so any offset lookup changes the segments."""
    grid, origins, gt = corridor(5, layers=2)
    pred = gt.copy()
    gt_inst = 1000 + np.arange(gt.size).reshape(gt.shape)   # distinct ids everywhere but the hit voxels
    pred_inst = 5000 + np.arange(gt.size).reshape(gt.shape)
    gt[5, :, 0] = pred[5, :, 0] = CAR
    gt_inst[5, :3, 0], gt_inst[5, 3:, 0] = 1, 2    # two GT cars: rows 0-2 and rows 3-4
    pred_inst[5, :, 0] = 1                         # the prediction merges them
    m = RayPQ(grid=grid, origins=origins, directions=X_RAY, min_segment_size=1)
    m.update(pred, gt, pred_inst, gt_inst)
    # car 1: IoU 3/5 = 0.6 -> TP; car 2: 2/5 -> FN; PQ = 0.6 * 1 / (1 + 0.5) = 0.4 at every tau
    assert m.compute()["RayPQ"] == pytest.approx(0.4)
    # default min size 10: the 2-ray FN is ignored -> PQ = SQ = 0.6
    m10 = RayPQ(grid=grid, origins=origins, directions=X_RAY)
    m10.update(pred, gt, pred_inst, gt_inst)
    assert m10.compute()["RayPQ"] == pytest.approx(0.6)


def test_ray_directions_and_origins_protocol():
    """Catches a wrong RayIoU ray set (pitch list not extended up to 0.21 rad, wrong order or count) and a
    wrong multi-frame origin selection (range filter, 8 evenly spaced frames)."""
    d = lidar_ray_directions()
    pitches = torch.asin(d[::360, 2])
    assert d.shape == (39 * 360, 3) and torch.allclose(d.norm(dim=1), torch.ones(len(d), dtype=d.dtype))
    assert pitches[0].item() == pytest.approx(-math.pi / 4) and pitches[9].item() == pytest.approx(
        -(math.pi / 2 - math.atan(10)))
    assert pitches[-1].item() >= 0.21 > pitches[-2].item()
    assert d[1].tolist() == pytest.approx([math.cos(math.pi / 4) * math.cos(math.radians(1)),
                                          math.cos(math.pi / 4) * math.sin(math.radians(1)), -math.sin(math.pi / 4)])
    o = torch.tensor([[float(x), 0.0, 1.8] for x in range(-45, 46, 5)])  # 19 frames, 15 within |x| < 39
    sel = select_ray_origins(o)
    assert sel[:, 0].tolist() == [-35.0, -25.0, -15.0, -5.0, 5.0, 15.0, 25.0, 35.0]
    assert OCC3D_GRID.shape == (200, 200, 16) and OCC3D_GRID.with_voxel_size(0.8).shape == (100, 100, 8)
    with pytest.raises(ValueError):
        OccupancyGrid(voxel_size=0.3)


def test_default_ray_cast_is_fast():
    """Catches a per-ray Python loop (or other non-vectorised traversal): the 14040 default rays must cross a
    200x200x16 grid in well under a second on one core (~0.1 s measured)."""
    sem, _ = street_scene(OCC3D_GRID, seed=3)
    render_rays(sem, [0.9858, 0.0, 1.8402])  # warm-up
    t0 = time.perf_counter()
    r = render_rays(sem, [0.9858, 0.0, 1.8402])
    elapsed = time.perf_counter() - t0
    assert len(r["labels"]) == 14040 and (r["labels"] != FREE_LABEL).sum() > 1000
    assert elapsed < 1.0, elapsed
