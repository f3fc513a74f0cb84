"""Configuration of PETR (and its StreamPETR / PETRv2 options) as a Hugging Face custom-code model."""
from transformers import PretrainedConfig

NUSCENES_CLASSES = [
    "car", "truck", "construction_vehicle", "bus", "trailer",
    "barrier", "motorcycle", "bicycle", "pedestrian", "traffic_cone",
]


class PetrConfig(PretrainedConfig):
    """PETR hyper-parameters. Defaults follow the official configs (900 queries, 256-d, 6 layers, 64 LID
    bins, position_range +-61.2 m, pc_range +-51.2 m); tests and the synthetic recipe shrink them.

    backbone_type: "resnet" builds `transformers.AutoBackbone` from `backbone_config` (a ResNetConfig dict),
    "vovnet" the official VoVNet-eSE (`vovnet_spec`, e.g. "V-99-eSE"; stage4 + stage5 into the neck, stage5 alone
    without it), "simple" a small plain CNN (`simple_channels`, one stride-2 stage per entry) for CPU experiments.
    dcn_stages: ResNet stages whose 3x3 convolutions are modulated deformable (DCNv2), (3, 4) in the official R50-DCN
    configs; their caffe-style ResNet puts the stride on the first 1x1 conv (`downsample_in_bottleneck=True` in
    `backbone_config`).
    use_neck: CPFPN over the last two backbone levels (the "p4" configs); off = the last level ("c5").
    memory_len / num_propagated: a StreamPETR-style object-centric memory queue (0 = PETRv1; not the official
    StreamPETR head, whose checkpoints do not convert).
    dn_groups / dn_noise_scale / dn_split: query denoising in training (StreamPETR / PETR-DN heads): noisy
    copies of the ground-truth centres as extra anchor queries, supervised directly; 0 = off (PETRv1).
    num_frames: PETRv2 multi-frame input (previous frames' lidar2img already aligned to the current frame).
    with_fpe: PETRv2 feature-guided position encoder. share_branches: PETRv1/StreamPETR share one cls/reg
    branch across decoder layers; PETRv2 has independent ones.
    input_size / image_mean / image_std: what `get_image_processor()` builds (test-time PETR pre-processing).
    yaw_convention: "nuscenes" = yaw of the box length axis in the LiDAR frame; "mmdet3d_v017" = the
    official checkpoints' convention (yaw_nus = -yaw - pi/2) for converted official weights.
    Options for training small models from scratch (NOT in the official PETR; defaults = official):
    memory_norm: LayerNorm on the image tokens before the decoder; content_query_init: "zeros" (official)
    or "query_pos" (content queries start as their anchor embedding); aux_2d_weight > 0: a training-only
    2-D auxiliary head on the image tokens (per-cell class of the covering projected box + its depth);
    attn_prior_sigma > 0: SMCA-style additive cross-attention bias around each anchor's projection into
    every camera (Gaussian of width sigma * 2^head feature cells), on top of the learned 3D PE.
    pe_type: "petr" (official: depth_num points per ray -> inverse sigmoid -> position_encoder) or "qfpe" (Q-/FQ-PETR's
    quantization-friendly PE: one point per ray at the fixed depth `qfpe_depth` metres, each normalised coordinate
    embedded by interpolating between `qfpe_num_anchors` learned anchors of `depth_num` dims bounded to
    [-qfpe_gamma, qfpe_gamma], so the position_encoder keeps its official 3 * depth_num inputs; see PetrQFPE).
    """

    model_type = "hfq_petr"

    def __init__(
        self,
        backbone_type="resnet",
        backbone_config=None,
        simple_channels=(32, 64, 128, 256),
        vovnet_spec="V-99-eSE",
        dcn_stages=(),
        use_neck=True,
        neck_channels=256,
        embed_dims=256,
        num_queries=900,
        num_decoder_layers=6,
        num_heads=8,
        ffn_dims=2048,
        dropout=0.1,
        depth_num=64,
        depth_start=1.0,
        use_lid=True,
        position_range=(-61.2, -61.2, -10.0, 61.2, 61.2, 10.0),
        pc_range=(-51.2, -51.2, -5.0, 51.2, 51.2, 3.0),
        post_center_range=(-61.2, -61.2, -10.0, 61.2, 61.2, 10.0),
        class_names=tuple(NUSCENES_CLASSES),
        code_size=10,
        code_weights=(1.0,) * 8 + (0.2, 0.2),
        num_reg_fcs=2,
        share_branches=True,
        with_multiview=True,
        with_fpe=False,
        num_frames=1,
        memory_len=0,
        num_propagated=0,
        dn_groups=0,
        dn_noise_scale=0.4,
        dn_split=0.75,
        max_num=300,
        focal_alpha=0.25,
        focal_gamma=2.0,
        cls_loss_weight=2.0,
        bbox_loss_weight=0.25,
        match_cls_weight=2.0,
        match_bbox_weight=0.25,
        input_size=(320, 800),
        image_mean=(103.53, 116.28, 123.675),
        image_std=(57.375, 57.12, 58.395),
        yaw_convention="nuscenes",
        memory_norm=False,
        content_query_init="zeros",
        aux_2d_weight=0.0,
        attn_prior_sigma=0.0,
        pe_type="petr",
        qfpe_depth=30.0,
        qfpe_num_anchors=3,
        qfpe_gamma=0.8,
        **kwargs,
    ):
        _load_quantizer(kwargs.get("quantization_config"))
        super().__init__(**kwargs)
        if backbone_type not in ("resnet", "vovnet", "simple"):
            raise ValueError(f"backbone_type={backbone_type!r}; use 'resnet', 'vovnet' or 'simple'.")
        if dcn_stages and (backbone_type != "resnet" or not set(dcn_stages) <= {1, 2, 3, 4}):
            raise ValueError(f"dcn_stages={dcn_stages!r}: ResNet stages 1-4 only (official R50-DCN: (3, 4)).")
        if yaw_convention not in ("nuscenes", "mmdet3d_v017"):
            raise ValueError(f"yaw_convention={yaw_convention!r}; use 'nuscenes' or 'mmdet3d_v017'.")
        if embed_dims % num_heads or embed_dims % 2:
            raise ValueError(f"embed_dims={embed_dims} must be even and divisible by num_heads={num_heads}.")
        if len(position_range) != 6 or len(pc_range) != 6:
            raise ValueError("position_range and pc_range need 6 values (xmin, ymin, zmin, xmax, ymax, zmax).")
        if len(code_weights) != code_size:
            raise ValueError(f"code_weights has {len(code_weights)} entries, code_size is {code_size}.")
        if num_propagated > memory_len:
            raise ValueError(f"num_propagated={num_propagated} exceeds memory_len={memory_len}; lower it.")
        if pe_type not in ("petr", "qfpe"):
            raise ValueError(f"pe_type={pe_type!r}; use 'petr' (official 3D PE) or 'qfpe' (Q-PETR's).")
        if pe_type == "qfpe" and (qfpe_num_anchors < 2 or qfpe_gamma <= 0 or qfpe_depth <= 0):
            raise ValueError(f"QFPE needs qfpe_num_anchors >= 2, qfpe_gamma > 0 and qfpe_depth > 0; got "
                             f"{qfpe_num_anchors}, {qfpe_gamma}, {qfpe_depth}.")
        if num_frames < 1:
            raise ValueError(f"num_frames={num_frames} must be >= 1.")
        if backbone_type == "resnet" and backbone_config is None:
            backbone_config = {
                "model_type": "resnet", "layer_type": "bottleneck", "depths": [3, 4, 6, 3],
                "hidden_sizes": [256, 512, 1024, 2048], "embedding_size": 64,
                "out_features": ["stage3", "stage4"],
            }
        self.backbone_type = backbone_type
        self.backbone_config = dict(backbone_config) if backbone_config is not None else None
        self.simple_channels = list(simple_channels)
        self.vovnet_spec = vovnet_spec
        self.dcn_stages = list(dcn_stages)
        self.use_neck = use_neck
        self.neck_channels = neck_channels
        self.embed_dims = embed_dims
        self.num_queries = num_queries
        self.num_decoder_layers = num_decoder_layers
        self.num_heads = num_heads
        self.ffn_dims = ffn_dims
        self.dropout = dropout
        self.depth_num = depth_num
        self.depth_start = depth_start
        self.use_lid = use_lid
        self.position_range = list(position_range)
        self.pc_range = list(pc_range)
        self.post_center_range = list(post_center_range)
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.code_size = code_size
        self.code_weights = list(code_weights)
        self.num_reg_fcs = num_reg_fcs
        self.share_branches = share_branches
        self.with_multiview = with_multiview
        self.with_fpe = with_fpe
        self.num_frames = num_frames
        self.memory_len = memory_len
        self.num_propagated = num_propagated
        self.dn_groups = dn_groups
        self.dn_noise_scale = dn_noise_scale
        self.dn_split = dn_split
        self.max_num = max_num
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.cls_loss_weight = cls_loss_weight
        self.bbox_loss_weight = bbox_loss_weight
        self.match_cls_weight = match_cls_weight
        self.match_bbox_weight = match_bbox_weight
        self.input_size = list(input_size)
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.yaw_convention = yaw_convention
        if content_query_init not in ("zeros", "query_pos"):
            raise ValueError(f"content_query_init={content_query_init!r}; use 'zeros' or 'query_pos'.")
        self.memory_norm = memory_norm
        self.content_query_init = content_query_init
        self.aux_2d_weight = aux_2d_weight
        self.attn_prior_sigma = attn_prior_sigma
        self.pe_type = pe_type
        self.qfpe_depth = qfpe_depth
        self.qfpe_num_anchors = qfpe_num_anchors
        self.qfpe_gamma = qfpe_gamma


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
