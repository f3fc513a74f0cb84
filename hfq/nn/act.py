"""`ActQuantizer`: the one activation quantizer of every quantized module (a layer's input, both operands of an
activation x activation matmul or add).

Dynamic args: scales computed from each input at run time; the module holds no tensors.
Static args (`dynamic=False`, per tensor): the scale (and, asymmetric, the zero point) are stored tensors, found by
`observe()`-ing calibration inputs and `freeze()`-ing the observer's range: running min/max for the "minmax"
observer, a bounded random subsample of the inputs for "percentile" / "mse" (the same `compute_qparams` as weights).
The scale starts as NaN: a static quantizer that was never calibrated (or whose scale is missing from a checkpoint)
refuses to run instead of quantizing with garbage.
Smoothing (SmoothQuant-style, `enable_smoothing`): a stored per-channel divisor `smooth` applied before quantizing,
so the quantizer works in the smoothed domain x / s (its layer's weight holds W * s; deployment folds 1 / s into
whatever produces x)."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..quant import QuantArgs, compute_qparams, fake_quantize, quantize

MAX_SAMPLES = 1 << 20  # values kept per static quantizer for the percentile / MSE observers


class ActQuantizer(nn.Module):
    def __init__(self, args: QuantArgs, dtype=torch.float32, device=None):
        super().__init__()
        if not args.dynamic and args.granularity != "tensor":
            raise ValueError(f"static activation quantization is per tensor (one stored scale); got granularity="
                             f"{args.granularity!r}: use granularity='tensor' or dynamic=True")
        if args.granularity in ("channel", "group") and args.dynamic:
            raise ValueError(f"activations are quantized per token or per tensor, got {args.granularity!r}")
        self.args = args
        self.smooth = None
        self.observing = False
        self._lo = self._hi = None
        self._samples: list[torch.Tensor] = []
        if args.dynamic:
            self.scale = self.zero = None
        else:
            frozen = dict(requires_grad=False)
            self.scale = nn.Parameter(torch.full((1,), float("nan"), dtype=dtype, device=device), **frozen)
            self.zero = None if args.symmetric else nn.Parameter(
                torch.zeros(1, dtype=torch.uint8, device=device), **frozen)

    @property
    def static(self) -> bool:
        return not self.args.dynamic

    def calibrated(self) -> bool:
        smooth_ok = self.smooth is None or bool(torch.isfinite(self.smooth).all())
        return smooth_ok and (self.args.dynamic or bool(torch.isfinite(self.scale).all()))

    def enable_smoothing(self, channels: int, values: torch.Tensor | None = None):
        """Give the quantizer a per-channel divisor (NaN until `values` or a checkpoint fills it)."""
        device = self.scale.device if self.scale is not None else None
        s = torch.full((channels,), float("nan"), device=device) if values is None else values.detach().float()
        self.smooth = nn.Parameter(s.clone(), requires_grad=False)
        return self

    def smoothed(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.smooth is None else x / self.smooth.to(x.dtype)

    def observe(self):
        """Start observing: inputs pass through unquantized and update the observer until `freeze()`."""
        if self.static:
            self.observing, self._lo, self._hi, self._samples = True, None, None, []
        return self

    @torch.no_grad()
    def _update(self, x: torch.Tensor):
        x = x.detach().float()
        lo, hi = x.min(), x.max()
        self._lo = lo if self._lo is None else torch.minimum(self._lo, lo)
        self._hi = hi if self._hi is None else torch.maximum(self._hi, hi)
        if self.args.observer != "minmax":
            flat, budget = x.flatten(), MAX_SAMPLES // 16  # at most 1/16 of the budget per call
            if flat.numel() > budget:
                g = torch.Generator(device=flat.device).manual_seed(len(self._samples))
                flat = flat[torch.randint(flat.numel(), (budget,), generator=g, device=flat.device)]
            self._samples.append(flat.cpu())
            if sum(s.numel() for s in self._samples) > MAX_SAMPLES:
                self._samples = self._samples[1:]

    @torch.no_grad()
    def freeze(self, name: str = ""):
        """Stop observing and store the scale/zero of the observed range."""
        if not self.static:
            return
        if self._lo is None:
            raise RuntimeError(f"activation quantizer {name or '?'} saw no calibration data: is its module on the "
                               f"forward path of the calibration inputs? (else keep it float: modules_to_not_convert)")
        if self.args.observer == "minmax":
            scale, zero = compute_qparams(torch.stack([self._lo, self._hi]), self.args)
        else:
            scale, zero = compute_qparams(torch.cat(self._samples), self.args)
        self.scale.copy_(scale.reshape(1))
        if self.zero is not None:
            self.zero.copy_(zero.reshape(1))
        self.observing, self._samples = False, []

    def observed_range(self) -> tuple[float, float]:
        """(min, max) seen while observing (the last calibration)."""
        if self._lo is None:
            raise RuntimeError("this quantizer has observed nothing")
        return float(self._lo), float(self._hi)

    def qparams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) used for x: computed from x (dynamic) or the stored ones (static)."""
        if self.args.dynamic:
            return compute_qparams(x.float(), self.args)
        if not self.calibrated():
            raise RuntimeError("static activation quantizer has no calibrated scale (or smoothing divisor): calibrate "
                               "the model (e.g. hfq.PTQConfig with calibration data) or load a checkpoint that has "
                               "its scales")
        zero = self.zero.float() if self.zero is not None else torch.zeros_like(self.scale)
        return self.scale.float(), zero

    def integers(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The quantized (smoothed) x as the float integers q - zero, and the scale they are in units of: what
        `forward` returns is their product. Dynamic symmetric min/max per-token scales take a 4-op path with the
        same values as `compute_qparams` (max(-min(x, 0), max(x, 0)) = max|x|, the inf-norm; measured: the general
        path's ~20 small ops per call were a third of a W8A8 decode step)."""
        x, a = self.smoothed(x), self.args
        if (a.dynamic and a.symmetric and a.observer == "minmax" and a.clip_ratio == 1.0 and a.sym_scale == "max"
                and a.granularity in ("token", "tensor")):
            x = x.float()
            amax = torch.linalg.vector_norm(x, float("inf"), dim=-1 if a.granularity == "token" else None,
                                            keepdim=True)
            scale = amax.div_(a.qmax).clamp_(min=1e-8)
            return torch.round(x / scale).clamp_(a.qmin, a.qmax), scale
        scale, zero = self.qparams(x)
        return quantize(x, scale, zero, a).float() - zero, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.smoothed(x)
        if self.observing:
            self._update(x)
            return x
        return fake_quantize(x, self.args, *self.qparams(x))

    def extra_repr(self) -> str:
        a = self.args
        return (f"{a.bits}bit/{a.granularity}{'' if a.symmetric else '/asym'}/"
                f"{'dynamic' if a.dynamic else 'static/' + a.observer}{'/smoothed' if self.smooth is not None else ''}")


def act_quantizers(model: nn.Module) -> dict[str, ActQuantizer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ActQuantizer)}


@torch.no_grad()
def calibrate_static(model: nn.Module, run) -> int:
    """Observe every static activation quantizer of `model` while `run()` feeds the calibration inputs through it,
    then freeze them (and the lookup tables / softmax input quantizers of `hfq.nn.lut`, which fit themselves to the
    ranges they observe); returns how many were calibrated. Quantizers keep the inputs of the modules before them in
    their quantized form, so each range is the one it meets at inference."""
    quantizers = {n: q for n, q in act_quantizers(model).items() if q.static}
    owners = [f"{n}." for n, m in model.named_modules() if getattr(m, "calibrates_children", False)]
    quantizers.update({n: m for n, m in model.named_modules() if getattr(m, "calibrates_with_activations", False)
                       and not any(n.startswith(o) for o in owners)})  # lookup tables, softmax inputs (hfq.nn.lut)
    for q in quantizers.values():
        q.observe()
    try:
        run()
    finally:
        for q in quantizers.values():
            q.observing = False
    for name, q in quantizers.items():
        q.freeze(name)
    return len(quantizers)


def is_silu(module: nn.Module) -> bool:
    """Whether an activation module is SiLU (torch's, or transformers' `SiLUActivation`)."""
    return isinstance(module, nn.SiLU) or type(module).__name__ == "SiLUActivation"


class ScaledSiLU(nn.Module):
    """x * sigmoid(x / scale) per channel: SwiGLU's activation after I-LLM's gate/up smoothing (gate rows * s,
    up rows / s leave silu(gate) * up unchanged only if the sigmoid reads gate / s). `scale` [channels] is stored."""

    def __init__(self, channels: int, dtype=torch.float32, device=None):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x / self.scale.to(x.dtype))
