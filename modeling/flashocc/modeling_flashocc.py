"""FlashOcc (arXiv 2311.12058) and Panoptic-FlashOcc (arXiv 2406.10527) as Hugging Face custom-code models, pure
PyTorch (no mmcv / mmdet3d / CUDA ops). Forward path of the official BEVDetOCC / BEVDepthPano (Yzichen/FlashOCC @
4084861): ResNet C4 + C5 -> CustomFPN -> LSS depth net -> BEV pooling (index_add, the BEVPoolv2 index rule) ->
CustomResNet -> FPN_LSS -> channel-to-height occupancy head (+ CenterPoint centre branch when panoptic).

Every layer is a plain nn.Conv2d / nn.Linear / nn.BatchNorm2d module and every BatchNorm2d follows its convolution
either in an nn.Sequential or as `convolution` / `normalization` of one module, so generic quantizers (module
replacement, BatchNorm folding) apply. Sub-module names follow the official ones where the layout allows it;
convert_flashocc.py maps the rest."""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoBackbone, PreTrainedModel, ResNetConfig
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_flashocc import NUSC_CLASS_FREQUENCIES, FlashOccConfig
from .flashocc_geometry import (
    bev_pool_planned, camera_mlp_input, camera_plan, depth_targets, prepare_cameras,
)
from .flashocc_panoptic import assign_instances, center_loss, decode_centers
from .image_processing_flashocc import FlashOccImageProcessor

_EPS = torch.finfo(torch.float32).eps


@dataclass
class FlashOccModelOutput(ModelOutput):
    """bev_features (B, C, Dy, Dx): the BEV encoder output the heads read; depth (B, N, D, fH, fW) depth
    probabilities; depth_logits: the same before the softmax."""

    bev_features: torch.FloatTensor = None
    depth: torch.FloatTensor = None
    depth_logits: torch.FloatTensor = None


@dataclass
class FlashOccOutput(ModelOutput):
    """logits (B, Dx, Dy, Dz, num_classes): occupancy logits in the official (x, y, z, class) order; loss: total;
    loss_dict: its terms; center_heatmap (B, K, Dy, Dx) logits, center_offset (B, 2, Dy, Dx) (x, y) offsets in cells,
    center_height (B, 1, Dy, Dx) z in metres (panoptic only); center_extra: outputs of the other configured centre
    heads (e.g. dim / rot / vel with OFFICIAL_CENTER_HEADS); bev_features, depth as in FlashOccModelOutput."""

    loss: torch.FloatTensor = None
    logits: torch.FloatTensor = None
    loss_dict: dict = None
    center_heatmap: torch.FloatTensor = None
    center_offset: torch.FloatTensor = None
    center_height: torch.FloatTensor = None
    center_extra: dict = None
    bev_features: torch.FloatTensor = None
    depth: torch.FloatTensor = None


# ------------------------------------------------------------------ building blocks
class FlashOccConvBN(nn.Module):
    """Conv2d (no bias by default) -> BatchNorm2d -> ReLU (or nothing): mmcv's ConvModule with BN."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0, dilation=1, bias=False, relu=True):
        super().__init__()
        self.convolution = nn.Conv2d(cin, cout, kernel_size, stride, padding, dilation, bias=bias)
        self.normalization = nn.BatchNorm2d(cout)
        self.activation = nn.ReLU(inplace=True) if relu else nn.Identity()

    def forward(self, x):
        return self.activation(self.normalization(self.convolution(x)))


class FlashOccBasicBlock(nn.Module):
    """mmdet BasicBlock: conv3x3(stride)-BN-ReLU, conv3x3-BN, + shortcut, ReLU. CustomResNet's first block of a stage
    has a plain 3x3 stride-2 Conv2d (with bias, no BN) as shortcut."""

    def __init__(self, cin, cout, stride=1, downsample=False):
        super().__init__()
        self.conv1 = FlashOccConvBN(cin, cout, 3, stride, 1)
        self.conv2 = FlashOccConvBN(cout, cout, 3, 1, 1, relu=False)
        self.downsample = nn.Conv2d(cin, cout, 3, stride, 1) if downsample else None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv2(self.conv1(x)) + identity)


class FlashOccSimpleBackbone(nn.Module):
    """Plain CNN (one stride-2 stage of two 3x3 conv-BN-ReLU per channel entry) for CPU experiments; returns the last
    two stages (strides downsample and 2 * downsample)."""

    def __init__(self, channels):
        super().__init__()
        stages, cin = [], 3
        for c in channels:
            stages.append(nn.Sequential(FlashOccConvBN(cin, c, 3, 2, 1), FlashOccConvBN(c, c, 3, 1, 1)))
            cin = c
        self.stages = nn.ModuleList(stages)
        self.channels = list(channels[-2:])

    def forward(self, x):
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs[-2:]


class FlashOccFPN(nn.Module):
    """CustomFPN (num_outs=1, out_ids=[0], no norm / activation): 1x1 laterals, top-down nearest upsample-and-add,
    one 3x3 output conv on the finest level."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList([nn.Conv2d(out_channels, out_channels, 3, padding=1)])

    def forward(self, feats):
        lat = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
        return self.fpn_convs[0](lat[0])


