"""PTQAT (arXiv 2508.10557): post-training quantization of every layer, then quantization-aware training of only part
of them, as a PEFT tuner: `peft.get_peft_model(model, hfq.PTQATConfig(...))`.

What the paper publishes is its abstract (no body, no code; ../shared/methods/vision.md section 5), so every choice it
leaves open is a config field and the defaults follow the spec's inferred recipe:
1. PTQ every target (each Linear / Conv2d hfq's PTQ quantizes): symmetric min/max weight scales (per channel or group),
   static per-tensor activation scales observed on the calibration data (or dynamic per-token, `act_dynamic=True`).
2. Measure each layer's output discrepancy, FP vs quantized (`metric`: relative "mse", "cosine" distance, or "kl"
   between softmaxes over the output features), with the layer quantized alone on its float input
   (`discrepancy="isolation"`) or with every layer quantized (`"joint"`).
3. Mark `ratio` of the layers trainable: `selection="smallest"` discrepancy (the paper's counter-intuitive choice:
   fine-tune the layers that are already good and let them absorb the error of the others), "largest" or "random".
4. Train with the task loss: a trainable layer learns a weight delta and its LSQ step sizes (straight-through
   rounding, LSQ's gradient scale); the others keep their PTQ weights and scales.
`merge_and_unload()` returns an ordinary hfq packed model (`hfq_ptq` config: packed integers + the learned scales)
that `save_pretrained` writes and `from_pretrained` reloads. The adapter saved by `save_pretrained` holds every layer's
step sizes and the trainable layers' weight deltas; `adapter_config.json` records the selection and discrepancies.

PEFT has no public hook for new tuner types (`register_peft_method` accepts only names already in its closed
`PeftType` enum), so importing hfq adds HFQ_PTQAT to that enum and registers the tuner; a PEFT version where this
does not hold fails at import with the reason."""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers.utils import logging

from .integration import keep_head_input_float, mark_quantized, module_kind, quantization_targets
from .nn import QuantConv2d, QuantLinear
from .nn.linear import scale_shape
from .progress import is_quiet
from .quant import QuantArgs, compute_qparams, fake_quantize, quantize
from .train.losses import kl_loss

logger = logging.get_logger(__name__)

METRICS = ("mse", "cosine", "kl")
SELECTIONS = ("smallest", "largest", "random")
DISCREPANCIES = ("isolation", "joint")
PEFT_NAME = "hfq_ptqat"  # PeftType.HFQ_PTQAT
PREFIX = "ptqat_"

try:
    import peft
    from peft.config import PeftConfig
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
except ImportError:  # pragma: no cover - peft is a dependency of hfq
    peft = None


def _peft_type():
    """PEFT's PeftType member HFQ_PTQAT, added to the closed enum once (Python's enum internals; checked)."""
    from peft.utils import PeftType

    name = PEFT_NAME.upper()
    if name not in PeftType.__members__:
        member = str.__new__(PeftType, name)
        member._name_, member._value_ = name, name
        PeftType._member_map_[name] = member
        PeftType._value2member_map_[name] = member
        PeftType._member_names_.append(name)
        type.__setattr__(PeftType, name, member)
    member = PeftType(name)
    if member not in list(PeftType) or member != name:
        raise RuntimeError(f"hfq.PTQATConfig could not add {name} to peft {peft.__version__}'s PeftType enum; "
                           f"use the peft version hfq pins (pyproject.toml) or report it")
    return member


def lsq_step(scale: torch.Tensor, per_step: int, qmax: int) -> torch.Tensor:
    """LSQ's gradient scale: the step's value unchanged, its gradient multiplied by
    1 / sqrt(elements per step * qmax)."""
    if not scale.requires_grad:
        return scale
    g = 1.0 / (max(per_step, 1) * qmax) ** 0.5
    return (scale - scale * g).detach() + scale * g


def discrepancy_terms(y: torch.Tensor, yq: torch.Tensor, metric: str, conv: bool) -> tuple[float, float]:
    """(numerator, denominator) of one batch's discrepancy; the layer's value is sum(num) / sum(den).
    mse: |yq - y|^2 / |y|^2 (relative, so layers of any output scale compare); cosine: 1 - cos(y, yq) per output
    vector (a token's or a pixel's features); kl: KL(softmax(y) || softmax(yq)) over the features, per vector."""
    y, yq = y.detach().float(), yq.detach().float()
    if metric == "mse":
        return float((yq - y).pow(2).sum()), float(y.pow(2).sum())
    if conv:
        y, yq = y.movedim(1, -1), yq.movedim(1, -1)
    y, yq = y.reshape(-1, y.shape[-1]), yq.reshape(-1, yq.shape[-1])
    if metric == "cosine":
        return float((1 - F.cosine_similarity(y, yq, dim=-1)).sum()), float(y.shape[0])
    return float(kl_loss(yq, y)) * y.shape[0], float(y.shape[0])


