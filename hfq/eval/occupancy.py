"""Occupancy-prediction metrics for Occ3D-nuScenes-style semantic voxel grids: mIoU, RayIoU and RayPQ.

Re-implements, in plain torch / numpy, the official evaluation code used by FlashOcc / Panoptic-FlashOcc:
`occ_metrics.Metric_mIoU` (FlashOCC) and `ray_metrics.py` / `ray_pq.py` (from SparseOcc, vendored by FlashOCC,
whose CUDA/C++ `dvr.render_forward` ray caster is replaced here by a vectorised Amanatides-Woo traversal).

Conventions used throughout:
  * a grid is an integer class array indexed ``[x, y, z]`` with the shape of `OccupancyGrid.shape`
    (Occ3D: 200 x 200 x 16); class ``free_label`` (17) is empty space, every other label is occupied;
  * points, origins and depths are in metres in the ego frame of the grid (`OccupancyGrid.pc_range`);
  * the accumulators sum counts over a whole dataset and only turn them into ratios in ``compute()``, so a
    class's IoU / PQ is a dataset-level ratio, never a mean of per-sample ratios;
  * a class absent from both ground truth and prediction has IoU (or PQ) NaN and is skipped by the means.
"""
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

OCC3D_CLASS_NAMES = (
    "others", "barrier", "bicycle", "bus", "car", "construction_vehicle", "motorcycle", "pedestrian",
    "traffic_cone", "trailer", "truck", "driveable_surface", "other_flat", "sidewalk", "terrain", "manmade",
    "vegetation", "free",
)
NUM_CLASSES = 18
FREE_LABEL = 17
# Panoptic-FlashOcc / ray_pq.py thing classes: bicycle, bus, car, construction_vehicle, motorcycle, pedestrian,
# trailer, truck (barrier and traffic_cone are stuff)
THING_CLASSES = (2, 3, 4, 5, 6, 7, 9, 10)
RAY_THRESHOLDS = (1.0, 2.0, 4.0)
# nuScenes LIDAR_TOP position in the ego frame (the value noted in the official ray_metrics.py); a real
# evaluation passes each sample's lidar2ego translation (and, for the multi-frame protocol, `select_ray_origins`).
DEFAULT_LIDAR_ORIGIN = (0.9858, 0.0, 1.8402)


@dataclass(frozen=True)
class OccupancyGrid:
    """Voxel-grid geometry: `pc_range` = (x_min, y_min, z_min, x_max, y_max, z_max) in metres and `voxel_size`
    (a number or an (x, y, z) triple, metres). Voxel ``[i, j, k]`` covers ``lower + [i, j, k] * voxel_size`` to
    ``lower + [i+1, j+1, k+1] * voxel_size``. Defaults are Occ3D-nuScenes (200 x 200 x 16, 0.4 m);
    ``OCC3D_GRID.with_voxel_size(0.8)`` is the same range at 100 x 100 x 8."""

    pc_range: tuple = (-40.0, -40.0, -1.0, 40.0, 40.0, 5.4)
    voxel_size: tuple = (0.4, 0.4, 0.4)

    def __post_init__(self):
        vs = self.voxel_size
        vs = (float(vs),) * 3 if isinstance(vs, (int, float)) else tuple(float(v) for v in vs)
        object.__setattr__(self, "voxel_size", vs)
        object.__setattr__(self, "pc_range", tuple(float(v) for v in self.pc_range))
        for i in range(3):
            n = (self.pc_range[i + 3] - self.pc_range[i]) / vs[i]
            if n < 0.5 or abs(n - round(n)) > 1e-6:
                raise ValueError(f"range {self.pc_range} is not a whole number of {vs} voxels along axis {i}")

    @property
    def shape(self):
        """Number of voxels along (x, y, z)."""
        return tuple(int(round((self.pc_range[i + 3] - self.pc_range[i]) / self.voxel_size[i])) for i in range(3))

    @property
    def lower(self):
        """(x_min, y_min, z_min) corner of the grid in metres."""
        return self.pc_range[:3]

    @property
    def upper(self):
        """(x_max, y_max, z_max) corner of the grid in metres."""
        return self.pc_range[3:]

    def with_voxel_size(self, voxel_size):
        """The same metric range at another voxel size (e.g. 0.8 m -> 100 x 100 x 8 for Occ3D)."""
        return OccupancyGrid(self.pc_range, voxel_size)

    def centers(self):
        """(X, Y, Z, 3) numpy array of voxel centres in metres."""
        axes = [self.pc_range[a] + (np.arange(n) + 0.5) * self.voxel_size[a] for a, n in enumerate(self.shape)]
        return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)

    def index_of(self, points):
        """Integer voxel index (..., 3) of metric points (..., 3) (floor; may lie outside the grid)."""
        return np.floor((np.asarray(points, np.float64) - np.array(self.lower)) /
                        np.array(self.voxel_size)).astype(np.int64)

    def to_voxel_coords(self, points):
        """Continuous voxel coordinates ``(p - lower) / voxel_size`` of metric points (..., 3); voxel index = floor."""
        p = torch.as_tensor(points, dtype=torch.float64)
        return (p - p.new_tensor(self.lower)) / p.new_tensor(self.voxel_size)


