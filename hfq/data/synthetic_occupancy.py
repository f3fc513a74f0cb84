"""Occ3D-style occupancy ground truth for the synthetic nuScenes-format scenes (`hfq.data.synthetic_nuscenes`).

Conventions (Occ3D-nuScenes; the grid, class names and thing classes are those of `hfq.eval.occupancy`):
  * every array is indexed ``[i, j, k]`` = (x, y, z) in the EGO frame of the sample, i.e. the ego pose of the
    sample's LIDAR_TOP sample_data (x forward, y left, z up; in the generator the ego pose is a pure yaw with
    z = 0, so the ego origin lies on the ground plane and the ground is ego z = 0);
  * voxel ``[i, j, k]`` covers ``lower + index * voxel_size`` to ``lower + (index + 1) * voxel_size`` and its
    centre is ``lower + (index + 0.5) * voxel_size``; default grid 200 x 200 x 16 of 0.4 m over
    x, y in [-40, 40] m, z in [-1, 5.4] m;
  * `semantics` uses the 18 Occ3D ids of `OCC3D_CLASS_NAMES` (17 = free); `instances` gives every thing-class box
    (`THING_CLASSES`, Panoptic-FlashOcc) its own id > 0 and is 0 elsewhere;
  * `mask_camera` is a dense camera visibility mask (`camera_visibility`: a per-camera depth buffer from exact
    voxel traversal, every voxel centre inside an image tested against it, plus Occ3D's first-occupied-voxel
    rule for surfaces); `mask_lidar` comes from ray marching (`march_rays`) along a dense synthetic LiDAR sweep.
    Both are approximations of Occ3D's masks, documented in `occupancy_labels`.

Files: ``<root>/occupancy/<sample_token>/labels.npz`` with keys semantics (uint8), instances (int32),
mask_camera, mask_lidar (bool), as written by `write_occupancy` and read by `load_occupancy`.
"""
import math
import os
import tempfile

import numpy as np
import torch
from tqdm.auto import tqdm

from hfq.data.synthetic_nuscenes import CLASSES, NuScenesTables, transform
from hfq.eval.occupancy import FREE_LABEL, THING_CLASSES, OccupancyGrid, cast_rays
from hfq.progress import is_quiet

OTHERS, DRIVEABLE_SURFACE = 0, 11
# nuScenes detection class name -> Occ3D id
DETECTION_TO_OCC3D = {
    "barrier": 1, "bicycle": 2, "bus": 3, "car": 4, "construction_vehicle": 5, "motorcycle": 6, "pedestrian": 7,
    "traffic_cone": 8, "trailer": 9, "truck": 10,
}
# nuScenes category (as written by the generator) -> detection class name
CATEGORY_TO_DETECTION = {spec[0]: name for name, spec in CLASSES.items()}
BOX_TOLERANCE = 1e-3  # metres: boxes are closed sets, grown by 1 mm so faces on a voxel-centre plane count


def occ3d_class_of(category):
    """Occ3D id of a nuScenes category name; categories outside the 10 detection classes are 0 (others)."""
    return DETECTION_TO_OCC3D.get(CATEGORY_TO_DETECTION.get(category), OTHERS)


def _inv(m):
    out = np.eye(4)
    out[:3, :3] = m[:3, :3].T
    out[:3, 3] = -m[:3, :3].T @ m[:3, 3]
    return out


def ego_to_global(db, sample_token):
    """4x4 ego -> global of a sample: the ego pose of its LIDAR_TOP sample_data."""
    ep = db.tables["ego_pose"][db.sd_by_sample[sample_token]["LIDAR_TOP"]["ego_pose_token"]]
    return transform(ep["translation"], ep["rotation"])


def lidar_origin(db, sample_token):
    """(3,) float64 LiDAR position in the sample's ego frame (its calibrated_sensor translation): the ray origin of
    RayIoU / RayPQ."""
    lidar = db.sd_by_sample[sample_token]["LIDAR_TOP"]
    return np.asarray(db.tables["calibrated_sensor"][lidar["calibrated_sensor_token"]]["translation"], np.float64)


