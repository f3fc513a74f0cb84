"""PETR (arXiv 2203.05625) as a Hugging Face custom-code model, with StreamPETR's memory queue and PETRv2's
multi-frame input / feature-guided PE as options. Follows the official PETRHead forward step by step (see
docs: vision.md section 1); names of sub-modules mirror the official keys so the converter stays simple."""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoBackbone, PreTrainedModel, ResNetConfig
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_petr import PetrConfig
from .petr_geometry import (
    boxes_to_nuscenes, decode_predictions, depth_bins, frustum_points, frustum_to_channels,
    inverse_sigmoid, pos2posemb3d, sine_encoding_3d,
)
from .image_processing_petr import PetrImageProcessor
from .petr_loss import aux_2d_loss, denoising_loss, petr_loss
from .vovnet import VoVNet


@dataclass
class PetrModelOutput(ModelOutput):
    """intermediate: (L, B, Q, C) post-normed decoder outputs; reference_points: (B, Q, 3) in [0, 1] of
    pc_range; memory: the ego-aligned StreamPETR memory that was used (None without memory)."""

    intermediate: torch.FloatTensor = None
    reference_points: torch.FloatTensor = None
    memory: dict = None
    image_features: torch.FloatTensor = None


@dataclass
class PetrDetectionOutput(ModelOutput):
    """logits (L, B, Q, num_classes); pred_boxes (L, B, Q, 10) code (cx, cy, log w, log l, cz, log h, sin,
    cos, vx, vy) in metres; memory: the StreamPETR queue to pass to the next frame."""

    loss: torch.FloatTensor = None
    logits: torch.FloatTensor = None
    pred_boxes: torch.FloatTensor = None
    loss_dict: dict = None
    memory: dict = None


class PetrSimpleBackbone(nn.Module):
    """Plain CNN (one stride-2 stage of two 3x3 conv-BN-ReLU per channel entry) for CPU-sized experiments."""

    def __init__(self, channels, num_outs):
        super().__init__()
        stages, cin = [], 3
        for c in channels:
            stages.append(nn.Sequential(
                nn.Conv2d(cin, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)))
            cin = c
        self.stages = nn.ModuleList(stages)
        self.channels = list(channels[-num_outs:])
        self.num_outs = num_outs

    def forward(self, x):
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs[-self.num_outs:]


class PetrOffsetConv(nn.Conv2d):
    """The offset / mask predictor of `PetrDeformConv2d`; initialised to zero (no offset, mask 0.5), as mmcv's."""


