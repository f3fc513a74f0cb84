"""MambaQuant: KLT-enhanced rotation and smooth-fused rotation for Mamba and Mamba2 (Xu et al., ICLR 2025; llm.md §4).

The official LLM recipe ("method_2"), on hfq's mixers (`hfq.nn.mamba`, which run the convolution, dt_proj and the
scan's output matmul as quantizable modules) and fused exactly by `hfq.transforms.mamba`:
1. calibration windows (`dataset`, n_samples x seq_len) run once through the float model, collecting per-channel
   maxima (conv1d input, dt_proj input, out_proj input, the scan's C) and covariances (layer 0's normalised residual,
   dt_proj input, out_proj input);
2. smoothing, SmoothQuant's s = max|X|^alpha / max|W|^(1-alpha) (alpha 0.5, s >= 1e-2, max|W| >= 1e-5): S7 (conv1d
   input), S5 (dt_proj input), S2 (out_proj input, through the gate's SiLU; Mamba2: through the gated RMSNorm);
   S4 (scan output matmul): s = max|C| per state, clamped to [1e-2, 100], C * s and B / s (the official direction;
   the official code takes a 0.999999-quantile of |C| over 2 sequences, here the maximum over all windows);
3. rotations, each R = K H (K: eigenvectors of the smoothed activation's covariance, H: a random Hadamard; the
   "KLT-enhanced rotation") for rotation="klt_hadamard": R1 on the residual stream and R5 on the dt path, offline;
   R2 on out_proj's input, online (a stored matrix per layer); R4 on the state dimension is an online Hadamard.
   rotation="hadamard" is the QuaRot-style baseline (every R a random Hadamard, R2 / R4 online without stored
   tensors); rotation=None leaves the model unrotated;
4. every linear (in_proj, x_proj, dt_proj, out_proj, lm_head) and conv1d rounded to nearest, per output channel
   (asymmetric min-max, as the official code); their inputs quantized per tensor at run time (8-bit asymmetric),
   the scan output matmul's h and C per token (`state_act_bits`).
The recurrence (exp(dt A), the state update), softplus, the D skip, SiLU gates and the norms stay float.
FalconMamba (RMS norms on dt, B, C) takes everything but S4 / S5, which do not commute with those norms.
Checkpoints hold the integers, scales, fused norm weights, ScaledSiLU scales and stored R2s; the online pieces are
rebuilt from `config.hfq_mamba` on load (never re-running calibration)."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from hfq.calibration import CalibratedConfig
from hfq.calibration.runner import run_blocks
from hfq.calibration.stats import InputStats
from hfq.integration import HfqQuantizer, quantization_targets, register_method, replace_targets, rtn_module
from hfq.nn.mamba import to_hfq_mixers
from hfq.progress import is_quiet
from hfq.quant import QuantArgs
from hfq.transforms import klt_rotation, random_hadamard
from hfq.transforms.fuse import untie_output_embedding
from hfq.transforms.mamba import (MixerTransform, configure_mixers, current_spec, fuse_mamba_, is_falcon, is_mamba2,
                                  restore_mixers, set_state_quant)

logger = logging.get_logger(__name__)

ROTATIONS = ("klt_hadamard", "hadamard", None)
PRESETS = {"w8a8": (8, 8), "w4a8": (4, 8)}


class MambaQuantConfig(CalibratedConfig):
    """MambaQuant. Defaults = the official "method_2" LLM recipe: W8A8, weights per output channel asymmetric min-max,
    every linear (lm_head included) and conv1d quantized, their inputs per tensor dynamic 8-bit asymmetric; the scan
    output matmul's operands per token 8-bit (`state_act_bits`, None = float).

    rotation: "klt_hadamard" (MambaQuant), "hadamard" (QuaRot-style baseline: R1, R5 random Hadamards, online
    Hadamard R2 and R4) or None (no rotation). smooth: S2, S4, S5, S7 with SmoothQuant's `alpha` (needs
    calibration data). rotation=None, smooth=False is the round-to-nearest baseline with the same quantizers.
    Calibration: the official code uses 8 x 2048 tokens (HellaSwag contexts). `MambaQuantConfig.preset("w4a8")`
    gives the paper's W4A8 setting."""

    quant_method = "hfq_mambaquant"
    target_kinds = ("linear", "conv1d")
    quantizes_keep_float = ("dt_proj",)  # hfq's mixer calls dt_proj as a module

    def __init__(self, bits: int = 8, group_size: int | None = None, sym: bool = False, act_bits: int | None = 8,
                 act_sym: bool = False, act_granularity: str = "tensor", quantize_lm_head: bool = True,
                 rotation: str | None = "klt_hadamard", smooth: bool = True, alpha: float = 0.5,
                 state_act_bits: int | None = 8, n_samples: int = 8, seq_len: int = 2048, **kwargs):
        self.rotation, self.smooth, self.alpha, self.state_act_bits = rotation, smooth, alpha, state_act_bits
        super().__init__(bits=bits, group_size=group_size, sym=sym, act_bits=act_bits, act_sym=act_sym,
                         act_granularity=act_granularity, quantize_lm_head=quantize_lm_head, n_samples=n_samples,
                         seq_len=seq_len, **kwargs)

    @classmethod
    def preset(cls, name: str, **kwargs) -> "MambaQuantConfig":
        if name.lower() not in PRESETS:
            raise ValueError(f"unknown MambaQuant preset {name!r}; known: {sorted(PRESETS)}")
        bits, act_bits = PRESETS[name.lower()]
        return cls(bits=bits, act_bits=act_bits, **kwargs)

    def post_init(self):
        super().post_init()
        if self.rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {ROTATIONS}, got {self.rotation!r}")
        if not isinstance(self.smooth, bool):
            raise TypeError(f"smooth must be True or False, got {self.smooth!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be a number in [0, 1], got {self.alpha!r}")
        self.state_args()

    def state_args(self) -> QuantArgs | None:
        """h and C of the scan output matmul: dynamic per token, asymmetric (the official ssm_matmul quantizer)."""
        if self.state_act_bits is None:
            return None
        try:
            return QuantArgs(bits=self.state_act_bits, symmetric=False, granularity="token", dynamic=True)
        except ValueError as e:
            raise ValueError(f"state_act_bits: {e}") from None

    def needs_statistics(self) -> bool:
        return self.smooth or self.rotation == "klt_hadamard"