OCC3D_GRID = OccupancyGrid()


def _nanmean(x):
    x = np.asarray(x, dtype=np.float64)
    return float("nan") if np.isnan(x).all() else float(np.nanmean(x))


def _as_long(x):
    return torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).long().cpu()


class MIoU:
    """Occ3D voxel mIoU (as FlashOCC's `Metric_mIoU`): an N x N confusion matrix (rows GT, columns prediction)
    summed over every `update`, then IoU_c = TP / (GT_c + Pred_c - TP) and mIoU = nanmean over every class
    except `free_label` (classes 0..16). GT labels outside [0, num_classes) (e.g. 255) are ignored."""

    def __init__(self, num_classes=NUM_CLASSES, free_label=FREE_LABEL, class_names=OCC3D_CLASS_NAMES):
        self.num_classes, self.free_label, self.class_names = num_classes, free_label, class_names
        self.hist = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self.count = 0

    def update(self, pred, gt, mask=None):
        """Add one sample (or a batch: any equal shapes). `pred`, `gt`: integer class grids; `mask`: bool grid
        (Occ3D `mask_camera`), only voxels where it is True are counted."""
        pred, gt = _as_long(pred).reshape(-1), _as_long(gt).reshape(-1)
        if pred.shape != gt.shape:
            raise ValueError(f"pred has {pred.numel()} voxels, gt {gt.numel()}")
        keep = (gt >= 0) & (gt < self.num_classes)
        if mask is not None:
            keep &= torch.as_tensor(np.asarray(mask) if not torch.is_tensor(mask) else mask).bool().reshape(-1)
        pred, gt = pred[keep], gt[keep]
        if pred.numel() and (pred.min() < 0 or pred.max() >= self.num_classes):
            raise ValueError(f"predicted labels must lie in [0, {self.num_classes})")
        n = self.num_classes
        self.hist += torch.bincount(gt * n + pred, minlength=n * n).reshape(n, n)
        self.count += 1

    def per_class_iou(self):
        """IoU of every class (length num_classes, free included; NaN where a class is in neither GT nor pred)."""
        h = self.hist.double().numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.diag(h) / (h.sum(0) + h.sum(1) - np.diag(h))

    def compute(self):
        """{"mIoU": nanmean over non-free classes, "per_class": {name: IoU} for the non-free classes}."""
        iou = self.per_class_iou()
        cls = [c for c in range(self.num_classes) if c != self.free_label]
        return {"mIoU": _nanmean(iou[cls]), "per_class": {self.class_names[c]: float(iou[c]) for c in cls}}


# ---------------------------------------------------------------------------------------------- ray casting

def lidar_ray_directions(num_azimuths=360, num_base_pitches=10, max_pitch=0.21):
    """Unit ray directions (N, 3) float64 of the RayIoU protocol (SparseOcc `generate_lidar_rays`): pitch angles
    -(pi/2 - atan(k + 1)) for k < num_base_pitches, extended by the last step until one is >= max_pitch
    (the nuScenes lidar's upper FOV), giving 39 pitches; azimuths every 360/num_azimuths degrees from 0.
    Order: pitch-major, azimuth-minor (default 39 x 360 = 14040 rays)."""
    pitches = [-(math.pi / 2 - math.atan(k + 1)) for k in range(num_base_pitches)]
    while pitches[-1] < max_pitch:
        pitches.append(2 * pitches[-1] - pitches[-2])
    pitch = torch.tensor(pitches, dtype=torch.float64)[:, None]
    az = torch.deg2rad(torch.arange(num_azimuths, dtype=torch.float64) * (360.0 / num_azimuths))[None, :]
    x, y = pitch.cos() * az.cos(), pitch.cos() * az.sin()
    dirs = torch.stack([x, y, pitch.sin().expand_as(x)], -1)
    return dirs.reshape(-1, 3)