def sorted_annotations(db, sample_token):
    """The sample's annotations in the order that defines instance ids (instance token, then token): id of the
    n-th one = n + 1, so an object keeps its id across the samples of a scene whenever the set of objects does."""
    return sorted(db.anns_by_sample.get(sample_token, []), key=lambda a: (a["instance_token"], a["token"]))


def semantic_labels(db, sample_token, grid=OccupancyGrid()):
    """(semantics uint8, instances int32) of a sample, both (X, Y, Z) in its ego frame.

    Ground: the global plane z = 0 (the generator's checkered ground) becomes driveable_surface (11) in the one
    voxel per (x, y) column whose z-interval [z_lo, z_hi) contains the plane's ego-frame height at the column's
    centre (the generator's ego z is 0, so this is ego z = 0: layer 2 on the Occ3D grid, layer 1 at 0.8 m).
    Boxes, painted after the ground in `sorted_annotations` order: a voxel takes a box's class when its centre
    lies inside the box (closed, grown by `BOX_TOLERANCE`), plus the voxel that contains the box centre, so that
    small objects (a rotated traffic cone) never vanish between voxel centres. With the Occ3D grid the ground
    layer's centres lie on the boxes' bottom faces (z = 0), so a box replaces the ground under it. Every box is
    painted, also boxes no camera sees (num_lidar_pts 0): visibility is what the masks are for.
    """
    sem = np.full(grid.shape, FREE_LABEL, np.uint8)
    inst = np.zeros(grid.shape, np.int32)
    e2g = ego_to_global(db, sample_token)
    g2e = _inv(e2g)
    centers = grid.centers()
    X, Y, Z = grid.shape
    # ground: global z of ego point p is r3 . p + t_z = 0  ->  z = -(r31 x + r32 y + t_z) / r33
    r3, tz = e2g[2, :3], e2g[2, 3]
    if abs(r3[2]) > 1e-6:
        xy = centers[:, :, 0, :2]
        zg = -(r3[0] * xy[..., 0] + r3[1] * xy[..., 1] + tz) / r3[2]
        k = np.floor((zg - grid.pc_range[2]) / grid.voxel_size[2]).astype(np.int64)
        ii, jj = np.nonzero((k >= 0) & (k < Z))
        sem[ii, jj, k[ii, jj]] = DRIVEABLE_SURFACE
    shape = np.array(grid.shape)
    for n, ann in enumerate(sorted_annotations(db, sample_token)):
        cls = occ3d_class_of(db.category_of_instance[ann["instance_token"]])
        box2ego = g2e @ transform(ann["translation"], ann["rotation"])
        w, l, h = ann["size"]
        half = np.array([l, w, h]) / 2 + BOX_TOLERANCE  # box x along its length, y along its width (nuScenes)
        corners = np.array(np.meshgrid(*[[-1, 1]] * 3, indexing="ij")).reshape(3, -1).T * half
        corners = corners @ box2ego[:3, :3].T + box2ego[:3, 3]
        lo = np.clip(grid.index_of(corners.min(0)), 0, shape)
        hi = np.clip(grid.index_of(corners.max(0)) + 1, 0, shape)
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        local = (centers[sl] - box2ego[:3, 3]) @ box2ego[:3, :3]  # ego -> box frame: R^T (p - t)
        inside = np.zeros(grid.shape, bool)
        inside[sl] = np.all(np.abs(local) <= half, axis=-1)
        c = grid.index_of(box2ego[:3, 3])
        if np.all((c >= 0) & (c < shape)):
            inside[tuple(c)] = True
        sem[inside] = cls
        inst[inside] = n + 1 if cls in THING_CLASSES else 0
    return sem, inst


