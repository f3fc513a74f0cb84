"""PETR's set-prediction loss: HungarianAssigner3D (focal cost + L1 on the first 8 code dims) and
sigmoid focal + weighted L1 losses on every decoder layer, averaged over the number of matched queries."""
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from .petr_geometry import normalize_bbox


def focal_cost(cls_logits, gt_labels, alpha=0.25, gamma=2.0, eps=1e-12):
    """FocalLossCost: (num_queries, num_gt) cost of giving each query each gt label."""
    p = cls_logits.sigmoid()
    neg = -(1 - p + eps).log() * (1 - alpha) * p.pow(gamma)
    pos = -(p + eps).log() * alpha * (1 - p).pow(gamma)
    return pos[:, gt_labels] - neg[:, gt_labels]


@torch.no_grad()
def hungarian_match(cls_logits, bbox_code, gt_labels, gt_code, cls_weight=2.0, bbox_weight=0.25,
                    alpha=0.25, gamma=2.0):
    """One-to-one assignment of queries to ground truth; returns (query_idx, gt_idx) LongTensors."""
    if gt_labels.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=cls_logits.device)
        return empty, empty
    cost = cls_weight * focal_cost(cls_logits, gt_labels, alpha, gamma)
    cost = cost + bbox_weight * torch.cdist(bbox_code[:, :8], gt_code[:, :8], p=1)
    cost = torch.nan_to_num(cost, nan=100.0, posinf=100.0, neginf=-100.0)
    rows, cols = linear_sum_assignment(cost.detach().cpu().double().numpy())
    dev = cls_logits.device
    return torch.as_tensor(rows, dtype=torch.long, device=dev), torch.as_tensor(cols, dtype=torch.long, device=dev)


def sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0):
    """Element-wise sigmoid focal loss (mmdet py_sigmoid_focal_loss), summed by the caller."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    pt = (1 - p) * targets + p * (1 - targets)
    w = (alpha * targets + (1 - alpha) * (1 - targets)) * pt.pow(gamma)
    return ce * w


def petr_loss(all_cls, all_code, gt_boxes, gt_labels, config):
    """Loss over all decoder layers.

    all_cls (L, B, Q, C) logits, all_code (L, B, Q, 10) predictions in metres/log-sizes; gt_boxes: list of
    (M, 9) LiDAR-frame (cx, cy, cz, w, l, h, yaw, vx, vy) gravity-centre boxes; gt_labels: list of (M,).
    """
    code_weights = torch.tensor(config.code_weights, device=all_code.device, dtype=all_code.dtype)
    num_layers, batch = all_cls.shape[:2]
    gt_codes = [normalize_bbox(b.to(all_code)) if b.numel() else b.new_zeros(0, config.code_size).to(all_code)
                for b in gt_boxes]
    num_pos = max(sum(int(l.numel()) for l in gt_labels), 1)
    losses = {}
    total = all_cls.new_zeros(())
    for layer in range(num_layers):
        cls_loss = all_cls.new_zeros(())
        box_loss = all_cls.new_zeros(())
        for b in range(batch):
            cls, code = all_cls[layer, b], all_code[layer, b]
            labels = gt_labels[b].to(cls.device).long()
            q_idx, g_idx = hungarian_match(cls, code, labels, gt_codes[b], config.match_cls_weight,
                                           config.match_bbox_weight, config.focal_alpha, config.focal_gamma)
            target = torch.zeros_like(cls)
            target[q_idx, labels[g_idx]] = 1.0
            cls_loss = cls_loss + sigmoid_focal_loss(cls, target, config.focal_alpha, config.focal_gamma).sum()
            if q_idx.numel():
                tgt = gt_codes[b][g_idx]
                finite = torch.isfinite(tgt).all(-1)
                diff = (code[q_idx][finite] - tgt[finite]).abs() * code_weights
                box_loss = box_loss + diff.sum()
        cls_loss = config.cls_loss_weight * cls_loss / num_pos
        box_loss = config.bbox_loss_weight * box_loss / num_pos
        losses[f"loss_cls_{layer}"] = cls_loss.detach()
        losses[f"loss_bbox_{layer}"] = box_loss.detach()
        total = total + cls_loss + box_loss
    return total, losses


def denoising_loss(dn_cls, dn_code, dn_meta, config):
    """Loss of the denoising queries: their targets are known (no matching). Queries whose noise exceeded
    `dn_split` are taught to be background, as in StreamPETR's prepare_for_dn."""
    idx, labels, boxes = dn_meta["index"], dn_meta["labels"], dn_meta["boxes"]
    code_weights = torch.tensor(config.code_weights, device=dn_code.device, dtype=dn_code.dtype)
    fg = labels < config.num_classes
    num = max(int(fg.sum()), 1)
    target_code = normalize_bbox(boxes.to(dn_code))
    losses, total = {}, dn_cls.new_zeros(())
    for layer in range(dn_cls.shape[0]):
        cls = dn_cls[layer][idx[:, 0], idx[:, 1]]
        target = torch.zeros_like(cls)
        target[fg.nonzero()[:, 0], labels[fg]] = 1.0
        cls_loss = config.cls_loss_weight * sigmoid_focal_loss(cls, target, config.focal_alpha,
                                                               config.focal_gamma).sum() / num
        code = dn_code[layer][idx[:, 0], idx[:, 1]][fg]
        box_loss = config.bbox_loss_weight * ((code - target_code[fg]).abs() * code_weights).sum() / num
        losses[f"loss_dn_cls_{layer}"], losses[f"loss_dn_bbox_{layer}"] = cls_loss.detach(), box_loss.detach()
        total = total + cls_loss + box_loss
    return total, losses


