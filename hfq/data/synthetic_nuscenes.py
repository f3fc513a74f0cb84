"""Synthetic nuScenes-format detection data: a 6-camera rig with nuScenes-like calibration looks at textured
3D boxes on a checkered ground plane; boxes are rendered by projecting their faces through the real camera
matrices (painter's algorithm, near-plane clipping). The output is the devkit's 13 tables + splits.json +
a map PNG, so `nuscenes.eval.detection.DetectionEval` runs on it unchanged, and a torch Dataset that reads
the tables back (images, lidar2img, LiDAR-frame targets).

Each scene draws its own objects from its own seed, so val scenes share nothing with train scenes except
the generating distribution. Honest but easy: few classes, distinct colours per class, a lit front face
so heading is observable, objects within 4-26 m (`object_range`) of the ego path's middle.
"""
import hashlib
import json
import logging
import math
import os

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy.spatial.transform import Rotation
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

# name, yaw in the ego frame (deg), translation (m), focal, cx, cy at 1600x900 (nuScenes rig, rounded)
CAMERAS = [
    ("CAM_FRONT", 0.0, (1.70, 0.02, 1.51), 1266.4, 816.3, 491.5),
    ("CAM_FRONT_RIGHT", -55.0, (1.55, -0.49, 1.50), 1260.8, 808.0, 495.3),
    ("CAM_FRONT_LEFT", 55.0, (1.52, 0.49, 1.51), 1272.6, 826.6, 479.8),
    ("CAM_BACK", 180.0, (0.03, 0.00, 1.58), 809.2, 829.2, 481.8),
    ("CAM_BACK_LEFT", 110.0, (1.04, 0.48, 1.59), 1256.7, 817.8, 452.0),
    ("CAM_BACK_RIGHT", -110.0, (1.01, -0.48, 1.56), 1259.5, 807.3, 501.2),
]
LIDAR_TRANSLATION = (0.94, 0.0, 1.84)
LIDAR_YAW = -math.pi / 2  # nuScenes LIDAR_TOP: x to the right, y forward

# detection name -> (nuScenes category, mean size w, l, h, RGB colour, can move, max speed m/s)
CLASSES = {
    "car": ("vehicle.car", (1.95, 4.6, 1.7), (40, 90, 230), True, 6.0),
    "truck": ("vehicle.truck", (2.5, 7.0, 3.0), (210, 40, 40), True, 5.0),
    "bus": ("vehicle.bus.rigid", (2.9, 11.0, 3.4), (235, 205, 30), True, 4.0),
    "construction_vehicle": ("vehicle.construction", (2.8, 6.5, 3.2), (245, 135, 20), False, 0.0),
    "trailer": ("vehicle.trailer", (2.9, 12.0, 3.9), (235, 235, 235), False, 0.0),
    "pedestrian": ("human.pedestrian.adult", (0.7, 0.7, 1.75), (40, 190, 70), True, 1.5),
    "barrier": ("movable_object.barrier", (2.5, 0.5, 1.0), (160, 60, 210), False, 0.0),
    "motorcycle": ("vehicle.motorcycle", (0.8, 2.1, 1.5), (20, 200, 200), True, 6.0),
    "bicycle": ("vehicle.bicycle", (0.6, 1.8, 1.3), (230, 90, 180), True, 4.0),
    "traffic_cone": ("movable_object.trafficcone", (0.45, 0.45, 1.0), (30, 30, 30), False, 0.0),
}
DEFAULT_CLASSES = ("car", "truck", "bus", "construction_vehicle", "pedestrian", "barrier")
ATTRIBUTES = ["vehicle.moving", "vehicle.stopped", "vehicle.parked", "cycle.with_rider", "cycle.without_rider",
              "pedestrian.sitting_lying_down", "pedestrian.standing", "pedestrian.moving"]