def select_ray_origins(origins, max_origins=8, xy_limit=39.0):
    """Multi-frame RayIoU origins (FlashOCC `EgoPoseDataset`): from the scene's lidar positions expressed in the
    current ego frame (T, 3), keep those with |x| < xy_limit and |y| < xy_limit, then at most `max_origins`
    picked at round(linspace(0, n - 1, max_origins))."""
    o = torch.as_tensor(origins, dtype=torch.float64).reshape(-1, 3)
    o = o[(o[:, 0].abs() < xy_limit) & (o[:, 1].abs() < xy_limit)]
    if len(o) > max_origins:
        o = o[torch.from_numpy(np.round(np.linspace(0, len(o) - 1, max_origins)).astype(np.int64))]
    return o


def cast_rays(occupied, origins, directions, grid=OCC3D_GRID):
    """Amanatides-Woo traversal of every ray (each origin x each direction) through a bool occupancy grid.

    origins: (3,) or (T, 3) metres; directions: (R, 3) (normalised here). Rays are ordered origin-major (T * R).
    All rays march together, one voxel step per iteration. As in the official DVR kernel: the walk starts in the
    origin's voxel, the next voxel is the axis with the smallest boundary distance with ties going to z, then y
    (then x); the hit is the first in-grid voxel that is occupied and its depth is the distance, from the
    origin, at which the ray LEAVES that voxel. A ray that hits nothing reports the last in-grid voxel it
    crossed and that voxel's exit distance. Distances are metric (the official code measures in voxel units
    and multiplies by the voxel size; identical for cubic voxels).

    Returns (voxel (N, 3) int64, depth (N,) float64 metres, hit (N,) bool, entered (N,) bool); a ray that never
    enters the grid has entered=False, voxel (-1, -1, -1) and depth 0.
    """
    occ = torch.as_tensor(np.asarray(occupied) if not torch.is_tensor(occupied) else occupied).bool().cpu()
    if tuple(occ.shape) != grid.shape:
        raise ValueError(f"grid of shape {tuple(occ.shape)}, expected {grid.shape}")
    origins = torch.as_tensor(origins, dtype=torch.float64).reshape(-1, 3)
    dirs = torch.as_tensor(directions, dtype=torch.float64).reshape(-1, 3)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    T, R = len(origins), len(dirs)
    n = T * R
    size = torch.tensor(grid.shape)
    vs = torch.tensor(grid.voxel_size, dtype=torch.float64)
    # in voxel coordinates: p(s) = o + s * d with s the metric distance along the ray
    o = grid.to_voxel_coords(origins)[:, None, :].expand(T, R, 3).reshape(n, 3)
    d = (dirs / vs)[None].expand(T, R, 3).reshape(n, 3)
    v = o.floor().long()
    step = torch.where(d >= 0, 1, -1)
    moving = d != 0
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    tmax = torch.where(moving, (v + (step > 0).long() - o) / torch.where(moving, d, 1.0), inf)
    tdelta = torch.where(moving, 1.0 / d.abs(), inf)

    out_vox = torch.full((n, 3), -1, dtype=torch.int64)
    out_depth = torch.zeros(n, dtype=torch.float64)
    out_hit = torch.zeros(n, dtype=torch.bool)
    out_entered = torch.zeros(n, dtype=torch.bool)
    flat_occ = occ.reshape(-1)
    strides = torch.tensor([grid.shape[1] * grid.shape[2], grid.shape[2], 1])
    lo, hi = torch.zeros_like(size), size - 1
    axes = torch.arange(3)
    # per live ray: current voxel, boundary distances, last in-grid voxel and its exit distance
    ids = torch.arange(n)
    last_v = torch.full((n, 3), -1, dtype=torch.int64)
    last_t = torch.zeros(n, dtype=torch.float64)
    entered = torch.zeros(n, dtype=torch.bool)
    # every ray terminates: an axis that keeps moving leaves the range for good within this many steps
    max_steps = int((v.abs().amax(0) + 2 * size + 2).sum()) + 1 if n else 0
    for _ in range(max_steps):
        inside = ((v >= 0) & (v <= hi)).all(1)
        tx, ty, tz = tmax.unbind(1)
        axis = torch.where(tx < ty, torch.where(tx < tz, 0, 2), torch.where(ty < tz, 1, 2))
        t_exit = tmax.gather(1, axis[:, None]).squeeze(1)
        hit = flat_occ[(torch.clamp(v, min=lo, max=hi) * strides).sum(1)] & inside
        last_v = torch.where(inside[:, None], v, last_v)
        last_t = torch.where(inside, t_exit, last_t)
        done = hit | (entered & ~inside)
        entered = entered | inside
        if not bool(entered.all()):
            # out of range on an axis and not moving back towards it: can never enter the grid
            done |= (((v < 0) & (d <= 0)) | ((v > hi) & (d >= 0))).any(1)
        if bool(done.any()):
            fin = ids[done]
            out_vox[fin], out_depth[fin], out_hit[fin], out_entered[fin] = last_v[done], last_t[done], hit[done], \
                entered[done]
            keep = (~done).nonzero().squeeze(1)
            ids, v, tmax, tdelta, step, d, last_v, last_t, entered, axis = (
                x.index_select(0, keep) for x in (ids, v, tmax, tdelta, step, d, last_v, last_t, entered, axis))
            if len(ids) == 0:
                break
        onehot = axis[:, None] == axes
        v = v + onehot * step
        tmax = torch.where(onehot, tmax + tdelta, tmax)
    else:
        if n:
            raise RuntimeError("ray traversal did not terminate")
    return out_vox, out_depth, out_hit, out_entered


