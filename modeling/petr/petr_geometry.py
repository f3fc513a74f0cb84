"""PETR geometry: LID depth bins, frustum -> LiDAR points, sine encodings, box coding and the export of
LiDAR-frame boxes to nuScenes global-frame result boxes. Pure torch/numpy (no devkit needed)."""
import math

import numpy as np
import torch


def inverse_sigmoid(x, eps=1e-5):
    """mmdet's inverse_sigmoid: clamp to [0, 1] first, so out-of-range points saturate at +-11.51."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def depth_bins(depth_num, depth_start, depth_max, use_lid=True):
    """Depth samples along each camera ray; LID spacing grows linearly (finer near the camera)."""
    index = torch.arange(depth_num, dtype=torch.float32)
    if use_lid:
        bin_size = (depth_max - depth_start) / (depth_num * (1 + depth_num))
        return depth_start + bin_size * index * (index + 1)
    return depth_start + index * (depth_max - depth_start) / depth_num


def frustum_points(lidar2img, feat_hw, pad_hw, depths, position_range, img2lidar=None):
    """3D points of the camera frustum in the LiDAR frame, normalised to `position_range`.

    lidar2img (B, N, 4, 4); returns (B, N, W, H, D, 3) in [0, 1] inside the range. Pixel coordinates are
    the top-left of each feature cell in input-image pixels, as in the official head. img2lidar: its inverse
    when already known (`img_to_lidar`; ONNX has no matrix inverse, so the exported graph takes it as an input).
    """
    H, W = feat_hw
    pad_h, pad_w = pad_hw
    device = lidar2img.device
    coords_h = torch.arange(H, device=device, dtype=torch.float32) * pad_h / H
    coords_w = torch.arange(W, device=device, dtype=torch.float32) * pad_w / W
    d = depths.to(device)
    grid = torch.stack(torch.meshgrid(coords_w, coords_h, d, indexing="ij"), dim=-1)  # W, H, D, 3
    grid = torch.cat([grid, torch.ones_like(grid[..., :1])], dim=-1)
    grid[..., :2] = grid[..., :2] * torch.clamp(grid[..., 2:3], min=1e-5)
    img2lidar = img_to_lidar(lidar2img) if img2lidar is None else img2lidar  # (B, N, 4, 4)
    pts = torch.einsum("bnij,whdj->bnwhdi", img2lidar, grid)[..., :3]
    lo = torch.tensor(position_range[:3], device=device)
    hi = torch.tensor(position_range[3:], device=device)
    return (pts - lo) / (hi - lo)


def img_to_lidar(lidar2img):
    """The inverse of lidar2img (B, N, 4, 4), computed in float64."""
    return torch.linalg.inv(lidar2img.double()).float()


def frustum_to_channels(points):
    """(B, N, W, H, D, 3) -> (B*N, D*3, H, W): channel = depth*3 + axis, as the official view()."""
    B, N, W, H, D, _ = points.shape
    return points.permute(0, 1, 4, 5, 3, 2).reshape(B * N, D * 3, H, W)


def sine_encoding_3d(mask, num_feats, temperature=10000.0, scale=2 * math.pi, eps=1e-6):
    """SinePositionalEncoding3D (normalize=True) over cameras, rows, cols -> (B, N, 3*num_feats, H, W).

    Note the official stack(dim=4) on 5-D tensors puts all sines before all cosines per axis (not
    interleaved like the 2-D DETR encoding); kept exactly so official weights see the same inputs.
    """
    not_mask = 1 - mask.to(torch.int)
    n = not_mask.cumsum(1, dtype=torch.float32)
    y = not_mask.cumsum(2, dtype=torch.float32)
    x = not_mask.cumsum(3, dtype=torch.float32)
    n = n / (n[:, -1:] + eps) * scale
    y = y / (y[:, :, -1:] + eps) * scale
    x = x / (x[:, :, :, -1:] + eps) * scale
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=mask.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    B, N, H, W = mask.shape

    def enc(v):
        p = v[..., None] / dim_t
        return torch.stack((p[..., 0::2].sin(), p[..., 1::2].cos()), dim=4).view(B, N, H, W, -1)

    return torch.cat((enc(n), enc(y), enc(x)), dim=4).permute(0, 1, 4, 2, 3)


def pos2posemb3d(pos, num_pos_feats=128, temperature=10000.0):
    """Sine embedding of normalised 3D anchors: interleaved sin/cos, concat order (y, x, z)."""
    pos = pos * (2 * math.pi)
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=pos.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)

    def enc(v):
        p = v[..., None] / dim_t
        return torch.stack((p[..., 0::2].sin(), p[..., 1::2].cos()), dim=-1).flatten(-2)

    return torch.cat((enc(pos[..., 1]), enc(pos[..., 0]), enc(pos[..., 2])), dim=-1)


def normalize_bbox(boxes):
    """(cx, cy, cz, w, l, h, yaw[, vx, vy]) -> 10-d code (cx, cy, log w, log l, cz, log h, sin, cos, vx, vy)."""
    cx, cy, cz = boxes[..., 0:1], boxes[..., 1:2], boxes[..., 2:3]
    w, l, h = boxes[..., 3:4].log(), boxes[..., 4:5].log(), boxes[..., 5:6].log()
    rot = boxes[..., 6:7]
    parts = [cx, cy, w, l, cz, h, rot.sin(), rot.cos()]
    if boxes.shape[-1] > 7:
        parts += [boxes[..., 7:8], boxes[..., 8:9]]
    return torch.cat(parts, dim=-1)


def denormalize_bbox(code):
    """Inverse of normalize_bbox -> (cx, cy, cz, w, l, h, yaw, vx, vy)."""
    yaw = torch.atan2(code[..., 6:7], code[..., 7:8])
    sizes = code[..., [2, 3, 5]].exp()
    vel = code[..., 8:10] if code.shape[-1] > 8 else code.new_zeros(code.shape[:-1] + (2,))
    return torch.cat([code[..., 0:2], code[..., 4:5], sizes, yaw, vel], dim=-1)


def decode_predictions(cls_logits, bbox_code, max_num, post_center_range, num_classes):
    """NMS-free decoding of one sample: top-`max_num` (query, class) pairs by sigmoid score."""
    scores = cls_logits.sigmoid().flatten()
    k = min(max_num, scores.numel())
    scores, idx = scores.topk(k)
    labels = idx % num_classes
    boxes = denormalize_bbox(bbox_code[idx // num_classes])
    r = torch.tensor(post_center_range, device=boxes.device)
    keep = ((boxes[:, :3] >= r[:3]) & (boxes[:, :3] <= r[3:])).all(-1)
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


# ---- quaternions (w, x, y, z), numpy, for the nuScenes export ----
def quat_to_matrix(q):
    w, x, y, z = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def quat_multiply(a, b):
    w1, x1, y1, z1 = a
    w2, x2, y2, z2 = b
    return np.array([
        w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2,
        w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
        w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2,
        w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2,
    ])


def yaw_quat(yaw):
    return np.array([math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)])


def quat_yaw(q):
    """Yaw (rotation about z) of a quaternion, i.e. the heading of its x axis projected on xy."""
    m = quat_to_matrix(q)
    return math.atan2(m[1, 0], m[0, 0])


DEFAULT_ATTRIBUTES = {
    "car": "vehicle.parked", "truck": "vehicle.parked", "construction_vehicle": "vehicle.parked",
    "bus": "vehicle.moving", "trailer": "vehicle.parked", "barrier": "", "motorcycle": "cycle.without_rider",
    "bicycle": "cycle.without_rider", "pedestrian": "pedestrian.moving", "traffic_cone": "",
}


def attribute_for(name, velocity):
    """mmdet3d's rule: moving/with-rider when the predicted speed exceeds 0.2 m/s, else the class default."""
    if math.hypot(velocity[0], velocity[1]) > 0.2:
        if name in ("car", "construction_vehicle", "bus", "truck", "trailer"):
            return "vehicle.moving"
        if name in ("bicycle", "motorcycle"):
            return "cycle.with_rider"
        return DEFAULT_ATTRIBUTES[name]
    if name == "pedestrian":
        return "pedestrian.standing"
    if name == "bus":
        return "vehicle.stopped"
    return DEFAULT_ATTRIBUTES[name]


