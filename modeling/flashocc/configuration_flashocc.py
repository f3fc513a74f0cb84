"""Configuration of FlashOcc (arXiv 2311.12058) and Panoptic-FlashOcc (arXiv 2406.10527) as a Hugging Face
custom-code model. Defaults are the official FlashOcc M1 config (`projects/configs/flashocc/flashocc-r50.py` of
Yzichen/FlashOCC @ 4084861); `flashocc_m0_kwargs()` and `panoptic_tiny_kwargs()` give the other official settings."""
import math

from transformers import PretrainedConfig

# Occ3D-nuScenes label ids (the order of `occ_class_names` in the official configs / bevdet_occ.py)
OCC3D_CLASSES = [
    "others", "barrier", "bicycle", "bus", "car", "construction_vehicle", "motorcycle", "pedestrian",
    "traffic_cone", "trailer", "truck", "driveable_surface", "other_flat", "sidewalk", "terrain", "manmade",
    "vegetation", "free",
]
# Detection classes in the order of the official configs' `class_names`, which is also the order of the labels in
# the BEVDet info files (tools/create_data_bevdet.py `classes`), hence of the centre heatmap channels
NUSCENES_DET_CLASSES = [
    "car", "truck", "construction_vehicle", "bus", "trailer", "barrier", "motorcycle", "bicycle", "pedestrian",
    "traffic_cone",
]
# bevdet_occ.py `detind2occind`, written for mmdet3d's default class order (car, truck, trailer, bus,
# construction_vehicle, bicycle, motorcycle, pedestrian, traffic_cone, barrier), NOT the configs' order above:
# applied to the heatmap channels of the official checkpoints it swaps trailer/construction_vehicle and sends
# barrier -> bicycle, bicycle -> pedestrian, pedestrian -> traffic_cone, traffic_cone -> barrier. Use
# `center_class_map="official"` to reproduce the official panoptic outputs bit for bit.
OFFICIAL_CENTER_TO_OCC = [4, 10, 9, 3, 5, 2, 6, 7, 8, 1]
# bevdet_occ.py BEVDepthPano `inst_class_ids`: occupancy classes that are split into instances
THING_OCC_CLASSES = [2, 3, 4, 5, 6, 7, 9, 10]
# bev_occ_head.py `nusc_class_frequencies` (voxel counts per Occ3D class); class_balance weights 1 / log(f + 1e-3)
NUSC_CLASS_FREQUENCIES = [
    944004, 1897170, 152386, 2391677, 16957802, 724139, 189027, 2074468, 413451, 2384460, 5916653, 175883646,
    4275424, 51393615, 61411620, 105975596, 116424404, 1892500630,
]
# CenterPoint `common_heads` of the panoptic configs: name -> (channels, number of convs). dim / rot / vel have loss
# weight 0 (task_specific_weight [1, 1, 0, 0, 0]) and are not run by the panoptic inference: the default config builds
# only reg and height (the converter drops the other three); pass center_heads=OFFICIAL_CENTER_HEADS to keep them.
OFFICIAL_CENTER_HEADS = {"reg": [2, 2], "height": [1, 2], "dim": [3, 2], "rot": [2, 2], "vel": [2, 2]}
PANOPTIC_CENTER_HEADS = {"reg": [2, 2], "height": [1, 2]}
DEFAULT_RESNET50 = {
    "model_type": "resnet", "layer_type": "bottleneck", "depths": [3, 4, 6, 3],
    "hidden_sizes": [256, 512, 1024, 2048], "embedding_size": 64, "out_features": ["stage3", "stage4"],
}


def _cells(axis, name):
    lo, hi, step = (float(v) for v in axis)
    n = (hi - lo) / step
    if step <= 0 or hi <= lo or abs(n - round(n)) > 1e-4:
        raise ValueError(f"{name}={list(axis)}: need (lower, upper, step) with step > 0 dividing upper - lower")
    return int(round(n))