# ------------------------------------------------------------------------------------------ statistics


def _add(stats: InputStats, x: torch.Tensor) -> None:
    stats.add(x.detach().float().reshape(-1, x.shape[-1]))


def block_statistics(block, first: bool) -> tuple[dict, list]:
    """Hooks on one Mamba block (hfq mixer, nothing fused yet) collecting, in the original basis, what the smoothing
    scales and KLTs need (every later transform is exact, so the transformed activations' statistics follow from
    these analytically): per-channel maxima of the conv1d input, dt_proj input, out_proj input and the scan's C;
    covariances of the dt_proj and out_proj inputs, and (first block) of the RMS-normalised residual, before the norm
    weight (which R1's fusion folds into in_proj). Returns (statistics, hook handles)."""
    m, dev = block.mixer, next(block.parameters()).device
    E = m.intermediate_size
    rows = slice(E, E + m.conv_dim) if is_mamba2(m) else slice(0, E)
    stats = {"conv": InputStats(rows.stop - rows.start, dev, want=("absmax",)),
             "state": InputStats(m.ssm_state_size * (m.n_groups if is_mamba2(m) else 1), dev, want=("absmax",)),
             "out": InputStats(E, dev, want=("moments", "absmax"))}
    hooks = [m.in_proj.register_forward_hook(lambda mod, a, y: _add(stats["conv"], y[..., rows])),
             m.ssm_out.register_forward_pre_hook(lambda mod, a: _add(stats["state"], a[1].reshape(a[1].shape[0], -1))),
             m.out_rotation.register_forward_pre_hook(lambda mod, a: _add(stats["out"], a[0]))]
    if not is_mamba2(m):
        R = m.time_step_rank
        stats["dt"] = InputStats(R, dev, want=("moments", "absmax"))
        hooks.append(m.x_proj.register_forward_hook(lambda mod, a, y: _add(stats["dt"], y[..., :R])))
    if first:
        stats["residual"] = InputStats(block.norm.weight.shape[0], dev, want=("moments",))

        def norm_hook(module, args):
            x = args[0].float()
            _add(stats["residual"], x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon))

        hooks.append(block.norm.register_forward_pre_hook(norm_hook))
    return stats, hooks


