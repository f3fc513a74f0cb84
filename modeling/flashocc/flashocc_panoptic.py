"""Panoptic-FlashOcc centre branch: CenterPoint heatmap targets / loss, centre decoding and the class-aware
nearest-centre instance clustering (read in Yzichen/FlashOCC @ 4084861: bev_centerpoint_head.py Centerness_Head,
centerpoint_bbox_coders.py center_decode, bevdet_occ.py BEVDepthPano.simple_test)."""
import math

import torch
import torch.nn.functional as F

_EPS = torch.finfo(torch.float32).eps  # mmdet's weight_reduce_loss divides by (avg_factor + eps)


# ------------------------------------------------------------------ targets (CenterPoint get_targets_single)
def gaussian_radius(height, width, min_overlap):
    """CornerNet / CenterPoint radius (in cells) keeping IoU >= min_overlap for a box of height x width cells."""
    b1 = height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1 ** 2 - 4 * c1)) / 2
    b2 = 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + math.sqrt(b2 ** 2 - 16 * c2)) / 2
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + math.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def draw_gaussian(heatmap, cx, cy, radius):
    """Max-paste a (2r+1)^2 Gaussian (sigma = (2r+1)/6, tails below eps * max zeroed) centred on cell (cx, cy)."""
    diameter = 2 * radius + 1
    sigma = diameter / 6
    r = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-(r[None, :] ** 2 + r[:, None] ** 2) / (2 * sigma * sigma))
    g[g < torch.finfo(torch.float64).eps * g.max()] = 0
    H, W = heatmap.shape
    left, right = min(cx, radius), min(W - cx, radius + 1)
    top, bottom = min(cy, radius), min(H - cy, radius + 1)
    if right <= 0 or bottom <= 0 or left < 0 or top < 0:
        return
    patch = heatmap[cy - top:cy + bottom, cx - left:cx + right]
    gauss = g[radius - top:radius + bottom, radius - left:radius + right].to(heatmap)
    torch.maximum(patch, gauss, out=patch)


def center_targets(center_labels, num_classes, grid_x, grid_y, height, width, gaussian_overlap, min_radius,
                   max_objs=500, device=None):
    """Per sample {"boxes": (M, >=5) ego-frame (x, y, z_gravity_centre, dx, dy, ...), "class_labels": (M,) heatmap
    channel} -> heatmap (B, K, H, W), indices (B, max_objs), mask (B, max_objs), targets (B, max_objs, 3) =
    (x offset in the cell, y offset, z). Cells are the BEV grid's (grid_x / grid_y = (lower, upper, cell))."""
    B = len(center_labels)
    heat = torch.zeros(B, num_classes, height, width, device=device)
    ind = torch.zeros(B, max_objs, dtype=torch.long, device=device)
    mask = torch.zeros(B, max_objs, dtype=torch.bool, device=device)
    target = torch.zeros(B, max_objs, 3, device=device)
    for b, t in enumerate(center_labels):
        boxes = t["boxes"].detach().float().cpu()
        labels = t["class_labels"].detach().long().cpu()
        for k in range(min(len(labels), max_objs)):
            x, y, z, size_x, size_y = (float(v) for v in boxes[k, :5])
            w, ln = size_x / grid_x[2], size_y / grid_y[2]
            if not (w > 0 and ln > 0):
                continue
            radius = max(min_radius, int(gaussian_radius(ln, w, gaussian_overlap)))
            fx = torch.tensor((x - grid_x[0]) / grid_x[2], dtype=torch.float32)
            fy = torch.tensor((y - grid_y[0]) / grid_y[2], dtype=torch.float32)
            ix, iy = int(fx), int(fy)  # int32 cast in the official code: truncation toward zero
            if not (0 <= ix < width and 0 <= iy < height):
                continue
            draw_gaussian(heat[b, int(labels[k])], ix, iy, radius)
            ind[b, k] = iy * width + ix
            mask[b, k] = True
            target[b, k] = torch.tensor([float(fx) - ix, float(fy) - iy, z])
    return heat, ind, mask, target


def gaussian_focal_loss(pred, target, alpha=2.0, gamma=4.0):
    """mmdet GaussianFocalLoss (element-wise): positives where target == 1, negatives weighted by (1 - target)^gamma."""
    eps = 1e-12
    pos = -(pred + eps).log() * (1 - pred).pow(alpha) * target.eq(1)
    neg = -(1 - pred + eps).log() * pred.pow(alpha) * (1 - target).pow(gamma)
    return pos + neg


