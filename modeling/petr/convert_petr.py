"""Map official mmdet3d PETR / PETRv2 checkpoints (`img_backbone.`, `img_neck.`, `pts_bbox_head.`) onto
PetrForObjectDetection3D's state dict. Official StreamPETR checkpoints do NOT convert: they need pieces this model does
not have (motion-aware LayerNorm, time embedding, a linear position encoder, a timestamped ego-pose memory); the
StreamPETR-style memory queue here is for experiments, and such checkpoints are refused (unknown keys). Backbones: ResNet (torchvision names -> transformers' ResNetBackbone; DCNv2
`conv_offset` of the R50-DCN configs -> `PetrDeformConv2d` with `dcn_stages=(3, 4)`) and VoVNet-eSE (`backbone_type="vovnet"`: same names). Official weights predict yaw in mmdet3d v0.17's convention: load
them with `yaw_convention="mmdet3d_v017"`."""
import re

import torch

from ..checkpoints import check_converted, match_table

_HEAD = [  # (official regex after 'pts_bbox_head.', ours)
    (r"input_proj\.(weight|bias)", r"model.input_proj.\1"),
    (r"position_encoder\.(\d)\.(weight|bias)", r"model.position_encoder.\1.\2"),
    (r"adapt_pos3d\.(\d)\.(weight|bias)", r"model.adapt_pos3d.\1.\2"),
    (r"fpe\.(conv_reduce|conv_expand)\.(weight|bias)", r"model.fpe.\1.\2"),
    (r"reference_points\.weight", r"model.reference_points.weight"),
    (r"query_embedding\.(\d)\.(weight|bias)", r"model.query_embedding.\1.\2"),
    (r"transformer\.decoder\.layers\.(\d+)\.attentions\.0\.attn\.(.*)", r"model.decoder.layers.\1.self_attn.\2"),
    (r"transformer\.decoder\.layers\.(\d+)\.attentions\.1\.attn\.(.*)", r"model.decoder.layers.\1.cross_attn.\2"),
    (r"transformer\.decoder\.layers\.(\d+)\.ffns\.0\.layers\.0\.0\.(weight|bias)",
     r"model.decoder.layers.\1.ffn.fc1.\2"),
    (r"transformer\.decoder\.layers\.(\d+)\.ffns\.0\.layers\.1\.(weight|bias)", r"model.decoder.layers.\1.ffn.fc2.\2"),
    (r"transformer\.decoder\.layers\.(\d+)\.norms\.(\d)\.(weight|bias)", r"model.decoder.layers.\1.norms.\2.\3"),
    (r"transformer\.decoder\.post_norm\.(weight|bias)", r"model.decoder.post_norm.\1"),
    (r"(cls_branches|reg_branches)\.(\d+)\.(\d+)\.(weight|bias)", r"\1.\2.\3.\4"),
]
_NECK = [
    (r"lateral_convs\.(\d)\.conv\.(weight|bias)", r"model.neck.lateral_convs.\1.\2"),
    (r"fpn_convs\.0\.conv\.(weight|bias)", r"model.neck.fpn_convs.0.\1"),
]
_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_RESNET = [  # torchvision / mmdet ResNet -> transformers ResNetBackbone
    (r"conv1\.weight", r"embedder.embedder.convolution.weight"),
    (r"bn1\." + _BN, r"embedder.embedder.normalization.\1"),
    (r"layer(\d)\.(\d+)\.conv(\d)\.weight", "STAGE.layer.CONV.convolution.weight"),
    (r"layer(\d)\.(\d+)\.conv(\d)\.conv_offset\.(weight|bias)", "STAGE.layer.CONV.convolution.conv_offset.PARAM"),
    (r"layer(\d)\.(\d+)\.bn(\d)\." + _BN, "STAGE.layer.CONV.normalization.BN"),
    (r"layer(\d)\.(\d+)\.downsample\.0\.weight", "STAGE.shortcut.convolution.weight"),
    (r"layer(\d)\.(\d+)\.downsample\.1\." + _BN, "STAGE.shortcut.normalization.BN"),
]
_LEGACY = [(".self_attn.", ".attentions.0."), (".multihead_attn.", ".attentions.1."),
           (".decoder.norm.", ".decoder.post_norm.")]
_DROPPED = {"pts_bbox_head.code_weights"}  # a config value (config.code_weights), not a weight


def _resnet_key(rest):
    for pat, repl in _RESNET:
        m = re.fullmatch(pat, rest)
        if not m:
            continue
        if not repl.startswith("STAGE"):
            return m.expand(repl)
        g = m.groups()
        out = repl.replace("STAGE", f"encoder.stages.{int(g[0]) - 1}.layers.{g[1]}")
        if "CONV" in out:
            out = out.replace("CONV", str(int(g[2]) - 1))
        return out.replace("PARAM", g[-1]) if "PARAM" in out else out.replace("BN", g[-1])
    return None


def _map_key(key):
    if key.startswith("img_backbone."):
        rest = key[len("img_backbone."):]
        if rest.startswith(("stem.", "stage")):  # VoVNet: our module tree carries the official names
            return "model.backbone." + rest
        new = _resnet_key(rest)
        return None if new is None else "model.backbone." + new
    for prefix, table in (("img_neck.", _NECK), ("pts_bbox_head.", _HEAD)):
        if key.startswith(prefix):
            return match_table(key[len(prefix):], table)
    return None


def convert_official_checkpoint(state_dict, config=None):
    """Official checkpoint dict (or its "state_dict") -> PetrForObjectDetection3D state dict.

    Shared (PETRv1) cls/reg branches are listed 6 times officially; they are checked to be
    identical and stored once when `config.share_branches` (the default when no config is given).
    With `config`, the result is checked against the model's keys and shapes.
    """
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    share = True if config is None else config.share_branches
    out, unknown = {}, []
    for key, value in state_dict.items():
        if key in _DROPPED:
            continue
        k = key
        for old, new in _LEGACY:
            k = k.replace(old, new) if k.startswith("pts_bbox_head.transformer.") else k
        new_key = _map_key(k)
        if new_key is None:
            unknown.append(key)
            continue
        m = re.fullmatch(r"(cls_branches|reg_branches)\.(\d+)\.(.*)", new_key)
        if m and share:
            base = f"{m.group(1)}.0.{m.group(3)}"
            if base in out and not torch.equal(out[base], value):
                raise ValueError(f"{key} differs from branch 0 but the config shares branches across layers "
                                 "(PETRv1); use share_branches=False for PETRv2-style checkpoints.")
            out[base] = value
            continue
        out[new_key] = value
    if unknown:
        raise ValueError(f"{len(unknown)} keys have no PETR counterpart (first: {unknown[:5]}); is this an "
                         "mmdet3d PETR/PETRv2 checkpoint with a ResNet or VoVNet backbone? (StreamPETR checkpoints do not "
                         "convert)")
    if config is not None:
        if config.yaw_convention != "mmdet3d_v017":
            raise ValueError("official PETR weights predict yaw in mmdet3d v0.17's convention (nuScenes yaw = -yaw - "
                             "pi/2); build the PetrConfig with yaw_convention='mmdet3d_v017', else every exported "
                             "box is rotated")
        _check_against(out, config)
    return out


def _check_against(converted, config):
    from .modeling_petr import PetrForObjectDetection3D

    with torch.device("meta"):
        model = PetrForObjectDetection3D(config)
    check_converted(converted, model, "align the PetrConfig (backbone_config, use_neck, num_decoder_layers, "
                    "with_fpe, share_branches).", "align the PetrConfig sizes.")