VISIBILITY = [("1", "v0-40"), ("2", "v40-60"), ("3", "v60-80"), ("4", "v80-100")]
TABLES = ["category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor", "ego_pose", "log",
          "scene", "sample", "sample_data", "sample_annotation", "map"]


# ---------------------------------------------------------------- geometry helpers
def yaw_matrix(yaw):
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def matrix_to_quat(m):
    """Rotation matrix -> quaternion in nuScenes order (w, x, y, z), w >= 0."""
    x, y, z, w = Rotation.from_matrix(np.asarray(m, dtype=np.float64)).as_quat(canonical=True)
    return np.array([w, x, y, z])


def quat_to_matrix(q):
    """Quaternion (w, x, y, z) -> rotation matrix."""
    w, x, y, z = np.asarray(q, dtype=np.float64)
    return Rotation.from_quat([x, y, z, w]).as_matrix()


def transform(translation, rotation):
    """4x4 from translation + quaternion (wxyz) or 3x3 matrix."""
    t = np.eye(4)
    t[:3, :3] = quat_to_matrix(rotation) if np.asarray(rotation).shape == (4,) else rotation
    t[:3, 3] = translation
    return t


def camera_to_ego(yaw_deg):
    """Camera axes (x right, y down, z forward) expressed in the ego frame for a camera looking at yaw."""
    p = math.radians(yaw_deg)
    return np.stack([[math.sin(p), -math.cos(p), 0.0], [0.0, 0.0, -1.0], [math.cos(p), math.sin(p), 0.0]], axis=1)


def box_corners(center, wlh, yaw):
    """8 corners (global); box x axis along the length, y along the width (nuScenes Box)."""
    w, l, h = wlh
    x = np.array([1, 1, 1, 1, -1, -1, -1, -1]) * l / 2
    y = np.array([1, -1, -1, 1, 1, -1, -1, 1]) * w / 2
    z = np.array([1, 1, -1, -1, 1, 1, -1, -1]) * h / 2
    return (yaw_matrix(yaw) @ np.stack([x, y, z])).T + np.asarray(center)


# faces as corner indices, with a tag: front (+x), back (-x), side, top, bottom
FACES = [((0, 1, 2, 3), "front"), ((4, 5, 6, 7), "back"), ((0, 3, 7, 4), "side"), ((1, 2, 6, 5), "side"),
         ((0, 1, 5, 4), "top"), ((3, 2, 6, 7), "bottom")]
LIGHT = np.array([0.3, 0.5, 0.8]) / np.linalg.norm([0.3, 0.5, 0.8])


def clip_near(poly, near=0.1):
    """Sutherland-Hodgman clip of a camera-frame polygon (k, 3) against z >= near."""
    out = []
    for i in range(len(poly)):
        a, b = poly[i], poly[(i + 1) % len(poly)]
        ina, inb = a[2] >= near, b[2] >= near
        if ina:
            out.append(a)
        if ina != inb:
            t = (near - a[2]) / (b[2] - a[2])
            out.append(a + t * (b - a))
    return np.array(out)


class Camera:
    def __init__(self, K, global_to_cam, size_hw):
        self.K, self.g2c, self.size_hw = K, global_to_cam, size_hw
        self.center = np.linalg.inv(global_to_cam)[:3, 3]

    def project(self, pts_global):
        """Polygon in global -> pixel polygon (list of tuples) or None when fully behind the camera."""
        cam = (self.g2c[:3, :3] @ pts_global.T).T + self.g2c[:3, 3]
        cam = clip_near(cam)
        if len(cam) < 3:
            return None
        uv = (self.K @ cam.T).T
        uv = uv[:, :2] / uv[:, 2:3]
        if np.abs(uv).max() > 1e5:
            uv = np.clip(uv, -1e5, 1e5)
        return [tuple(p) for p in uv]