def center_loss(heatmap_logits, offset, height, center_labels, config):
    """Centerness_Head.loss with task_specific_weight [1, 1, 0, 0, 0]: Gaussian focal loss on clip_sigmoid(heatmap)
    (divided by the number of peak cells) + reg_weight * L1 on the xy offset + reg_weight * L1 on the height (each
    divided by the number of boxes + 1e-4)."""
    B, K, H, W = heatmap_logits.shape
    heat_t, ind, mask, target = center_targets(
        center_labels, K, config.grid_x, config.grid_y, H, W, config.center_gaussian_overlap,
        config.center_min_radius, max(config.center_max_num, 1), heatmap_logits.device)
    pred = heatmap_logits.sigmoid().clamp(1e-4, 1 - 1e-4)  # mmdet3d clip_sigmoid
    num_pos = max(float(heat_t.eq(1).sum()), 1.0)
    loss_hm = gaussian_focal_loss(pred, heat_t).sum() / (num_pos + _EPS)
    reg = torch.cat([offset, height], 1).permute(0, 2, 3, 1).reshape(B, H * W, 3)
    reg = reg.gather(1, ind.unsqueeze(-1).expand(-1, -1, 3))
    w = mask.unsqueeze(-1).float()
    num = max(float(mask.sum()), 1e-4) + 1e-4
    l1 = (reg - target).abs() * w
    loss_xy = l1[..., :2].sum() / (num + _EPS) * config.center_reg_weight
    loss_z = l1[..., 2:].sum() / (num + _EPS) * config.center_reg_weight
    return {"loss_heatmap": loss_hm, "loss_center_xy": loss_xy, "loss_center_z": loss_z}


# ------------------------------------------------------------------ decoding (get_centers + center_decode)
@torch.no_grad()
def decode_centers(heatmap_logits, offset, height, config):
    """Per sample {"centers": (M, 3) ego xyz, "scores": (M,), "labels": (M,) heatmap channel}: sigmoid, 3x3 max-pool
    NMS, top-K per class then top-K overall (K = center_max_num), x = (col + offset_x) * cell + lower (y likewise),
    z = height, kept when score > threshold and inside center_post_center_range."""
    B, C, H, W = heatmap_logits.shape
    heat = heatmap_logits.sigmoid()
    heat = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat).float()
    k = min(config.center_max_num, H * W)
    cls_scores, cls_inds = heat.view(B, C, -1).topk(k)  # (B, C, k)
    scores, sel = cls_scores.view(B, -1).topk(k)  # (B, k)
    labels = torch.div(sel, k, rounding_mode="floor")
    inds = cls_inds.view(B, -1).gather(1, sel)
    ys = torch.div(inds, W, rounding_mode="floor").float()
    xs = (inds % W).float()
    off = offset.permute(0, 2, 3, 1).reshape(B, H * W, 2).gather(1, inds.unsqueeze(-1).expand(-1, -1, 2))
    hei = height.permute(0, 2, 3, 1).reshape(B, H * W, 1).gather(1, inds.unsqueeze(-1))
    x = (xs + off[..., 0]) * config.grid_x[2] + config.grid_x[0]
    y = (ys + off[..., 1]) * config.grid_y[2] + config.grid_y[0]
    centers = torch.stack([x, y, hei[..., 0]], -1)
    rng = torch.tensor(config.center_post_center_range, device=centers.device, dtype=centers.dtype)
    keep = (centers >= rng[:3]).all(-1) & (centers <= rng[3:]).all(-1)
    if config.center_score_threshold:  # the official truthiness test: 0 / None disable the threshold
        keep &= scores > config.center_score_threshold
    return [{"centers": centers[b, keep[b]], "scores": scores[b, keep[b]], "labels": labels[b, keep[b]]}
            for b in range(B)]


# ------------------------------------------------------------------ clustering (BEVDepthPano.simple_test)
@torch.no_grad()
def assign_instances(semantics, centers, labels, center_to_occ, thing_classes, occ_origin, occ_voxel,
                     id_offset, chunk=65536):
    """Class-aware nearest-centre clustering. semantics (X, Y, Z) occupancy classes; centers (M, 3) ego xyz; labels
    (M,) heatmap channels. Centres go to voxel units with `.int()` truncation ((xyz - origin) / voxel); every voxel of
    a thing class c joins the nearest centre (squared integer distance, first one on ties) among the centres whose
    channel maps to c; its id is id_offset + the centre's rank in the centre list stably sorted by channel (the
    official CPU path). Other voxels, and thing voxels of a class without centres, keep their semantic id."""
    inst = semantics.to(torch.int32).clone()
    if len(labels) == 0:
        return inst
    dev = semantics.device
    origin = torch.as_tensor(occ_origin, dtype=centers.dtype, device=dev)
    voxel = torch.as_tensor(occ_voxel, dtype=centers.dtype, device=dev)
    cvox = ((centers.to(dev) - origin) / voxel).to(torch.int32).long()
    labels = labels.to(dev).long()
    rank = torch.empty_like(labels)
    rank[torch.sort(labels, stable=True).indices] = torch.arange(len(labels), device=dev)
    occ_of = torch.as_tensor(center_to_occ, device=dev)[labels]
    for c in thing_classes:
        vox = (semantics == c).nonzero()  # (V, 3) x, y, z
        sel = (occ_of == c).nonzero().flatten()
        if len(vox) == 0 or len(sel) == 0:
            continue
        best = torch.cat([((v[:, None, :] - cvox[sel][None]) ** 2).sum(-1).argmin(1) for v in vox.split(chunk)])
        inst[vox[:, 0], vox[:, 1], vox[:, 2]] = (id_offset + rank[sel[best]]).to(torch.int32)
    return inst