def march_rays(occupied, origins, directions, grid=OccupancyGrid(), step=None, block=16):
    """Visibility by ray marching (used for `mask_lidar`): (X, Y, Z) bool of the voxels that some ray reaches.

    occupied: (X, Y, Z) bool (anything not free); origins, directions: (R, 3) ego-frame metres (directions need
    not be unit). Each ray is sampled at t = t0, t0 + step, ... (t0 = 0, or where it enters the grid when the
    origin lies outside) until it leaves the grid; every voxel it samples up to and including the first occupied
    one is visible, nothing behind that hit is. `step` defaults to half the smallest voxel edge, so a ray can
    skip a corner of a voxel it only grazes (less than half a voxel deep). All rays advance together, `block`
    samples at a time; finished rays (hit or out) drop out.
    """
    shape = torch.tensor(grid.shape)
    X, Y, Z = grid.shape
    occ = torch.as_tensor(occupied, dtype=torch.bool).reshape(-1)
    visible = torch.zeros(X * Y * Z, dtype=torch.bool)
    o = torch.as_tensor(np.array(origins, np.float64)).reshape(-1, 3)
    d = torch.as_tensor(np.array(directions, np.float64)).reshape(-1, 3)
    d = d / d.norm(dim=1, keepdim=True)
    step = 0.5 * min(grid.voxel_size) if step is None else step
    lower, upper = torch.tensor(grid.lower), torch.tensor(grid.upper)
    vs = torch.tensor(grid.voxel_size)
    # slab method: parameter interval [t_in, t_out] of each ray inside the grid box
    t1, t2 = (lower - o) / d, (upper - o) / d  # +-inf where d = 0, nan when also on the plane
    t1, t2 = torch.nan_to_num(t1, nan=-math.inf), torch.nan_to_num(t2, nan=math.inf)
    t_in = torch.minimum(t1, t2).amax(1).clamp(min=0.0)
    t_out = torch.maximum(t1, t2).amin(1)
    keep = t_out >= t_in
    o, d, t_in, t_out = o[keep].float(), d[keep].float(), t_in[keep].float(), t_out[keep].float()
    offsets = torch.arange(block, dtype=torch.float32) * step
    lower, vs = lower.float(), vs.float()
    b = 0
    while len(o):
        t = t_in[:, None] + (b * block * step + offsets)[None]  # (A, block)
        idx = torch.floor((o[:, None] + t[..., None] * d[:, None] - lower) / vs).long()
        inb = ((idx >= 0) & (idx < shape)).all(-1)
        lin = ((idx[..., 0] * Y + idx[..., 1]) * Z + idx[..., 2]).clamp(0, X * Y * Z - 1)
        hit = occ[lin] & inb
        any_hit = hit.any(1)
        first = torch.where(any_hit, hit.to(torch.uint8).argmax(1), torch.full_like(any_hit, block, dtype=torch.long))
        seen = inb & (torch.arange(block)[None] <= first[:, None])
        visible[lin[seen]] = True
        alive = ~any_hit & (t[:, -1] + step <= t_out)
        o, d, t_in, t_out = o[alive], d[alive], t_in[alive], t_out[alive]
        b += 1
    return visible.reshape(X, Y, Z)


def camera_models(db, sample_token, ego_from_global):
    """[(channel, K (3, 3), cam2ego (4, 4), H, W)] of the sample's cameras in channel order: intrinsics as in
    calibrated_sensor, camera -> ego of the sample (`ego_from_global` @ the camera's sensor -> global, so a camera
    captured at another ego pose lands where it was), H, W the written image size of the sample_data."""
    out = []
    for ch, sd in sorted(db.sd_by_sample[sample_token].items()):
        cs = db.tables["calibrated_sensor"][sd["calibrated_sensor_token"]]
        if db.tables["sensor"][cs["sensor_token"]]["modality"] != "camera":
            continue
        out.append((ch, np.array(cs["camera_intrinsic"], np.float64), ego_from_global @ db.sensor_to_global(sd),
                    int(sd["height"]), int(sd["width"])))
    return out