def clip_to_image(poly, width, height):
    """Sutherland-Hodgman clip of a 2-D polygon to the image rectangle."""
    pts = [np.asarray(p, float) for p in poly]
    for axis, bound, keep_below in ((0, 0.0, False), (0, width, True), (1, 0.0, False), (1, height, True)):
        out = []
        for i in range(len(pts)):
            a, b = pts[i], pts[(i + 1) % len(pts)]
            ina = a[axis] <= bound if keep_below else a[axis] >= bound
            inb = b[axis] <= bound if keep_below else b[axis] >= bound
            if ina:
                out.append(a)
            if ina != inb:
                out.append(a + (bound - a[axis]) / (b[axis] - a[axis]) * (b - a))
        pts = out
        if len(pts) < 3:
            return []
    return pts


def polygon_area(poly):
    if len(poly) < 3:
        return 0.0
    p = np.asarray(poly)
    return 0.5 * abs(np.dot(p[:, 0], np.roll(p[:, 1], 1)) - np.dot(p[:, 1], np.roll(p[:, 0], 1)))


def render_view(cam, objects, tile=4.0, extent=44.0):
    """RGB image + per-pixel object id (0 = background) for one camera."""
    H, W = cam.size_hw
    img = Image.new("RGB", (W, H), (150, 190, 230))
    ids = Image.new("L", (W, H), 0)
    draw, draw_id = ImageDraw.Draw(img), ImageDraw.Draw(ids)
    cx, cy = cam.center[0], cam.center[1]
    x0, y0 = math.floor((cx - extent) / tile), math.floor((cy - extent) / tile)
    n = int(2 * extent / tile) + 1
    for i in range(x0, x0 + n):
        for j in range(y0, y0 + n):
            quad = np.array([[i, j, 0], [i + 1, j, 0], [i + 1, j + 1, 0], [i, j + 1, 0]], float) * [tile, tile, 1]
            poly = cam.project(quad)
            if poly is not None:
                draw.polygon(poly, fill=(95, 95, 95) if (i + j) % 2 else (120, 118, 112))
    order = sorted(range(len(objects)), key=lambda k: -np.linalg.norm(objects[k]["center"][:2] - cam.center[:2]))
    areas = np.zeros(len(objects))
    for k in order:
        ob = objects[k]
        corners = box_corners(ob["center"], ob["wlh"], ob["yaw"])
        center = np.asarray(ob["center"])
        for idx, tag in FACES:
            face = corners[list(idx)]
            normal = face.mean(0) - center
            if np.dot(normal, cam.center - face.mean(0)) <= 0:  # back-face culling (convex box)
                continue
            poly = cam.project(face)
            if poly is None:
                continue
            shade = 0.55 + 0.45 * max(0.0, float(np.dot(normal / np.linalg.norm(normal), LIGHT)))
            col = np.array(ob["color"], float) * shade
            if tag == "front":
                col = 0.45 * col + 0.55 * 255
            elif tag == "back":
                col = 0.55 * col
            draw.polygon(poly, fill=tuple(int(c) for c in np.clip(col, 0, 255)))
            draw_id.polygon(poly, fill=k + 1)
            areas[k] += polygon_area(clip_to_image(poly, W, H))
            if tag in ("side", "front", "back"):  # a dark band low on each vertical face: texture + scale cue
                lo = face[np.argsort(face[:, 2])]
                band = np.array([lo[0], lo[1], lo[1], lo[0]], float)
                hgt = ob["wlh"][2]
                band[:2, 2] += 0.15 * hgt
                band[2:, 2] += 0.35 * hgt
                bpoly = cam.project(band)
                if bpoly is not None:
                    draw.polygon(bpoly, fill=tuple(int(c) for c in np.clip(col * 0.35, 0, 255)))
    visible = np.bincount(np.asarray(ids).ravel(), minlength=len(objects) + 1)[1:]
    return img, visible, areas


# ---------------------------------------------------------------- generation
def _token(*parts):
    return hashlib.md5("/".join(str(p) for p in parts).encode()).hexdigest()