def box_corners_lidar(boxes):
    """(M, >=7) gravity-centre (cx, cy, cz, w, l, h, yaw) -> (M, 8, 3) corners; length along the yaw axis."""
    w, l, h, yaw = boxes[:, 3], boxes[:, 4], boxes[:, 5], boxes[:, 6]
    sx = boxes.new_tensor([1, 1, 1, 1, -1, -1, -1, -1])
    sy = boxes.new_tensor([1, -1, -1, 1, 1, -1, -1, 1])
    sz = boxes.new_tensor([1, 1, -1, -1, 1, 1, -1, -1])
    x, y, z = sx * l[:, None] / 2, sy * w[:, None] / 2, sz * h[:, None] / 2
    c, s = yaw.cos()[:, None], yaw.sin()[:, None]
    return torch.stack([c * x - s * y, s * x + c * y, z], -1) + boxes[:, None, :3]


@torch.no_grad()
def aux_2d_targets(lidar2img, boxes, labels, feat_hw, input_hw, num_classes):
    """Per feature cell of every camera: the class of the nearest ground-truth box whose projected 2-D
    extent covers the cell centre (num_classes = background) and that box's depth (camera z, metres).

    lidar2img (N, 4, 4); boxes (M, >=7) LiDAR frame; returns labels (N, H, W) long and depth (N, H, W)."""
    N = lidar2img.shape[0]
    H, W = feat_hw
    cls = torch.full((N, H, W), num_classes, dtype=torch.long, device=lidar2img.device)
    depth = torch.zeros(N, H, W, device=lidar2img.device)
    if boxes.numel() == 0:
        return cls, depth
    corners = box_corners_lidar(boxes.float())  # (M, 8, 3)
    pts = torch.cat([corners, torch.ones_like(corners[..., :1])], -1)
    cam = torch.einsum("nij,mkj->nmki", lidar2img.float(), pts)  # (N, M, 8, 4)
    z = cam[..., 2]
    centre = torch.einsum("nij,mj->nmi", lidar2img.float(),
                          torch.cat([boxes[:, :3].float(), torch.ones_like(boxes[:, :1]).float()], -1))
    uv = cam[..., :2] / z.clamp(min=0.1)[..., None]
    valid = (z > 0.1).all(-1) & (centre[..., 2] > 0.1)  # (N, M): box fully in front of the camera
    x0, x1 = uv[..., 0].amin(-1), uv[..., 0].amax(-1)
    y0, y1 = uv[..., 1].amin(-1), uv[..., 1].amax(-1)
    sy, sx = input_hw[0] / H, input_hw[1] / W
    cy = (torch.arange(H, device=lidar2img.device, dtype=torch.float32) + 0.5) * sy
    cx = (torch.arange(W, device=lidar2img.device, dtype=torch.float32) + 0.5) * sx
    inside = ((cy[None, None, :, None] >= y0[..., None, None]) & (cy[None, None, :, None] <= y1[..., None, None])
              & (cx[None, None, None, :] >= x0[..., None, None]) & (cx[None, None, None, :] <= x1[..., None, None])
              & valid[..., None, None])  # (N, M, H, W)
    d = torch.where(inside, centre[..., 2][..., None, None].expand_as(inside), torch.full_like(inside, 1e9,
                                                                                             dtype=torch.float32))
    best, idx = d.min(1)  # nearest box per cell
    hit = best < 1e9
    cls[hit] = labels.to(cls.device)[idx[hit]]
    depth[hit] = best[hit]
    return cls, depth


def aux_2d_loss(head, image_features, lidar2img, input_hw, labels, config):
    """Focal loss on per-cell classes + L1 on the depth of covered cells (a training-only auxiliary)."""
    B, N, C, H, W = image_features.shape
    out = head(image_features.flatten(0, 1)).view(B, N, -1, H, W)
    cls_losses, depth_losses, num_pos = [], [], 0
    for b in range(B):
        tcls, tdepth = aux_2d_targets(lidar2img[b], labels[b]["boxes"], labels[b]["class_labels"], (H, W), input_hw,
                                      config.num_classes)
        logits = out[b, :, :config.num_classes].permute(0, 2, 3, 1).reshape(-1, config.num_classes)
        target = F.one_hot(tcls.flatten(), config.num_classes + 1)[:, :config.num_classes].to(logits.dtype)
        cls_losses.append(sigmoid_focal_loss(logits, target, config.focal_alpha, config.focal_gamma).sum())
        pos = tcls < config.num_classes
        num_pos += int(pos.sum())
        if pos.any():
            depth_losses.append((out[b, :, -1][pos] - tdepth[pos] / 10.0).abs().sum())
    norm = max(num_pos, 1)
    cls_loss = config.aux_2d_weight * sum(cls_losses) / norm
    depth_loss = config.aux_2d_weight * (sum(depth_losses) / norm if depth_losses else out.sum() * 0)
    return cls_loss + depth_loss, {"loss_aux_cls": cls_loss.detach(), "loss_aux_depth": depth_loss.detach()}