def _pixel_samples(H, W, pixel_stride):
    """(u, v) pixel coordinates (Hs, Ws) of the sampled pixels: the centres of the stride x stride blocks of an
    H x W image, ``stride * index + stride / 2`` (pixel i covers [i, i + 1) in the intrinsics' convention)."""
    u = np.arange(0, W, pixel_stride) + pixel_stride / 2
    v = np.arange(0, H, pixel_stride) + pixel_stride / 2
    return np.meshgrid(u, v, indexing="xy")


def camera_visibility(occupied, cameras, grid=OccupancyGrid(), pixel_stride=2, surface_rays=True):
    """Dense, Occ3D-style camera visibility: (X, Y, Z) bool tensor of the voxels that some camera sees.

    occupied: (X, Y, Z) bool (anything not free); cameras: iterable of (K (3, 3), cam2ego (4, 4), H, W), or of
    (name, K, cam2ego, H, W) as `camera_models` returns them. The result is the union over the cameras of:

    * depth-buffer test (free space and surfaces seen head-on): one ray per sampled pixel (`_pixel_samples`:
      every `pixel_stride`-th pixel of the H x W image, at the centres of the stride x stride blocks) is cast
      through `occupied` with the exact voxel traversal `hfq.eval.occupancy.cast_rays`; its depth is the distance
      from the camera centre at which it leaves its first occupied voxel (the far side of the surface voxel), or
      where it leaves the grid when it hits nothing (0, nothing seen, when it never enters the grid). Every voxel
      centre p in front of the camera (camera-frame z > 0) whose projection K p / z lies inside the image
      (0 <= u < W, 0 <= v < H) looks up the NEAREST sampled pixel (the block containing its projection) and is
      visible when its distance from the camera centre along that pixel's unit ray, (p - c) . d, is <= the
      buffered depth: free space in front of the first surface is visible, and so is the surface voxel itself
      when its centre lies in front of the buffered far side (surfaces seen roughly head-on); the voxel behind a
      surface, whose centre lies half a voxel or more beyond that far side, is not.
    * surface rule (`surface_rays`; Occ3D's rule for occupied voxels): from the camera centre a ray is cast
      towards the centre of every occupied voxel whose centre projects inside the image, and the first occupied
      voxel it meets (the voxel itself or one in front of it) is visible. This is what makes surfaces seen at
      grazing angles visible: a ground voxel's centre lies 0.2 m below the ground's top face, so from a camera
      1.5 m up the line of sight to it enters the ground through the top of a voxel in front of it and the
      depth test hides it; the line of sight to a farther ground voxel's centre does meet it first.

    Approximations that remain: (1) a voxel takes the depth of a ray up to half a stride away (nearest-pixel
    lookup, no interpolation), so within about one block's footprint of a depth discontinuity (a box silhouette)
    a free voxel just behind the edge can be marked, or one just in front of it missed; (2) visibility is
    decided at voxel centres: a voxel whose centre projects outside the image, or whose centre is hidden while a
    corner is visible, is not visible (except as the first occupied voxel of a surface-rule ray; such a voxel's
    centre may then lie just outside the image); (3) with the surface rule the ground voxels are only seen as
    the first hit of a line of sight to a farther ground voxel's centre, so the outer ground near the grid edge
    (beyond about 0.87 of the distance to the edge for a camera 1.5 m above the ground) stays unseen; (4) free
    voxels are decided by the depth buffer only (the surface-rule rays mark just their first occupied voxel).
    """
    occ = torch.as_tensor(np.asarray(occupied) if not torch.is_tensor(occupied) else occupied).bool()
    if tuple(occ.shape) != grid.shape:
        raise ValueError(f"grid of shape {tuple(occ.shape)}, expected {grid.shape}")
    X, Y, Z = grid.shape
    flat_occ = occ.reshape(-1)
    centres = torch.from_numpy(grid.centers().reshape(-1, 3))
    visible = torch.zeros(X * Y * Z, dtype=torch.bool)
    for cam in cameras:
        K, cam2ego, H, W = cam[-4:]
        K = np.asarray(K, np.float64)
        cam2ego = np.asarray(cam2ego, np.float64)
        R, t = torch.from_numpy(cam2ego[:3, :3].copy()), torch.from_numpy(cam2ego[:3, 3].copy())
        u, v = _pixel_samples(H, W, pixel_stride)
        Hs, Ws = u.shape
        rays = np.linalg.inv(K) @ np.stack([u.ravel(), v.ravel(), np.ones(u.size)])  # (3, Hs * Ws), camera frame
        rays = torch.from_numpy((rays / np.linalg.norm(rays, axis=0)).T.copy())  # unit, row-major pixels
        # voxel centres in the camera frame, R^T (p - t), and their projections
        q = (centres - t) @ R
        uvw = q @ torch.from_numpy(K).T
        front = uvw[:, 2] > 1e-9
        zs = torch.where(front, uvw[:, 2], torch.ones_like(uvw[:, 2]))
        pu, pv = uvw[:, 0] / zs, uvw[:, 1] / zs
        sel = (front & (pu >= 0) & (pu < W) & (pv >= 0) & (pv < H)).nonzero().squeeze(1)
        targets = sel[flat_occ[sel]] if surface_rays else sel[:0]
        # one traversal for the pixel rays (depth buffer) and the surface-rule rays, all from the camera centre
        vox, depth, hit, _ = cast_rays(occ, t, torch.cat([rays @ R.T, centres[targets] - t]), grid)
        n = len(rays)
        col = torch.floor(pu[sel] / pixel_stride).long().clamp(0, Ws - 1)
        row = torch.floor(pv[sel] / pixel_stride).long().clamp(0, Hs - 1)
        pix = row * Ws + col
        visible[sel[(q[sel] * rays[pix]).sum(1) <= depth[pix]]] = True
        first = vox[n:][hit[n:]]
        visible[(first[:, 0] * Y + first[:, 1]) * Z + first[:, 2]] = True
    return visible.reshape(X, Y, Z)