class FlashOccSELayer(nn.Module):
    """BEVDepth camera-aware SE: x * sigmoid(conv_expand(relu(conv_reduce(x_se))))."""

    def __init__(self, channels):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, channels, 1)
        self.conv_expand = nn.Conv2d(channels, channels, 1)

    def forward(self, x, x_se):
        return x * torch.sigmoid(self.conv_expand(F.relu(self.conv_reduce(x_se))))


class FlashOccMlp(nn.Module):
    def __init__(self, cin, hidden, cout):
        super().__init__()
        self.fc1 = nn.Linear(cin, hidden)
        self.fc2 = nn.Linear(hidden, cout)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class FlashOccASPP(nn.Module):
    """DeepLab ASPP of the BEVDepth depth net: 1x1 and three dilated (6, 12, 18) 3x3 branches + image pooling,
    concatenated, projected back to `channels` (conv-BN-ReLU), dropout 0.5."""

    def __init__(self, channels, mid):
        super().__init__()
        self.aspp1 = FlashOccConvBN(channels, mid, 1)
        self.aspp2 = FlashOccConvBN(channels, mid, 3, padding=6, dilation=6)
        self.aspp3 = FlashOccConvBN(channels, mid, 3, padding=12, dilation=12)
        self.aspp4 = FlashOccConvBN(channels, mid, 3, padding=18, dilation=18)
        self.global_avg_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, mid, 1, bias=False),
                                             nn.BatchNorm2d(mid), nn.ReLU(inplace=True))
        self.project = FlashOccConvBN(5 * mid, channels, 1)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x):
        pooled = self.global_avg_pool(x).expand(-1, -1, *x.shape[-2:])  # = bilinear resize of a 1x1 map
        x = torch.cat([self.aspp1(x), self.aspp2(x), self.aspp3(x), self.aspp4(x), pooled], 1)
        return self.dropout(self.project(x))


class FlashOccDepthNet(nn.Module):
    """BEVDepth DepthNet (use_dcn=False, no stereo): reduce conv, camera-aware SE for context and depth (the 27 camera
    parameters through BatchNorm1d + MLPs), 3 BasicBlocks + ASPP + 1x1 conv for the depth logits."""

    def __init__(self, cin, mid, context_channels, depth_channels, aspp_mid):
        super().__init__()
        self.reduce_conv = nn.Sequential(nn.Conv2d(cin, mid, 3, padding=1), nn.BatchNorm2d(mid), nn.ReLU(inplace=True))
        self.context_conv = nn.Conv2d(mid, context_channels, 1)
        self.bn = nn.BatchNorm1d(27)
        self.depth_mlp = FlashOccMlp(27, mid, mid)
        self.depth_se = FlashOccSELayer(mid)
        self.context_mlp = FlashOccMlp(27, mid, mid)
        self.context_se = FlashOccSELayer(mid)
        self.depth_conv = nn.Sequential(FlashOccBasicBlock(mid, mid), FlashOccBasicBlock(mid, mid),
                                        FlashOccBasicBlock(mid, mid), FlashOccASPP(mid, aspp_mid),
                                        nn.Conv2d(mid, depth_channels, 1))

    def forward(self, x, mlp_input):
        mlp_input = self.bn(mlp_input.reshape(-1, mlp_input.shape[-1]))
        x = self.reduce_conv(x)
        context = self.context_conv(self.context_se(x, self.context_mlp(mlp_input)[..., None, None]))
        depth = self.depth_conv(self.depth_se(x, self.depth_mlp(mlp_input)[..., None, None]))
        return torch.cat([depth, context], 1)