def render_rays(semantics, origins, directions=None, grid=OCC3D_GRID, instances=None, free_label=FREE_LABEL):
    """Cast the RayIoU rays through a semantic grid (GT and prediction alike): occupied = label != free_label.

    Returns {"labels": (N,) int64 class of the hit voxel (free_label when nothing is hit or the ray never enters
    the grid), "depths": (N,) float64 exit distance in metres (see `cast_rays`), and "instances": (N,) int64
    instance id of that voxel when an instance grid is given (-1 for rays that never enter)}. Directions default
    to `lidar_ray_directions()`."""
    sem = _as_long(semantics)
    if directions is None:
        directions = lidar_ray_directions()
    vox, depth, _, entered = cast_rays(sem != free_label, origins, directions, grid)
    i, j, k = vox.clamp(min=0).unbind(1)
    labels = torch.where(entered, sem[i, j, k], free_label)
    out = {"labels": labels, "depths": depth}
    if instances is not None:
        out["instances"] = torch.where(entered, _as_long(instances)[i, j, k], -1)
    return out


# -------------------------------------------------------------------------------------------------- RayIoU

def _tau_key(prefix, tau):
    return f"{prefix}@{tau:g}"


class RayIoU:
    """RayIoU (SparseOcc `ray_metrics.py`): per sample, the same rays are cast through GT and prediction; only
    rays whose GT label is not free count. For each threshold tau (metres): TP_c = rays with pred label == GT
    label == c and |d_pred - d_gt| < tau (strict); IoU_c = TP_c / (GT_c + Pred_c - TP_c) with counts summed over
    the dataset; RayIoU@tau = nanmean over the non-free classes; RayIoU = mean over all (tau, class) entries,
    i.e. the mean of the per-threshold values. The camera mask is not used (as in the official code)."""

    def __init__(self, grid=OCC3D_GRID, thresholds=RAY_THRESHOLDS, origins=DEFAULT_LIDAR_ORIGIN, directions=None,
                 num_classes=NUM_CLASSES, free_label=FREE_LABEL, class_names=OCC3D_CLASS_NAMES):
        self.grid, self.thresholds, self.origins = grid, tuple(float(t) for t in thresholds), origins
        self.directions = lidar_ray_directions() if directions is None else directions
        self.num_classes, self.free_label, self.class_names = num_classes, free_label, class_names
        self.gt_cnt = np.zeros(num_classes, np.int64)
        self.pred_cnt = np.zeros(num_classes, np.int64)
        self.tp_cnt = np.zeros((len(self.thresholds), num_classes), np.int64)

    def update(self, pred, gt, origins=None):
        """Add one sample: (X, Y, Z) class grids; `origins` (3,) or (T, 3) metres override the default."""
        origins = self.origins if origins is None else origins
        p = render_rays(pred, origins, self.directions, self.grid, free_label=self.free_label)
        g = render_rays(gt, origins, self.directions, self.grid, free_label=self.free_label)
        self.update_rays(p["labels"], p["depths"], g["labels"], g["depths"])

    def update_rays(self, pred_labels, pred_depths, gt_labels, gt_depths):
        """Add already-cast rays (1-D, aligned): labels are classes, depths metres."""
        pl, gl = np.asarray(pred_labels).astype(np.int64), np.asarray(gt_labels).astype(np.int64)
        err = np.abs(np.asarray(pred_depths, np.float64) - np.asarray(gt_depths, np.float64))
        valid = gl != self.free_label
        pl, gl, err = pl[valid], gl[valid], err[valid]
        n = self.num_classes
        self.gt_cnt += np.bincount(gl[(gl >= 0) & (gl < n)], minlength=n)
        self.pred_cnt += np.bincount(pl[(pl >= 0) & (pl < n)], minlength=n)
        same = (pl == gl) & (gl >= 0) & (gl < n)
        for j, tau in enumerate(self.thresholds):
            self.tp_cnt[j] += np.bincount(gl[same & (err < tau)], minlength=n)

    def compute(self):
        """{"RayIoU", "RayIoU@<tau>" for each tau, "per_class": {"RayIoU@<tau>": {name: IoU}}} (non-free classes)."""
        cls = [c for c in range(self.num_classes) if c != self.free_label]
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = self.tp_cnt / (self.gt_cnt + self.pred_cnt - self.tp_cnt)
        iou = iou[:, cls]
        out = {"RayIoU": _nanmean(iou), "per_class": {}}
        for j, tau in enumerate(self.thresholds):
            out[_tau_key("RayIoU", tau)] = _nanmean(iou[j])
            out["per_class"][_tau_key("RayIoU", tau)] = {self.class_names[c]: float(v) for c, v in zip(cls, iou[j])}
        return out


