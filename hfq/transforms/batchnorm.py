"""Fold eval-mode BatchNorm into the convolution before it, as an int8 deployment does (the quantized convolution
then carries the normalisation in its weights and bias)."""
from __future__ import annotations

import torch
import torch.nn as nn


def conv_bn_pairs(model: nn.Module) -> list[tuple[nn.Conv2d, nn.Module, str]]:
    """(conv, parent, attribute name of the BatchNorm2d in parent) for every BatchNorm2d right after a Conv2d:
    neighbours in an nn.Sequential, or a module with `convolution` + `normalization` (transformers' ResNet)."""
    pairs = []
    for module in model.modules():
        if isinstance(module, nn.Sequential):
            children = list(module._modules.items())
            pairs += [(a, module, name_b) for (_, a), (name_b, b) in zip(children, children[1:])
                      if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d)]
        conv, bn = getattr(module, "convolution", None), getattr(module, "normalization", None)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            pairs.append((conv, module, "normalization"))
    return pairs


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> int:
    """Fold every BatchNorm2d of `conv_bn_pairs` into its convolution (which gains a bias) and replace it by
    nn.Identity; returns the number folded. Works on meta tensors too, so a load skeleton gets the folded layout."""
    pairs = conv_bn_pairs(model)
    for conv, parent, name in pairs:
        bn = getattr(parent, name)
        std = (bn.running_var + bn.eps).sqrt()
        gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(std)
        conv.weight = nn.Parameter(conv.weight * (gamma / std).reshape(-1, 1, 1, 1))
        conv.bias = nn.Parameter((bias - bn.running_mean) * gamma / std + beta)
        setattr(parent, name, nn.Identity())
    return len(pairs)
