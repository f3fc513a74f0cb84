"""CFWS (arXiv 2312.10588): post-training quantization of re-parameterized networks (RepVGG). The model is fused first
(`reparameterize()`: one 3x3 convolution per block); every fused 3x3 convolution is split into a coarse part (the
centre taps, which carry the 1x1 and identity branches, on their own grid) and a fine part (the neighbours and the
centre's rounding residual), two INT8 convolutions summed in the accumulator, with an INT16 bias
(`hfq.nn.QuantCFWSConv2d`, math in `hfq.quant.cfws`); activation scales by TensorRT-style entropy (KL) calibration
or this project's improved KL (`hfq.quant.kl`: the paper's metric is unreleased). Other layers (the head, 1x1
convolutions) are plain W8A8 as `hfq.PTQConfig`."""
from __future__ import annotations

import torch
from transformers.utils import logging

from hfq.integration import empty_quantized, quantization_targets, register_method, replace_targets, rtn_module
from hfq.nn import QuantCFWSConv2d

from .ptq import PTQConfig, PTQHfQuantizer

logger = logging.get_logger(__name__)


class CFWSConfig(PTQConfig):
    """CFWS W8A8. split: True (CFWS) or False (plain per-channel / per-tensor RTN of the fused model: the baseline).
    act_observer: "minmax" (default, as the official script's default RepVGGMinMaxConfig; the best measured on the
    digits benchmark), "kl" (TensorRT entropy) or "kl_improved" (KL + relative MSE: ours, the paper's improved KL is
    unreleased), static per-tensor activations over the calibration images. weight_granularity "channel"
    (the official per-output-channel grids) or "tensor". The model is reparameterized (fused) before quantizing when
    it has `reparameterize()` and is not fused yet; the checkpoint holds the fused layout."""

    quant_method = "hfq_cfws"

    def __init__(self, split: bool = True, weight_granularity: str = "channel", act_observer: str = "minmax",
                 **kwargs):
        self.split = split
        super().__init__(weight_granularity=weight_granularity, act_observer=act_observer, **kwargs)

    def post_init(self):
        super().post_init()
        if not self.sym:
            raise ValueError("CFWS quantizes weights symmetrically (as the official layer): use sym=True")

    def splits(self, module) -> bool:
        """Whether a target is split: a convolution with an odd kernel larger than 1x1 (RepVGG's fused 3x3)."""
        k = getattr(module, "kernel_size", (1, 1))
        return self.split and isinstance(module, torch.nn.Conv2d) and k != (1, 1) and k[0] % 2 == 1 and k[1] % 2 == 1


class CFWSHfQuantizer(PTQHfQuantizer):
    def transform(self, model, batches):
        if hasattr(model, "reparameterize") and not getattr(model.config, "deploy", False):
            model.reparameterize()
            logger.info("hfq_cfws: fused the re-parameterized branches (reparameterize())")
        super().transform(model, batches)

    @torch.no_grad()
    def solve(self, model, batches, sample_weights=None):
        cfg = self.quantization_config
        targets = quantization_targets(model, cfg)
        if not targets:
            raise ValueError("hfq_cfws found nothing to quantize (no Conv2d or Linear)")

        def build(name, module):
            if cfg.splits(module):
                w, a = cfg.scheme_for(name)
                return QuantCFWSConv2d.from_conv(module, w, a)
            return rtn_module(name, module, cfg)

        replace_targets(model, targets, build)

    def empty_module(self, name, module, dtype=None):
        cfg = self.quantization_config
        if cfg.splits(module):
            w, a = cfg.scheme_for(name)
            return QuantCFWSConv2d.empty_like(module, w, a, dtype=dtype)
        return empty_quantized(name, module, cfg, dtype)


register_method(CFWSConfig, CFWSHfQuantizer)
