"""Lift-splat geometry of FlashOcc's LSS view transformer (BEVDet's LSSViewTransformer with BEVPoolv2), in plain torch.

Conventions (read in the official view_transformer.py, Yzichen/FlashOCC @ 4084861):
- frustum (D, fH, fW, 3) of (u, v, d): u = linspace(0, W_in - 1, fW), v = linspace(0, H_in - 1, fH) in network-input
  pixels, d = torch.arange(start, stop, step) (float32);
- a frustum point goes to the ego frame as bda @ (R_cam2ego @ K^-1 @ (d * u', d * v', d) + t_cam2ego) where
  (u', v', 1) = post_rot^-1 @ ((u, v, d) - post_tran) undoes the image resize / crop / flip / rotation;
- voxel index = ((p - lower) / cell) cast with `.long()`, i.e. TRUNCATED TOWARD ZERO (not floored): a point up to one
  cell below the lower bound still lands in cell 0; a point is kept when 0 <= index < size on all three axes;
- the pooled map is the sum over points of depth_prob * feature per cell, laid out (B, C, Dz, Dy, Dx) and then
  z-collapsed with torch.cat(unbind(dim=2), 1): channel = z * C + c (z-major).
"""
import torch
import torch.nn.functional as F


def create_frustum(depth_bins, input_size, downsample, device=None):
    """(D, fH, fW, 3) frustum of (u, v, d) for the network input `input_size` (H, W) at stride `downsample`."""
    h_in, w_in = input_size
    fh, fw = h_in // downsample, w_in // downsample
    d = torch.arange(*depth_bins, dtype=torch.float32, device=device)
    n = d.numel()
    us = torch.linspace(0, w_in - 1, fw, dtype=torch.float32, device=device)
    vs = torch.linspace(0, h_in - 1, fh, dtype=torch.float32, device=device)
    return torch.stack([us.view(1, 1, fw).expand(n, fh, fw), vs.view(1, fh, 1).expand(n, fh, fw),
                        d.view(n, 1, 1).expand(n, fh, fw)], dim=-1)


def augmentation_to_post(img_aug):
    """(..., 3, 3) 2-D homogeneous image augmentation [[a, b, tx], [c, d, ty], [0, 0, 1]] (original pixel -> network
    pixel) -> the official post_rots (..., 3, 3) = [[a, b, 0], [c, d, 0], [0, 0, 1]] and post_trans (..., 3) =
    (tx, ty, 0)."""
    post_rots = torch.zeros_like(img_aug)
    post_rots[..., :2, :2] = img_aug[..., :2, :2]
    post_rots[..., 2, 2] = 1
    post_trans = torch.zeros_like(img_aug[..., 0])
    post_trans[..., :2] = img_aug[..., :2, 2]
    return post_rots, post_trans


def frustum_to_ego(frustum, sensor2ego, intrinsics, post_rots, post_trans, bda):
    """Frustum points in the (BEV-augmented) ego frame, (B, N, D, fH, fW, 3)."""
    B, N = sensor2ego.shape[:2]
    pts = frustum.to(sensor2ego)[None, None] - post_trans.view(B, N, 1, 1, 1, 3)
    undo_aug = torch.inverse(post_rots).view(B, N, 1, 1, 1, 3, 3)
    pts = (undo_aug @ pts.unsqueeze(-1))  # (B, N, D, fH, fW, 3, 1) = (u, v, d) in the original image
    pts = torch.cat([pts[..., :2, :] * pts[..., 2:3, :], pts[..., 2:3, :]], dim=-2)  # (d u, d v, d)
    cam_to_ego = sensor2ego[:, :, :3, :3] @ torch.inverse(intrinsics)  # R K^-1
    pts = (cam_to_ego.view(B, N, 1, 1, 1, 3, 3) @ pts).squeeze(-1) + sensor2ego[:, :, :3, 3].view(B, N, 1, 1, 1, 3)
    return (bda.view(B, 1, 1, 1, 1, 3, 3) @ pts.unsqueeze(-1)).squeeze(-1)


