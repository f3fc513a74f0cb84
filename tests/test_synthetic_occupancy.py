"""hfq.data.synthetic_occupancy: Occ3D-style labels of the synthetic nuScenes scenes, checked against geometry
computed here independently (ego pose -> yaw by hand, boxes in their own frame, voxel index = floor)."""
import math
import os

import numpy as np
import pytest
import torch

from hfq.data import synthetic_occupancy as so
from hfq.data.synthetic_nuscenes import CAMERAS, CLASSES, NuScenesTables, generate_synthetic_nuscenes
from hfq.data.synthetic_occupancy import (
    DETECTION_TO_OCC3D, load_occupancy, occupancy_labels, semantic_labels, write_occupancy,
)
from hfq.eval.occupancy import OCC3D_CLASS_NAMES, THING_CLASSES, OccupancyGrid

GRIDS = [OccupancyGrid(), OccupancyGrid(voxel_size=0.8)]
GRID_IDS = ["200x200x16", "100x100x8"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors, one intra-op thread


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic_occ"))
    generate_synthetic_nuscenes(root, num_scenes={"synthetic_train": 1, "synthetic_val": 1}, samples_per_scene=2,
                                image_size=(90, 160), classes=list(CLASSES), objects_per_scene=(10, 10),
                                class_cycle=True, seed=3)
    return root


@pytest.fixture(scope="module")
def db(root):
    return NuScenesTables(root)


@pytest.fixture(scope="module")
def token(db):
    return db.split_samples("synthetic_train")[0]


@pytest.fixture(scope="module")
def labels(db, token):
    """Full labels of the first train sample on the Occ3D grid (every 2nd pixel: dense rays at 160 x 90)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return occupancy_labels(db, token, OccupancyGrid(), pixel_stride=2)
    finally:
        torch.set_num_threads(old)


# ------------------------------------------------------------------ independent geometry
def yaw_of(q):
    w, x, y, z = q
    assert abs(x) < 1e-9 and abs(y) < 1e-9, "the generator's poses are pure yaw"
    return 2 * math.atan2(z, w)


def rot_z(yaw):
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def ego_pose(db, token):
    ep = db.tables["ego_pose"][db.sd_by_sample[token]["LIDAR_TOP"]["ego_pose_token"]]
    return np.array(ep["translation"]), yaw_of(ep["rotation"])


def to_ego(db, token, p_global):
    t, yaw = ego_pose(db, token)
    return rot_z(-yaw) @ (np.asarray(p_global) - t)


def voxel(grid, p):
    return tuple(int(math.floor((p[a] - grid.pc_range[a]) / grid.voxel_size[a])) for a in range(3))


def centre(grid, idx):
    return np.array([grid.pc_range[a] + (idx[a] + 0.5) * grid.voxel_size[a] for a in range(3)])


def ground_layer(grid):
    """Layer whose z-interval holds ego z = 0 (the generator's ego pose z is 0, its ground global z = 0)."""
    return int(math.floor((0.0 - grid.pc_range[2]) / grid.voxel_size[2]))


def in_grid(grid, idx):
    return all(0 <= idx[a] < grid.shape[a] for a in range(3))


def boxes(db, token):
    """[(occ id, instance id expected, ego centre, ego yaw, (w, l, h), annotation)] in sorted annotation order."""
    _, ego_yaw = ego_pose(db, token)
    anns = sorted(db.anns_by_sample[token], key=lambda a: (a["instance_token"], a["token"]))
    out = []
    for n, ann in enumerate(anns):
        name = next(k for k, v in CLASSES.items() if v[0] == db.category_of_instance[ann["instance_token"]])
        cls = DETECTION_TO_OCC3D[name]
        out.append((cls, n + 1 if cls in THING_CLASSES else 0, to_ego(db, token, ann["translation"]),
                    yaw_of(ann["rotation"]) - ego_yaw, ann["size"], ann))
    return out


def inside_box(p, center, yaw, wlh, margin=0.0):
    """Whether any of the points p (3,) or (N, 3) lies inside the box grown by `margin` (box x along its length)."""
    local = (np.atleast_2d(p) - center) @ rot_z(-yaw).T
    w, l, h = wlh
    return bool(np.any(np.all(np.abs(local) <= np.array([l, w, h]) / 2 + margin, axis=-1)))


def segment(a, b, n=400):
    return a + np.linspace(0, 1, n)[:, None] * (np.asarray(b) - a)


def camera_centres(db, token):
    """Ego-frame camera centres (the generator uses one ego pose per sample for all sensors)."""
    out = []
    for ch, *_ in CAMERAS:
        cs = db.tables["calibrated_sensor"][db.sd_by_sample[token][ch]["calibrated_sensor_token"]]
        out.append(np.array(cs["translation"]))
    return out


def camera_views(db, token):
    """[(centre (3,), rotation cam -> ego (3, 3), K, H, W)] of the sample's cameras, built by hand from the rig's
    yaws (`CAMERAS`: camera z forward along the yaw, x to the right, y down) and the written image size."""
    out = []
    for ch, yaw_deg, *_ in CAMERAS:
        sd = db.sd_by_sample[token][ch]
        cs = db.tables["calibrated_sensor"][sd["calibrated_sensor_token"]]
        a = math.radians(yaw_deg)
        rot = np.array([[math.sin(a), 0.0, math.cos(a)], [-math.cos(a), 0.0, math.sin(a)], [0.0, -1.0, 0.0]])
        out.append((np.array(cs["translation"]), rot, np.array(cs["camera_intrinsic"]), sd["height"], sd["width"]))
    return out


def in_some_image(db, token, points):
    """(N,) bool: whether each ego-frame point is in front of some camera and projects inside its image."""
    points = np.atleast_2d(points)
    out = np.zeros(len(points), bool)
    for c, rot, K, H, W in camera_views(db, token):
        q = (points - c) @ rot  # camera frame
        z = np.where(q[:, 2] > 1e-9, q[:, 2], 1.0)
        u, v = (q @ K.T)[:, 0] / z, (q @ K.T)[:, 1] / z
        out |= (q[:, 2] > 1e-9) & (u >= 0) & (u < W) & (v >= 0) & (v < H)
    return out


def segments_hit_box(a, b, center, yaw, wlh, margin=0.0):
    """(N,) bool: whether each segment a[n] -> b[n] (ego frame) meets the box grown by `margin` (slab test in the
    box frame, box x along its length)."""
    R = rot_z(-yaw)
    a, b = (np.atleast_2d(a) - center) @ R.T, (np.atleast_2d(b) - center) @ R.T
    w, l, h = wlh
    half = np.array([l, w, h]) / 2 + margin
    d = b - a
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (-half - a) / d, (half - a) / d
    t1 = np.where(d == 0, np.where(np.abs(a) <= half, -np.inf, np.inf), t1)
    t2 = np.where(d == 0, np.where(np.abs(a) <= half, np.inf, -np.inf), t2)
    lo, hi = np.minimum(t1, t2).max(1), np.maximum(t1, t2).min(1)
    return (lo <= hi) & (hi >= 0) & (lo <= 1)


def looking_along(yaw_deg, origin):
    """cam2ego (4, 4) of a level camera at `origin` looking along `yaw_deg` (z forward, x right, y down)."""
    a = math.radians(yaw_deg)
    m = np.eye(4)
    m[:3, :3] = [[math.sin(a), 0.0, math.cos(a)], [-math.cos(a), 0.0, math.sin(a)], [0.0, -1.0, 0.0]]
    m[:3, 3] = origin
    return m


# ------------------------------------------------------------------ tests
def test_grid_shapes_and_centres():
    """Catches a grid whose shape or voxel centres are off (e.g. centre = min + index * size, a truncated
    int((max - min) / size) giving 199 or 15 voxels, a scaled grid that keeps 0.4 m), and ranges that are not a
    whole number of voxels being accepted."""
    g, g8 = OccupancyGrid(), OccupancyGrid(voxel_size=0.8)
    assert g.shape == (200, 200, 16) and g8.shape == (100, 100, 8)
    assert g.with_voxel_size(0.8).shape == (100, 100, 8)
    c = g.centers()
    assert c.shape == (200, 200, 16, 3)
    np.testing.assert_allclose(c[0, 0, 0], [-39.8, -39.8, -0.8], atol=1e-9)
    np.testing.assert_allclose(c[199, 100, 15], [39.8, 0.2, 5.2], atol=1e-9)
    np.testing.assert_allclose(g8.centers()[0, 0, 0], [-39.6, -39.6, -0.6], atol=1e-9)
    assert g.index_of([[0.0, -0.01, 0.0]]).tolist() == [[100, 99, 2]]
    with pytest.raises(ValueError):
        OccupancyGrid(voxel_size=0.7)
    names = OCC3D_CLASS_NAMES
    assert len(names) == 18 and names[11] == "driveable_surface" and names[17] == "free"
    assert set(THING_CLASSES) == {2, 3, 4, 5, 6, 7, 9, 10}
    assert {OCC3D_CLASS_NAMES[v]: k for k, v in DETECTION_TO_OCC3D.items()} == {k: k for k in DETECTION_TO_OCC3D}


@pytest.mark.parametrize("grid", GRIDS, ids=GRID_IDS)
def test_box_centre_voxel_has_class_and_just_outside_does_not(db, token, grid):
    """Catches box rasterisation in the wrong place or shape: the voxel holding a box's centre must carry the box's
    Occ3D class, a voxel just inside each end of a long box too, and the voxel 0.75 voxel past the end of its
    length axis must not (fails for w / l swapped, the box yaw ignored or negated, boxes left in global coordinates or a
    wrong class mapping), on the Occ3D grid and on the 0.8 m grid."""
    sem, _ = semantic_labels(db, token, grid)
    all_boxes = boxes(db, token)
    checked = 0
    for cls, _, c, yaw, (w, l, h), _ann in all_boxes:
        idx = voxel(grid, c)
        if not in_grid(grid, idx):
            continue
        assert sem[idx] == cls, (OCC3D_CLASS_NAMES[cls], OCC3D_CLASS_NAMES[sem[idx]])
        axis = rot_z(yaw)[:, 0]  # the box's length direction in the ego frame
        for sign in (1, -1):
            # a voxel whose box holds this point has its centre within size / sqrt(2) < 0.75 size of it in x, y
            out = c + sign * (l / 2 + 0.75 * grid.voxel_size[0]) * axis
            others = [b for b in all_boxes if b[2] is not c]
            if not any(inside_box(out, c2, y2, s2, margin=1.0) for _, _, c2, y2, s2, _ in others) \
                    and in_grid(grid, voxel(grid, out)):
                vo = voxel(grid, out)  # open ground: driveable surface on the ground layer, else free
                assert sem[vo] == (so.DRIVEABLE_SURFACE if vo[2] == ground_layer(grid) else so.FREE_LABEL), \
                    (OCC3D_CLASS_NAMES[cls], sign)
                checked += 1
            if min(w, l) > 1.0 and grid.voxel_size[0] == 0.4:
                assert sem[voxel(grid, c + sign * (l / 2 - 0.3) * axis)] == cls
    assert checked >= 10


def test_labels_are_in_the_ego_frame(db, token):
    """Catches a wrong world -> ego transform (ego pose inverted the wrong way, yaw sign flipped, translation not
    removed, the pose of another sample): each thing box's voxels must be centred on its ego-frame centre computed
    here by hand, and boxes ahead of the ego (along its heading in global) must be at x > 0, boxes behind at x < 0."""
    sem, inst = semantic_labels(db, token, OccupancyGrid())
    centres = OccupancyGrid().centers()
    t, ego_yaw = ego_pose(db, token)
    heading = np.array([math.cos(ego_yaw), math.sin(ego_yaw), 0.0])
    assert abs(ego_yaw) > 0.05  # a pose that actually rotates, or the test could not tell
    ahead = behind = 0
    for cls, iid, c, _, _, ann in boxes(db, token):
        if iid == 0:
            continue
        vox = centres[inst == iid]
        assert len(vox) > 0
        np.testing.assert_allclose(vox[:, :2].mean(0), c[:2], atol=0.3)
        forward = float(np.dot(np.array(ann["translation"]) - t, heading))
        if forward > 2.0:
            assert vox[:, 0].mean() > 0
            ahead += 1
        elif forward < -2.0:
            assert vox[:, 0].mean() < 0
            behind += 1
    assert ahead and behind


@pytest.mark.parametrize("grid", GRIDS, ids=GRID_IDS)
def test_ground_layer_is_driveable_surface_and_space_above_is_free(db, token, grid):
    """Catches the ground on the wrong voxel layer (e.g. ego pose z ignored in the wrong direction, ceil instead
    of floor, layer 0 instead of the one containing ego z = 0: layer 2 at 0.4 m, layer 1 at 0.8 m), missing ground,
    or space above open ground / under the ground that is not free."""
    sem, _ = semantic_labels(db, token, grid)
    kg = ground_layer(grid)
    assert kg == (2 if grid.voxel_size[2] == 0.4 else 1)
    centres = grid.centers()[:, :, 0, :2]
    near = np.zeros(grid.shape[:2], bool)
    for _, _, c, _, (w, l, h), _ in boxes(db, token):
        near |= np.linalg.norm(centres - c[:2], axis=-1) < 0.5 * math.hypot(w, l) + grid.voxel_size[0]
    assert (~near).mean() > 0.9
    column = np.full(grid.shape[2], so.FREE_LABEL)
    column[kg] = so.DRIVEABLE_SURFACE
    assert np.all(sem[~near] == column)
    assert np.all(sem[:, :, :kg] == so.FREE_LABEL)  # boxes stand on the ground: nothing below it


def test_instance_ids_distinct_per_thing_and_zero_for_stuff(db):
    """Catches wrong instance ids: one id per class instead of per box, ids given to stuff (barrier, traffic cone),
    ids that follow table order instead of the sorted annotation order (not 1 + index), ids that change between
    the two samples of a scene, or instance voxels whose class is not the box's."""
    tokens = db.split_samples("synthetic_train")
    per_sample = []
    for tok in tokens:
        sem, inst = semantic_labels(db, tok, OccupancyGrid())
        seen = {}
        for cls, iid, c, _, _, ann in boxes(db, tok):
            got = int(inst[voxel(OccupancyGrid(), c)])
            assert got == iid, (OCC3D_CLASS_NAMES[cls], got, iid)
            if iid:
                assert np.all(sem[inst == iid] == cls)
                seen[ann["instance_token"]] = iid
        ids = sorted(seen.values())
        assert len(ids) == len(set(ids)) >= 6  # 8 thing classes in the 10 objects
        assert set(np.unique(inst)) == {0, *ids}
        assert np.all(inst[~np.isin(sem, sorted(THING_CLASSES))] == 0)
        per_sample.append(seen)
    assert per_sample[0] == per_sample[1]


def _shadow_voxels(db, token, box, grid, behind=0.6):
    """Free voxels just behind `box` (seen from the ego) that every camera's line of sight crosses the box for:
    the voxels around the point `behind` metres past the box on the line from the ego origin to its centre."""
    _, _, c, yaw, (w, l, h), _ = box
    ray = c / np.linalg.norm(c)
    depth = 0.5 * math.hypot(w, l) + behind
    out = []
    for dz in (-0.2, 0.2):
        for lateral in (-0.2, 0.0, 0.2):
            p = c + depth * ray + lateral * np.array([-ray[1], ray[0], 0.0]) + np.array([0.0, 0.0, dz])
            idx = voxel(grid, p)
            q = centre(grid, idx)
            if inside_box(q, c, yaw, (w, l, h), margin=0.3):
                continue
            blocked = all(inside_box(segment(cam, q), c, yaw, (w, l, h), margin=-0.05)
                          for cam in camera_centres(db, token))
            if blocked:
                out.append(idx)
    return out


def test_camera_mask_sees_front_faces_not_behind_boxes(db, token, labels):
    """Catches camera-mask occlusion bugs: a box's voxel nearest to the cameras must be visible (fails when the
    first hit voxel is excluded or the rays start in the wrong place) and free voxels right behind a box, which
    every camera's line of sight reaches only through the box, must not be (fails when rays march on through
    occupied voxels, or when pixel rays are built with K instead of K^-1)."""
    grid = OccupancyGrid()
    sem, inst, mask = labels["semantics"], labels["instances"], labels["mask_camera"]
    centres = grid.centers()
    front_checked = shadows = 0
    for box in boxes(db, token):
        cls, iid, c, yaw, (w, l, h), ann = box
        if iid == 0 or min(w, l) < 1.5 or ann["visibility_token"] != "4":
            continue
        # nearest voxel of the box above the ground layer (ground-layer ones can hide behind the ground in front)
        own = (inst == iid) & (np.arange(grid.shape[2]) >= 3)[None, None, :]
        cams = camera_centres(db, token)
        idxs = np.argwhere(own)
        dist = np.min([np.linalg.norm(centres[own] - cam, axis=-1) for cam in cams], axis=0)
        assert mask[tuple(idxs[np.argmin(dist)])], OCC3D_CLASS_NAMES[cls]
        front_checked += 1
        for idx in _shadow_voxels(db, token, box, grid):
            assert sem[idx] == so.FREE_LABEL
            assert not mask[idx], (OCC3D_CLASS_NAMES[cls], idx)
            shadows += 1
    assert front_checked >= 3 and shadows >= 10


def test_camera_mask_excludes_unseen_space(db, token, labels):
    """Catches a camera mask that marks space no camera sees: everything below the ground layer (hidden by the
    ground), the voxels straight above the ego and the ground right around it (outside every camera's +-20 deg
    vertical field of view), and any voxel farther than one voxel from every voxel whose centre projects inside
    some camera's image (cameras rebuilt here from the rig's yaws), e.g. rays through all directions, rays not
    stopped by the ground, a wrong camera rotation or pixel rays built with K instead of K^-1; while a good part
    of the ground ahead is visible."""
    grid = OccupancyGrid()
    mask, sem = labels["mask_camera"], labels["semantics"]
    assert not mask[:, :, :2].any()
    assert not mask[95:105, 95:105, 12:].any()  # x, y in [-2, 2] m, z above 3.8 m
    assert not mask[95:105, 95:105, 2].any()  # ground within 2 m of the ego origin
    ahead = mask[110:150, 90:110, 2] & (sem[110:150, 90:110, 2] == so.DRIVEABLE_SURFACE)  # 4-20 m ahead
    assert ahead.mean() > 0.5
    in_view = in_some_image(db, token, grid.centers().reshape(-1, 3)).reshape(grid.shape)
    # a surface voxel seen as the first hit of a ray may have its centre just outside: allow one voxel around
    padded = np.pad(in_view, 1)
    near_view = np.zeros_like(in_view)
    for di, dj, dk in np.ndindex(3, 3, 3):
        near_view |= padded[di:di + grid.shape[0], dj:dj + grid.shape[1], dk:dk + grid.shape[2]]
    assert not (mask & ~near_view).any()
    assert 0.3 < mask.mean() < in_view.mean()


def test_camera_mask_is_dense_on_open_ground(db, token, labels):
    """Catches a sparse camera mask (one ray per pixel block marking only the voxels it crosses: at range the
    ground between rays is missed) and a depth-buffer test without the surface rule (a ground voxel's centre lies
    below the ground's top face, so its line of sight enters the ground in front of it and a centre-only depth
    test hides nearly all ground): of the ground voxels 6-20 m from the ego whose centre lies inside some camera
    image and whose top face no camera's line of sight reaches through a box (boxes grown by 0.5 m), at least
    95% must be visible; also half of all ground voxels within 40 m."""
    grid = OccupancyGrid()
    mask, sem = labels["mask_camera"], labels["semantics"]
    kg = ground_layer(grid)
    centres = grid.centers()[:, :, kg]
    r = np.linalg.norm(centres[..., :2], axis=-1)
    ground = sem[:, :, kg] == so.DRIVEABLE_SURFACE
    cand = ground & (r >= 6.0) & (r <= 20.0)
    cand[cand] = in_some_image(db, token, centres[cand])
    top = centres[cand] + np.array([0.0, 0.0, grid.voxel_size[2] / 2])
    blocked = np.zeros(len(top), bool)
    for cam in camera_centres(db, token):
        for _, _, c, yaw, wlh, _ in boxes(db, token):
            blocked |= segments_hit_box(np.broadcast_to(cam, top.shape), top, c, yaw, wlh, margin=0.5)
    open_ground = np.zeros_like(cand)
    open_ground[cand] = ~blocked
    assert open_ground.sum() > 3000
    assert mask[:, :, kg][open_ground].mean() >= 0.95
    assert mask[:, :, kg][ground & (r <= 40.0)].mean() > 0.5


def test_camera_visibility_stops_exactly_at_the_surface():
    """Catches a depth comparison off by one voxel (a voxel centre compared with the buffered depth plus a voxel,
    or with the far side of the voxel behind the hit, marks the layer behind a surface visible; minus a voxel
    hides the surface layer itself): a camera looks at a wall one voxel thick from 4.5 m, head-on and at 25 deg;
    for every voxel of the layer in front of the wall, of the wall and of the layer behind it whose centre
    projects well inside the image, the first two must be visible (also by the depth buffer alone, without the
    surface rule) and the layer behind, and all space behind it, must not be."""
    grid = OccupancyGrid((0.0, -4.0, -4.0, 8.0, 4.0, 4.0), 0.4)  # 20 x 20 x 20
    occupied = np.zeros(grid.shape, bool)
    wall = 12  # x in [4.8, 5.2]
    occupied[wall] = True
    K = np.array([[64.0, 0.0, 32.0], [0.0, 64.0, 32.0], [0.0, 0.0, 1.0]])
    centres = grid.centers()
    for yaw in (0.0, 25.0):
        cam2ego = looking_along(yaw, (0.3, 0.1, 0.1))
        q = (centres - cam2ego[:3, 3]) @ cam2ego[:3, :3]
        u, v = 64.0 * q[..., 0] / q[..., 2] + 32.0, 64.0 * q[..., 1] / q[..., 2] + 32.0
        inner = (q[..., 2] > 0) & (u > 6) & (u < 58) & (v > 6) & (v < 58)
        for surface_rays in (True, False):
            mask = so.camera_visibility(occupied, [(K, cam2ego, 64, 64)], grid, pixel_stride=2,
                                        surface_rays=surface_rays).numpy()
            for layer in (wall - 1, wall, wall + 1):
                assert inner[layer].sum() >= 60, (yaw, layer)
            assert mask[wall - 1][inner[wall - 1]].all(), (yaw, surface_rays)
            assert mask[wall][inner[wall]].all(), (yaw, surface_rays)
            assert not mask[wall + 1][inner[wall + 1]].any(), (yaw, surface_rays)
            assert not mask[wall + 1:].any(), (yaw, surface_rays)


def test_lidar_mask_sees_360_but_not_through_ground_or_boxes(db, token, labels):
    """Catches LiDAR-mask bugs: rays over only part of the azimuth circle (ground behind and beside the ego must
    be seen), rays not starting at the LiDAR origin or not stopped by the ground (nothing below the ground layer
    may be visible, nor the ground right under the sensor, below its -30.67 deg beam), or rays that pass through
    boxes (the free voxels behind a box, shadowed from the LiDAR origin, must be hidden)."""
    grid = OccupancyGrid()
    mask, sem = labels["mask_lidar"], labels["semantics"]
    assert not mask[:, :, :2].any()
    assert not mask[97:103, 97:103, 2].any()  # ground within ~1.2 m of the ego origin: under the LiDAR
    for sl in [np.s_[125:150, 95:105], np.s_[50:75, 95:105], np.s_[95:105, 125:150], np.s_[95:105, 50:75]]:
        ground = sem[sl][..., 2] == so.DRIVEABLE_SURFACE
        assert mask[sl][..., 2][ground].mean() > 0.5, sl
    lidar_origin = np.array(db.tables["calibrated_sensor"][db.sd_by_sample[token]["LIDAR_TOP"]
                                                           ["calibrated_sensor_token"]]["translation"])
    hidden = 0
    for box in boxes(db, token):
        _, iid, c, yaw, (w, l, h), _ = box
        if iid == 0 or min(w, l) < 1.5:
            continue
        ray = (c - lidar_origin) * np.array([1, 1, 0])
        ray /= np.linalg.norm(ray)
        q = c + (0.5 * math.hypot(w, l) + 0.6) * ray
        q[2] = 0.6  # layer 4, below the box top, hidden from a LiDAR 1.84 m up when the box is between
        idx = voxel(grid, q)
        seg = segment(lidar_origin, centre(grid, idx))
        if sem[idx] == so.FREE_LABEL and inside_box(seg, c, yaw, (w, l, h), margin=-0.05):
            assert not mask[idx]
            hidden += 1
    assert hidden >= 3


def test_write_and_load_round_trip(root, db):
    """Catches write_occupancy writing the wrong samples, keys, dtypes or shapes, losing data on the way to disk,
    leaving temporary files behind, or returning a wrong count; and load_occupancy not reading them back."""
    grid = OccupancyGrid(voxel_size=0.8)
    val = db.split_samples("synthetic_val")
    assert write_occupancy(root, split="synthetic_val", grid=grid) == len(val) == 2
    for tok in db.split_samples("synthetic_train"):
        assert not os.path.exists(os.path.join(root, "occupancy", tok, "labels.npz"))
    want = occupancy_labels(db, val[1], grid)
    got = load_occupancy(root, val[1])
    assert set(got) == {"semantics", "instances", "mask_camera", "mask_lidar"}
    for k, dtype in [("semantics", np.uint8), ("instances", np.int32), ("mask_camera", bool), ("mask_lidar", bool)]:
        assert got[k].dtype == dtype and got[k].shape == (100, 100, 8)
        np.testing.assert_array_equal(got[k], want[k])
    assert sorted(os.listdir(os.path.join(root, "occupancy", val[1]))) == ["labels.npz"]


def test_interrupted_write_leaves_no_file(root, db, monkeypatch):
    """Catches a non-atomic write: when saving fails halfway, neither a half-written labels.npz nor a temporary
    file may remain."""
    tok = db.split_samples("synthetic_train")[1]

    def fail(fh, **arrays):
        fh.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(so.np, "savez_compressed", fail)
    with pytest.raises(OSError):
        write_occupancy(root, split="synthetic_train", grid=OccupancyGrid(voxel_size=0.8))
    folder = os.path.join(root, "occupancy", db.split_samples("synthetic_train")[0])
    assert os.listdir(folder) == []
    assert not os.path.exists(os.path.join(root, "occupancy", tok))