def _sample_objects(rng, classes, ego_path, num_objects, class_cycle=False, object_range=(4.0, 26.0)):
    objects = []
    tries = 0
    offset = int(rng.integers(len(classes))) if class_cycle else 0
    while len(objects) < num_objects and tries < 500:
        tries += 1
        if class_cycle:
            name = classes[(offset + len(objects)) % len(classes)]
        else:
            name = classes[int(rng.integers(len(classes)))]
        cat, size, color, movable, vmax = CLASSES[name]
        wlh = np.array(size) * rng.uniform(0.9, 1.1, 3)
        mid = ego_path[len(ego_path) // 2]
        r, a = rng.uniform(*object_range), rng.uniform(0, 2 * math.pi)
        xy = mid[:2] + r * np.array([math.cos(a), math.sin(a)])
        yaw = rng.uniform(-math.pi, math.pi)
        speed = rng.uniform(0.5, vmax) if movable and rng.uniform() < 0.5 else 0.0
        vel = speed * np.array([math.cos(yaw), math.sin(yaw)])
        radius = 0.5 * math.hypot(wlh[0], wlh[1])
        ok = all(np.linalg.norm(xy - e[:2]) > radius + 3.0 for e in ego_path)
        ok = ok and all(np.linalg.norm(xy - o["xy0"]) > radius + o["radius"] + 0.5 for o in objects)
        if not ok:
            continue
        objects.append({"name": name, "category": cat, "wlh": wlh, "color": color, "xy0": xy, "yaw": yaw,
                        "vel": vel, "radius": radius})
    return objects


def generate_synthetic_nuscenes(root, version="v1.0-synthetic", num_scenes=None, samples_per_scene=6,
                                image_size=(225, 400), classes=DEFAULT_CLASSES, objects_per_scene=(6, 10),
                                seed=0, class_cycle=False, object_range=(4.0, 26.0)):
    """Write a nuScenes-format dataset under `root`; returns the split dict written to splits.json.

    num_scenes: {split: count}, default {"synthetic_train": 60, "synthetic_val": 12}. Split names must not be
    the devkit's predefined ones ("train", "val", ...), which the devkit ties to the official scene lists.
    image_size: (H, W) of the written images; intrinsics are the 1600x900 ones scaled to it.
    class_cycle: assign classes round-robin within a scene (every class appears when objects_per_scene >=
    len(classes)) instead of drawing them independently.
    object_range: (min, max) distance in metres of object centres from the middle of the ego path.
    """
    num_scenes = num_scenes or {"synthetic_train": 60, "synthetic_val": 12}
    unknown = [c for c in classes if c not in CLASSES]
    if unknown:
        raise ValueError(f"unknown classes {unknown}; choose from {sorted(CLASSES)}.")
    from_devkit = {"train", "val", "test", "mini_train", "mini_val", "train_detect", "train_track"}
    if from_devkit & set(num_scenes):
        raise ValueError(f"split names {sorted(from_devkit & set(num_scenes))} are predefined by the devkit; "
                         "use e.g. 'synthetic_train' / 'synthetic_val'.")
    H, W = image_size
    scale = W / 1600.0
    vroot = os.path.join(root, version)
    os.makedirs(vroot, exist_ok=True)
    os.makedirs(os.path.join(root, "maps"), exist_ok=True)
    t = {name: [] for name in TABLES}

    for name, (cat, *_rest) in CLASSES.items():
        t["category"].append({"token": _token("cat", cat), "name": cat, "description": f"synthetic {name}"})
    for a in ATTRIBUTES:
        t["attribute"].append({"token": _token("attr", a), "name": a, "description": a})
    for tok, level in VISIBILITY:
        t["visibility"].append({"token": tok, "level": level, "description": f"visibility {level}"})

    sensors = {"LIDAR_TOP": ("lidar", LIDAR_TRANSLATION, matrix_to_quat(yaw_matrix(LIDAR_YAW)), [])}
    cam_K = {}
    for name, yaw, trans, f, cx, cy in CAMERAS:
        K = np.array([[f * scale, 0, cx * scale], [0, f * scale, cy * scale], [0, 0, 1]])
        cam_K[name] = K
        sensors[name] = ("camera", trans, matrix_to_quat(camera_to_ego(yaw)), K.tolist())
    calib = {}
    for ch, (modality, trans, rot, K) in sensors.items():
        t["sensor"].append({"token": _token("sensor", ch), "channel": ch, "modality": modality})
        calib[ch] = _token("calib", ch)
        t["calibrated_sensor"].append({"token": calib[ch], "sensor_token": _token("sensor", ch),
                                       "translation": list(trans), "rotation": list(rot), "camera_intrinsic": K})
    log_token = _token("log")
    t["log"].append({"token": log_token, "logfile": "synthetic", "vehicle": "synthetic", "date_captured": "2026-01-01",
                     "location": "synthetic"})
    map_file = "maps/synthetic.png"
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(os.path.join(root, map_file))
    t["map"].append({"token": _token("map"), "log_tokens": [log_token], "category": "semantic_prior",
                     "filename": map_file})

    splits = {}
    scene_idx = 0
    total = sum(num_scenes.values())
    bar = tqdm(total=total, desc="synthetic nuScenes scenes")
    for split, count in num_scenes.items():
        splits[split] = []
        for local in range(count):
            rng = np.random.default_rng([seed, scene_idx, 7919])  # one independent stream per scene
            scene_name = f"scene-{scene_idx:04d}"
            splits[split].append(scene_name)
            _write_scene(t, rng, root, scene_idx, scene_name, log_token, calib, cam_K, (H, W),
                         samples_per_scene, list(classes), objects_per_scene, class_cycle, object_range)
            scene_idx += 1
            bar.update(1)
    bar.close()
    for name in TABLES:
        with open(os.path.join(vroot, f"{name}.json"), "w") as fh:
            json.dump(t[name], fh)
    with open(os.path.join(vroot, "splits.json"), "w") as fh:
        json.dump(splits, fh)
    logger.info("wrote %d scenes to %s", total, vroot)
    return splits


def _write_scene(t, rng, root, scene_idx, scene_name, log_token, calib, cam_K, size_hw, num_samples, classes,
                 objects_per_scene, class_cycle=False, object_range=(4.0, 26.0)):
    dt = 0.5
    base_ts = 1_600_000_000_000_000 + scene_idx * 100_000_000
    ego_xy0 = rng.uniform(200, 1800, 2)
    ego_yaw = rng.uniform(-math.pi, math.pi)
    ego_speed = rng.uniform(0.0, 3.0)
    ego_dir = np.array([math.cos(ego_yaw), math.sin(ego_yaw)])
    ego_path = [np.append(ego_xy0 + ego_speed * dt * i * ego_dir, 0.0) for i in range(num_samples)]
    num_objects = int(rng.integers(objects_per_scene[0], objects_per_scene[1] + 1))
    objects = _sample_objects(rng, classes, ego_path, num_objects, class_cycle, object_range)
    scene_token = _token("scene", scene_idx)
    sample_tokens = [_token("sample", scene_idx, i) for i in range(num_samples)]
    inst_tokens = [_token("inst", scene_idx, k) for k in range(len(objects))]
    ann_tokens = [[_token("ann", scene_idx, i, k) for k in range(len(objects))] for i in range(num_samples)]
    channels = ["LIDAR_TOP"] + [c[0] for c in CAMERAS]
    sd_tokens = {ch: [_token("sd", scene_idx, i, ch) for i in range(num_samples)] for ch in channels}
    for ch in channels[1:]:
        os.makedirs(os.path.join(root, "samples", ch), exist_ok=True)

    t["scene"].append({"token": scene_token, "name": scene_name, "description": "synthetic", "log_token": log_token,
                       "nbr_samples": num_samples, "first_sample_token": sample_tokens[0],
                       "last_sample_token": sample_tokens[-1]})
    for k, ob in enumerate(objects):
        t["instance"].append({"token": inst_tokens[k], "category_token": _token("cat", ob["category"]),
                              "nbr_annotations": num_samples, "first_annotation_token": ann_tokens[0][k],
                              "last_annotation_token": ann_tokens[-1][k]})
    ego_rot = matrix_to_quat(yaw_matrix(ego_yaw))
    for i in range(num_samples):
        ts = base_ts + int(i * dt * 1e6)
        prev_s = sample_tokens[i - 1] if i > 0 else ""
        next_s = sample_tokens[i + 1] if i + 1 < num_samples else ""
        t["sample"].append({"token": sample_tokens[i], "timestamp": ts, "scene_token": scene_token,
                            "prev": prev_s, "next": next_s})
        ego2global = transform(ego_path[i], ego_rot)
        state = []
        for ob in objects:
            xy = ob["xy0"] + ob["vel"] * dt * i
            state.append({"center": np.array([xy[0], xy[1], ob["wlh"][2] / 2]), "wlh": ob["wlh"], "yaw": ob["yaw"],
                          "color": ob["color"]})
        visible = np.zeros(len(objects))
        area = np.zeros(len(objects))
        for name, *_ in CAMERAS:
            cs = next(c for c in t["calibrated_sensor"] if c["token"] == calib[name])
            cam2global = ego2global @ transform(cs["translation"], cs["rotation"])
            cam = Camera(cam_K[name], np.linalg.inv(cam2global), size_hw)
            img, vis, ar = render_view(cam, state)
            visible += vis
            area += ar
            img.save(os.path.join(root, "samples", name, f"{sd_tokens[name][i]}.jpg"), quality=92)
        for ch in channels:
            ep = _token("ego", scene_idx, i, ch)
            t["ego_pose"].append({"token": ep, "translation": ego_path[i].tolist(), "rotation": ego_rot.tolist(),
                                  "timestamp": ts})
            cam = ch != "LIDAR_TOP"
            t["sample_data"].append({
                "token": sd_tokens[ch][i], "sample_token": sample_tokens[i], "ego_pose_token": ep,
                "calibrated_sensor_token": calib[ch], "timestamp": ts, "fileformat": "jpg" if cam else "pcd",
                "is_key_frame": True, "height": size_hw[0] if cam else 0, "width": size_hw[1] if cam else 0,
                "filename": f"samples/{ch}/{sd_tokens[ch][i]}." + ("jpg" if cam else "pcd.bin"),
                "prev": sd_tokens[ch][i - 1] if i > 0 else "",
                "next": sd_tokens[ch][i + 1] if i + 1 < num_samples else "",
            })
        for k, ob in enumerate(objects):
            frac = visible[k] / max(area[k], 1.0)
            vis_token = VISIBILITY[min(3, int(np.searchsorted([0.4, 0.6, 0.8], frac, side="right")))][0]
            speed = float(np.linalg.norm(ob["vel"]))
            if ob["name"] == "pedestrian":
                attr = "pedestrian.moving" if speed > 0 else "pedestrian.standing"
            elif ob["name"] in ("barrier", "traffic_cone"):
                attr = None
            elif ob["name"] in ("motorcycle", "bicycle"):
                attr = "cycle.with_rider" if speed > 0 else "cycle.without_rider"
            elif ob["name"] == "bus":  # nuScenes / mmdet3d convention: a bus that does not move has stopped
                attr = "vehicle.moving" if speed > 0 else "vehicle.stopped"
            else:
                attr = "vehicle.moving" if speed > 0 else "vehicle.parked"
            t["sample_annotation"].append({
                "token": ann_tokens[i][k], "sample_token": sample_tokens[i], "instance_token": inst_tokens[k],
                "visibility_token": vis_token, "attribute_tokens": [_token("attr", attr)] if attr else [],
                "translation": state[k]["center"].tolist(), "size": ob["wlh"].tolist(),
                "rotation": matrix_to_quat(yaw_matrix(ob["yaw"])).tolist(),
                "prev": ann_tokens[i - 1][k] if i > 0 else "",
                "next": ann_tokens[i + 1][k] if i + 1 < num_samples else "",
                # no LiDAR here: visible camera pixels stand in for points, so fully hidden boxes get 0 and
                # the devkit drops them from the ground truth exactly as it drops empty real boxes
                "num_lidar_pts": int(visible[k]), "num_radar_pts": 0,
            })


# ---------------------------------------------------------------- reading back
class NuScenesTables:
    """Minimal reader of the devkit tables (no devkit needed for training)."""

    def __init__(self, root, version="v1.0-synthetic"):
        vroot = os.path.join(root, version)
        if not os.path.isdir(vroot):
            raise ValueError(f"{vroot} does not exist; run generate_synthetic_nuscenes(root) first.")
        self.root = root
        self.tables = {}
        for name in TABLES:
            with open(os.path.join(vroot, f"{name}.json")) as fh:
                self.tables[name] = {r["token"]: r for r in json.load(fh)}
        with open(os.path.join(vroot, "splits.json")) as fh:
            self.splits = json.load(fh)
        self.sd_by_sample = {}
        for sd in self.tables["sample_data"].values():
            cs = self.tables["calibrated_sensor"][sd["calibrated_sensor_token"]]
            ch = self.tables["sensor"][cs["sensor_token"]]["channel"]
            if sd["is_key_frame"]:
                self.sd_by_sample.setdefault(sd["sample_token"], {})[ch] = sd
        self.anns_by_sample = {}
        for ann in self.tables["sample_annotation"].values():
            self.anns_by_sample.setdefault(ann["sample_token"], []).append(ann)
        categories = self.tables["category"]
        self.category_of_instance = {
            tok: categories[inst["category_token"]]["name"] for tok, inst in self.tables["instance"].items()}

    def split_samples(self, split):
        if split not in self.splits:
            raise ValueError(f"split {split!r} not in splits.json ({sorted(self.splits)}).")
        names = set(self.splits[split])
        out = []
        for scene in self.tables["scene"].values():
            if scene["name"] in names:
                tok = scene["first_sample_token"]
                while tok:
                    out.append(tok)
                    tok = self.tables["sample"][tok]["next"]
        return out

    def sensor_to_global(self, sd):
        cs = self.tables["calibrated_sensor"][sd["calibrated_sensor_token"]]
        ep = self.tables["ego_pose"][sd["ego_pose_token"]]
        return transform(ep["translation"], ep["rotation"]) @ transform(cs["translation"], cs["rotation"])

    def velocity(self, ann):
        """Devkit box_velocity: centre difference over prev/next, NaN when the gap exceeds 1.5 s."""
        prev = self.tables["sample_annotation"].get(ann["prev"]) if ann["prev"] else None
        nxt = self.tables["sample_annotation"].get(ann["next"]) if ann["next"] else None
        first, last = prev or ann, nxt or ann
        if first is last:
            return np.array([np.nan, np.nan, np.nan])
        t0 = self.tables["sample"][first["sample_token"]]["timestamp"] * 1e-6
        t1 = self.tables["sample"][last["sample_token"]]["timestamp"] * 1e-6
        if t1 - t0 > (1.5 if prev is None or nxt is None else 3.0):
            return np.array([np.nan, np.nan, np.nan])
        return (np.array(last["translation"]) - np.array(first["translation"])) / (t1 - t0)


def _name_of(category):
    return next((n for n, v in CLASSES.items() if v[0] == category), None)


class SyntheticNuScenesDataset(torch.utils.data.Dataset):
    """Samples of one split: 6 processed camera images, lidar2img, and LiDAR-frame targets.

    processor: a PetrImageProcessor-like callable (images, intrinsics, lidar2cam, train) -> dict.
    class_names: the detector's class list (label ids are indices into it).
    """

    def __init__(self, root, split, processor, class_names, version="v1.0-synthetic", train=False, seed=0):
        self.db = NuScenesTables(root, version)
        self.samples = self.db.split_samples(split)
        self.processor, self.class_names, self.train = processor, list(class_names), train
        self.rng = np.random.default_rng(seed)
        self.channels = [c[0] for c in CAMERAS]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, idx):
        token = self.samples[idx]
        sds = self.db.sd_by_sample[token]
        lidar_sd = sds["LIDAR_TOP"]
        lidar2global = self.db.sensor_to_global(lidar_sd)
        images, Ks, l2c = [], [], []
        for ch in self.channels:
            sd = sds[ch]
            cs = self.db.tables["calibrated_sensor"][sd["calibrated_sensor_token"]]
            images.append(Image.open(os.path.join(self.db.root, sd["filename"])).convert("RGB"))
            Ks.append(np.array(cs["camera_intrinsic"]))
            l2c.append(np.linalg.inv(self.db.sensor_to_global(sd)) @ lidar2global)
        item = self.processor(images, Ks, l2c, train=self.train, rng=self.rng)
        g2l = np.linalg.inv(lidar2global)
        boxes, labels = [], []
        for ann in self.db.anns_by_sample.get(token, []):
            name = _name_of(self.db.category_of_instance[ann["instance_token"]])
            if ann["num_lidar_pts"] + ann["num_radar_pts"] <= 0 or name not in self.class_names:
                continue
            c = g2l[:3, :3] @ np.array(ann["translation"]) + g2l[:3, 3]
            rot = g2l[:3, :3] @ quat_to_matrix(ann["rotation"])
            v = np.nan_to_num(g2l[:3, :3] @ self.db.velocity(ann), nan=0.0)
            w, l, h = ann["size"]
            boxes.append([c[0], c[1], c[2], w, l, h, math.atan2(rot[1, 0], rot[0, 0]), v[0], v[1]])
            labels.append(self.class_names.index(name))
        ep = self.db.tables["ego_pose"][lidar_sd["ego_pose_token"]]
        cs = self.db.tables["calibrated_sensor"][lidar_sd["calibrated_sensor_token"]]
        item.update({
            "labels": {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 9),
                       "class_labels": torch.tensor(labels, dtype=torch.long)},
            "sample_token": token,
            "lidar2ego": (cs["translation"], cs["rotation"]),
            "ego2global": (ep["translation"], ep["rotation"]),
            "lidar2global": torch.from_numpy(lidar2global).float(),
        })
        return item