def voxel_indices(points, grid_lower, grid_cell, grid_size):
    """Integer (x, y, z) cell of every point and whether it is inside the grid (the official BEVPoolv2 rule:
    `.long()` truncation toward zero, then 0 <= index < size)."""
    lower = torch.as_tensor(grid_lower, dtype=points.dtype, device=points.device)
    cell = torch.as_tensor(grid_cell, dtype=points.dtype, device=points.device)
    idx = ((points - lower) / cell).long()
    size = torch.as_tensor(grid_size, device=points.device)
    kept = ((idx >= 0) & (idx < size)).all(-1)
    return idx, kept


def bev_pool_plan(points, grid_lower, grid_cell, grid_size):
    """What BEVPoolv2 computes once per camera setup (its ranks_bev / ranks_feat / ranks_depth): for every frustum
    point inside the grid, points (B, N, D, fH, fW, 3) in ego coordinates, its flat BEV cell (b, z, y, x), its
    feature pixel (b, n, v, u) and its depth probability (b, n, d, v, u); int64 (K,) each."""
    B, N, D, fh, fw = points.shape[:5]
    dx, dy, dz = grid_size
    idx, kept = voxel_indices(points, grid_lower, grid_cell, grid_size)
    batch = torch.arange(B, device=points.device).view(B, 1, 1, 1, 1).expand(B, N, D, fh, fw)
    cell = ((batch * dz + idx[..., 2]) * dy + idx[..., 1]) * dx + idx[..., 0]  # (b, z, y, x) row-major
    # one feature vector per pixel, shared by its D depth bins
    pixel = torch.arange(B * N * fh * fw, device=points.device).view(B, N, 1, fh, fw).expand(B, N, D, fh, fw)
    prob = torch.arange(B * N * D * fh * fw, device=points.device).view(B, N, D, fh, fw)
    return cell[kept], pixel[kept], prob[kept]


def bev_pool_planned(depth, feat, plan, grid_size):
    """Splat depth_prob x feature with a `bev_pool_plan`: depth (B, N, D, fH, fW), feat (B, N, C, fH, fW) ->
    (B, C * Dz, Dy, Dx), channel = z * C + c (the official layout). Gathers and one scatter-add, so it exports to ONNX
    (Gather, ScatterElements with reduction "add") with the plan as graph inputs."""
    B = depth.shape[0]
    C = feat.shape[2]
    dx, dy, dz = grid_size
    cell, pixel, prob = plan
    feat_pix = feat.permute(0, 1, 3, 4, 2).reshape(-1, C)
    values = depth.reshape(-1)[prob].unsqueeze(-1) * feat_pix[pixel]
    out = feat.new_zeros(B * dz * dy * dx, C).scatter_add(0, cell.unsqueeze(-1).expand(-1, C), values)
    return out.view(B, dz, dy, dx, C).permute(0, 1, 4, 2, 3).reshape(B, dz * C, dy, dx)


def bev_pool(depth, feat, points, grid_lower, grid_cell, grid_size):
    """Splat depth_prob x feature into BEV cells: depth (B, N, D, fH, fW), feat (B, N, C, fH, fW), points
    (B, N, D, fH, fW, 3) ego coordinates -> (B, C * Dz, Dy, Dx), channel = z * C + c (the official layout)."""
    return bev_pool_planned(depth, feat, bev_pool_plan(points, grid_lower, grid_cell, grid_size), grid_size)


def prepare_cameras(config, pixel_values, intrinsics, sensor2ego, img_aug=None, post_rots=None, post_trans=None,
                    bda=None, ego2global=None):
    """The camera inputs as the view transformer takes them, float32: (sensor2ego (re-expressed in camera 0's ego
    frame when ego2global is given), intrinsics, post_rots, post_trans, bda), from either img_aug or the official
    post_rots + post_trans (identity when neither)."""
    if pixel_values.dim() != 5:
        raise ValueError(f"pixel_values must be (B, N_cams, 3, H, W), got {tuple(pixel_values.shape)}")
    B, N, _, H, W = pixel_values.shape
    if [H, W] != list(config.input_size):
        raise ValueError(f"pixel_values are {H}x{W} but the config's input_size is {config.input_size}: the LSS "
                         "frustum is built for input_size (use the model's image processor, or set input_size).")
    geo, dev = torch.float32, pixel_values.device  # geometry stays float32 whatever the model dtype
    if post_rots is None and post_trans is None:
        if img_aug is None:
            img_aug = torch.eye(3, dtype=geo, device=dev).expand(B, N, 3, 3)
        post_rots, post_trans = augmentation_to_post(img_aug.to(geo))
    elif post_rots is None or post_trans is None or img_aug is not None:
        raise ValueError("pass either img_aug (B, N, 3, 3) or both post_rots (B, N, 3, 3) and post_trans (B, N, 3)")
    if bda is None:
        bda = torch.eye(3, dtype=geo, device=dev).expand(B, 3, 3)
    bda = bda[..., :3, :3]
    sensor2ego = sensor2ego.to(geo)
    if ego2global is not None:
        sensor2ego = ego_alignment(sensor2ego, ego2global)
    return sensor2ego, intrinsics.to(geo), post_rots.to(geo), post_trans.to(geo), bda.to(geo)


