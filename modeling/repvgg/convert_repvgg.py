"""Map official RepVGG checkpoints (DingXiaoH/RepVGG `repvgg.py` state dicts: `stage0.rbr_dense.conv.weight`,
`stage1.0.rbr_1x1.bn.running_var`, `stage2.1.rbr_identity.weight`, `linear.weight`, or the deploy form's
`stage0.rbr_reparam.weight` / `.bias`) onto RepVGGForImageClassification, and read the architecture off them."""
import re

import torch

from ..checkpoints import check_converted, rename_keys
from .configuration_repvgg import OFFICIAL_BASE_CHANNELS, REPVGG_VARIANTS, RepVGGConfig, variant_kwargs

_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_BLOCK = (r"(rbr_dense\.conv\.weight|rbr_1x1\.conv\.weight|rbr_dense\.bn\." + _BN + r"|rbr_1x1\.bn\." + _BN
          + r"|rbr_identity\." + _BN + r"|rbr_reparam\.(weight|bias))")


def map_official_key(key):
    """Our name for one official key, or None when it has no counterpart."""
    m = re.fullmatch(r"stage0\." + _BLOCK, key)
    if m:
        return f"repvgg.stages.0.0.{m[1]}"
    m = re.fullmatch(r"stage([1-9]\d*)\.(\d+)\." + _BLOCK, key)
    if m:
        return f"repvgg.stages.{m[1]}.{m[2]}.{m[3]}"
    m = re.fullmatch(r"linear\.(weight|bias)", key)
    if m:
        return f"classifier.{m[1]}"
    return None


def _unwrap(state_dict):
    for wrapper in ("state_dict", "model"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], dict):
            state_dict = state_dict[wrapper]
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}


def convert_official_checkpoint(state_dict, config=None):
    """Official state dict (also wrapped in "state_dict" / "model", or with DDP's "module." prefix) ->
    RepVGGForImageClassification state dict. Unknown keys raise (listing them). With `config`, the result is checked
    against the model that config builds: no missing or unexpected key, equal shapes (works on meta tensors)."""
    state_dict = _unwrap(state_dict)
    out, unknown = rename_keys(state_dict, map_official_key)
    if unknown:
        raise ValueError(f"{len(unknown)} keys have no RepVGG counterpart (first: {unknown[:5]}); is this a plain "
                         "RepVGG (A0-B3, g2 / g4) checkpoint of DingXiaoH/RepVGG? RepVGGplus and SE variants are not "
                         "supported.")
    if config is not None:
        _check_against(out, config)
    return out


def config_from_official_checkpoint(state_dict, **kwargs):
    """The RepVGGConfig of an official checkpoint, read from its keys and shapes: blocks per stage, widths,
    groupwise blocks, classes, training-time or deploy form. The official variant is named when it matches
    (variant=None otherwise, with base_channels (64, 128, 256, 512)); kwargs (image_size, id2label, ...) are
    passed on."""
    state_dict = _unwrap(state_dict)
    deploy = "stage0.rbr_reparam.weight" in state_dict
    suffix = "rbr_reparam.weight" if deploy else "rbr_dense.conv.weight"
    if f"stage0.{suffix}" not in state_dict or "linear.weight" not in state_dict:
        raise ValueError("not an official RepVGG state dict: stage0.rbr_dense.conv.weight (or stage0.rbr_reparam."
                         "weight) and linear.weight are missing.")
    stem = state_dict[f"stage0.{suffix}"]
    blocks = {}
    for key in state_dict:
        m = re.fullmatch(r"stage(\d+)\.(\d+)\." + re.escape(suffix), key)
        if m:
            blocks.setdefault(int(m[1]), []).append(int(m[2]))
    stages = sorted(blocks)
    if stages != list(range(1, len(stages) + 1)) or not stages:
        raise ValueError(f"official RepVGG stages must be stage1..stageN, found {stages}.")
    num_blocks, widths, groups_map, index, cin = [], [], {}, 1, stem.shape[0]
    for s in stages:
        if sorted(blocks[s]) != list(range(len(blocks[s]))):
            raise ValueError(f"stage{s} blocks are not numbered 0..{len(blocks[s]) - 1}: {sorted(blocks[s])}")
        num_blocks.append(len(blocks[s]))
        for j in range(len(blocks[s])):
            w = state_dict[f"stage{s}.{j}.{suffix}"]
            groups = cin // w.shape[1]
            if groups > 1:
                groups_map[index] = groups
            cin, index = w.shape[0], index + 1
        widths.append(cin)
    if len(stages) != len(OFFICIAL_BASE_CHANNELS):
        raise ValueError(f"{len(stages)} stages; official RepVGG has 4 (build the config by hand).")
    multipliers = [w / c for w, c in zip(widths, OFFICIAL_BASE_CHANNELS)]
    arch = dict(num_blocks=num_blocks, width_multiplier=multipliers, base_channels=list(OFFICIAL_BASE_CHANNELS),
                override_groups_map=groups_map)
    variant = next((name for name in REPVGG_VARIANTS if variant_kwargs(name) == arch), None)
    num_labels = state_dict["linear.weight"].shape[0]
    if "id2label" not in kwargs:
        kwargs.setdefault("num_labels", num_labels)
    base = dict(variant=variant) if variant else arch
    config = RepVGGConfig(**base, in_channels=stem.shape[1], deploy=deploy, **kwargs)
    if config.stem_channels != stem.shape[0] or config.num_labels != num_labels:
        raise ValueError(f"stem width {stem.shape[0]} / {num_labels} classes do not fit the inferred config "
                         f"(stem {config.stem_channels}, {config.num_labels} classes).")
    return config


def _check_against(converted, config):
    from .modeling_repvgg import RepVGGForImageClassification

    with torch.device("meta"):
        model = RepVGGForImageClassification(config)
    check_converted(converted, model, f"align num_blocks / deploy (config.deploy={config.deploy}) with the "
                    "checkpoint, e.g. config_from_official_checkpoint.", "align width_multiplier, override_groups_map "
                    "and num_labels with the checkpoint.")