def lidar_rays(origin, ground_z, grid=OccupancyGrid(), azimuth_step_deg=0.5, elevation_range_deg=(-30.67, 10.67),
               elevation_step_deg=1.0):
    """(origins, directions) of a spinning LiDAR at `origin` (ego frame), level with the ego xy plane.

    Azimuths: 0..360 deg in `azimuth_step_deg`. Elevations within `elevation_range_deg` (the nuScenes HDL-32E
    field of view by default): at and above the horizon every `elevation_step_deg`; below it, one elevation per
    ground ring, rings one voxel apart (the angles at which a ray meets the ground plane `ground_z` at horizontal
    distances r_min, r_min + voxel, ... up to the farthest grid corner). A single sweep this dense stands in
    for Occ3D's aggregation of many sweeps along the sequence, which covers the ground densely.
    """
    lo, hi = elevation_range_deg
    elev = list(np.arange(0.0, hi + 1e-9, elevation_step_deg)) if hi >= 0 else []
    height = origin[2] - ground_z
    if height > 0 and lo < 0:
        r_min = height / math.tan(math.radians(-lo))
        lo_xy, hi_xy = np.array(grid.lower[:2]) - origin[:2], np.array(grid.upper[:2]) - origin[:2]
        r_max = math.hypot(*np.maximum(np.abs(lo_xy), np.abs(hi_xy)))
        elev += list(-np.degrees(np.arctan(height / np.arange(r_min, r_max + grid.voxel_size[0], grid.voxel_size[0]))))
    elif lo < 0:
        elev += list(np.arange(lo, 0.0, elevation_step_deg))
    az = np.radians(np.arange(0.0, 360.0, azimuth_step_deg))
    el = np.radians(np.array(elev))
    a, e = np.meshgrid(az, el, indexing="ij")
    d = np.stack([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)], -1).reshape(-1, 3)
    return np.broadcast_to(np.asarray(origin, np.float64), d.shape), d