# --------------------------------------------------------------------------------------------------- RayPQ

class RayPQ:
    """RayPQ (SparseOcc / Panoptic-FlashOcc `ray_pq.py`) on the RayIoU rays, with an instance id per ray.

    Segments: within a class, rays sharing an instance id; for classes not in `thing_classes` every ray of the
    class is one segment (GT and prediction alike; the official code collapses only the GT side, which is the
    same for Panoptic-FlashOcc outputs, whose stuff voxels carry their class as instance id). An instance id met
    under two classes is split per class (the official code drops such a GT instance into an "unassigned"
    segment). Only rays whose GT label is not free count. Per class and
    threshold tau: a GT and a predicted segment of the class match if IoU > 0.5, where the intersection counts only
    rays with |d_pred - d_gt| < tau and the segment sizes count all their rays; each match is a TP adding its IoU.
    Unmatched segments with >= `min_segment_size` rays are FN (GT) / FP (prediction); smaller ones are ignored.
    (The official code applies the size limit to FP/FN only: a matched small segment is still a TP.)
    SQ = sum IoU / TP, RQ = TP / (TP + FP/2 + FN/2), PQ = SQ * RQ; NaN for a class with TP + FP + FN = 0.
    RayPQ@tau = nanmean over non-free classes; RayPQ = nanmean over all (tau, class) entries (as the official
    code; this can differ from the mean of the three RayPQ@tau when NaNs differ between thresholds)."""

    def __init__(self, grid=OCC3D_GRID, thresholds=RAY_THRESHOLDS, origins=DEFAULT_LIDAR_ORIGIN, directions=None,
                 min_segment_size=10, thing_classes=THING_CLASSES, num_classes=NUM_CLASSES,
                 free_label=FREE_LABEL, class_names=OCC3D_CLASS_NAMES):
        self.grid, self.thresholds, self.origins = grid, tuple(float(t) for t in thresholds), origins
        self.directions = lidar_ray_directions() if directions is None else directions
        self.min_segment_size, self.thing_classes = min_segment_size, tuple(thing_classes)
        self.num_classes, self.free_label, self.class_names = num_classes, free_label, class_names
        shape = (len(self.thresholds), num_classes)
        self.tp, self.fp, self.fn = (np.zeros(shape, np.int64) for _ in range(3))
        self.iou_sum = np.zeros(shape, np.float64)

    def update(self, pred, gt, instances_pred, instances_gt, origins=None):
        """Add one sample: (X, Y, Z) class grids and integer instance-id grids of the same shape."""
        origins = self.origins if origins is None else origins
        p = render_rays(pred, origins, self.directions, self.grid, instances_pred, self.free_label)
        g = render_rays(gt, origins, self.directions, self.grid, instances_gt, self.free_label)
        self.update_rays(p["labels"], p["instances"], p["depths"], g["labels"], g["instances"], g["depths"])

    def _segment_ids(self, labels, instances):
        stuff = ~np.isin(labels, self.thing_classes)
        return np.where(stuff, -1, instances)

    def update_rays(self, pred_labels, pred_instances, pred_depths, gt_labels, gt_instances, gt_depths):
        """Add already-cast rays (1-D, aligned): labels, instance ids, depths in metres."""
        pl, gl = np.asarray(pred_labels).astype(np.int64), np.asarray(gt_labels).astype(np.int64)
        pi, gi = np.asarray(pred_instances).astype(np.int64), np.asarray(gt_instances).astype(np.int64)
        err = np.abs(np.asarray(pred_depths, np.float64) - np.asarray(gt_depths, np.float64))
        valid = gl != self.free_label
        pl, gl, pi, gi, err = pl[valid], gl[valid], pi[valid], gi[valid], err[valid]
        pi, gi = self._segment_ids(pl, pi), self._segment_ids(gl, gi)
        for c in range(self.num_classes):
            gm, pm = gl == c, pl == c
            if c == self.free_label or not (gm.any() or pm.any()):
                continue
            g_ids, g_idx, g_cnt = np.unique(gi[gm], return_inverse=True, return_counts=True)
            p_ids, p_idx, p_cnt = np.unique(pi[pm], return_inverse=True, return_counts=True)
            g_full = np.full(len(gl), -1)
            g_full[gm] = g_idx.reshape(-1)
            p_full = np.full(len(pl), -1)
            p_full[pm] = p_idx.reshape(-1)
            for j, tau in enumerate(self.thresholds):
                both = gm & pm & (err < tau)
                pairs, inter = np.unique(g_full[both] * len(p_ids) + p_full[both], return_counts=True)
                ga, pa = pairs // max(len(p_ids), 1), pairs % max(len(p_ids), 1)
                iou = inter / (g_cnt[ga] + p_cnt[pa] - inter)
                match = iou > 0.5
                self.tp[j, c] += int(match.sum())
                self.iou_sum[j, c] += float(iou[match].sum())
                g_matched = np.zeros(len(g_ids), bool)
                g_matched[ga[match]] = True
                p_matched = np.zeros(len(p_ids), bool)
                p_matched[pa[match]] = True
                self.fn[j, c] += int((~g_matched & (g_cnt >= self.min_segment_size)).sum())
                self.fp[j, c] += int((~p_matched & (p_cnt >= self.min_segment_size)).sum())

    def compute(self):
        """{"RayPQ", "RayPQ@<tau>", "per_class": {"PQ@<tau>" / "SQ@<tau>" / "RQ@<tau>": {name: value}}}."""
        tp, fp, fn = (x.astype(np.float64) for x in (self.tp, self.fp, self.fn))
        present = (tp + fp + fn) > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            sq = np.where(tp > 0, self.iou_sum / tp, 0.0)
            rq = np.where(present, tp / (tp + 0.5 * fp + 0.5 * fn), 0.0)
        pq = sq * rq
        sq, rq, pq = (np.where(present, x, np.nan) for x in (sq, rq, pq))
        cls = [c for c in range(self.num_classes) if c != self.free_label]
        out = {"RayPQ": _nanmean(pq[:, cls]), "per_class": {}}
        for j, tau in enumerate(self.thresholds):
            out[_tau_key("RayPQ", tau)] = _nanmean(pq[j, cls])
            for name, arr in (("PQ", pq), ("SQ", sq), ("RQ", rq)):
                out["per_class"][_tau_key(name, tau)] = {self.class_names[c]: float(arr[j, c]) for c in cls}
        return out


