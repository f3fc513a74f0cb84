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