def boxes_to_nuscenes(decoded, class_names, lidar2ego, ego2global, yaw_convention="nuscenes", sample_token=None):
    """LiDAR-frame decoded boxes -> nuScenes result dicts in the global frame.

    lidar2ego / ego2global: (translation[3], rotation quaternion wxyz[4]).
    """
    t_le, q_le = np.asarray(lidar2ego[0], float), np.asarray(lidar2ego[1], float)
    t_eg, q_eg = np.asarray(ego2global[0], float), np.asarray(ego2global[1], float)
    r_le, r_eg = quat_to_matrix(q_le), quat_to_matrix(q_eg)
    out = []
    boxes = decoded["boxes"].detach().cpu().double().numpy()
    for box, score, label in zip(boxes, decoded["scores"].tolist(), decoded["labels"].tolist()):
        cx, cy, cz, w, l, h, yaw, vx, vy = box
        if yaw_convention == "mmdet3d_v017":
            yaw = -yaw - math.pi / 2
        center = r_eg @ (r_le @ np.array([cx, cy, cz]) + t_le) + t_eg
        rot = quat_multiply(q_eg, quat_multiply(q_le, yaw_quat(yaw)))
        vel = r_eg @ (r_le @ np.array([vx, vy, 0.0]))
        name = class_names[label]
        out.append({
            "sample_token": sample_token,
            "translation": center.tolist(),
            "size": [float(w), float(l), float(h)],
            "rotation": (rot / np.linalg.norm(rot)).tolist(),
            "velocity": vel[:2].tolist(),
            "detection_name": name,
            "detection_score": float(score),
            "attribute_name": attribute_for(name, vel[:2]),
        })
    return out
