"""VoVNet-eSE (Lee & Park, CenterMask) as the official PETR configs use it (VoVNet-99-eSE, DD3D pre-training), with the
module names of the official checkpoints (`stem.stem_1/conv.weight`, `stage2.OSA2_1.layers.0.OSA2_1_0/conv.weight`,
`stage3.OSA3_2.concat.OSA3_2_concat/norm.running_mean`, `...ese.fc.weight`), so a converted checkpoint loads with no
renaming. One-shot aggregation block: `layer_per_block` 3x3 conv-BN-ReLU layers in a chain, the block input and all
their outputs concatenated, a 1x1 conv-BN-ReLU to `stage_out_ch`, effective squeeze-excitation (global average pool,
1x1 conv, hard sigmoid), and an identity shortcut on every block of a stage but the first. Stages 3-5 start with a 3x3
stride-2 max-pool (ceil mode)."""
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

VOVNET_SPECS = {  # stem channels, per-stage conv / output channels, layers per block, blocks per stage
    "V-39-eSE": dict(stem=(64, 64, 128), stage_ch=(128, 160, 192, 224), out_ch=(256, 512, 768, 1024), layers=5,
                     blocks=(1, 1, 2, 2)),
    "V-57-eSE": dict(stem=(64, 64, 128), stage_ch=(128, 160, 192, 224), out_ch=(256, 512, 768, 1024), layers=5,
                     blocks=(1, 1, 4, 3)),
    "V-99-eSE": dict(stem=(64, 64, 128), stage_ch=(128, 160, 192, 224), out_ch=(256, 512, 768, 1024), layers=5,
                     blocks=(1, 3, 9, 3)),
}


def _conv_bn_relu(cin, cout, name, kernel=3, stride=1):
    return [(f"{name}/conv", nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False)),
            (f"{name}/norm", nn.BatchNorm2d(cout)), (f"{name}/relu", nn.ReLU(inplace=True))]


class EffectiveSE(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return x * F.hardsigmoid(self.fc(F.adaptive_avg_pool2d(x, 1)))


class OSABlock(nn.Module):
    def __init__(self, cin, stage_ch, out_ch, layers, name, identity):
        super().__init__()
        self.identity = identity
        self.layers = nn.ModuleList(
            nn.Sequential(OrderedDict(_conv_bn_relu(cin if i == 0 else stage_ch, stage_ch, f"{name}_{i}")))
            for i in range(layers))
        self.concat = nn.Sequential(OrderedDict(_conv_bn_relu(cin + layers * stage_ch, out_ch, f"{name}_concat", 1)))
        self.ese = EffectiveSE(out_ch)

    def forward(self, x):
        outs = [x]
        for layer in self.layers:
            outs.append(layer(outs[-1]))
        y = self.ese(self.concat(torch.cat(outs, 1)))
        return y + x if self.identity else y


class VoVNet(nn.Module):
    """`out_features`: names among "stem", "stage2".."stage5" whose outputs `forward` returns (in that order);
    `channels`: their channel counts."""

    def __init__(self, spec_name="V-99-eSE", out_features=("stage4", "stage5")):
        super().__init__()
        if spec_name not in VOVNET_SPECS:
            raise ValueError(f"unknown VoVNet spec {spec_name!r}; known: {sorted(VOVNET_SPECS)}")
        spec = VOVNET_SPECS[spec_name]
        s = spec["stem"]
        self.stem = nn.Sequential(OrderedDict(_conv_bn_relu(3, s[0], "stem_1", stride=2)
                                              + _conv_bn_relu(s[0], s[1], "stem_2")
                                              + _conv_bn_relu(s[1], s[2], "stem_3", stride=2)))
        channels, cin = {"stem": s[2]}, s[2]
        for i, (stage_ch, out_ch, blocks) in enumerate(zip(spec["stage_ch"], spec["out_ch"], spec["blocks"])):
            n = i + 2
            mods = [] if n == 2 else [("Pooling", nn.MaxPool2d(3, 2, ceil_mode=True))]
            for b in range(blocks):
                mods.append((f"OSA{n}_{b + 1}", OSABlock(cin if b == 0 else out_ch, stage_ch, out_ch, spec["layers"],
                                                        f"OSA{n}_{b + 1}", identity=b > 0)))
            self.add_module(f"stage{n}", nn.Sequential(OrderedDict(mods)))
            channels[f"stage{n}"], cin = out_ch, out_ch
        unknown = [f for f in out_features if f not in channels]
        if unknown:
            raise ValueError(f"out_features {unknown} are not VoVNet outputs; use {list(channels)}")
        self.out_features = tuple(out_features)
        self.channels = [channels[f] for f in self.out_features]

    def forward(self, x):
        outs = []
        x = self.stem(x)
        if "stem" in self.out_features:
            outs.append(x)
        for n in range(2, 6):
            x = getattr(self, f"stage{n}")(x)
            if f"stage{n}" in self.out_features:
                outs.append(x)
        return outs
