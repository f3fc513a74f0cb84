"""FQ-PETR (arXiv 2511.09347; Q-PETR arXiv 2502.15488): a fully quantized PETR. On top of `hfq.PTQConfig`'s W8A8
per-tensor static PTQ (every conv / linear, both attention matmuls, the feature + position-embedding adds) it
quantizes the softmax input with QANS (z - max(z) clipped to [-beta, 0], beta per layer from a candidate set) and
evaluates every non-linear function the model marks (`hfq_op`: sigmoid, inverse sigmoid; exp inside the softmax)
through DULUT lookup tables fitted on the calibrated input ranges. QFPE, the third part, is a model option
(`PetrConfig(pe_type="qfpe")`) trained like the standard PE. The paper has no released code: the readings taken
where it is silent are listed in docs/fqpetr.md."""
from __future__ import annotations

import torch
import torch.nn as nn
from transformers.utils import logging

from hfq.integration import quantization_targets, register_method
from hfq.nn import LUTFunction, QuantLinear, QuantMultiheadAttention, QuantSoftmax
from hfq.transforms import smoothing_scale
from hfq.nn.lut import TABLES

from .ptq import PTQConfig, PTQHfQuantizer

logger = logging.get_logger(__name__)
SOFTMAX_INPUTS = ("qans", "raw")


class FQPETRConfig(PTQConfig):
    """FQ-PETR: W8A8 per-tensor static PTQ + QANS softmax input + DULUT non-linears (all on by default).

    softmax_input: "qans" (FQ-PETR), "raw" (the logits quantized per tensor with a static int8 scale: the plain
    fully-int8 baseline) or None (float softmax, as hfq.PTQConfig). beta_candidates: QANS clipping ranges tried per
    attention layer (the one whose softmax deviates least from the float softmax on the calibration data is kept).
    lut: "dulut" (LUT-1 index mapper of `lut_index_entries` + LUT-2 of `lut_value_entries` values), "single" (one
    uniform linear table of `lut_single_entries` values: the baseline) or None (non-linears in float). Tables cover
    the calibrated input range of each function; their input is a `lut_input_bits` integer code of that range.
    smooth_alpha: None (default) or SmoothQuant's migration strength: every linear layer's input (and the q / k / v
    inputs of every attention) is divided per channel by s = max|x|^alpha / max|w|^(1 - alpha) (calibration absmax)
    and its weight columns multiplied by s before quantization (the "SmoothQuant-style" baseline; FQ-PETR's best
    PETR row is "SQ* + QANS").
    calibration: a list of model-input dicts, or `dataset` = a nuScenes-format folder (see PTQConfig)."""

    quant_method = "hfq_fqpetr"

    def __init__(self, softmax_input: str | None = "qans", beta_candidates=(2, 4, 6, 8, 10, 12, 16, 20, 24, 32),
                 lut: str | None = "dulut", lut_index_entries: int = 32, lut_value_entries: int = 32,
                 lut_single_entries: int = 256, lut_input_bits: int = 16, smooth_alpha: float | None = None, **kwargs):
        self.smooth_alpha = smooth_alpha
        self.softmax_input, self.beta_candidates, self.lut = softmax_input, list(beta_candidates), lut
        self.lut_index_entries, self.lut_value_entries = lut_index_entries, lut_value_entries
        self.lut_single_entries, self.lut_input_bits = lut_single_entries, lut_input_bits
        super().__init__(**kwargs)

    def post_init(self):
        if self.softmax_input is not None and self.softmax_input not in SOFTMAX_INPUTS:
            raise ValueError(f"softmax_input must be one of {SOFTMAX_INPUTS} or None, got {self.softmax_input!r}")
        if self.lut is not None and self.lut not in TABLES:
            raise ValueError(f"lut must be one of {TABLES} or None (float non-linears), got {self.lut!r}")
        if not self.beta_candidates or any(b <= 0 for b in self.beta_candidates):
            raise ValueError(f"beta_candidates must be positive clipping ranges, got {self.beta_candidates!r}")
        if not 8 <= self.lut_input_bits <= 24:
            raise ValueError(f"lut_input_bits must be 8..24, got {self.lut_input_bits}")
        if self.lut_value_entries < self.lut_index_entries:
            raise ValueError(f"lut_value_entries ({self.lut_value_entries}) must be >= lut_index_entries "
                             f"({self.lut_index_entries})")
        if self.smooth_alpha is not None and not 0 <= self.smooth_alpha <= 1:
            raise ValueError(f"smooth_alpha must be in [0, 1] (SmoothQuant: 0.5) or None, got {self.smooth_alpha}")
        if self.act_bits is None or self.act_dynamic:
            raise ValueError("FQ-PETR quantizes activations with static scales (act_bits=8, act_dynamic=False)")
        super().post_init()

    @property
    def target_kinds(self):
        kinds = PTQConfig.target_kinds
        return kinds + ("nonlinear",) if self.lut is not None else kinds

    def nonlinear_module(self, fn: str) -> LUTFunction:
        """The table that evaluates a marked non-linear function `fn` (uncalibrated: NaN until fitted or loaded)."""
        return LUTFunction(fn, self.lut, self.lut_input_bits, self.lut_index_entries, self.lut_value_entries,
                           self.lut_single_entries)

    def softmax_module(self) -> QuantSoftmax | None:
        if self.softmax_input is None:
            return None
        return QuantSoftmax(self.softmax_input, self.act_bits, self.beta_candidates,
                            None if self.lut is None else self.nonlinear_module("exp"))


