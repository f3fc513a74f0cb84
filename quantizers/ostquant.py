"""OSTQuant: learned orthogonal + scaling transforms with the KL-Top loss, then GPTQ (Hu et al., ICLR 2025).

Lifecycle (the training itself is `hfq.ostquant`):
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

from hfq.integration import HfqConfig, HfqQuantizer, check_loaded, quantization_targets, register_method, \
    replace_targets
from hfq.nn import QuantLinear
from hfq.ostquant import ROTATION_INITS, OSTQuantTrainer, OSTTransforms, init_transforms
from hfq.quant import QuantArgs
from hfq.transforms import (fuse_transforms_, kv_quant_args, online_spec, restore_online_rotations, set_kv_quant,
                            transform_layout)

from .gptq import GPTQConfig, GPTQHfQuantizer, calibration_samples, calibration_to_dict, check_calibration_fields

logger = logging.get_logger(__name__)

WEIGHT_METHODS = ("gptq", "rtn")


class OSTQuantConfig(HfqConfig):
    """OSTQuant (defaults = official code / scripts, llm.md §1.3). Besides the shared `HfqConfig` fields (weights:
    4-bit per-output-channel symmetric; activations: act_bits None = A16, else dynamic per-token, asymmetric,
    act_clip_ratio):

    kv_bits: K (after RoPE, and after R3 with online_qk) and V quantized where attention reads them, dynamic per
    token and head, kv_sym (default asymmetric), kv_clip_ratio (defaults of the official code; None = float KV).
    The student sees it (and R3) while the transforms train; the model gets it after GPTQ; restored on load.
    Simulated: the cache itself stays float, so this measures a KV4 cache's accuracy, not its memory.
    rotation_init: "hadamard" (random Hadamard R1 and R2), "klt_hadamard" (weight-KLT x random Hadamard, the
    official W4A4 `--use_klt`) or "random" (random orthogonal). learn: train the transforms (False = QuaRot-style
    baseline: rotations only, no scalings, no training). scalings: learn the per-layer diagonal scalings too.
    online_down: online Hadamard R4 before down_proj (default on, as the official code); online_qk: online Hadamard
    R3 on q/k after RoPE (off in the official scripts; only matters with a quantized KV cache).
    train_steps, train_batch_size (16 = 4 per GPU x 4 GPUs in the W4A16 script), lr_rotation, lr_scaling (linear
    decay to 0; geoopt RiemannianAdam, so lr_rotation is a step length per rotation matrix), kl_top_k,
    stabilize_every (project the rotations back onto the manifold every n steps). train_weight_quant: fake-quantize
    weights while training (None = auto: False with 4-bit (or lower) activations, as the official W4A4 script;
    True otherwise, as the W4A16 script: at A8 the activation error alone gives the loss almost nothing to learn,
    measured KL-Top 0.0015 on SmolLM2).
    weight_method: "gptq" (default, damp, act_order, mse_clip as in the paper: 0.01, False, True) or "rtn".
    dataset / n_samples / seq_len / seed / batch_size / autocast_dtype: calibration as in `GPTQConfig`; the same
    windows train the transforms. Runtime only (not saved): tokenizer, device."""

    quant_method = "hfq_ostquant"
    runtime_fields = ("tokenizer", "device")

    def __init__(self, bits: int = 4, group_size: int | None = None, sym: bool = True, act_bits: int | None = None,
                 act_sym: bool = False, kv_bits: int | None = None, kv_sym: bool = False, kv_clip_ratio: float = 1.0,
                 rotation_init: str = "hadamard",
                 learn: bool = True, scalings: bool = True, online_down: bool = True, online_qk: bool = False,
                 train_steps: int = 100, train_batch_size: int = 16, lr_rotation: float = 0.01689753,
                 lr_scaling: float = 0.00178988, kl_top_k: int = 1000, stabilize_every: int = 10,
                 train_weight_quant: bool | None = None, weight_method: str = "gptq", damp: float = 0.01,
                 act_order: bool = False, mse_clip: bool = True, block_size: int = 128, dataset=None,
                 n_samples: int = 128, seq_len: int = 2048, seed: int = 0, batch_size: int = 2,
                 autocast_dtype: str | None = None, tokenizer=None, device=None, **kwargs):
        self.kv_bits, self.kv_sym, self.kv_clip_ratio = kv_bits, kv_sym, kv_clip_ratio
        self.rotation_init, self.learn, self.scalings = rotation_init, learn, scalings
        self.online_down, self.online_qk = online_down, online_qk
        self.train_steps, self.train_batch_size, self.lr_rotation, self.lr_scaling = train_steps, train_batch_size, \
            lr_rotation, lr_scaling
        self.kl_top_k, self.stabilize_every, self.train_weight_quant = kl_top_k, stabilize_every, train_weight_quant
        self.weight_method, self.damp, self.act_order, self.mse_clip, self.block_size = weight_method, damp, \
            act_order, mse_clip, block_size
        self.dataset, self.n_samples, self.seq_len, self.seed, self.batch_size = dataset, n_samples, seq_len, seed, \
            batch_size
        self.autocast_dtype, self.tokenizer, self.device = autocast_dtype, tokenizer, device
        super().__init__(bits=bits, group_size=group_size, sym=sym, act_bits=act_bits, act_sym=act_sym, **kwargs)

    def post_init(self):
        super().post_init()
        self.kv_args()  # validates kv_bits / kv_clip_ratio
        if self.rotation_init not in ROTATION_INITS:
            raise ValueError(f"rotation_init must be one of {ROTATION_INITS}, got {self.rotation_init!r}")
        if self.weight_method not in WEIGHT_METHODS:
            raise ValueError(f"weight_method must be one of {WEIGHT_METHODS}, got {self.weight_method!r}")
        for name in ("learn", "scalings", "online_down", "online_qk", "act_order", "mse_clip", "kv_sym"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.train_weight_quant is not None and not isinstance(self.train_weight_quant, bool):
            raise TypeError(f"train_weight_quant must be None (auto), True or False, got {self.train_weight_quant!r}")
        check_calibration_fields(self, ("train_steps", "train_batch_size", "kl_top_k", "n_samples", "seq_len",
                                        "batch_size", "block_size"))
        if not isinstance(self.stabilize_every, int) or self.stabilize_every < 0:
            raise ValueError(f"stabilize_every must be an integer >= 0 (0 = never), got {self.stabilize_every!r}")
        for name in ("lr_rotation", "lr_scaling"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        if self.act_order and self.group_size:
            raise ValueError("act_order=True with a group_size is not supported by OSTQuant here; use group_size=None "
                             "(the paper's per-channel weights) or act_order=False")

    def to_dict(self) -> dict:
        return calibration_to_dict(super().to_dict())

    def kv_args(self) -> QuantArgs | None:
        if self.kv_bits is None:
            return None
        try:
            return kv_quant_args(self.kv_bits, self.kv_sym, self.kv_clip_ratio)
        except ValueError as e:
            raise ValueError(f"kv_bits / kv_clip_ratio: {e}") from None

    def weight_quant_in_training(self) -> bool:
        if self.train_weight_quant is None:
            return self.act_bits is None or self.act_bits >= 8
        return self.train_weight_quant

    def gptq_config(self) -> GPTQConfig:
        """The GPTQ settings applied to the fused model (same weight/activation grid)."""
        return GPTQConfig(bits=self.bits, group_size=self.group_size, sym=self.sym, observer=self.observer,
                          clip_ratio=self.clip_ratio, act_bits=self.act_bits, act_sym=self.act_sym,
                          act_granularity=self.act_granularity, act_clip_ratio=self.act_clip_ratio,
                          kernel=self.kernel, modules_to_not_convert=self.modules_to_not_convert,
                          quantize_lm_head=self.quantize_lm_head, act_order=self.act_order, damp=self.damp,
                          mse_clip=self.mse_clip, block_size=self.block_size, n_samples=self.n_samples,
                          seq_len=self.seq_len, seed=self.seed, batch_size=self.batch_size,
                          autocast_dtype=self.autocast_dtype, device=self.device)


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
    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            check_loaded(model)
            check_online_spec(model, self.quantization_config)
            restore_online_rotations(model)  # R3 / R4 carry no tensors: rebuilt from config.hfq_online_rotations
        else:
            self.quantize_model(model)
        return model

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
            try:
                self.losses = trainer.train(_as_batch(samples).to(device), cfg.train_batch_size, cfg.seed)
            finally:
                trainer.close()
        return tf.export()

    def quantize_model(self, model, calibration=None):
        """Train (or just initialise) the transforms, fuse them, then GPTQ/RTN the fused model in place.
        calibration: overrides config.dataset (same forms)."""
        cfg = self.quantization_config
        transform_layout(model)  # unsupported architectures fail before any work
        quantization_targets(model, cfg)
        samples = calibration_samples(cfg, model, calibration)
        self.losses = []
        r1, layers = self.learn_transforms(model, samples)
        fuse_transforms_(model, r1, layers, online_down=cfg.online_down, online_qk=cfg.online_qk,
                         online_seed=cfg.seed)
        if cfg.weight_method == "gptq":
            GPTQHfQuantizer(cfg.gptq_config(), pre_quantized=False).quantize_model(model, calibration=samples)
        else:
            w, a = cfg.weight_args(), cfg.act_args()
            if cfg.mse_clip:
                w.observer = "mse"
            replace_targets(model, quantization_targets(model, cfg),
                            lambda n, m: QuantLinear.from_linear(m, w, a, cfg.kernel))
        set_kv_quant(model, cfg.kv_args())  # also re-hooks R4 on the new down_proj modules
        return model


register_method(OSTQuantConfig, OSTQuantHfQuantizer)
