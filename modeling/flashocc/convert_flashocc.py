"""Map official FlashOcc / Panoptic-FlashOcc checkpoints (mmdet3d BEVDetOCC / BEVDepthPano state dicts of
Yzichen/FlashOCC: `img_backbone.`, `img_neck.`, `img_view_transformer.depth_net.`, `img_bev_encoder_backbone.`,
`img_bev_encoder_neck.`, `occ_head.`, `aux_centerness_head.`) onto FlashOccForOccupancy's state dict.

Backbone: torchvision-style ResNet (mmdet `ResNet`, style='pytorch') -> transformers' ResNetBackbone names.
Depth net: FlashOcc's single 1x1 conv (depth_net_type="lss") or the BEVDepth DepthNet of Panoptic-FlashOcc
("bevdepth", use_dcn=False). Unsupported official variants (4D / stereo models, DCN depth nets, Swin backbones)
have keys with no counterpart and are refused."""
import re

import torch

from ..checkpoints import check_converted, match_table, rename_keys

_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_DN = "model.view_transformer.depth_net."
_TABLES = {  # official prefix -> [(regex on the rest of the key, our key)]
    "img_neck.": [
        (r"lateral_convs\.(\d+)\.conv\.(weight|bias)", r"model.img_neck.lateral_convs.\1.\2"),
        (r"fpn_convs\.0\.conv\.(weight|bias)", r"model.img_neck.fpn_convs.0.\1"),
    ],
    "img_view_transformer.depth_net.": [  # "lss": one conv; "bevdepth": DepthNet
        (r"(weight|bias)", _DN + r"\1"),
        (r"reduce_conv\.([01])\." + _BN, _DN + r"reduce_conv.\1.\2"),
        (r"(context_conv|bn|depth_mlp\.fc[12]|context_mlp\.fc[12]|depth_se\.conv_reduce|depth_se\.conv_expand|"
         r"context_se\.conv_reduce|context_se\.conv_expand)\." + _BN, _DN + r"\1.\2"),
        (r"depth_conv\.([012])\.conv([12])\.weight", _DN + r"depth_conv.\1.conv\2.convolution.weight"),
        (r"depth_conv\.([012])\.bn([12])\." + _BN, _DN + r"depth_conv.\1.conv\2.normalization.\3"),
        (r"depth_conv\.3\.(aspp[1-4])\.atrous_conv\.weight", _DN + r"depth_conv.3.\1.convolution.weight"),
        (r"depth_conv\.3\.(aspp[1-4])\.bn\." + _BN, _DN + r"depth_conv.3.\1.normalization.\2"),
        (r"depth_conv\.3\.global_avg_pool\.([12])\." + _BN, _DN + r"depth_conv.3.global_avg_pool.\1.\2"),
        (r"depth_conv\.3\.conv1\.weight", _DN + r"depth_conv.3.project.convolution.weight"),
        (r"depth_conv\.3\.bn1\." + _BN, _DN + r"depth_conv.3.project.normalization.\1"),
        (r"depth_conv\.4\.(weight|bias)", _DN + r"depth_conv.4.\1"),
    ],
    "img_bev_encoder_backbone.": [
        (r"layers\.(\d+)\.(\d+)\.conv([12])\.weight", r"model.bev_backbone.layers.\1.\2.conv\3.convolution.weight"),
        (r"layers\.(\d+)\.(\d+)\.bn([12])\." + _BN, r"model.bev_backbone.layers.\1.\2.conv\3.normalization.\4"),
        (r"layers\.(\d+)\.0\.downsample\.(weight|bias)", r"model.bev_backbone.layers.\1.0.downsample.\2"),
    ],
    "img_bev_encoder_neck.": [
        (r"(conv\.[0134]|up2\.[124])\." + _BN, r"model.bev_neck.\1.\2"),
    ],
    "occ_head.": [
        (r"final_conv\.conv\.(weight|bias)", r"occ_head.final_conv.\1"),
        (r"predicter\.([02])\.(weight|bias)", r"occ_head.predicter.\1.\2"),
    ],
    "aux_centerness_head.": [
        (r"shared_conv\.conv\.weight", r"center_head.shared_conv.convolution.weight"),
        (r"shared_conv\.bn\." + _BN, r"center_head.shared_conv.normalization.\1"),
        (r"task_heads\.0\.(\w+)\.(\d+)\.conv\.weight", r"center_head.heads.\1.\2.convolution.weight"),
        (r"task_heads\.0\.(\w+)\.(\d+)\.bn\." + _BN, r"center_head.heads.\1.\2.normalization.\3"),
        (r"task_heads\.0\.(\w+)\.(\d+)\.(weight|bias)", r"center_head.heads.\1.\2.\3"),
    ],
}
_RESNET = [  # torchvision / mmdet ResNet (after 'img_backbone.') -> transformers ResNetBackbone
    (r"conv1\.weight", lambda m: "embedder.embedder.convolution.weight"),
    (r"bn1\." + _BN, lambda m: f"embedder.embedder.normalization.{m[1]}"),
    (r"layer(\d)\.(\d+)\.conv(\d)\.weight",
     lambda m: f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.layer.{int(m[3]) - 1}.convolution.weight"),
    (r"layer(\d)\.(\d+)\.bn(\d)\." + _BN,
     lambda m: f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.layer.{int(m[3]) - 1}.normalization.{m[4]}"),
    (r"layer(\d)\.(\d+)\.downsample\.0\.weight",
     lambda m: f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.shortcut.convolution.weight"),
    (r"layer(\d)\.(\d+)\.downsample\.1\." + _BN,
     lambda m: f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.shortcut.normalization.{m[3]}"),
]


def map_official_key(key):
    """Our name for one official key, or None when it has no counterpart."""
    if key.startswith("img_backbone."):
        rest = key[len("img_backbone."):]
        for pat, fn in _RESNET:
            m = re.fullmatch(pat, rest)
            if m:
                return "model.img_backbone." + fn(m)
        return None
    for prefix, table in _TABLES.items():
        if key.startswith(prefix):
            return match_table(key[len(prefix):], table)
    return None


def convert_official_checkpoint(state_dict, config=None):
    """Official checkpoint dict (or its "state_dict", or an EMA dump with "state_dict") -> FlashOccForOccupancy
    state dict. Unknown keys raise (listing them). With `config`, the centre head's dim / rot / vel branches (loss
    weight 0 officially, never run by the panoptic inference) are dropped unless config.center_heads names them, and
    the result is checked against the model built from the config: no missing or unexpected key, equal shapes."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    out, unknown = rename_keys(state_dict, map_official_key)
    if config is not None:  # the official loss-weight-0 box branches, when the config does not build them
        unused = tuple(f"center_head.heads.{n}." for n in ("dim", "rot", "vel") if n not in config.center_heads)
        out = {k: v for k, v in out.items() if not (unused and k.startswith(unused))}
    if unknown:
        raise ValueError(f"{len(unknown)} keys have no FlashOcc counterpart (first: {unknown[:5]}); is this a "
                         "single-frame FlashOcc (BEVDetOCC) or Panoptic-FlashOcc (BEVDepthPano / BEVDepthOCC) "
                         "checkpoint with a ResNet backbone? 4D / stereo, DCN depth nets and Swin backbones are not "
                         "supported.")
    if config is not None:
        _check_against(out, config)
    return out


def _check_against(converted, config):
    from .modeling_flashocc import FlashOccForOccupancy

    with torch.device("meta"):
        model = FlashOccForOccupancy(config)
    check_converted(converted, model, "align the FlashOccConfig (backbone_config, depth_net_type, panoptic, "
                    "center_heads, bev_backbone_layers).", "align the FlashOccConfig sizes (depth_bins, bev_channels, "
                    "bev_neck_channels, occ_head_channels, num_occ_z).")
