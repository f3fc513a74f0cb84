"""OSTQuant: learned orthogonal + scaling transforms with the KL-Top loss, then GPTQ (Hu et al., ICLR 2025).

Lifecycle (the config is `config.py`, the training `train.py`):
1. calibration windows (`dataset`, n_samples x seq_len) — used both for training the transforms and for GPTQ;
2. init R1 (global residual rotation), R2 (one per KV head per layer) from `rotation_init`, scalings = 1;
3. learn=True: train all transforms over the whole model with KL-Top between the float model (teacher) and the
   transformed model with fake-quantized activations (and weights, `train_weight_quant`), straight-through;
   learn=False: the QuaRot-style baseline, random Hadamard R1/R2 + online R4 (+ optional R3), nothing learned;
4. `fuse_transforms_` (exact, float64): norms absorbed, R1/R2/scalings fused, online Hadamard R4 before down_proj
   (and R3 on q/k after RoPE with online_qk=True), recorded in config.hfq_online_rotations;
5. GPTQ (or RTN) of the fused float model into packed `QuantLinear`s with a dynamic per-token activation
   quantizer; the online rotations are re-attached to the new down_proj modules.
The checkpoint holds integers, scales, the (fused) norm weights and the online-rotation spec: reloading rebuilds
the R3/R4 modules from that spec (`restore_online_rotations`) and never re-runs training or calibration.
"""
from __future__ import annotations

import torch
from transformers.utils import logging

from hfq.integration import METHODS, HfqQuantizer, quantization_targets, register_method
from hfq.transforms import fuse_transforms_, online_spec, restore_online_rotations, set_kv_quant, transform_layout

from .config import OSTQuantConfig
from .train import OSTQuantTrainer, OSTTransforms, init_transforms

logger = logging.get_logger(__name__)


def _as_batch(samples: list[torch.Tensor]) -> torch.Tensor:
    lengths = {s.numel() for s in samples}
    if len(lengths) != 1:
        n = min(lengths)
        logger.warning(f"hfq_ostquant: calibration samples have different lengths; training uses their first {n} "
                       f"tokens")
        return torch.stack([s[:n] for s in samples])
    return torch.stack(samples)


def check_online_spec(model, cfg: OSTQuantConfig) -> None:
    """The run-time pieces the config says the weights were fused for must be in `config.hfq_online_rotations`:
    without them the model would run without R4 / R3 / the KV quantizer and silently give wrong outputs."""
    spec = online_spec(model)
    needed = {"down_proj": cfg.online_down, "qk": cfg.online_qk, "kv": cfg.kv_bits is not None}
    lost = [kind for kind, wanted in needed.items() if wanted and kind not in spec]
    if lost:
        raise ValueError(f"this hfq_ostquant checkpoint was fused for online pieces {lost} but its config.json has no "
                         f"hfq_online_rotations entry for them; without them its outputs would be wrong. Restore "
                         f"config.json from the saved model (or re-quantize from full precision)")


class OSTQuantHfQuantizer(HfqQuantizer):
    supports_offload = True  # learn=False only: the rotations are fused block by block, then the weight solver runs

    def offload_refusal(self):
        cfg = self.quantization_config
        if cfg.learn:
            return ("learn=True trains the transforms over the whole model at once (KL-Top on its outputs); use "
                    "learn=False (QuaRot-style rotations, fused block by block) or enough memory")
        if cfg.rotation_init == "klt_hadamard":
            return "rotation_init='klt_hadamard' reads every weight at once to build R1; use 'hadamard'"
        return super().offload_refusal()

    def restore(self, model):
        check_online_spec(model, self.quantization_config)
        restore_online_rotations(model)  # R3 / R4 carry no tensors: rebuilt from config.hfq_online_rotations

    def learn_transforms(self, model, samples: list[torch.Tensor]):
        """(r1, layers) to fuse: initialised from `rotation_init`, trained with KL-Top when `learn`."""
        cfg = self.quantization_config
        r1, r2 = init_transforms(model, cfg.rotation_init, cfg.seed)
        tf = OSTTransforms(model, r1, r2, scalings=cfg.scalings and cfg.learn)
        if cfg.learn:
            device = next(model.parameters()).device
            tf.to(device)
            targets = quantization_targets(model, cfg)
            trainer = OSTQuantTrainer(
                model, tf, targets, weight_args=cfg.weight_args() if cfg.weight_quant_in_training() else None,
                act_args=cfg.act_args(), online_down=cfg.online_down, online_seed=cfg.seed, kl_top_k=cfg.kl_top_k,
                lr_rotation=cfg.lr_rotation, lr_scaling=cfg.lr_scaling, steps=cfg.train_steps,
                stabilize_every=cfg.stabilize_every, kv_args=cfg.kv_args(), online_qk=cfg.online_qk)
            held_out = None if cfg.held_out is None else torch.as_tensor(cfg.held_out).to(device)
            try:
                self.losses = trainer.train(_as_batch(samples).to(device), cfg.train_batch_size, cfg.seed, held_out)
                self.held_out_losses = trainer.held_out_losses
            finally:
                trainer.close()
        return tf.export()

    def calibrate(self, model, calibration=None):
        if transform_layout(model).moe_inputs:  # unsupported architectures fail before any work
            raise NotImplementedError(
                f"hfq_ostquant does not support MoE models ({model.config.model_type}): its MLP scalings and online "
                f"down_proj Hadamard are not defined for routed experts. hfq.MoEQuantConfig quantizes MoE models "
                f"(with a rotation, rotate=True)")
        self.losses, self.held_out_losses = [], []
        return super().calibrate(model, calibration)  # the same windows train the transforms and calibrate GPTQ

    def transform(self, model, samples):
        """Train (or just initialise) the transforms and fuse them exactly into the float model."""
        cfg = self.quantization_config
        r1, layers = self.learn_transforms(model, samples)
        fuse_transforms_(model, r1, layers, online_down=cfg.online_down, online_qk=cfg.online_qk,
                         online_seed=cfg.seed)

    def solve(self, model, samples, sample_weights=None):
        """The nested weight solver on the fused model (sample_weights reach its statistics)."""
        solver = self.quantization_config.solver_config()
        METHODS[solver.quant_method][1](solver, pre_quantized=False).quantize_model(
            model, calibration=samples, sample_weights=sample_weights)

    def attach(self, model, samples):
        set_kv_quant(model, self.quantization_config.kv_args())  # also re-hooks R4 on the new down_proj modules


register_method(OSTQuantConfig, OSTQuantHfQuantizer)