def _smooth(act_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's scale as the official code computes it: max|X|^alpha / max|W|^(1-alpha), W >= 1e-5, s >= 1e-2."""
    return (act_max.double().cpu().pow(alpha) / w_max.detach().double().cpu().clamp(min=1e-5).pow(1 - alpha)
            ).clamp(min=1e-2)


def _klt_hadamard(cov: torch.Tensor, s: torch.Tensor | None, seed: int) -> torch.Tensor:
    """K H: eigenvectors of the covariance of x / s (the activation after smoothing), then a random Hadamard."""
    cov = cov.double().cpu()
    if s is not None:
        cov = cov / torch.outer(s, s)
    return klt_rotation(cov) @ random_hadamard(cov.shape[0], seed)


def mixer_transform(m, cfg: MambaQuantConfig, stats: dict | None) -> MixerTransform:
    """One mixer's smoothing scales and offline / stored rotations for the config (stats: `block_statistics`)."""
    t, seed, klt = MixerTransform(), cfg.seed, cfg.rotation == "klt_hadamard"
    if cfg.smooth:
        t.s_conv = _smooth(stats["conv"].absmax(), m.conv1d.weight.abs().amax(dim=(1, 2)), cfg.alpha)
        t.s_out = _smooth(stats["out"].absmax(), m.out_proj.weight.abs().amax(dim=0), cfg.alpha)
        if not is_falcon(m):
            t.s_state = stats["state"].absmax().double().cpu().clamp(1e-2, 100)
            if is_mamba2(m):
                t.s_state = t.s_state.reshape(m.n_groups, m.ssm_state_size)
            else:
                t.s_dt = _smooth(stats["dt"].absmax(), m.dt_proj.weight.abs().amax(dim=0), cfg.alpha)
    if cfg.rotation is not None and not is_mamba2(m):
        t.r_dt = (_klt_hadamard(stats["dt"].covariance(), t.s_dt, seed) if klt
                  else random_hadamard(m.time_step_rank, seed))
    if klt:
        t.r_out = _klt_hadamard(stats["out"].covariance(), t.s_out, seed)
    return t


def plan_transforms(model, cfg: MambaQuantConfig, samples: list[torch.Tensor] | None):
    """(r1, per-mixer MixerTransforms, out_hadamard_seed, state_hadamard_seed) for the config. With calibration
    samples, one float pass block by block (`run_blocks`: one block's statistics alive at a time)."""
    ms = to_hfq_mixers(model)
    klt = cfg.rotation == "klt_hadamard"
    if samples is None:
        layers, residual = [mixer_transform(m, cfg, None) for m in ms], None
    else:
        layers, residual = [], []

        @torch.no_grad()
        def stats_pass(block, i, inputs):
            stats, hooks = block_statistics(block, first=i == 0)
            try:
                outs = inputs.forward(block)
            finally:
                for h in hooks:
                    h.remove()
            layers.append(mixer_transform(block.mixer, cfg, stats))
            if i == 0:
                residual.append(stats["residual"].covariance())
            return outs

        run_blocks(model, samples, [stats_pass], device=cfg.device, batch_size=cfg.batch_size,
                   desc="hfq_mambaquant statistics")
    if cfg.smooth and any(is_falcon(m) for m in ms):
        logger.info("hfq_mambaquant: FalconMamba normalises dt, B and C, so S4 and S5 are not applied (S2, S7 are)")
    if cfg.rotation is None:
        return None, layers, None, None
    d = model.config.hidden_size
    r1 = _klt_hadamard(residual[0], None, cfg.seed) if klt else random_hadamard(d, cfg.seed)
    return r1, layers, None if klt else cfg.seed, cfg.seed


class MambaQuantHfQuantizer(HfqQuantizer):
    def calibrate(self, model, calibration=None):
        if not self.quantization_config.needs_statistics():
            if calibration is not None:
                raise ValueError("this MambaQuant config (no smoothing, no KLT) uses no calibration data; drop "
                                 "calibration= or enable smooth / rotation='klt_hadamard'")
            return None
        return super().calibrate(model, calibration)

    def transform(self, model, samples):
        cfg = self.quantization_config
        if cfg.sample_weights is not None:
            raise ValueError("hfq_mambaquant's statistics do not weight samples; drop sample_weights")
        if cfg.quantize_lm_head and untie_output_embedding(model):
            logger.info("hfq_mambaquant: untied the output embedding (it is quantized; the input embedding stays float)")
        r1, layers, out_seed, state_seed = plan_transforms(model, cfg, samples)
        fuse_mamba_(model, r1, layers, out_hadamard_seed=out_seed, state_hadamard_seed=state_seed)

    @torch.no_grad()
    def solve(self, model, samples, sample_weights=None):
        if sample_weights is not None:
            raise ValueError("hfq_mambaquant rounds to nearest and does not weight samples; drop sample_weights")
        cfg = self.quantization_config
        targets = quantization_targets(model, cfg)
        bar = tqdm(total=len(targets), desc="hfq_mambaquant", disable=is_quiet())

        def build(name, module):
            bar.update()
            return rtn_module(name, module, cfg)

        replace_targets(model, targets, build)
        bar.close()

    def attach(self, model, samples):
        set_state_quant(model, self.quantization_config.state_args())

    def prepare_skeleton(self, model):
        spec = current_spec(model)
        if spec is not None:  # ScaledSiLU / stored R2 tensors must exist before the checkpoint loads into them
            configure_mixers(model, spec)
        self._check_spec(model)

    def restore(self, model):
        restore_mixers(model)

    def _check_spec(self, model):
        """The online pieces the config says the weights were fused for must be in `config.hfq_mamba`."""
        cfg, spec = self.quantization_config, current_spec(model)
        if spec is None:
            raise ValueError("this hfq_mambaquant checkpoint has no hfq_mamba entry in its config.json: its mixers' "
                             "online rotations and smoothing activations are unknown and its outputs would be wrong; "
                             "restore config.json from the saved model (or re-quantize from full precision)")
        wanted = {"state_rotation": cfg.rotation is not None, "out_rotation": cfg.rotation is not None,
                  "gate_scale": cfg.smooth and model.config.model_type != "mamba2",
                  "conv_scale": cfg.smooth and model.config.model_type == "mamba2"}
        lost = [k for k, v in wanted.items() if v and not spec.get(k)]
        if lost:
            raise ValueError(f"this hfq_mambaquant checkpoint's config.json lacks {lost} in hfq_mamba, which its "
                             f"weights were fused for; restore config.json from the saved model")


register_method(MambaQuantConfig, MambaQuantHfQuantizer)