# -------------------------------------------------------------------------------------------- convenience

def evaluate_occupancy(preds, gts, masks=None, instance_preds=None, instance_gts=None, grid=OCC3D_GRID,
                       origins=DEFAULT_LIDAR_ORIGIN, sample_origins=None, thresholds=RAY_THRESHOLDS,
                       min_segment_size=10, directions=None):
    """mIoU (camera-masked when `masks` is given), RayIoU and, when both instance lists are given, RayPQ over a
    dataset of (X, Y, Z) class grids.

    preds / gts / masks / instance_*: sequences with one grid per sample. Ray origins: `origins` ((3,) or (T, 3)
    metres, ego frame) for every sample, or `sample_origins` (one such array per sample). Rays are cast once per
    sample and shared by RayIoU and RayPQ. Returns {"mIoU", "RayIoU", "RayIoU@1", "RayIoU@2", "RayIoU@4",
    ["RayPQ", "RayPQ@1", "RayPQ@2", "RayPQ@4"], "per_class": {"IoU": {...}, "RayIoU@1": {...}, ...}} (keys use
    the given thresholds)."""
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predictions for {len(gts)} ground truths")
    panoptic = instance_preds is not None and instance_gts is not None
    dirs = lidar_ray_directions() if directions is None else directions
    miou = MIoU()
    ray_iou = RayIoU(grid, thresholds, origins, dirs)
    ray_pq = RayPQ(grid, thresholds, origins, dirs, min_segment_size) if panoptic else None
    for i, (pred, gt) in enumerate(zip(preds, gts)):
        miou.update(pred, gt, None if masks is None else masks[i])
        o = origins if sample_origins is None else sample_origins[i]
        p = render_rays(pred, o, dirs, grid, instance_preds[i] if panoptic else None)
        g = render_rays(gt, o, dirs, grid, instance_gts[i] if panoptic else None)
        ray_iou.update_rays(p["labels"], p["depths"], g["labels"], g["depths"])
        if panoptic:
            ray_pq.update_rays(p["labels"], p["instances"], p["depths"], g["labels"], g["instances"], g["depths"])
    m, r = miou.compute(), ray_iou.compute()
    out = {"mIoU": m["mIoU"], **{k: v for k, v in r.items() if k != "per_class"}}
    per_class = {"IoU": m["per_class"], **r["per_class"]}
    if panoptic:
        q = ray_pq.compute()
        out.update({k: v for k, v in q.items() if k != "per_class"})
        per_class.update(q["per_class"])
    out["per_class"] = per_class
    return out