def camera_plan(config, sensor2ego, intrinsics, post_rots, post_trans, bda):
    """The BEV pooling plan (`bev_pool_plan`) of prepared camera inputs: the frustum of the config lifted to the ego
    frame (recomputed per call: transformers v5 leaves non-persistent buffers uninitialised)."""
    frustum = create_frustum(config.depth_bins, config.input_size, config.downsample, sensor2ego.device)
    points = frustum_to_ego(frustum, sensor2ego, intrinsics, post_rots, post_trans, bda)
    return bev_pool_plan(points, [config.grid_x[0], config.grid_y[0], config.grid_z[0]],
                         [config.grid_x[2], config.grid_y[2], config.grid_z[2]], config.grid_size)


def camera_mlp_input(sensor2ego, intrinsics, post_rots, post_trans, bda):
    """BEVDepth's 27 camera parameters per view (B, N, 27): fx, fy, cx, cy, post_rot[0, :2], post_tran[0],
    post_rot[1, :2], post_tran[1], bda[0, :2], bda[1, :2], bda[2, 2], then sensor2ego[:3, :] row by row."""
    B, N = sensor2ego.shape[:2]
    bda = bda.view(B, 1, 3, 3).expand(B, N, 3, 3)
    k, r, t = intrinsics, post_rots, post_trans
    cols = [k[..., 0, 0], k[..., 1, 1], k[..., 0, 2], k[..., 1, 2], r[..., 0, 0], r[..., 0, 1], t[..., 0],
            r[..., 1, 0], r[..., 1, 1], t[..., 1], bda[..., 0, 0], bda[..., 0, 1], bda[..., 1, 0], bda[..., 1, 1],
            bda[..., 2, 2]]
    return torch.cat([torch.stack(cols, -1), sensor2ego[:, :, :3, :].reshape(B, N, 12)], -1)


def depth_targets(depth_map, downsample, depth_bins):
    """BEVDepth depth supervision: per-pixel metric depth (B, N, H, W) (0 = no LiDAR point) -> one-hot bins
    (B * N * fH * fW, D) of the nearest point in each downsample x downsample patch (all-zero rows = no target).
    bin = trunc((depth - start) / step + 1) - 1 (the official `.long()` of (depth - (start - step)) / step, then the
    one-hot's column 0 dropped); depths below start or at/after start + D * step get no target."""
    B, N, H, W = depth_map.shape
    start, stop, step = depth_bins
    D = torch.arange(*depth_bins).numel()
    patches = depth_map.view(B * N, H // downsample, downsample, W // downsample, downsample)
    patches = patches.permute(0, 1, 3, 2, 4).reshape(-1, downsample * downsample)
    nearest = torch.where(patches == 0, torch.full_like(patches, 1e5), patches).amin(-1)
    bins = (nearest - (start - step)) / step
    bins = torch.where((bins < D + 1) & (bins >= 0), bins, torch.zeros_like(bins))
    return F.one_hot(bins.long(), num_classes=D + 1)[:, 1:].float()


def ego_alignment(sensor2ego, ego2global):
    """BEVDet prepare_inputs: express every camera in the ego frame of camera 0 (each nuScenes camera has its own
    ego pose, taken at its own timestamp): inv(ego2global[:, 0]) @ ego2global @ sensor2ego, in float64."""
    key = torch.inverse(ego2global[:, :1].double())
    return (key @ ego2global.double() @ sensor2ego.double()).to(sensor2ego.dtype)