class FlashOccViewTransformer(nn.Module):
    """LSS lift-splat: depth_net -> softmax over D depth bins (first D channels) and C context channels, then the
    pooling of depth_prob x context into the BEV grid (flashocc_geometry.bev_pool)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        D, C = config.num_depth_bins, config.bev_channels
        if config.depth_net_type == "lss":
            self.depth_net = nn.Conv2d(config.neck_channels, D + C, 1)
        else:
            mid = config.depth_net_mid_channels or config.neck_channels
            self.depth_net = FlashOccDepthNet(config.neck_channels, mid, C, D, config.aspp_mid_channels)

    def plan(self, sensor2ego, intrinsics, post_rots, post_trans, bda):
        """The BEV pooling plan of this camera setup (`flashocc_geometry.camera_plan`)."""
        return camera_plan(self.config, sensor2ego, intrinsics, post_rots, post_trans, bda)

    def forward(self, feat, sensor2ego, intrinsics, post_rots, post_trans, bda, bev_plan=None):
        cfg = self.config
        B, N, C_in, fh, fw = feat.shape
        x = feat.reshape(B * N, C_in, fh, fw)
        if cfg.depth_net_type == "lss":
            x = self.depth_net(x)
        else:
            x = self.depth_net(x, camera_mlp_input(sensor2ego, intrinsics, post_rots, post_trans, bda).to(x.dtype))
        D = cfg.num_depth_bins
        depth_logits = x[:, :D].reshape(B, N, D, fh, fw)
        depth = depth_logits.softmax(dim=2)
        context = x[:, D:D + cfg.bev_channels].reshape(B, N, cfg.bev_channels, fh, fw)
        if bev_plan is None:
            bev_plan = self.plan(sensor2ego, intrinsics, post_rots, post_trans, bda)
        bev = bev_pool_planned(depth, context, bev_plan, cfg.grid_size)
        return bev, depth, depth_logits


class FlashOccBEVResNet(nn.Module):
    """CustomResNet (Basic): stages of BasicBlocks, the first of each with stride 2 and a 3x3 conv shortcut."""

    def __init__(self, cin, channels, layers):
        super().__init__()
        stages = []
        for cout, n in zip(channels, layers):
            blocks = [FlashOccBasicBlock(cin, cout, stride=2, downsample=True)]
            blocks += [FlashOccBasicBlock(cout, cout) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.layers = nn.ModuleList(stages)

    def forward(self, x):
        feats = []
        for stage in self.layers:
            x = stage(x)
            feats.append(x)
        return feats


class FlashOccFPNLSS(nn.Module):
    """FPN_LSS: stage 3 upsampled to stage 1's size (bilinear, align_corners; the official x4, identical when the grid
    is a multiple of 8, and defined for any even grid) and concatenated after stage 1, two conv-BN-ReLU to 2 * out,
    x2 upsample, conv3x3-BN-ReLU to out, 1x1 conv (with bias)."""

    def __init__(self, cin, cout):
        super().__init__()
        mid = cout * 2
        self.conv = nn.Sequential(
            nn.Conv2d(cin, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True))
        self.up2 = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(mid, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 1))

    def forward(self, feats):
        low = feats[0]
        high = F.interpolate(feats[2], size=low.shape[-2:], mode="bilinear", align_corners=True)
        return self.up2(self.conv(torch.cat([low, high], 1)))


class FlashOccOccHead(nn.Module):
    """BEVOCCHead2D (channel-to-height): 3x3 conv + ReLU, permute (B, C, Dy, Dx) -> (B, Dx, Dy, C), Linear ->
    Softplus -> Linear to Dz * num_classes, viewed (B, Dx, Dy, Dz, num_classes): z-major, class-minor."""

    def __init__(self, cin, hidden, num_z, num_classes):
        super().__init__()
        self.num_z, self.num_classes = num_z, num_classes
        self.final_conv = nn.Conv2d(cin, hidden, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.predicter = nn.Sequential(nn.Linear(hidden, hidden * 2), nn.Softplus(),
                                       nn.Linear(hidden * 2, num_z * num_classes))

    def forward(self, x):
        x = self.act(self.final_conv(x)).permute(0, 3, 2, 1)
        B, dx, dy = x.shape[:3]
        return self.predicter(x).view(B, dx, dy, self.num_z, self.num_classes)


class FlashOccCenterHead(nn.Module):
    """Panoptic-FlashOcc Centerness_Head (one task): shared conv-BN-ReLU, then per output a SeparateHead branch of
    (convs - 1) conv-BN-ReLU and a final conv (kernel center_final_kernel). Returns (heatmap, reg, height, {other
    configured heads}); every built branch runs, so quantizers calibrate all of them."""

    def __init__(self, config):
        super().__init__()
        k, hc, sc = config.center_final_kernel, config.center_head_channels, config.center_share_channels
        self.shared_conv = FlashOccConvBN(config.bev_neck_channels, sc, 3, padding=1)
        outputs = dict(config.center_heads)
        outputs["heatmap"] = [len(config.center_class_names), config.center_heatmap_convs]
        self.heads = nn.ModuleDict()
        for name, (channels, convs) in outputs.items():
            layers, cin = [], sc
            for _ in range(convs - 1):
                layers.append(FlashOccConvBN(cin, hc, k, padding=k // 2))
                cin = hc
            final = nn.Conv2d(cin, channels, k, padding=k // 2)
            final._flashocc_heatmap_out = name == "heatmap"
            layers.append(final)
            self.heads[name] = nn.Sequential(*layers)

    def forward(self, x):
        x = self.shared_conv(x)
        extra = {name: head(x) for name, head in self.heads.items() if name not in ("heatmap", "reg", "height")}
        return self.heads["heatmap"](x), self.heads["reg"](x), self.heads["height"](x), extra


# ------------------------------------------------------------------ models
class FlashOccPreTrainedModel(PreTrainedModel):
    config_class = FlashOccConfig
    base_model_prefix = "model"
    main_input_name = "pixel_values"

    def get_image_processor(self, **kwargs):
        """The test-time pre-processing this model expects (shipped with the saved code)."""
        cfg = self.config
        opts = dict(input_size=cfg.input_size, image_mean=cfg.image_mean, image_std=cfg.image_std, bgr=cfg.bgr,
                    resize_test=cfg.resize_test, crop_h=cfg.crop_h)
        opts.update(kwargs)
        return FlashOccImageProcessor(**opts)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                if getattr(module, "_flashocc_heatmap_out", False):
                    init.constant_(module.bias, self.config.center_init_bias)
                else:
                    init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)


class FlashOccModel(FlashOccPreTrainedModel):
    """Images -> BEV features: backbone (C4, C5) -> CustomFPN -> LSS view transformer -> CustomResNet -> FPN_LSS."""

    def __init__(self, config):
        super().__init__(config)
        if config.backbone_type == "resnet":
            bcfg = dict(config.backbone_config)
            bcfg.pop("model_type", None)
            self.img_backbone = AutoBackbone.from_config(ResNetConfig(**bcfg))
            channels = list(self.img_backbone.channels)[-2:]
        else:
            self.img_backbone = FlashOccSimpleBackbone(config.simple_channels)
            channels = self.img_backbone.channels
        self.img_neck = FlashOccFPN(channels, config.neck_channels)
        self.view_transformer = FlashOccViewTransformer(config)
        self.bev_backbone = FlashOccBEVResNet(config.bev_in_channels, config.bev_backbone_channels,
                                              config.bev_backbone_layers)
        self.bev_neck = FlashOccFPNLSS(config.bev_backbone_channels[0] + config.bev_backbone_channels[2],
                                       config.bev_neck_channels)
        self.post_init()

    def image_features(self, pixel_values):
        B, N = pixel_values.shape[:2]
        x = pixel_values.flatten(0, 1)
        feats = self.img_backbone(x).feature_maps if self.config.backbone_type == "resnet" else self.img_backbone(x)
        x = self.img_neck(list(feats)[-2:])
        return x.view(B, N, *x.shape[1:])

    def geometry(self, pixel_values, intrinsics, sensor2ego, img_aug=None, post_rots=None, post_trans=None, bda=None,
                 ego2global=None):
        """The camera inputs as the view transformer takes them (`flashocc_geometry.prepare_cameras`)."""
        return prepare_cameras(self.config, pixel_values, intrinsics, sensor2ego, img_aug, post_rots, post_trans, bda,
                               ego2global)

    def bev_plan(self, pixel_values, intrinsics, sensor2ego, **camera):
        """The BEV pooling plan (flat cell / pixel / depth indices of the frustum points inside the grid) of these
        camera inputs: what BEVPoolv2 precomputes once per camera setup; `forward(..., bev_plan=)` takes it, and
        the ONNX export takes it as graph inputs."""
        return self.view_transformer.plan(*self.geometry(pixel_values, intrinsics, sensor2ego, **camera))

    def forward(self, pixel_values, intrinsics, sensor2ego, img_aug=None, post_rots=None, post_trans=None, bda=None,
                ego2global=None, bev_plan=None, **kwargs):
        """bev_plan: `bev_plan(...)` of the same camera inputs, to skip recomputing it (None: computed here)."""
        camera = self.geometry(pixel_values, intrinsics, sensor2ego, img_aug, post_rots, post_trans, bda, ego2global)
        feat = self.image_features(pixel_values)
        bev, depth, depth_logits = self.view_transformer(feat, *camera, bev_plan=bev_plan)
        bev = self.bev_neck(self.bev_backbone(bev))
        return FlashOccModelOutput(bev_features=bev, depth=depth, depth_logits=depth_logits)


class FlashOccForOccupancy(FlashOccPreTrainedModel):
    """FlashOcc occupancy model (+ the Panoptic-FlashOcc centre branch and instance clustering when panoptic)."""

    def __init__(self, config):
        super().__init__(config)
        self.model = FlashOccModel(config)
        self.occ_head = FlashOccOccHead(config.bev_neck_channels, config.occ_head_channels, config.num_occ_z,
                                        config.num_classes)
        self.center_head = FlashOccCenterHead(config) if config.panoptic else None
        self.post_init()

    def forward(self, pixel_values, intrinsics, sensor2ego, img_aug=None, post_rots=None, post_trans=None, bda=None,
                ego2global=None, labels=None, mask_camera=None, center_labels=None, depth_labels=None, bev_plan=None,
                **kwargs):
        """pixel_values (B, N, 3, H, W) from the image processor; intrinsics (B, N, 3, 3); sensor2ego (B, N, 4, 4)
        camera -> ego; img_aug (B, N, 3, 3) original -> network pixel map, or post_rots (B, N, 3, 3) + post_trans
        (B, N, 3) (the official form); bda (B, 3, 3) BEV augmentation (identity); ego2global (B, N, 4, 4) optional
        per-camera ego poses (cameras are then re-expressed in camera 0's ego frame, as the official prepare_inputs).
        labels: voxel_semantics (B, Dx, Dy, Dz) long (or a dict with keys voxel_semantics / mask_camera /
        center_labels / depth_labels); mask_camera (B, Dx, Dy, Dz) bool (needed when config.use_mask);
        center_labels (panoptic): one dict per sample {"boxes": (M, >=5) (x, y, z_gravity_centre, dx, dy, ...) in the
        BEV-augmented ego frame, "class_labels": (M,) index into config.center_class_names}; depth_labels
        (B, N, H, W) metric depth per input pixel (0 = none) for the BEVDepth depth loss; bev_plan:
        `self.model.bev_plan(...)` of the same camera inputs (precomputed BEV pooling indices; None: computed)."""
        if isinstance(labels, dict):
            mask_camera = labels.get("mask_camera", mask_camera)
            center_labels = labels.get("center_labels", center_labels)
            depth_labels = labels.get("depth_labels", depth_labels)
            labels = labels.get("voxel_semantics")
        cfg = self.config
        out = self.model(pixel_values, intrinsics, sensor2ego, img_aug=img_aug, post_rots=post_rots,
                         post_trans=post_trans, bda=bda, ego2global=ego2global, bev_plan=bev_plan)
        logits = self.occ_head(out.bev_features)
        heat = offset = height = extra = None
        if self.center_head is not None:
            heat, offset, height, extra = self.center_head(out.bev_features)
        loss_dict = {}
        if labels is not None:
            loss_dict["loss_occ"] = self.occupancy_loss(logits, labels, mask_camera)
        if center_labels is not None:
            if self.center_head is None:
                raise ValueError("center_labels given but the config is not panoptic (panoptic=True adds the branch)")
            loss_dict.update({k: v * cfg.center_loss_weight
                              for k, v in center_loss(heat, offset, height, center_labels, cfg).items()})
        if depth_labels is not None:
            loss_dict["loss_depth"] = self.depth_loss(out.depth, depth_labels)
        loss = sum(loss_dict.values()) if loss_dict else None
        return FlashOccOutput(loss=loss, logits=logits, loss_dict=loss_dict or None, center_heatmap=heat,
                              center_offset=offset, center_height=height, center_extra=extra or None,
                              bev_features=out.bev_features,
                              depth=out.depth)

    def class_weights(self, dtype, device):
        """1 / log(freq + 1e-3) per class (the official class_balance weights)."""
        freq = torch.tensor(NUSC_CLASS_FREQUENCIES[:self.config.num_classes], dtype=torch.float64)
        return (1 / torch.log(freq + 0.001)).to(dtype=dtype, device=device)

    def occupancy_loss(self, logits, voxel_semantics, mask_camera=None):
        """BEVOCCHead2D.loss: cross entropy (ignore_index) summed over the voxels of mask_camera (all voxels when
        use_mask is off) and divided by their number (with class_balance: class-weighted CE divided by the sum of
        the weights of those voxels' classes)."""
        cfg = self.config
        if tuple(voxel_semantics.shape) != tuple(logits.shape[:-1]):
            raise ValueError(f"voxel_semantics {tuple(voxel_semantics.shape)} must match the occupancy grid "
                             f"{tuple(logits.shape[:-1])} (B, Dx, Dy, Dz)")
        preds = logits.reshape(-1, cfg.num_classes)
        target = voxel_semantics.reshape(-1).long()
        weight = self.class_weights(preds.dtype, preds.device) if cfg.class_balance else None
        ce = F.cross_entropy(preds, target, weight=weight, ignore_index=cfg.ignore_index, reduction="none")
        if cfg.use_mask:
            if mask_camera is None:
                raise ValueError("config.use_mask=True (official FlashOcc): pass mask_camera (B, Dx, Dy, Dz), or build "
                                 "the config with use_mask=False to average over all voxels")
            m = mask_camera.reshape(-1).to(preds.dtype)
        else:
            m = torch.ones_like(ce)
        if cfg.class_balance:
            valid = (target != cfg.ignore_index) & (m > 0)
            avg = (weight[target.clamp(0, cfg.num_classes - 1)] * valid).sum()
        else:
            avg = m.sum()
        return (ce * m).sum() / (avg + _EPS)

    def depth_loss(self, depth, depth_labels):
        """BEVDepth get_depth_loss: binary cross entropy of the depth probabilities against the one-hot bin of the
        nearest LiDAR point per feature cell, over cells that have one, times depth_loss_weight."""
        cfg = self.config
        target = depth_targets(depth_labels, cfg.downsample, cfg.depth_bins).to(depth.device)
        pred = depth.permute(0, 1, 3, 4, 2).reshape(-1, depth.shape[2])
        fg = target.amax(1) > 0
        bce = F.binary_cross_entropy(pred[fg].float(), target[fg], reduction="none").sum()
        return cfg.depth_loss_weight * bce / max(1.0, float(fg.sum()))

    @torch.no_grad()
    def post_process(self, outputs):
        """Per sample {"semantics": (Dx, Dy, Dz) uint8 argmax class}; panoptic adds "instances" (Dx, Dy, Dz) int32
        (thing voxels: num_classes + rank of their nearest same-class centre, else the semantic id), "centers"
        (M, 3), "center_scores", "center_labels" (heatmap channels)."""
        cfg = self.config
        sem = outputs.logits.argmax(-1)
        results = [{"semantics": s.to(torch.uint8)} for s in sem]
        if cfg.panoptic and outputs.center_heatmap is not None:
            origin = (cfg.grid_x[0], cfg.grid_y[0], cfg.grid_z[0])
            for res, s, c in zip(results, sem, decode_centers(outputs.center_heatmap, outputs.center_offset,
                                                              outputs.center_height, cfg)):
                res["instances"] = assign_instances(s, c["centers"], c["labels"], cfg.center_to_occ,
                                                    cfg.thing_occ_classes, origin, cfg.occ_voxel_size,
                                                    cfg.num_classes)
                res.update(centers=c["centers"], center_scores=c["scores"], center_labels=c["labels"])
        return results