class FlashOccConfig(PretrainedConfig):
    """FlashOcc / Panoptic-FlashOcc hyper-parameters; every size is configurable (tests shrink them).

    Image branch: `backbone_type` "resnet" = transformers' ResNet through `AutoBackbone` (`backbone_config`, a
    ResNetConfig dict; default ResNet-50 torchvision-style, outputs C4 + C5) or "simple" = a plain CNN with one
    stride-2 stage per `simple_channels` entry (its last two stages feed the neck) for CPU experiments.
    `neck_channels`: CustomFPN output (one map at stride `downsample`, 16 officially). `input_size` (H, W) network
    input, 256x704 officially.
    View transformer (LSS, BEVPoolv2 rule): `depth_bins` = (start, stop, step) of torch.arange (1, 45, 0.5) -> 88
    bins (M0 / panoptic-tiny: step 1.0 -> 44); `grid_x` / `grid_y` / `grid_z` = (lower, upper, cell) of the BEV
    pooling grid, [-40, 40) step 0.4 and one z bin [-1, 5.4) officially; `bev_channels` = 64 (numC_Trans) per z bin.
    `depth_net_type`: "lss" (FlashOcc: one 1x1 conv -> D + C) or "bevdepth" (Panoptic-FlashOcc: BEVDepth DepthNet with
    camera-aware SE, 3 BasicBlocks, ASPP of `aspp_mid_channels`; `depth_loss_weight` for its depth supervision).
    BEV encoder: CustomResNet (`bev_backbone_channels`, `bev_backbone_layers` BasicBlocks per stage, stride 2 each)
    and FPN_LSS to `bev_neck_channels` (256; M0 and panoptic-tiny 128) at the pooling grid's resolution.
    Occupancy head (BEVOCCHead2D, channel-to-height): 3x3 conv to `occ_head_channels`, Linear -> Softplus -> Linear to
    `num_occ_z` * num_classes, viewed (z-major, class-minor). Occupancy voxels: the BEV cells in x / y and `num_occ_z`
    equal slices of [grid_z[0], grid_z[1]) in z (Occ3D: 200 x 200 x 16 of 0.4 m).
    Loss: cross entropy (ignore `ignore_index`), over the voxels of `mask_camera` when `use_mask`, divided by their
    number (FlashOcc); `class_balance` weights classes by 1 / log(freq + 1e-3) (the official frequencies).
    `panoptic=True` adds the Panoptic-FlashOcc centre branch: a CenterPoint-style shared conv of
    `center_share_channels`, heads `center_heads` {name: [channels, convs]} (default reg + height, the ones the
    panoptic inference reads; OFFICIAL_CENTER_HEADS adds the unused dim / rot / vel) and a
    `len(center_class_names)`-class heatmap with `center_heatmap_convs` convs of `center_head_channels`; and instance
    clustering in `post_process`: heatmap sigmoid, 3x3 max-pool NMS, top `center_max_num`, score >
    `center_score_threshold`, inside `center_post_center_range`; every voxel predicted as one of `thing_occ_classes`
    joins the nearest centre of its class. `center_class_map`: "by_name" maps heatmap channels to occupancy classes
    by name (right for the configs' class order) or "official" (the official table, see OFFICIAL_CENTER_TO_OCC).
    Centre loss: Gaussian focal loss on the heatmap (Gaussian radius from the box size, `center_gaussian_overlap`,
    `center_min_radius`) + `center_reg_weight` * L1 on the xy offset and the height, times `center_loss_weight`.
    `image_mean` / `image_std` / `bgr` / `resize_test` / `crop_h`: what `get_image_processor()` builds.
    """

    model_type = "hfq_flashocc"

    def __init__(
        self,
        backbone_type="resnet",
        backbone_config=None,
        simple_channels=(16, 32, 64, 128, 256),
        neck_channels=256,
        input_size=(256, 704),
        downsample=16,
        depth_bins=(1.0, 45.0, 0.5),
        grid_x=(-40.0, 40.0, 0.4),
        grid_y=(-40.0, 40.0, 0.4),
        grid_z=(-1.0, 5.4, 6.4),
        bev_channels=64,
        depth_net_type="lss",
        depth_net_mid_channels=None,
        aspp_mid_channels=96,
        depth_loss_weight=3.0,
        bev_backbone_channels=(128, 256, 512),
        bev_backbone_layers=(2, 2, 2),
        bev_neck_channels=256,
        occ_head_channels=256,
        num_occ_z=16,
        occ_class_names=tuple(OCC3D_CLASSES),
        use_mask=True,
        class_balance=False,
        ignore_index=255,
        panoptic=False,
        center_class_names=tuple(NUSCENES_DET_CLASSES),
        center_share_channels=64,
        center_head_channels=64,
        center_heads=None,
        center_heatmap_convs=2,
        center_final_kernel=3,
        center_init_bias=-2.19,
        center_max_num=500,
        center_score_threshold=0.3,
        center_post_center_range=(-61.2, -61.2, -10.0, 61.2, 61.2, 10.0),
        center_gaussian_overlap=0.1,
        center_min_radius=2,
        center_reg_weight=0.25,
        center_loss_weight=1.0,
        thing_occ_classes=tuple(THING_OCC_CLASSES),
        center_class_map="by_name",
        image_mean=(123.675, 116.28, 103.53),
        image_std=(58.395, 57.12, 57.375),
        bgr=True,
        resize_test=0.0,
        crop_h=(0.0, 0.0),
        **kwargs,
    ):
        _load_quantizer(kwargs.get("quantization_config"))
        super().__init__(**kwargs)
        if backbone_type not in ("resnet", "simple"):
            raise ValueError(f"backbone_type={backbone_type!r}; use 'resnet' (AutoBackbone ResNet) or 'simple'.")
        if backbone_type == "resnet" and backbone_config is None:
            backbone_config = dict(DEFAULT_RESNET50)
        if backbone_type == "simple" and (len(simple_channels) < 2 or 2 ** (len(simple_channels) - 1) != downsample):
            raise ValueError(f"simple_channels={list(simple_channels)}: one stride-2 stage per entry and the last two "
                             f"feed the neck, so it needs log2(downsample) + 1 = {int(math.log2(downsample)) + 1} "
                             "entries (outputs at strides downsample and 2 * downsample).")
        if depth_net_type not in ("lss", "bevdepth"):
            raise ValueError(f"depth_net_type={depth_net_type!r}; use 'lss' (FlashOcc) or 'bevdepth' (Panoptic).")
        if len(input_size) != 2 or input_size[0] % downsample or input_size[1] % downsample:
            raise ValueError(f"input_size={list(input_size)} must be (H, W), both multiples of "
                             f"downsample={downsample}.")
        if len(depth_bins) != 3 or depth_bins[2] <= 0 or depth_bins[1] <= depth_bins[0]:
            raise ValueError(f"depth_bins={list(depth_bins)}: need (start, stop, step) of torch.arange, step > 0.")
        nx, ny = _cells(grid_x, "grid_x"), _cells(grid_y, "grid_y")
        _cells(grid_z, "grid_z")
        if len(bev_backbone_channels) != 3 or len(bev_backbone_layers) != 3:
            raise ValueError("bev_backbone_channels / bev_backbone_layers: three stages (CustomResNet, FPN_LSS "
                             "reads stages 1 and 3).")
        if nx % 2 or ny % 2:
            raise ValueError(f"the BEV grid is {nx} x {ny} cells; FPN_LSS doubles the stride-2 stage back to it, so "
                             "both must be even (e.g. grid_x=(-40, 40, 0.8) -> 100 cells).")
        if num_occ_z < 1:
            raise ValueError(f"num_occ_z={num_occ_z} must be >= 1.")
        if min(bev_backbone_layers) < 1:
            raise ValueError(f"bev_backbone_layers={list(bev_backbone_layers)}: at least one block per stage.")
        if len(image_mean) != 3 or len(image_std) != 3:
            raise ValueError("image_mean / image_std need 3 values.")
        if center_class_map not in ("by_name", "official"):
            raise ValueError(f"center_class_map={center_class_map!r}; use 'by_name' or 'official'.")
        if center_heads is None:
            center_heads = {k: list(v) for k, v in PANOPTIC_CENTER_HEADS.items()}
        center_heads = {k: [int(c), int(n)] for k, (c, n) in dict(center_heads).items()}
        if panoptic:
            for need, ch in (("reg", 2), ("height", 1)):
                if center_heads.get(need, [None])[0] != ch:
                    raise ValueError(f"panoptic needs center_heads[{need!r}] with {ch} output channels (got "
                                     f"{center_heads.get(need)}); the clustering reads the xy offset and the height.")
            if "heatmap" in center_heads:
                raise ValueError("center_heads must not name 'heatmap' (it is built from center_class_names).")
            if min(n for _, n in center_heads.values()) < 1 or center_heatmap_convs < 1:
                raise ValueError("every centre head needs at least one conv.")
            bad = [c for c in thing_occ_classes if not 0 <= c < len(occ_class_names)]
            if bad:
                raise ValueError(f"thing_occ_classes {bad} are not occupancy class ids "
                                 f"(0..{len(occ_class_names) - 1}).")
            if center_class_map == "official" and len(center_class_names) != len(OFFICIAL_CENTER_TO_OCC):
                raise ValueError("center_class_map='official' is the official 10-class table; use 'by_name'.")
        if class_balance and len(occ_class_names) > len(NUSC_CLASS_FREQUENCIES):
            raise ValueError("class_balance uses the 18 official Occ3D class frequencies; more classes given.")

        self.backbone_type = backbone_type
        self.backbone_config = dict(backbone_config) if backbone_config is not None else None
        self.simple_channels = list(simple_channels)
        self.neck_channels = neck_channels
        self.input_size = list(input_size)
        self.downsample = downsample
        self.depth_bins = [float(v) for v in depth_bins]
        self.grid_x = [float(v) for v in grid_x]
        self.grid_y = [float(v) for v in grid_y]
        self.grid_z = [float(v) for v in grid_z]
        self.bev_channels = bev_channels
        self.depth_net_type = depth_net_type
        self.depth_net_mid_channels = depth_net_mid_channels
        self.aspp_mid_channels = aspp_mid_channels
        self.depth_loss_weight = depth_loss_weight
        self.bev_backbone_channels = list(bev_backbone_channels)
        self.bev_backbone_layers = list(bev_backbone_layers)
        self.bev_neck_channels = bev_neck_channels
        self.occ_head_channels = occ_head_channels
        self.num_occ_z = num_occ_z
        self.occ_class_names = list(occ_class_names)
        self.num_classes = len(self.occ_class_names)
        self.use_mask = use_mask
        self.class_balance = class_balance
        self.ignore_index = ignore_index
        self.panoptic = panoptic
        self.center_class_names = list(center_class_names)
        self.center_share_channels = center_share_channels
        self.center_head_channels = center_head_channels
        self.center_heads = center_heads
        self.center_heatmap_convs = center_heatmap_convs
        self.center_final_kernel = center_final_kernel
        self.center_init_bias = center_init_bias
        self.center_max_num = center_max_num
        self.center_score_threshold = center_score_threshold
        self.center_post_center_range = list(center_post_center_range)
        self.center_gaussian_overlap = center_gaussian_overlap
        self.center_min_radius = center_min_radius
        self.center_reg_weight = center_reg_weight
        self.center_loss_weight = center_loss_weight
        self.thing_occ_classes = list(thing_occ_classes)
        self.center_class_map = center_class_map
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.bgr = bgr
        self.resize_test = resize_test
        self.crop_h = list(crop_h)

    # ------------------------------------------------------------------ derived sizes
    @property
    def num_depth_bins(self):
        start, stop, step = self.depth_bins
        return int(math.ceil((stop - start) / step))

    @property
    def grid_size(self):
        """(Dx, Dy, Dz) cells of the BEV pooling grid."""
        return _cells(self.grid_x, "grid_x"), _cells(self.grid_y, "grid_y"), _cells(self.grid_z, "grid_z")

    @property
    def bev_in_channels(self):
        """Channels of the pooled BEV map: bev_channels per z bin (z collapsed into channels)."""
        return self.bev_channels * self.grid_size[2]

    @property
    def occ_voxel_size(self):
        """(x, y, z) size of an occupancy voxel (0.4 m each in Occ3D)."""
        return self.grid_x[2], self.grid_y[2], (self.grid_z[1] - self.grid_z[0]) / self.num_occ_z

    @property
    def center_to_occ(self):
        """Occupancy class of each heatmap channel (-1: none)."""
        if self.center_class_map == "official":
            return list(OFFICIAL_CENTER_TO_OCC)
        return [self.occ_class_names.index(n) if n in self.occ_class_names else -1 for n in self.center_class_names]


