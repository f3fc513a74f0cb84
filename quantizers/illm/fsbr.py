"""FSBR, I-LLM's fully-smooth block reconstruction (llm.md §2.1): one decoder block at a time, on the outputs of the
already-quantized blocks before it, learn

- smoothing scales at every pair `PAIRS` names (norm -> q/k/v, norm -> gate/up, v -> o per KV head, q <-> k tied
  over RoPE pairs, gate <-> up inside SwiGLU, up -> down), initialised SmoothQuant-style from the block's channel
  maxima on the calibration inputs (s = max|X|^alpha / max|W|^(1 - alpha) for activation -> weight pairs,
  s = sqrt(max|a| / max|b|) for the activation <-> activation pairs q <-> k and gate <-> up); learned in log space
  (a deviation: the paper's code learns the scales directly; Adam's steps are then relative);
- learnable weight clipping (LWC, OmniQuant): per output channel, the quantization range is
  [sigmoid(beta) min w, sigmoid(gamma) max w], gamma = beta = 4 at the start;

by minimising MSE(float block on float inputs, student block on quantized inputs) with AdamW (weight decay 0). The
student is the block through `torch.func.functional_call` on `layer_params(..., t=scales)` (the same pure function
that fuses them afterwards) with LWC fake-quantized weights and dynamic per-token fake-quantized linear inputs
(straight-through rounding); the gate <-> up smoothing is the MLP's `ScaledSiLU` scale. Afterwards the scales are
fused exactly (`layer_params` + `set_gate_scale`) and every linear is rounded to nearest on its learned range."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.func import functional_call
from transformers.utils import logging

from hfq.arch import get_adapter
from hfq.calibration.runner import BlockInputs, first_output
from hfq.nn import QuantLinear, ScaledSiLU
from hfq.quant import QuantArgs, fake_quantize, fake_quantize_minmax, qparams_from_range
from hfq.train import TeacherStudentTrainer
from hfq.transforms import LayerTransform, layer_params, smoothing_scale, transform_layout
from hfq.transforms.fuse import set_gate_scale

logger = logging.get_logger(__name__)

PAIRS = ("attn_in", "mlp_in", "qk", "ov", "gate_up", "up_down")
FIELDS = {p: f"s_{p}" for p in PAIRS}
LWC_INIT = 4.0


def _names(layout):
    a, m = layout.attn, layout.mlp
    return {"q": f"{a}.{layout.q}", "k": f"{a}.{layout.k}", "v": f"{a}.{layout.v}", "o": f"{a}.{layout.o}",
            "gate": f"{m}.{layout.gate}", "up": f"{m}.{layout.up}", "down": f"{m}.{layout.down}"}


@torch.no_grad()
def channel_maxima(block: nn.Module, layout, inputs: BlockInputs) -> dict[str, torch.Tensor]:
    """max |.| per channel over the calibration inputs of the block: "<x>_in" (input of linear x) and "<x>_out"."""
    names, stats, handles = _names(layout), {}, []

    def keep(key, t):
        m = t.detach().abs().reshape(-1, t.shape[-1]).amax(0).double()
        stats[key] = m if key not in stats else torch.maximum(stats[key], m)

    for short, name in names.items():
        def hook(mod, args, out, short=short):
            keep(f"{short}_in", args[0])
            keep(f"{short}_out", out)
        handles.append(block.get_submodule(name).register_forward_hook(hook))
    try:
        inputs.forward(block)
    finally:
        for h in handles:
            h.remove()
    return stats


@torch.no_grad()
def init_scales(block: nn.Module, layout, n_heads: int, n_kv: int, stats: dict, alpha: float,
                pairs: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """SmoothQuant-style initial scale per pair (float64), from the block's weights and channel maxima."""
    names = _names(layout)
    W = {k: block.get_submodule(n).weight.detach().double() for k, n in names.items()}
    hd = block.get_submodule(layout.attn).head_dim
    groups = n_heads // n_kv
    out = {}
    for pair, norm, consumers in (("attn_in", layout.attn_norm, "qkv"), ("mlp_in", layout.mlp_norm, ("gate", "up"))):
        if pair not in pairs:
            continue
        gamma = (block.get_submodule(norm).weight.detach().double() + layout.norm_offset).abs().clamp(min=1e-8)
        x = stats[f"{consumers[0]}_in"] / gamma  # the normalised input before gamma (gamma is absorbed in W)
        w = torch.stack([W[c].abs().amax(0) for c in consumers]).amax(0) * gamma
        out[pair] = smoothing_scale(x, w, alpha)
    if "qk" in pairs:
        q = stats["q_out"].reshape(n_kv, groups, 2, hd // 2).amax(1).amax(1)  # per KV head, tied over RoPE pairs
        k = stats["k_out"].reshape(n_kv, 2, hd // 2).amax(1)
        out["qk"] = (q.clamp(min=1e-5) / k.clamp(min=1e-5)).sqrt()
    if "ov" in pairs:
        v = stats["v_out"].reshape(n_kv, hd)
        wo = W["o"].abs().amax(0).reshape(n_kv, groups, hd).amax(1)
        out["ov"] = smoothing_scale(v, wo, alpha)
    if "gate_up" in pairs:
        out["gate_up"] = (stats["up_out"].clamp(min=1e-5) / stats["gate_out"].clamp(min=1e-5)).sqrt()
    if "up_down" in pairs:
        out["up_down"] = smoothing_scale(stats["down_in"], W["down"].abs().amax(0), alpha)
    return out


def lwc_qparams(w: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, args: QuantArgs):
    """(scale, zero) of each row's learned range [sigmoid(beta) min, sigmoid(gamma) max] (differentiable)."""
    lo = w.amin(-1, keepdim=True).clamp(max=0) * torch.sigmoid(beta)
    hi = w.amax(-1, keepdim=True).clamp(min=0) * torch.sigmoid(gamma)
    return qparams_from_range(lo, hi, args)


class FSBRTrainer(TeacherStudentTrainer):
    """Block reconstruction of one decoder block (the trainer's model), see the module docstring."""

    def __init__(self, block: nn.Module, layout, n_heads: int, n_kv: int, init: dict[str, torch.Tensor],
                 inputs: BlockInputs, weight_args: QuantArgs, act_args: QuantArgs | None, *, lwc: bool, steps: int,
                 let_lr: float, lwc_lr: float):
        self.layout, self.n_heads, self.n_kv, self.inputs = layout, n_heads, n_kv, inputs
        self.names = _names(layout)
        self.wargs, self.aargs = weight_args, act_args
        dev = next(block.parameters()).device
        self.log_s = nn.ParameterDict({p: nn.Parameter(v.float().log().to(dev)) for p, v in init.items()})
        rows = {k: block.get_submodule(n).weight.shape[0] for k, n in self.names.items()}
        self.lwc = nn.ParameterDict({f"{k}_{b}": nn.Parameter(torch.full((r, 1), LWC_INIT, device=dev))
                                     for k, r in rows.items() for b in ("gamma", "beta")}) if lwc else None
        groups = [{"params": list(self.log_s.parameters()), "lr": let_lr}]
        if self.lwc is not None:
            groups.append({"params": list(self.lwc.parameters()), "lr": lwc_lr})
        super().__init__(block, groups, steps=steps, loss="mse",
                         forward=lambda call, k: first_output(call(inputs.hidden[k], **inputs.kwargs[k])),
                         optimizer=lambda g: torch.optim.AdamW(g, weight_decay=0.0), desc="hfq_illm fsbr")
        if act_args is not None:
            for name in self.names.values():
                self.hook_input(block.get_submodule(name), lambda x: fake_quantize_minmax(x, act_args))

    def transform(self) -> LayerTransform:
        return LayerTransform(**{FIELDS[p]: v.exp() for p, v in self.log_s.items()})

    def qparams(self, short: str, w: torch.Tensor):
        if self.lwc is None:
            return qparams_from_range(w.amin(-1, keepdim=True).clamp(max=0), w.amax(-1, keepdim=True).clamp(min=0),
                                      self.wargs)
        return lwc_qparams(w, self.lwc[f"{short}_gamma"], self.lwc[f"{short}_beta"], self.wargs)

    def student_params(self) -> dict[str, torch.Tensor]:
        t = self.transform()
        out = layer_params(self.model, self.layout, self.n_heads, self.n_kv, t=t, dtype=torch.float32)
        for short, name in self.names.items():
            w = out[name + ".weight"]
            out[name + ".weight"] = fake_quantize(w, self.wargs, *self.qparams(short, w))
        act = self.model.get_submodule(self.layout.mlp).act_fn
        if t.s_gate_up is not None:
            out[f"{self.layout.mlp}.act_fn.scale"] = act.scale.float() * t.s_gate_up
        return out

    @torch.no_grad()
    def fuse_and_quantize(self, kernel: str = "auto") -> None:
        """Fuse the learned scales into the block's float weights (exact), then replace every linear by its
        QuantLinear rounded to nearest on the learned clipping range."""
        block = self.model
        t = LayerTransform(**{k: v.double() for k, v in vars(self.transform()).items() if v is not None})
        for name, value in layer_params(block, self.layout, self.n_heads, self.n_kv, t=t).items():
            p = block.get_parameter(name)
            p.data.copy_(value.to(p.dtype))
        if t.s_gate_up is not None:
            mlp = block.get_submodule(self.layout.mlp)
            set_gate_scale(mlp, t.s_gate_up, mlp.get_submodule(self.layout.up).weight)
        for short, name in self.names.items():
            lin = block.get_submodule(name)
            w = lin.weight.detach().float()
            block.set_submodule(name, QuantLinear.from_linear(lin, self.wargs, self.aargs, kernel,
                                                              qparams=self.qparams(short, w)))


def fsbr_block(block: nn.Module, model, inputs: BlockInputs, targets: list[torch.Tensor], cfg) -> list[float]:
    """Train and fuse one block in place; returns the training losses."""
    layout = transform_layout(model)
    heads, kv, _ = get_adapter(model).attention_dims(model)
    pairs = tuple(cfg.smooth_pairs)
    if "gate_up" in pairs and not isinstance(block.get_submodule(layout.mlp).act_fn, ScaledSiLU):
        raise RuntimeError("install ScaledSiLU on the MLP before FSBR with the gate_up pair")
    init = init_scales(block, layout, heads, kv, channel_maxima(block, layout, inputs), cfg.alpha, pairs)
    steps = cfg.epochs * len(inputs)
    trainer = FSBRTrainer(block, layout, heads, kv, init, inputs, cfg.weight_args(), cfg.act_args(), lwc=cfg.lwc,
                          steps=steps, let_lr=cfg.let_lr, lwc_lr=cfg.lwc_lr)
    losses = []
    try:
        g = torch.Generator().manual_seed(cfg.seed)
        with torch.enable_grad():
            for _ in range(cfg.epochs):
                for k in torch.randperm(len(inputs), generator=g).tolist():
                    losses.append(trainer.step(k, teacher=targets[k]))
    finally:
        trainer.close()
    trainer.fuse_and_quantize(cfg.kernel)
    return losses


__all__ = ["PAIRS", "FSBRTrainer", "channel_maxima", "init_scales", "fsbr_block", "lwc_qparams"]