class FQPETRHfQuantizer(PTQHfQuantizer):
    def _process_model_before_weight_loading(self, model, **kwargs):
        super()._process_model_before_weight_loading(model, **kwargs)
        if self.pre_quantized:
            install_softmax(model, self.quantization_config)
            if self.quantization_config.smooth_alpha is not None:
                for name in smoothed_layers(model):
                    layer = model.get_submodule(name)
                    layer.input_quant.enable_smoothing(layer.in_features)

    def transform(self, model, batches):
        super().transform(model, batches)
        cfg = self.quantization_config
        self.smoothing = {}
        if cfg.smooth_alpha is not None:
            self.smoothing = smooth_(model, batches, cfg.smooth_alpha, quantization_targets(model, cfg))
            logger.info("hfq_fqpetr: smoothed the inputs of %d linear layers (alpha %.2f)", len(self.smoothing),
                        cfg.smooth_alpha)

    def solve(self, model, batches, sample_weights=None):
        super().solve(model, batches, sample_weights)
        for name, s in self.smoothing.items():
            model.get_submodule(name).input_quant.enable_smoothing(s.numel(), s)
        install_softmax(model, self.quantization_config)


def install_softmax(model, config: FQPETRConfig) -> None:
    """Give every quantized attention its quantized softmax (the checkpoint stores its clip and exp table)."""
    for m in model.modules():
        if isinstance(m, QuantMultiheadAttention):
            m.softmax = config.softmax_module()


def smoothed_layers(model) -> list[str]:
    """The quantized linear layers SmoothQuant-style smoothing covers (the layers `smooth_` measured): every
    QuantLinear outside attention, and each attention's q / k / v projections but not its out_proj
    (nn.MultiheadAttention computes that input internally, so no float pass sees it to measure)."""
    names, in_attention = [], set()
    for n, m in model.named_modules():  # parents come before their children
        if isinstance(m, QuantMultiheadAttention):
            names += [f"{n}.{p}" for p in ("q_proj", "k_proj", "v_proj")]
            in_attention.update(f"{n}.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
        elif isinstance(m, QuantLinear) and n not in in_attention:
            names.append(n)
    return names


@torch.no_grad()
def smooth_(model, batches, alpha: float, targets: dict) -> dict[str, torch.Tensor]:
    """Per-channel input absmax of every target nn.Linear and of each attention's query / key / value over the
    calibration batches (float model), s = absmax^alpha / max|w|^(1 - alpha) per input channel, weights scaled
    in place (W * s); returns {quantized layer name: s} for the input quantizers to divide by."""
    absmax, hooks = {}, []

    def track(names, args):  # a forward pre-hook: returns None, so the inputs pass unchanged
        for name, x in zip(names, args):
            a = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
            absmax[name] = a if name not in absmax else torch.maximum(absmax[name], a)

    for n, m in targets.items():
        if isinstance(m, (nn.Linear, nn.MultiheadAttention)):
            names = [n] if isinstance(m, nn.Linear) else [f"{n}.{p}" for p in ("q_proj", "k_proj", "v_proj")]
            hooks.append(m.register_forward_pre_hook(lambda mod, args, names=names: track(names, args)))
    try:
        for batch in batches:
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    scales = {}
    for n, m in targets.items():
        if isinstance(m, nn.Linear) and n in absmax:
            scales[n] = smoothing_scale(absmax[n], m.weight.detach().abs().amax(0).float(), alpha)
            m.weight.mul_(scales[n].to(m.weight.dtype))
        elif isinstance(m, nn.MultiheadAttention):
            d = m.embed_dim
            for i, p in enumerate(("q_proj", "k_proj", "v_proj")):
                if f"{n}.{p}" in absmax:
                    w = m.in_proj_weight[i * d:(i + 1) * d]
                    w_absmax = w.detach().abs().amax(0).float()
                    scales[f"{n}.{p}"] = smoothing_scale(absmax[f"{n}.{p}"], w_absmax, alpha)
                    w.mul_(scales[f"{n}.{p}"].to(w.dtype))
    return scales


register_method(FQPETRConfig, FQPETRHfQuantizer)
