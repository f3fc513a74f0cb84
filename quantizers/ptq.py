"""PTQ with static activation scales: round-to-nearest weights, and activation ranges observed on calibration inputs
and stored, the "standard 8-bit per-tensor PTQ" baseline of Q-PETR / FQ-PETR and the deployment form of int8 vision
models (TensorRT-style). Quantizes every Linear, Conv2d (BatchNorm folded in first), nn.MultiheadAttention (its
four projections and both matmuls) and the operations a model marks with `hfq_op` (e.g. PETR's feature + position
embedding adds: each operand on its own scale)."""
from __future__ import annotations

import dataclasses
import os

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from hfq.calibration import CalibratedConfig
from hfq.integration import HfqQuantizer, quantization_targets, register_method, replace_targets, rtn_module
from hfq.nn import calibrate_static
from hfq.progress import is_quiet
from hfq.quant import QuantArgs
from hfq.transforms.batchnorm import conv_bn_pairs, fold_batchnorm

logger = logging.get_logger(__name__)
WEIGHT_GRANULARITIES = ("tensor", "channel", "group")


class PTQConfig(CalibratedConfig):
    """Static-activation PTQ. Defaults: W8A8, symmetric per-tensor int8 weights and activations, min/max observer.

    weight_granularity: "tensor" (one scale per weight, the Q-PETR baseline), "channel" or "group" (with group_size).
    act_dynamic: False (default) stores calibrated activation scales; True quantizes each input at run time (then no
    calibration runs). act_observer: "minmax", "percentile" (act_percentile of |x| over a subsample of the calibration
    inputs) or "mse". fold_batchnorm: fold eval-mode BatchNorm2d into the convolution before it (as int8 deployment
    does); the saved checkpoint has the folded layout.
    Calibration data (`dataset` or `calibration=` of `hfq.quantize`): for a language model any form of
    `CalibratedConfig` (n_samples x seq_len tokens, batch_size per forward); for other models a list of model-input
    dicts (e.g. {"pixel_values": ..., "lidar2img": ...}), each run as `model(**batch)`, all of them, as given; for a
    PETR-family model also a nuScenes-format folder (`dataset="path"`: n_samples evenly spaced samples of its
    `dataset_split`, through the model's image processor; `hfq.data.synthetic_nuscenes.calibration_batches`)."""

    quant_method = "hfq_ptq"
    target_kinds = ("linear", "experts", "conv2d", "attention", "op")
    static_activations = True

    def __init__(self, bits: int = 8, group_size: int | None = None, weight_granularity: str = "tensor",
                 act_bits: int | None = 8, act_granularity: str = "tensor", act_dynamic: bool = False,
                 act_observer: str = "minmax", act_percentile: float = 0.999, fold_batchnorm: bool = True,
                 n_samples: int = 32, seq_len: int = 512, dataset_split: str = "synthetic_train", **kwargs):
        self.dataset_split = dataset_split
        self.weight_granularity, self.act_dynamic = weight_granularity, act_dynamic
        self.act_observer, self.act_percentile, self.fold_batchnorm = act_observer, act_percentile, fold_batchnorm
        super().__init__(bits=bits, group_size=group_size, act_bits=act_bits, act_granularity=act_granularity,
                         n_samples=n_samples, seq_len=seq_len, **kwargs)

    def post_init(self):
        if self.weight_granularity not in WEIGHT_GRANULARITIES:
            raise ValueError(f"weight_granularity must be one of {WEIGHT_GRANULARITIES}, got {self.weight_granularity!r}")
        if (self.weight_granularity == "group") != bool(self.group_size):
            raise ValueError(f"group_size={self.group_size} goes with weight_granularity='group' (and only with it), "
                             f"got weight_granularity={self.weight_granularity!r}")
        if not self.act_dynamic and self.act_bits is not None and self.act_granularity != "tensor":
            raise ValueError("static activation scales are per tensor: act_granularity='tensor' (or act_dynamic=True "
                             "for per-token scales computed at run time)")
        super().post_init()

    def weight_args(self) -> QuantArgs:
        return dataclasses.replace(super().weight_args(), granularity=self.weight_granularity)

    def act_args(self) -> QuantArgs | None:
        args = super().act_args()
        if args is None:
            return None
        return dataclasses.replace(args, dynamic=self.act_dynamic, observer=self.act_observer,
                                   percentile=self.act_percentile)

    def calibration_batches(self, model, calibration=None) -> list[dict]:
        """Model-input dicts for the calibration forwards."""
        data = calibration if calibration is not None else self.dataset
        if isinstance(data, (list, tuple)) and data and all(isinstance(b, dict) and "input_ids" not in b for b in data):
            return list(data)
        if isinstance(data, (str, os.PathLike)) and os.path.isdir(data) and hasattr(model, "get_image_processor"):
            from hfq.data.synthetic_nuscenes import calibration_batches
            return calibration_batches(model, data, self.dataset_split, self.n_samples, self.batch_size)
        windows = torch.stack(self.calibration_samples(model, calibration))
        return [{"input_ids": w} for w in windows.split(self.batch_size)]


class PTQHfQuantizer(HfqQuantizer):
    def prepare_skeleton(self, model):
        if self.quantization_config.fold_batchnorm:
            fold_structure(model)  # the checkpoint holds folded convolutions: give the skeleton their biases

    def calibrate(self, model, calibration=None):
        """Model-input batches, when some activation scale is static (else none are needed)."""
        cfg = self.quantization_config
        if not cfg.static_activation_sources():
            return None
        return cfg.calibration_batches(model, calibration)

    def transform(self, model, batches):
        model.eval()
        if self.quantization_config.fold_batchnorm:
            logger.info("hfq_ptq: folded %d BatchNorm2d into their convolutions", fold_batchnorm(model))

    @torch.no_grad()
    def solve(self, model, batches, sample_weights=None):
        cfg = self.quantization_config
        if sample_weights is not None or cfg.sample_weights is not None:
            raise ValueError("hfq_ptq's range observers do not weight samples; drop sample_weights")
        targets = quantization_targets(model, cfg)
        if not targets:
            raise ValueError("hfq_ptq found nothing to quantize (no Linear, Conv2d, MultiheadAttention or marked op)")
        replace_targets(model, targets, lambda name, module: rtn_module(name, module, cfg))

    @torch.no_grad()
    def attach(self, model, batches):
        """Observe the calibration batches through the quantized model and store every static activation scale."""
        if batches is None:
            return
        device = next(model.parameters()).device

        def run():
            for batch in tqdm(batches, desc=f"{self.quantization_config.quant_method} calibration", disable=is_quiet()):
                model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})

        n = calibrate_static(model, run)
        logger.info("hfq_ptq: calibrated %d static activation quantizers on %d batches", n, len(batches))


def fold_structure(model) -> None:
    """The layout `fold_batchnorm` leaves (every folded convolution has a bias, its BatchNorm is gone), without the
    arithmetic: for the load skeleton, whose tensors are not loaded yet."""
    for conv, parent, name in conv_bn_pairs(model):
        if conv.bias is None:
            conv.bias = torch.nn.Parameter(torch.empty(conv.out_channels, dtype=conv.weight.dtype,
                                                       device=conv.weight.device))
        setattr(parent, name, torch.nn.Identity())


register_method(PTQConfig, PTQHfQuantizer)