def deform_conv2d(x, offset, weight, mask, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """Modulated deformable convolution (DCNv2) in plain torch: tap k of the kernel reads x at its regular position
    plus (offset[:, 2k], offset[:, 2k + 1]) = (dy, dx), bilinearly (zero outside the image), times mask[:, k]; the
    same layout as mmcv's modulated_deform_conv2d and torchvision.ops.deform_conv2d (whose PyPI build does not
    load against this project's CPU torch)."""
    B, C, H, W = x.shape
    kh, kw = weight.shape[-2:]
    Ho, Wo = offset.shape[-2:]
    ys = torch.arange(Ho, device=x.device, dtype=x.dtype) * stride[0] - padding[0]
    xs = torch.arange(Wo, device=x.device, dtype=x.dtype) * stride[1] - padding[1]
    taps = []
    for k in range(kh * kw):
        i, j = divmod(k, kw)
        py = ys[:, None] + i * dilation[0] + offset[:, 2 * k]  # (B, Ho, Wo)
        px = xs[None, :] + j * dilation[1] + offset[:, 2 * k + 1]
        grid = torch.stack([2 * px / max(W - 1, 1) - 1, 2 * py / max(H - 1, 1) - 1], -1)
        taps.append(F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
                    * mask[:, k:k + 1])
    cols = torch.stack(taps, 2)  # (B, C, k*k, Ho, Wo)
    return torch.einsum("bckhw,ock->bohw", cols, weight.reshape(weight.shape[0], C, kh * kw))


class PetrDeformConv2d(nn.Module):
    """Modulated deformable 3x3 convolution (DCNv2, mmcv's ModulatedDeformConv2dPack): `conv_offset` predicts, per
    output position, 2*k*k offsets followed by k*k mask logits (sigmoid), as in the official R50-DCN backbones
    (stages 3-4). Keys: `weight`, `conv_offset.{weight,bias}`."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        k = conv.kernel_size[0]
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.weight = nn.Parameter(conv.weight.detach().clone())
        self.conv_offset = PetrOffsetConv(conv.in_channels, 3 * k * k, k, conv.stride, conv.padding, conv.dilation)

    def forward(self, x):
        out = self.conv_offset(x)
        kk = out.shape[1] // 3
        return deform_conv2d(x, out[:, :2 * kk], self.weight, out[:, 2 * kk:].sigmoid(), self.stride, self.padding,
                             self.dilation)


def use_deformable_stages(backbone, stages) -> None:
    """Replace the 3x3 convolution of every bottleneck in transformers-ResNet `stages` (1-based, official
    `stage_with_dcn`) by `PetrDeformConv2d`."""
    for i in stages:
        for block in backbone.encoder.stages[i - 1].layers:
            block.layer[1].convolution = PetrDeformConv2d(block.layer[1].convolution)


class PetrCPFPN(nn.Module):
    """CPFPN: 1x1 laterals, top-down nearest upsampling, a 3x3 output conv only on level 0 (the head's input)."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList([nn.Conv2d(out_channels, out_channels, 3, padding=1)])

    def forward(self, feats):
        lat = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
        return self.fpn_convs[0](lat[0])


class PetrFFN(nn.Module):
    def __init__(self, dims, hidden, dropout):
        super().__init__()
        self.fc1 = nn.Linear(dims, hidden)
        self.fc2 = nn.Linear(hidden, dims)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return x + self.dropout(self.fc2(self.dropout(F.relu(self.fc1(x)))))


class PetrPositionAdd(nn.Module):
    """`x + pos`: the position-embedding adds as modules (no parameters), so quantizers can observe and
    quantize both operands separately (Q-PETR: image features and 3D PE live on very different ranges).
    `hfq_op` declares the operation to hfq (which finds it by this attribute, not by the class name)."""

    hfq_op = "add"

    def forward(self, x, pos):
        return x + pos


class PetrSigmoid(nn.Module):
    """sigmoid as a module, so a quantizer can evaluate it its own way (FQ-PETR: through a lookup table)."""

    hfq_op = "sigmoid"

    def forward(self, x):
        return torch.sigmoid(x)


class PetrInverseSigmoid(nn.Module):
    """mmdet's inverse_sigmoid as a module (clamped to [0, 1], +-11.51 at the ends), like PetrSigmoid."""

    hfq_op = "inverse_sigmoid"

    def forward(self, x):
        return inverse_sigmoid(x)


class PetrDecoderLayer(nn.Module):
    """Post-norm layer: self-attn -> LN -> cross-attn (keys carry the 3D PE, values do not) -> LN -> FFN -> LN."""

    def __init__(self, config):
        super().__init__()
        d = config.embed_dims
        self.self_attn = nn.MultiheadAttention(d, config.num_heads, dropout=config.dropout)
        self.cross_attn = nn.MultiheadAttention(d, config.num_heads, dropout=config.dropout)
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(3))
        self.ffn = PetrFFN(d, config.ffn_dims, config.dropout)
        self.dropout = nn.Dropout(config.dropout)
        self.query_pos_add = PetrPositionAdd()  # tgt + query_pos (self- and cross-attention queries)
        self.key_pos_add = PetrPositionAdd()  # image feature + 3D PE (cross-attention keys)

    def forward(self, tgt, query_pos, memory, key_pos, key_padding_mask, extra_keys=None, extra_values=None,
                attn_mask=None, cross_attn_mask=None):
        q = self.query_pos_add(tgt, query_pos)
        k, v = q, tgt
        if extra_keys is not None:  # StreamPETR hybrid attention: memory entries as extra keys
            k, v = torch.cat([q, extra_keys], 0), torch.cat([tgt, extra_values], 0)
        sa = self.self_attn(q, k, v, attn_mask=attn_mask, need_weights=False)[0]
        tgt = self.norms[0](tgt + self.dropout(sa))
        attn = self.cross_attn(self.query_pos_add(tgt, query_pos), self.key_pos_add(memory, key_pos), memory,
                               key_padding_mask=key_padding_mask, attn_mask=cross_attn_mask, need_weights=False)[0]
        tgt = self.norms[1](tgt + self.dropout(attn))
        return self.norms[2](self.ffn(tgt))


class PetrDecoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(PetrDecoderLayer(config) for _ in range(config.num_decoder_layers))
        self.post_norm = nn.LayerNorm(config.embed_dims)

    def forward(self, tgt, query_pos, memory, key_pos, key_padding_mask, extra_keys=None, extra_values=None,
                attn_mask=None, cross_attn_mask=None):
        outs = []
        for layer in self.layers:
            tgt = layer(tgt, query_pos, memory, key_pos, key_padding_mask, extra_keys, extra_values, attn_mask,
                        cross_attn_mask)
            outs.append(self.post_norm(tgt))
        return torch.stack(outs)  # (L, Q, B, C)


class PetrSELayer(nn.Module):
    """PETRv2 feature-guided PE: pe3d * sigmoid(conv(relu(conv(img_feat))))."""

    def __init__(self, dims):
        super().__init__()
        self.conv_reduce = nn.Conv2d(dims, dims, 1)
        self.conv_expand = nn.Conv2d(dims, dims, 1)
        self.gate = PetrSigmoid()

    def forward(self, pe, feat):
        return pe * self.gate(self.conv_expand(F.relu(self.conv_reduce(feat))))


class PetrQFPE(nn.Module):
    """Q-/FQ-PETR's quantization-friendly position embedding input (arXiv 2502.15488, 2511.09347; design inferred
    from a third-party note, no official code: see docs/fqpetr.md). Each axis of the ray point at the fixed depth,
    normalised to [0, 1] (clamped), is embedded as the linear interpolation between the two of `K` learned anchors
    (at t = 0, 1/(K-1), ..., 1) that bracket it. Anchors are bounded through gamma * tanh, so every embedding value
    lies in [-gamma, gamma] (official inverse-sigmoid inputs reach +-11.5). Output channels: x, y, z embeddings
    concatenated (3 * dims), the official position_encoder's input width when dims = depth_num."""

    def __init__(self, num_anchors, dims, gamma):
        super().__init__()
        self.anchors = nn.Parameter(torch.empty(3, num_anchors, dims))
        self.gamma = gamma

    def forward(self, t):
        """t (M, H, W, 3) normalised coordinates -> (M, 3 * dims, H, W)."""
        K = self.anchors.shape[1]
        table = self.gamma * torch.tanh(self.anchors)  # (3, K, dims)
        s = t.clamp(0, 1) * (K - 1)
        idx = s.floor().clamp(max=K - 2)
        w = (s - idx)[..., None]
        idx = idx.long()
        emb = [table[a][idx[..., a]] * (1 - w[..., a, :]) + table[a][idx[..., a] + 1] * w[..., a, :] for a in range(3)]
        return torch.cat(emb, -1).permute(0, 3, 1, 2)


class PetrPreTrainedModel(PreTrainedModel):
    config_class = PetrConfig
    base_model_prefix = "model"
    main_input_name = "pixel_values"
    _no_split_modules = ["PetrDecoderLayer"]

    def get_image_processor(self, **kwargs):
        """The test-time pre-processing this model expects (shipped with the saved code)."""
        cfg = self.config
        return PetrImageProcessor(final_size=cfg.input_size, image_mean=cfg.image_mean, image_std=cfg.image_std,
                                  **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, nn.MultiheadAttention):
            init.xavier_uniform_(module.in_proj_weight)
            init.zeros_(module.in_proj_bias)
            init.xavier_uniform_(module.out_proj.weight)
            init.zeros_(module.out_proj.bias)
        elif isinstance(module, PetrFFN):
            for lin in (module.fc1, module.fc2):
                init.xavier_uniform_(lin.weight)
                init.zeros_(lin.bias)
        elif isinstance(module, nn.Embedding):
            init.uniform_(module.weight, 0.0, 1.0)  # anchors in normalised pc_range, used raw
        elif isinstance(module, PetrQFPE):
            init.normal_(module.anchors, 0.0, 1.0)
        elif isinstance(module, PetrOffsetConv):
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, PetrDeformConv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
            if module.weight is not None:
                init.ones_(module.weight)
                init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
            if getattr(module, "_petr_cls_out", False):
                init.constant_(module.bias, -math.log((1 - 0.01) / 0.01))  # prior prob 0.01


class PetrModel(PetrPreTrainedModel):
    """Backbone (+ CPFPN) -> input_proj, 3D position embedding, anchor queries, post-norm decoder."""

    def __init__(self, config):
        super().__init__(config)
        d = config.embed_dims
        num_outs = 2 if config.use_neck else 1
        if config.backbone_type == "resnet":
            bcfg = dict(config.backbone_config)
            bcfg.pop("model_type", None)
            self.backbone = AutoBackbone.from_config(ResNetConfig(**bcfg))
            use_deformable_stages(self.backbone, config.dcn_stages)
            channels = list(self.backbone.channels)[-num_outs:]
        elif config.backbone_type == "vovnet":
            self.backbone = VoVNet(config.vovnet_spec, ("stage4", "stage5")[-num_outs:])
            channels = self.backbone.channels
        else:
            self.backbone = PetrSimpleBackbone(config.simple_channels, num_outs)
            channels = self.backbone.channels
        self.neck = PetrCPFPN(channels, config.neck_channels) if config.use_neck else None
        in_ch = config.neck_channels if config.use_neck else channels[-1]
        self.input_proj = nn.Conv2d(in_ch, d, 1)
        self.qfpe = (PetrQFPE(config.qfpe_num_anchors, config.depth_num, config.qfpe_gamma)
                     if getattr(config, "pe_type", "petr") == "qfpe" else None)
        self.coords_logit = PetrInverseSigmoid() if self.qfpe is None else None
        self.position_encoder = nn.Sequential(
            nn.Conv2d(config.depth_num * 3, d * 4, 1), nn.ReLU(inplace=True), nn.Conv2d(d * 4, d, 1))
        if config.with_multiview:
            self.adapt_pos3d = nn.Sequential(
                nn.Conv2d(d * 3 // 2, d * 4, 1), nn.ReLU(inplace=True), nn.Conv2d(d * 4, d, 1))
        self.fpe = PetrSELayer(d) if config.with_fpe else None
        self.reference_points = nn.Embedding(config.num_queries, 3)
        self.query_embedding = nn.Sequential(nn.Linear(d * 3 // 2, d), nn.ReLU(inplace=True), nn.Linear(d, d))
        self.decoder = PetrDecoder(config)
        # optional (not in the official PETR): LayerNorm of the image tokens before they become keys/values
        self.memory_norm = nn.LayerNorm(d) if getattr(config, "memory_norm", False) else None
        self.post_init()

    def extract_features(self, pixel_values):
        B, N = pixel_values.shape[:2]
        x = pixel_values.flatten(0, 1)
        feats = self.backbone(x).feature_maps if self.config.backbone_type == "resnet" else self.backbone(x)
        feats = list(feats)[-(2 if self.config.use_neck else 1):]
        x = self.neck(feats) if self.neck is not None else feats[-1]
        return x.view(B, N, *x.shape[1:])

    def position_encoder_input(self, lidar2img, feat_hw, pad_hw, img2lidar=None):
        """The position_encoder's input per feature cell, (B*N, 3 * depth_num, H, W): official PETR = the inverse
        sigmoid of depth_num frustum points per ray (+-11.5); QFPE = anchor embeddings of one point at qfpe_depth."""
        cfg = self.config  # depths computed here, not stored: transformers v5 leaves non-persistent buffers empty
        if self.qfpe is not None:
            pts = frustum_points(lidar2img, feat_hw, pad_hw, torch.tensor([float(cfg.qfpe_depth)]), cfg.position_range,
                                 img2lidar)
            return self.qfpe(pts[..., 0, :].flatten(0, 1).transpose(1, 2))  # (B*N, H, W, 3)
        depths = depth_bins(cfg.depth_num, cfg.depth_start, cfg.position_range[3], cfg.use_lid)
        pts = frustum_points(lidar2img, feat_hw, pad_hw, depths, cfg.position_range, img2lidar)
        return self.coords_logit(frustum_to_channels(pts))

    def position_embedding(self, feat, lidar2img, pad_hw, img2lidar=None):
        """3D PE of every feature cell: `position_encoder_input` -> position_encoder."""
        B, N, _, H, W = feat.shape
        coords = self.position_encoder_input(lidar2img, (H, W), pad_hw, img2lidar)
        return self.position_encoder(coords).view(B, N, self.config.embed_dims, H, W)

    def query_pos(self, ref):
        return self.query_embedding(pos2posemb3d(ref, self.config.embed_dims // 2))

    def forward(self, pixel_values, lidar2img, pixel_mask=None, memory=None, ego_transform=None,
                dn_reference_points=None, img2lidar=None, **kwargs):
        """pixel_values (B, N, 3, H, W) normalised and padded; lidar2img (B, N, 4, 4) including the image
        augmentation; pixel_mask (B, N, H, W) 1 = real pixel; memory / ego_transform: StreamPETR queue from
        the previous frame and the 4x4 previous-LiDAR -> current-LiDAR transform; dn_reference_points
        (B, P, 3): denoising anchors put before the learned ones (training only, see dn_groups); img2lidar: the
        inverse of lidar2img when already known (`petr_geometry.img_to_lidar`; None: computed here)."""
        cfg = self.config
        if pixel_values.dim() != 5 or lidar2img.shape[:2] != pixel_values.shape[:2]:
            raise ValueError(f"pixel_values must be (B, N, 3, H, W) with lidar2img (B, N, 4, 4); got "
                             f"{tuple(pixel_values.shape)} and {tuple(lidar2img.shape)}.")
        if pixel_values.shape[1] % cfg.num_frames:
            raise ValueError(f"{pixel_values.shape[1]} views is not a multiple of num_frames={cfg.num_frames}; "
                             "stack the previous frames' views (with aligned lidar2img) after the current ones.")
        B, N, _, Hin, Win = pixel_values.shape
        feat = self.extract_features(pixel_values)
        x = self.input_proj(feat.flatten(0, 1))
        x = x.view(B, N, *x.shape[1:])
        H, W = x.shape[-2:]
        pad = torch.zeros(B, N, Hin, Win, device=x.device) if pixel_mask is None else 1.0 - pixel_mask.float()
        masks = F.interpolate(pad, size=(H, W)).to(torch.bool)
        pos = self.position_embedding(x, lidar2img.float(), (Hin, Win), img2lidar)
        if self.fpe is not None:
            pos = self.fpe(pos.flatten(0, 1), x.flatten(0, 1)).view(pos.shape)
        if cfg.with_multiview:
            sine = sine_encoding_3d(masks, cfg.embed_dims // 2)
            pos = pos + self.adapt_pos3d(sine.flatten(0, 1)).view(pos.shape)

        ref = self.reference_points.weight.unsqueeze(0).expand(B, -1, -1)
        if dn_reference_points is not None:
            ref = torch.cat([dn_reference_points.to(ref), ref], 1)
        tgt = torch.zeros(B, ref.shape[1], cfg.embed_dims, device=x.device, dtype=x.dtype)
        num_new = tgt.shape[1]  # queries of this frame (denoising + learned); memory ones are appended below
        extra_k = extra_v = None
        if memory is not None and cfg.memory_len > 0:
            memory = self.align_memory(memory, ego_transform)
            k = cfg.num_propagated
            ref = torch.cat([ref, memory["reference_points"][:, :k]], 1)
            tgt = torch.cat([tgt, memory["embedding"][:, :k]], 1)
            if memory["embedding"].shape[1] > k:
                rest_e, rest_r = memory["embedding"][:, k:], memory["reference_points"][:, k:]
                extra_v = rest_e.transpose(0, 1)
                extra_k = (rest_e + self.query_pos(rest_r)).transpose(0, 1)
        qpos = self.query_pos(ref)
        if getattr(cfg, "content_query_init", "zeros") == "query_pos":
            # optional (not in the official PETR): content queries start as their anchor embedding, not zeros
            tgt = torch.cat([qpos[:, :num_new], tgt[:, num_new:]], 1)

        mem = x.permute(1, 3, 4, 0, 2).reshape(-1, B, cfg.embed_dims)  # (N*H*W, B, C), order (n, h, w)
        if self.memory_norm is not None:
            mem = self.memory_norm(mem)
        key_pos = pos.permute(1, 3, 4, 0, 2).reshape(-1, B, cfg.embed_dims)
        attn_mask = None
        if dn_reference_points is not None:
            num_extra = 0 if extra_k is None else extra_k.shape[0]
            attn_mask = self.denoising_mask(dn_reference_points.shape[1], ref.shape[1], num_extra, x.device)
        key_padding_mask, cross_mask = masks.view(B, -1), None
        if getattr(cfg, "attn_prior_sigma", 0.0) > 0:
            cross_mask = self.projection_prior(ref, lidar2img.float(), (H, W), (Hin, Win))
            cross_mask = cross_mask.masked_fill(key_padding_mask[:, None, None, :], -1e4)
            cross_mask, key_padding_mask = cross_mask.flatten(0, 1), None
        inter = self.decoder(tgt.transpose(0, 1), qpos.transpose(0, 1), mem, key_pos, key_padding_mask,
                             extra_k, extra_v, attn_mask, cross_mask)
        return PetrModelOutput(intermediate=inter.transpose(1, 2), reference_points=ref, memory=memory,
                               image_features=x)

    @torch.no_grad()
    def projection_prior(self, ref, lidar2img, feat_hw, input_hw):
        """Optional (not in the official PETR; SMCA-style spatial prior for fast from-scratch training):
        additive cross-attention bias -d^2 / (2 sigma_h^2), d = distance in feature cells between a key token
        and the anchor's projection into that token's camera; sigma doubles per head (multi-scale); cameras
        that see the anchor behind them get -30. Returns (B, heads, Q, N*H*W) in the memory order (n, h, w)."""
        cfg = self.config
        H, W = feat_hw
        lo = torch.tensor(cfg.pc_range[:3], device=ref.device)
        hi = torch.tensor(cfg.pc_range[3:], device=ref.device)
        pts = ref * (hi - lo) + lo  # (B, Q, 3) LiDAR frame
        pts = torch.cat([pts, torch.ones_like(pts[..., :1])], -1)
        proj = torch.einsum("bnij,bqj->bnqi", lidar2img, pts)  # (B, N, Q, 4)
        z = proj[..., 2]
        uv = proj[..., :2] / z.clamp(min=1e-3)[..., None]
        cu = uv[..., 0] / (input_hw[1] / W) - 0.5  # in feature cells (cell centres at integers)
        cv = uv[..., 1] / (input_hw[0] / H) - 0.5
        gy = torch.arange(H, device=ref.device, dtype=torch.float32)
        gx = torch.arange(W, device=ref.device, dtype=torch.float32)
        d2 = (gy[None, None, None, :, None] - cv[..., None, None]) ** 2 \
            + (gx[None, None, None, None, :] - cu[..., None, None]) ** 2  # (B, N, Q, H, W)
        sigma = cfg.attn_prior_sigma * 2.0 ** torch.arange(cfg.num_heads, device=ref.device, dtype=torch.float32)
        bias = -d2[:, None] / (2 * sigma[None, :, None, None, None, None] ** 2)  # (B, heads, N, Q, H, W)
        bias = bias.clamp(min=-30.0).masked_fill((z <= 0.1)[:, None, :, :, None, None], -30.0)
        B, nh, N, Q = bias.shape[:4]
        return bias.permute(0, 1, 3, 2, 4, 5).reshape(B, nh, Q, N * H * W)

    def denoising_mask(self, pad, total, num_extra, device):
        """Self-attention mask (True = blocked): learned queries cannot see denoising ones (they would leak
        the ground truth), and each denoising group sees only itself and the learned queries."""
        mask = torch.zeros(total, total + num_extra, dtype=torch.bool, device=device)
        mask[pad:, :pad] = True
        group = pad // self.config.dn_groups
        for g in range(self.config.dn_groups):
            mask[g * group:(g + 1) * group, :g * group] = True
            mask[g * group:(g + 1) * group, (g + 1) * group:pad] = True
        return mask

    def align_memory(self, memory, ego_transform):
        """Move the stored reference points from the previous LiDAR frame into the current one."""
        if ego_transform is None:
            return memory
        lo = torch.tensor(self.config.pc_range[:3], device=ego_transform.device)
        hi = torch.tensor(self.config.pc_range[3:], device=ego_transform.device)
        pts = memory["reference_points"] * (hi - lo) + lo
        pts = torch.einsum("bij,bmj->bmi", ego_transform[:, :3, :3].float(), pts) + ego_transform[:, None, :3, 3]
        return {"embedding": memory["embedding"], "reference_points": ((pts - lo) / (hi - lo)).clamp(0, 1)}


def _cls_branch(config):
    d, layers = config.embed_dims, []
    for _ in range(config.num_reg_fcs):
        layers += [nn.Linear(d, d), nn.LayerNorm(d), nn.ReLU(inplace=True)]
    out = nn.Linear(d, config.num_classes)
    out._petr_cls_out = True
    return nn.Sequential(*layers, out)


def _reg_branch(config):
    d, layers = config.embed_dims, []
    for _ in range(config.num_reg_fcs):
        layers += [nn.Linear(d, d), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.Linear(d, config.code_size))


class PetrForObjectDetection3D(PetrPreTrainedModel):
    """PETR detector: PetrModel + per-layer cls/reg branches, set-prediction loss and NMS-free decoding."""

    def __init__(self, config):
        super().__init__(config)
        self.model = PetrModel(config)
        n = 1 if config.share_branches else config.num_decoder_layers
        self.cls_branches = nn.ModuleList(_cls_branch(config) for _ in range(n))
        self.reg_branches = nn.ModuleList(_reg_branch(config) for _ in range(n))
        self.anchor_logit = PetrInverseSigmoid()  # box centres = sigmoid(offset + inverse_sigmoid(anchor))
        self.centre_sigmoid = PetrSigmoid()
        # optional training-only 2-D auxiliary head on the image tokens (StreamPETR trains with a 2-D
        # auxiliary head too): per-cell class of the projected ground-truth box + its depth; unused at inference
        self.aux_head = (nn.Conv2d(config.embed_dims, config.num_classes + 1, 1)
                         if getattr(config, "aux_2d_weight", 0.0) > 0 else None)
        self.post_init()
        if self.aux_head is not None:
            with torch.no_grad():
                self.aux_head.bias[:-1].fill_(-math.log((1 - 0.01) / 0.01))

    def heads(self, intermediate, reference_points):
        """Per-layer class logits and box codes; centres are sigmoid(offset + inverse_sigmoid(anchor))."""
        pc = self.config.pc_range
        ref = self.anchor_logit(reference_points)
        logits, codes = [], []
        for lvl in range(intermediate.shape[0]):
            i = 0 if self.config.share_branches else lvl
            logits.append(self.cls_branches[i](intermediate[lvl]))
            tmp = self.reg_branches[i](intermediate[lvl])
            xy = self.centre_sigmoid(tmp[..., 0:2] + ref[..., 0:2])
            z = self.centre_sigmoid(tmp[..., 4:5] + ref[..., 2:3])
            x = xy[..., 0:1] * (pc[3] - pc[0]) + pc[0]
            y = xy[..., 1:2] * (pc[4] - pc[1]) + pc[1]
            z = z * (pc[5] - pc[2]) + pc[2]
            codes.append(torch.cat([x, y, tmp[..., 2:4], z, tmp[..., 5:]], -1))
        return torch.stack(logits), torch.stack(codes)

    def forward(self, pixel_values, lidar2img, pixel_mask=None, labels=None, memory=None, ego_transform=None,
                img2lidar=None, **kwargs):
        """labels: optional list (one per sample) of dicts {"boxes": (M, 9) LiDAR-frame gravity-centre
        (cx, cy, cz, w, l, h, yaw, vx, vy), "class_labels": (M,)}; gives `loss`. img2lidar: see PetrModel."""
        dn = None
        if labels is not None and self.training and self.config.dn_groups > 0:
            dn = self.prepare_denoising(labels, pixel_values.device)
        out = self.model(pixel_values, lidar2img, pixel_mask=pixel_mask, memory=memory, ego_transform=ego_transform,
                         dn_reference_points=None if dn is None else dn["reference_points"], img2lidar=img2lidar)
        logits, codes = self.heads(out.intermediate, out.reference_points)
        if dn is not None:  # split the denoising queries off; the outputs keep their usual shape
            pad = dn["reference_points"].shape[1]
            dn_logits, dn_codes = logits[:, :, :pad], codes[:, :, :pad]
            logits, codes = logits[:, :, pad:], codes[:, :, pad:]
            out.intermediate, out.reference_points = out.intermediate[:, :, pad:], out.reference_points[:, pad:]
        loss = loss_dict = None
        if labels is not None:
            loss, loss_dict = petr_loss(logits, codes, [t["boxes"] for t in labels],
                                        [t["class_labels"] for t in labels], self.config)
            if dn is not None and dn["index"].numel():
                dn_loss, dn_dict = denoising_loss(dn_logits, dn_codes, dn, self.config)
                loss = loss + dn_loss
                loss_dict.update(dn_dict)
            if self.aux_head is not None and self.training:
                aux_loss, aux_dict = aux_2d_loss(self.aux_head, out.image_features, lidar2img, pixel_values.shape[-2:],
                                                 labels, self.config)
                loss = loss + aux_loss
                loss_dict.update(aux_dict)
        new_memory = self.update_memory(out, logits, codes) if self.config.memory_len > 0 else None
        return PetrDetectionOutput(loss=loss, logits=logits, pred_boxes=codes, loss_dict=loss_dict,
                                   memory=new_memory)

    @torch.no_grad()
    def prepare_denoising(self, labels, device):
        """StreamPETR prepare_for_dn: `dn_groups` noisy copies of every gt centre (uniform noise of
        dn_noise_scale * half the box size); copies pushed beyond dn_split become background targets."""
        cfg = self.config
        B = len(labels)
        max_gt = max(int(t["class_labels"].numel()) for t in labels)
        pad = max_gt * cfg.dn_groups
        lo = torch.tensor(cfg.pc_range[:3], device=device)
        hi = torch.tensor(cfg.pc_range[3:], device=device)
        ref = torch.zeros(B, pad, 3, device=device)
        index, tgt_labels, tgt_boxes = [], [], []
        for b, t in enumerate(labels):
            boxes, cls = t["boxes"].to(device), t["class_labels"].to(device)
            n = cls.numel()
            for g in range(cfg.dn_groups if n else 0):
                rand = torch.rand(n, 3, device=device) * 2 - 1
                centre = boxes[:, :3] + rand * boxes[:, 3:6] / 2 * cfg.dn_noise_scale
                ref[b, g * max_gt:g * max_gt + n] = ((centre - lo) / (hi - lo)).clamp(0, 1)
                far = rand.norm(dim=-1) > cfg.dn_split
                index.append(torch.stack([torch.full((n,), b, device=device),
                                          torch.arange(g * max_gt, g * max_gt + n, device=device)], 1))
                tgt_labels.append(torch.where(far, torch.full_like(cls, cfg.num_classes), cls))
                tgt_boxes.append(boxes)
        if not index:
            return None
        return {"reference_points": ref, "index": torch.cat(index).long(), "labels": torch.cat(tgt_labels),
                "boxes": torch.cat(tgt_boxes)}

    @torch.no_grad()
    def update_memory(self, out, logits, codes):
        """StreamPETR queue: push the top-`num_propagated` last-layer queries (embedding + predicted centre)
        in front of the (already ego-aligned) old memory, keep `memory_len` entries."""
        cfg, k = self.config, self.config.num_propagated
        score = logits[-1].sigmoid().amax(-1)
        idx = score.topk(min(k, score.shape[1]), dim=1).indices
        emb = torch.gather(out.intermediate[-1], 1, idx[..., None].expand(-1, -1, cfg.embed_dims))
        lo = torch.tensor(cfg.pc_range[:3], device=codes.device)
        hi = torch.tensor(cfg.pc_range[3:], device=codes.device)
        centres = codes[-1][..., [0, 1, 4]]
        ref = torch.gather(((centres - lo) / (hi - lo)).clamp(0, 1), 1, idx[..., None].expand(-1, -1, 3))
        if out.memory is not None:
            emb = torch.cat([emb, out.memory["embedding"]], 1)
            ref = torch.cat([ref, out.memory["reference_points"]], 1)
        return {"embedding": emb[:, :cfg.memory_len].detach(), "reference_points": ref[:, :cfg.memory_len].detach()}

    @torch.no_grad()
    def post_process(self, outputs, lidar2ego=None, ego2global=None, sample_tokens=None):
        """Decode the last layer. Without poses: list of {"boxes" (K, 9) LiDAR frame, "scores", "labels"};
        with per-sample lidar2ego / ego2global (translation, quaternion wxyz): nuScenes result dicts."""
        cfg = self.config
        results = []
        for b in range(outputs.logits.shape[1]):
            dec = decode_predictions(outputs.logits[-1, b], outputs.pred_boxes[-1, b], cfg.max_num,
                                     cfg.post_center_range, cfg.num_classes)
            if lidar2ego is not None:
                token = sample_tokens[b] if sample_tokens is not None else None
                dec = boxes_to_nuscenes(dec, cfg.class_names, lidar2ego[b], ego2global[b], cfg.yaw_convention, token)
            results.append(dec)
        return results