def flashocc_m0_kwargs():
    """flashocc-r50-M0.py: depth step 1.0 (44 bins), 128-channel FPN_LSS and occupancy head."""
    return dict(depth_bins=(1.0, 45.0, 1.0), bev_neck_channels=128, occ_head_channels=128)


def panoptic_tiny_kwargs():
    """panoptic-flashocc-r50-depth-tiny-pano.py: BEVDepth depth net (ASPP 96, depth loss weight 1), 44 depth bins,
    128-channel BEV neck / occupancy head, no camera mask, class balancing, the centre branch."""
    return dict(depth_bins=(1.0, 45.0, 1.0), depth_net_type="bevdepth", aspp_mid_channels=96, depth_loss_weight=1.0,
                bev_neck_channels=128, occ_head_channels=128, use_mask=False, class_balance=True, panoptic=True)


def _load_quantizer(quantization_config):
    """An hfq-quantized checkpoint needs hfq's quantizer registered with transformers before its weights load: import
    hfq here (the config is read first), or refuse with the fix. Float checkpoints never import hfq."""
    qc = quantization_config
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if isinstance(method, str) and method.startswith("hfq_"):
        try:
            import hfq  # noqa: F401
        except ImportError as e:
            raise ImportError(f"this checkpoint is quantized with hfq ({method}): install hfq (pip install hfq) to "
                              f"load it; without it its packed integer weights cannot be read") from e