def occupancy_labels(db, sample_token, grid=OccupancyGrid(), pixel_stride=2, lidar_azimuth_step_deg=0.5,
                     lidar_elevation_range_deg=(-30.67, 10.67), lidar_elevation_step_deg=1.0):
    """Occ3D-style labels of one sample, all (X, Y, Z) numpy arrays in the sample's ego frame:

    * semantics (uint8) and instances (int32): see `semantic_labels`;
    * mask_camera (bool): voxels seen by at least one camera, dense as in Occ3D (every voxel whose line of sight
      to a camera is unobstructed and whose centre projects inside that camera's image), computed by
      `camera_visibility` with the cameras of `camera_models` (written image size, this sample's ego frame):
      a depth buffer per camera from one exact traversal (`cast_rays`) per `pixel_stride`-th pixel, every voxel
      centre compared, at the nearest sampled pixel, with the far side of the first occupied voxel along that
      pixel's ray (free space and head-on surface voxels visible, anything behind a surface not), plus Occ3D's
      rule for occupied voxels (the first occupied voxel on the line of sight to each occupied voxel centre in
      the image is visible), which keeps the ground seen at grazing angles. Approximations left: nearest-pixel
      lookup at the stride (within about a block's footprint of a box silhouette a voxel just behind the edge
      can be marked or one just in front missed), visibility decided at voxel centres, and the outer ground
      near the grid edge unseen (its voxels are never the first hit of a line of sight); see
      `camera_visibility`.
    * mask_lidar (bool): an approximation: ray marching (`march_rays`: every voxel a ray reaches up to and
      including its first non-free one) from the LiDAR origin (LIDAR_TOP's translation in the ego frame) along
      the rays of `lidar_rays` over 360 deg of azimuth; a single dense synthetic sweep (ground rings one voxel
      apart, so per-ray marking suffices), not Occ3D's aggregated real sweeps (no beam pattern, no ego motion,
      no per-point noise).
    """
    sem, inst = semantic_labels(db, sample_token, grid)
    e2g = ego_to_global(db, sample_token)
    g2e = _inv(e2g)
    occupied = torch.from_numpy(sem != FREE_LABEL)
    mask_camera = camera_visibility(occupied, camera_models(db, sample_token, g2e), grid, pixel_stride).numpy()
    lidar2ego = g2e @ db.sensor_to_global(db.sd_by_sample[sample_token]["LIDAR_TOP"])
    origin = lidar2ego[:3, 3]
    # ground height under the LiDAR in the ego frame (global z = 0 plane; see `semantic_labels`)
    ground_z = -(e2g[2, 0] * origin[0] + e2g[2, 1] * origin[1] + e2g[2, 3]) / e2g[2, 2]
    li_o, li_d = lidar_rays(origin, ground_z, grid, lidar_azimuth_step_deg, lidar_elevation_range_deg,
                            lidar_elevation_step_deg)
    mask_lidar = march_rays(occupied, li_o, li_d, grid).numpy()
    return {"semantics": sem, "instances": inst, "mask_camera": mask_camera, "mask_lidar": mask_lidar}


def occupancy_path(root, sample_token):
    return os.path.join(root, "occupancy", sample_token, "labels.npz")


def write_occupancy(root, split=None, grid=OccupancyGrid(), version="v1.0-synthetic", **options):
    """Write ``<root>/occupancy/<sample_token>/labels.npz`` for every sample of `root` (or of one split);
    returns the number of files written. Each file is written to a temporary file in the same folder and then
    renamed, so an interrupted run never leaves a half-written labels.npz. `options` go to `occupancy_labels`."""
    db = NuScenesTables(root, version)
    tokens = db.split_samples(split) if split is not None else list(db.tables["sample"])
    written = 0
    for token in tqdm(tokens, desc="occupancy labels", disable=is_quiet()):
        labels = occupancy_labels(db, token, grid, **options)
        path = occupancy_path(root, token)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".labels-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez_compressed(fh, **labels)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        written += 1
    return written