def collate(items):
    """Stack images/lidar2img; keep targets and poses as lists."""
    out = {"pixel_values": torch.stack([i["pixel_values"] for i in items]),
           "lidar2img": torch.stack([i["lidar2img"] for i in items])}
    for key in ("labels", "sample_token", "lidar2ego", "ego2global", "lidar2global"):
        out[key] = [i[key] for i in items]
    return out


def calibration_batches(model, root, split="synthetic_train", num_samples=32, batch_size=2,
                        version="v1.0-synthetic"):
    """Model inputs ({"pixel_values", "lidar2img"}) of `num_samples` evenly spaced samples of `split` of a
    nuScenes-format folder, pre-processed by the model's own image processor, in batches of `batch_size`."""
    ds = SyntheticNuScenesDataset(root, split, model.get_image_processor(), model.config.class_names, version)
    if num_samples > len(ds):
        raise ValueError(f"{num_samples} calibration samples asked for, split {split!r} of {root} has {len(ds)}")
    idx = np.linspace(0, len(ds) - 1, num_samples).round().astype(int)
    items = [ds[int(i)] for i in idx]
    return [{k: v for k, v in collate(items[i:i + batch_size]).items() if k in ("pixel_values", "lidar2img")}
            for i in range(0, len(items), batch_size)]