if peft is not None:
    @dataclass
    class PTQATConfig(PeftConfig):
        """PTQAT as a PEFT config (see the module docstring for the method).

        target_modules: None = every Linear / Conv2d hfq's PTQ quantizes (not the output embedding, not the layers
        inside nn.MultiheadAttention); or names / a regex (only Linear and Conv2d). bits / group_size (None = one
        scale per output channel): symmetric weights. act_bits (None = weight-only); act_dynamic: per-token scales
        at run time instead of learned static per-tensor ones. metric / discrepancy / selection / ratio / seed: which
        layers train (ratio=1 is QAT of every layer, ratio=0 is PTQ only). fold_batchnorm: fold eval-mode
        BatchNorm2d into the convolution before it first (BN stays frozen, as int8 deployment folds it).
        dataset (+ n_samples, seq_len, batch_size, dataset_split): the calibration data, any form `hfq.PTQConfig`
        takes (a text dataset name or file for LLMs, token windows, a list of model-input dicts, a nuScenes-format
        folder for PETR); only a name or path is saved.
        selected_layers / discrepancies: written by calibration and saved, so `PeftModel.from_pretrained` rebuilds
        the same trainable set without calibrating again."""

        target_modules: Optional[Union[list[str], str]] = field(default=None,
                                                                metadata={"help": "None: every Linear / Conv2d"})
        exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "kept float"})
        bits: int = 4
        group_size: Optional[int] = None
        act_bits: Optional[int] = 8
        act_dynamic: bool = False
        metric: str = "mse"
        discrepancy: str = "isolation"
        selection: str = "smallest"
        ratio: float = 0.5
        seed: int = 0
        fold_batchnorm: bool = True
        dataset: Any = None
        n_samples: int = 32
        seq_len: int = 512
        batch_size: int = 2
        dataset_split: str = "synthetic_train"
        selected_layers: Optional[list[str]] = None
        discrepancies: Optional[dict] = None

        def __post_init__(self):
            super().__post_init__()
            self.peft_type = _peft_type()
            for name, value, allowed in (("metric", self.metric, METRICS), ("selection", self.selection, SELECTIONS),
                                         ("discrepancy", self.discrepancy, DISCREPANCIES)):
                if value not in allowed:
                    raise ValueError(f"PTQATConfig: {name} must be one of {allowed}, got {value!r}")
            if not isinstance(self.ratio, (int, float)) or not 0 <= self.ratio <= 1:
                raise ValueError(f"PTQATConfig: ratio is the fraction of layers to train, in [0, 1]; got "
                                 f"{self.ratio!r}")
            self.ptq_config()  # validates bits, group size, activation settings

        def ptq_config(self, dataset=None, modules_to_not_convert=None):
            """The `hfq.PTQConfig` of the same scheme: it reads the calibration data of step 1 and is the merged
            model's quantization config."""
            from .quantizers import PTQConfig

            return PTQConfig(bits=self.bits, group_size=self.group_size,
                             weight_granularity="group" if self.group_size else "channel",
                             act_bits=self.act_bits, act_dynamic=self.act_dynamic,
                             act_granularity="token" if self.act_dynamic else "tensor",
                             fold_batchnorm=self.fold_batchnorm, dataset=dataset, n_samples=self.n_samples,
                             seq_len=self.seq_len, batch_size=self.batch_size, dataset_split=self.dataset_split,
                             seed=self.seed, modules_to_not_convert=modules_to_not_convert)

        def to_dict(self) -> dict:
            d = super().to_dict()
            if not isinstance(d.get("dataset"), (str, type(None))):
                d["dataset"] = None  # in-memory calibration samples are not saved
            return d




    class PTQATLayer(nn.Module, BaseTunerLayer):
        """A Linear or Conv2d under PTQAT: weights fake-quantized with the step sizes `ptqat_weight_scale` (after
        adding `ptqat_delta` on a trainable layer), the input fake-quantized with `ptqat_act_scale` (static) or
        per token (dynamic). `mode` serves calibration ("observe" ranges, "measure" / "record" / "compare"
        discrepancies); "quant" is the normal forward."""

        adapter_layer_names = ("ptqat_weight_scale", "ptqat_act_scale", "ptqat_delta")

        def __init__(self, base_layer: nn.Module, adapter_name: str, weight_args: QuantArgs,
                     act_args: QuantArgs | None, trainable: bool | None):
            super().__init__()
            self.base_layer = base_layer
            self.weight_args, self.act_args = weight_args, act_args
            self.ptqat_weight_scale = nn.ParameterDict()
            self.ptqat_act_scale = nn.ParameterDict()
            self.ptqat_delta = nn.ParameterDict()
            self.frozen_peft_weight_names, self.merged_adapters = {}, []
            self.mode, self._stat, self._range, self._y = "quant", None, None, None
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, trainable)

        @property
        def is_conv(self) -> bool:
            return isinstance(self.base_layer, nn.Conv2d)

        def update_layer(self, adapter_name: str, trainable: bool | None) -> None:
            w = self.base_layer.weight
            nan = dict(dtype=torch.float32, device=w.device)
            shape = scale_shape(w.shape[0], w[0].numel(), self.weight_args)
            self.ptqat_weight_scale[adapter_name] = nn.Parameter(torch.full(shape, float("nan"), **nan))
            if self.act_args is not None and not self.act_args.dynamic:
                self.ptqat_act_scale[adapter_name] = nn.Parameter(torch.full((1,), float("nan"), **nan))
            self.set_trainable(adapter_name, trainable, fill=float("nan"))

        def set_trainable(self, adapter_name: str, trainable: bool | None, fill: float = 0.0) -> None:
            """Give a trainable layer its weight delta (zeros after calibration; NaN until a saved adapter fills
            it); a frozen (or not yet selected) layer keeps its PTQ step sizes frozen."""
            if trainable:
                self.ptqat_delta[adapter_name] = nn.Parameter(torch.full_like(self.base_layer.weight, fill))
                self.frozen_peft_weight_names.pop(adapter_name, None)
            else:
                self.frozen_peft_weight_names[adapter_name] = self.adapter_layer_names
            self.set_adapter(self.active_adapters)

        def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
            """PEFT's set_adapter makes every adapter tensor trainable; re-freeze the layers PTQAT keeps at PTQ (PEFT
            0.21 does this itself through `frozen_peft_weight_names`, older versions do not)."""
            super().set_adapter(adapter_names, inference_mode=inference_mode)
            for adapter_name, names in self.frozen_peft_weight_names.items():
                for name in names:
                    if adapter_name in getattr(self, name):
                        getattr(self, name)[adapter_name].requires_grad_(False)

        def is_trainable(self, adapter_name: str) -> bool:
            return adapter_name in self.ptqat_delta

        # ------------------------------------------------------------ quantization
        def _check(self, adapter_name: str) -> None:
            tensors = [self.ptqat_weight_scale[adapter_name]] + [d[adapter_name] for d in
                                                                  (self.ptqat_act_scale, self.ptqat_delta)
                                                                  if adapter_name in d]
            if not all(bool(torch.isfinite(t).all()) for t in tensors):
                raise RuntimeError("PTQAT layer has no calibrated step sizes (or weight delta): create the adapter "
                                   "with get_peft_model(model, PTQATConfig(dataset=...)) and leave selected_layers "
                                   "unset so it calibrates, or load a saved adapter with PeftModel.from_pretrained")

        def weight_rows(self, adapter_name: str) -> torch.Tensor:
            """The float weight [out, cols] this layer quantizes (base weight + delta on a trainable layer)."""
            w = self.base_layer.weight
            if adapter_name in self.ptqat_delta:
                w = w + self.ptqat_delta[adapter_name]
            return w.reshape(w.shape[0], -1)

        def quantized_weight(self, adapter_name: str) -> torch.Tensor:
            rows, a = self.weight_rows(adapter_name), self.weight_args
            scale = self.ptqat_weight_scale[adapter_name]
            s = lsq_step(scale, rows.numel() // scale.numel(), a.qmax)
            return fake_quantize(rows, a, s, torch.zeros_like(s)).reshape(self.base_layer.weight.shape)

        def quantized_input(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
            a = self.act_args
            if a is None:
                return x
            if a.dynamic:
                return fake_quantize(x, a)
            scale = self.ptqat_act_scale[adapter_name]
            s = lsq_step(scale, x[0].numel(), a.qmax)
            return fake_quantize(x, a, s, torch.zeros_like(s))

        def _compute(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            b = self.base_layer
            return b._conv_forward(x, weight, b.bias) if self.is_conv else F.linear(x, weight, b.bias)

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if self.disable_adapters or not self.active_adapters:
                return self.base_layer(x, *args, **kwargs)
            a = self.active_adapters[0]
            if self.mode == "observe":  # static activation ranges; weights already quantized
                lo, hi = x.detach().float().amin(), x.detach().float().amax()
                self._range = (lo, hi) if self._range is None else (torch.minimum(self._range[0], lo),
                                                                    torch.maximum(self._range[1], hi))
                return self._compute(x, self.quantized_weight(a))
            if self.mode in ("measure", "record"):
                y = self.base_layer(x)
                if self.mode == "record":
                    self._y = y.detach()
                else:
                    self._accumulate(y, self._compute(self.quantized_input(x, a), self.quantized_weight(a)))
                return y
            self._check(a)
            y = self._compute(self.quantized_input(x, a), self.quantized_weight(a))
            if self.mode == "compare":
                self._accumulate(self._y, y)
            return y

        def _accumulate(self, y, yq) -> None:
            num, den = discrepancy_terms(y, yq, self._metric, self.is_conv)
            self._stat = (num, den) if self._stat is None else (self._stat[0] + num, self._stat[1] + den)

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            raise NotImplementedError("a PTQAT layer becomes a packed hfq layer: use merge_and_unload()")

        def unmerge(self) -> None:
            pass  # never merged in place

        @torch.no_grad()
        def packed(self, adapter_name: str) -> nn.Module:
            """The hfq packed module this layer deploys as: integers round(W / step) with the learned steps, the
            learned (static) activation step, the base bias. Same rounding as the training forward."""
            self._check(adapter_name)
            w, a = self.weight_args, self.act_args
            scale = self.ptqat_weight_scale[adapter_name].detach()
            zero = torch.zeros_like(scale)
            q = quantize(self.weight_rows(adapter_name), scale, zero, w)
            b = self.base_layer
            if self.is_conv:
                module = QuantConv2d.empty_like(b, w, a)
                module.set_quantized(q, scale, zero)
                if b.bias is not None:
                    module.bias.data.copy_(b.bias)
            else:
                module = QuantLinear.from_quantized(q, scale, zero, w, a, b.bias, dtype=b.weight.dtype)
            if a is not None and not a.dynamic:
                module.input_quant.scale.data.copy_(self.ptqat_act_scale[adapter_name].detach())
            return module

        def __repr__(self) -> str:
            return "ptqat." + super().__repr__()


    class PTQATModel(BaseTuner):
        """The PEFT tuner: wraps the targets in `PTQATLayer`s, calibrates and selects (step 1-3) right after, and
        merges into packed hfq layers."""

        prefix = PREFIX
        tuner_layer_cls = PTQATLayer
        target_module_mapping: dict = {}

        def _pre_injection_hook(self, model, config, adapter_name):
            if config.fold_batchnorm:
                from .transforms.batchnorm import fold_batchnorm

                was_training = model.training
                model.eval()
                folded = fold_batchnorm(model)
                model.train(was_training)
                if folded:
                    logger.info("hfq_ptqat: folded %d BatchNorm2d into their convolutions", folded)
            if config.target_modules is None:
                ptq = config.ptq_config()
                config.target_modules = sorted(n for n, m in quantization_targets(model, ptq).items()
                                               if module_kind(m) in ("linear", "conv2d"))
                if not config.target_modules:
                    raise ValueError("PTQAT found no Linear or Conv2d to quantize in this model")

        def _prepare_adapter_config(self, peft_config, model_config):
            return peft_config  # targets were resolved in _pre_injection_hook, where the model is at hand

        def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
            if isinstance(target, PTQATLayer):
                raise ValueError("a model holds one PTQAT adapter; merge_and_unload() it before adding another")
            if module_kind(target) not in ("linear", "conv2d"):
                raise ValueError(f"PTQAT quantizes Linear and Conv2d layers; {current_key} is a "
                                 f"{type(target).__name__}: remove it from target_modules")
            w, a = peft_config.ptq_config().scheme_for(current_key)
            if self.is_conv_group(target, w):
                raise ValueError(f"{current_key}: convolution weights are quantized per output channel; use "
                                 f"group_size=None or exclude the convolutions")
            selected = peft_config.selected_layers
            trainable = None if selected is None else current_key in selected
            self._replace_module(parent, target_name, PTQATLayer(target, adapter_name, w, a, trainable), target)

        @staticmethod
        def is_conv_group(target, args: QuantArgs) -> bool:
            return isinstance(target, nn.Conv2d) and args.granularity == "group"

        def _post_injection_hook(self, model, config, adapter_name):
            if config.selected_layers is None:
                calibrate(model, config, adapter_name)

        def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
            if len(self.peft_config) != 1:
                raise ValueError("PTQAT merges one adapter at a time")
            adapter = next(iter(self.peft_config))
            config = self.peft_config[adapter]
            layers = [(n, m) for n, m in self.model.named_modules() if isinstance(m, PTQATLayer)]
            for name, layer in tqdm(layers, desc="hfq_ptqat merge", disable=not progressbar or is_quiet()):
                self.model.set_submodule(name, layer.packed(adapter) if merge else layer.get_base_layer())
            if hasattr(self.model, "peft_config"):
                del self.model.peft_config
            if merge:
                ptq = config.ptq_config()
                left_float = [re.escape(n) for n in quantization_targets(self.model, ptq)]
                mark_quantized(self.model, config.ptq_config(modules_to_not_convert=left_float or None))
                keep_head_input_float(self.model)
            return self.model


@torch.no_grad()
def calibrate(model: nn.Module, config, adapter_name: str = "default") -> dict[str, float]:
    """Steps 1-3 on a model whose targets are `PTQATLayer`s: weight steps from min/max, static activation steps
    observed on the calibration data, per-layer discrepancies, and the trainable selection (recorded in `config`)."""
    if config.dataset is None:
        raise ValueError("PTQATConfig needs calibration data for its PTQ step: dataset= a text dataset name or file, "
                         "token windows, a list of model-input dicts or a nuScenes-format folder (or load a saved "
                         "adapter with PeftModel.from_pretrained)")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, PTQATLayer)}
    batches = config.ptq_config(dataset=config.dataset).calibration_batches(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()

    def run(desc):
        for batch in tqdm(batches, desc=f"hfq_ptqat {desc}", disable=is_quiet()):
            model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})

    def set_mode(mode):
        for layer in layers.values():
            layer.mode = mode

    try:
        for layer in layers.values():
            scale, _ = compute_qparams(layer.weight_rows(adapter_name).float(), layer.weight_args)
            layer.ptqat_weight_scale[adapter_name].copy_(scale)
            layer._range, layer._stat, layer._metric = None, None, config.metric
        if adapter_name in next(iter(layers.values())).ptqat_act_scale:
            set_mode("observe")
            run("activation ranges")
            for name, layer in layers.items():
                if layer._range is None:
                    raise RuntimeError(f"PTQAT layer {name} saw no calibration data: is it on the forward path of the "
                                       f"calibration inputs? (else exclude it: exclude_modules)")
                scale, _ = compute_qparams(torch.stack(layer._range), layer.act_args)
                layer.ptqat_act_scale[adapter_name].copy_(scale.reshape(1))
        if config.discrepancy == "isolation":
            set_mode("measure")
            run(f"{config.metric} discrepancy (isolation)")
        else:
            for batch in tqdm(batches, desc=f"hfq_ptqat {config.metric} discrepancy (joint)", disable=is_quiet()):
                inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                set_mode("record")
                model(**inputs)
                set_mode("compare")
                model(**inputs)
    finally:
        set_mode("quant")
        model.train(was_training)
        for layer in layers.values():
            layer._y = None
    missing = [n for n, layer in layers.items() if layer._stat is None]
    if missing:
        raise RuntimeError(f"PTQAT layers {missing[:3]} saw no calibration data; exclude them (exclude_modules)")
    scores = {n: layer._stat[0] / max(layer._stat[1], 1e-30) for n, layer in layers.items()}
    chosen = select_layers(scores, config.selection, config.ratio, config.seed)
    for name, layer in layers.items():
        layer.set_trainable(adapter_name, name in chosen)
    config.selected_layers = sorted(chosen)
    config.discrepancies = {n: float(v) for n, v in sorted(scores.items())}
    logger.info("hfq_ptqat: %d of %d layers trainable (%s %s, ratio %s)", len(chosen), len(layers), config.selection,
                config.metric, config.ratio)
    return scores


def select_layers(scores: dict[str, float], selection: str, ratio: float, seed: int = 0) -> set[str]:
    """round(ratio * n) layer names: the smallest / largest discrepancies (ties by name) or a seeded random set."""
    k = round(ratio * len(scores))
    names = sorted(scores)
    if selection == "random":
        return set(random.Random(seed).sample(names, k))
    ranked = sorted(names, key=lambda n: (scores[n], n), reverse=selection == "largest")
    return set(ranked[:k])


def _register() -> None:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    try:
        from peft.utils import register_peft_method
    except ImportError:
        raise RuntimeError(f"hfq.PTQATConfig registers itself with peft.utils.register_peft_method, which peft "
                           f"{peft.__version__} lacks; install peft>=0.17") from None

    peft_type = _peft_type()
    if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        register_peft_method(name=PEFT_NAME, config_cls=PTQATConfig, model_cls=PTQATModel, prefix=PREFIX)


if peft is not None:
    _register()