def load_occupancy(root, sample_token):
    """The arrays of ``<root>/occupancy/<sample_token>/labels.npz`` as a dict (semantics, instances, mask_camera,
    mask_lidar)."""
    with np.load(occupancy_path(root, sample_token)) as data:
        return {k: data[k] for k in data.files}


# the official FlashOcc camera order (data_config["cams"])
FLASHOCC_CAMERAS = ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT")


class SyntheticOccupancyDataset(torch.utils.data.Dataset):
    """Samples of one split for an occupancy model (FlashOcc): the 6 camera images through `processor` (the model's
    image processor: (images, intrinsics, sensor2ego, train=, rng=) -> pixel_values, intrinsics, sensor2ego, img_aug,
    ...), the occupancy labels `write_occupancy` wrote (voxel_semantics, mask_camera, instances), and the panoptic
    centre targets: every box of `center_class_names` as (x, y, gravity-centre z, length, width) in the ego frame
    with its index into that list. Labels are read from `<root>/occupancy/`; write them first."""

    def __init__(self, root, split, processor, center_class_names=None, version="v1.0-synthetic", train=False,
                 seed=0):
        self.db = NuScenesTables(root, version)
        self.root, self.samples, self.processor, self.train = root, self.db.split_samples(split), processor, train
        missing = [t for t in self.samples if not os.path.isfile(occupancy_path(root, t))]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(self.samples)} samples of {split!r} have no occupancy "
                                    f"labels under {root}/occupancy; run hfq.data.synthetic_occupancy."
                                    f"write_occupancy({root!r}) first")
        self.center_class_names = list(center_class_names or ())
        self.rng = np.random.default_rng(seed)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, idx):
        from PIL import Image

        token = self.samples[idx]
        sds = self.db.sd_by_sample[token]
        images, Ks, cam2ego = [], [], []
        for ch in FLASHOCC_CAMERAS:
            cs = self.db.tables["calibrated_sensor"][sds[ch]["calibrated_sensor_token"]]
            images.append(Image.open(os.path.join(self.root, sds[ch]["filename"])).convert("RGB"))
            Ks.append(np.array(cs["camera_intrinsic"]))
            cam2ego.append(transform(cs["translation"], cs["rotation"]))
        item = self.processor(images, Ks, cam2ego, train=self.train, rng=self.rng)
        occ = load_occupancy(self.root, token)
        item["voxel_semantics"] = torch.from_numpy(occ["semantics"].astype(np.int64))
        item["mask_camera"] = torch.from_numpy(occ["mask_camera"])
        item["instances"] = torch.from_numpy(occ["instances"])
        boxes, labels = [], []
        g2e = np.linalg.inv(ego_to_global(self.db, token))
        for ann in sorted_annotations(self.db, token):
            name = CATEGORY_TO_DETECTION.get(self.db.category_of_instance[ann["instance_token"]])
            if name not in self.center_class_names:
                continue
            c = g2e[:3, :3] @ np.array(ann["translation"]) + g2e[:3, 3]
            w, length, _ = ann["size"]
            boxes.append([c[0], c[1], c[2], length, w])
            labels.append(self.center_class_names.index(name))
        item["center_labels"] = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 5),
                                 "class_labels": torch.tensor(labels, dtype=torch.long)}
        item["sample_token"] = token
        return item


def collate_occupancy(items):
    """Stack the tensors of `SyntheticOccupancyDataset` items; centre targets and tokens stay lists."""
    out = {k: torch.stack([i[k] for i in items]) for k, v in items[0].items() if torch.is_tensor(v)}
    out["center_labels"] = [i["center_labels"] for i in items]
    out["sample_token"] = [i["sample_token"] for i in items]
    return out


def model_inputs(batch):
    """The forward arguments of an occupancy model in a collated batch (images and geometry, no labels)."""
    return {k: batch[k] for k in ("pixel_values", "intrinsics", "sensor2ego", "img_aug") if k in batch}