@torch.no_grad()
def evaluate_model(model_or_path, data_dir, split="synthetic_val", batch_size=2, version="v1.0-synthetic"):
    """Run an occupancy model (`hfq.modeling.flashocc`, float or hfq-quantized; a folder is loaded with
    trust_remote_code) over `split` of a nuScenes-format folder whose occupancy labels `write_occupancy` wrote, and
    score it with `evaluate_occupancy`: mIoU on the camera mask, RayIoU from each sample's LiDAR position, RayPQ for
    panoptic models. Adds "samples"."""
    from transformers import AutoModel

    from hfq.data.synthetic_occupancy import SyntheticOccupancyDataset, collate_occupancy, lidar_origin, model_inputs

    model = model_or_path
    if isinstance(model, (str, os.PathLike)):
        model = AutoModel.from_pretrained(model, trust_remote_code=True)
    model.eval()
    cfg = model.config
    ds = SyntheticOccupancyDataset(data_dir, split, model.get_image_processor(), version=version)
    grid = OccupancyGrid((cfg.grid_x[0], cfg.grid_y[0], cfg.grid_z[0], cfg.grid_x[1], cfg.grid_y[1], cfg.grid_z[1]),
                         cfg.occ_voxel_size)
    preds, gts, masks, inst_p, inst_g, origins = [], [], [], [], [], []
    for start in range(0, len(ds), batch_size):
        items = [ds[i] for i in range(start, min(start + batch_size, len(ds)))]
        batch = collate_occupancy(items)
        if tuple(batch["voxel_semantics"].shape[1:]) != grid.shape:
            raise ValueError(f"the labels are {tuple(batch['voxel_semantics'].shape[1:])} voxels, the model predicts "
                             f"{grid.shape}: write the labels with the model's grid (write_occupancy(grid=...))")
        for item, res in zip(items, model.post_process(model(**model_inputs(batch)))):
            preds.append(res["semantics"])
            gts.append(item["voxel_semantics"])
            masks.append(item["mask_camera"])
            inst_p.append(res.get("instances"))
            inst_g.append(item["instances"])
            origins.append(lidar_origin(ds.db, item["sample_token"]))
    panoptic = all(p is not None for p in inst_p)
    out = evaluate_occupancy(preds, gts, masks, inst_p if panoptic else None, inst_g if panoptic else None, grid,
                             sample_origins=origins)
    out["samples"] = len(preds)
    return out
