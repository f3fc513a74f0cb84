"""Non-linear functions evaluated the integer way (FQ-PETR): `LUTFunction` reads a lookup table fitted on the
calibrated input range, `QuantSoftmax` quantizes the softmax input (raw logits, or QANS: z - max(z) clipped to
[-beta, 0]) and takes exp from a table. Tables and ranges are stored tensors (NaN until calibrated or loaded, and a
NaN table refuses to run); `observe()` / `freeze()` follow `ActQuantizer`, so `calibrate_static` calibrates them in
the same pass as the activation scales."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..quant import QuantArgs, fake_quantize
from ..quant.lut import FUNCTIONS, dulut, fit_dulut, fit_single, linear_lut

TABLES = ("dulut", "single")  # FQ-PETR's two cascaded 32-entry tables / one uniform table (256 entries: the baseline)


def quantize_range(x: torch.Tensor, lo: float, hi: float, bits: int) -> torch.Tensor:
    """x clamped to [lo, hi] and rounded to the 2^bits uniform codes of that range (the table's integer input)."""
    step = (hi - lo) / (2**bits - 1)
    return ((x.clamp(lo, hi) - lo) / step).round() * step + lo


class LUTFunction(nn.Module):
    """`fn(x)` through a table on [lo, hi] (the calibrated input range; inputs outside saturate), the input taken
    as a `input_bits` integer code of that range. table="dulut": LUT-1 `index` + LUT-2 `values`; "single": one
    uniform linear table of `entries` values."""

    def __init__(self, fn: str, table: str = "dulut", input_bits: int = 16, index_entries: int = 32,
                 value_entries: int = 32, entries: int = 256, device=None):
        super().__init__()
        if fn not in FUNCTIONS:
            raise ValueError(f"no table for {fn!r}; tables exist for {sorted(FUNCTIONS)}")
        if table not in TABLES:
            raise ValueError(f"table must be one of {TABLES}, got {table!r}")
        self.fn, self.table, self.input_bits = fn, table, input_bits
        frozen = dict(requires_grad=False)
        nan = lambda n: nn.Parameter(torch.full((n,), float("nan"), device=device), **frozen)  # noqa: E731
        self.input_range = nan(2)
        self.index = nan(index_entries) if table == "dulut" else None
        self.values = nan(value_entries if table == "dulut" else entries)
        self.observing, self._lo, self._hi = False, None, None

    static = True
    calibrates_with_activations = True  # observed and frozen by `calibrate_static`

    def calibrated(self) -> bool:
        return bool(torch.isfinite(self.values).all() and torch.isfinite(self.input_range).all())

    def observe(self):
        self.observing, self._lo, self._hi = True, None, None
        return self

    @torch.no_grad()
    def freeze(self, name: str = ""):
        if self._lo is None:
            raise RuntimeError(f"lookup table {name or '?'} ({self.fn}) saw no calibration data: is it on the forward "
                               f"path of the calibration inputs?")
        self.fit(self._lo, self._hi)
        self.observing = False

    @torch.no_grad()
    def fit(self, lo: float, hi: float):
        """Build the table for inputs in [lo, hi]."""
        if not hi > lo:
            hi = lo + max(abs(lo), 1.0) * 1e-3  # a constant input: any tiny range holds it
        self.input_range.copy_(torch.tensor([lo, hi]))
        if self.table == "dulut":
            index, values = fit_dulut(self.fn, lo, hi, self.index.numel(), self.values.numel())
            self.index.copy_(index)
        else:
            values = fit_single(self.fn, lo, hi, self.values.numel())
        self.values.copy_(values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            lo, hi = float(x.min()), float(x.max())
            self._lo = lo if self._lo is None else min(self._lo, lo)
            self._hi = hi if self._hi is None else max(self._hi, hi)
            return FUNCTIONS[self.fn](x)
        if not self.calibrated():
            raise RuntimeError(f"lookup table for {self.fn} is not calibrated: quantize with calibration data or load "
                               f"a checkpoint that has its tables")
        lo, hi = self.input_range.tolist()
        xq = quantize_range(x.float(), lo, hi, self.input_bits)
        if self.table == "dulut":
            return dulut(xq, lo, hi, self.index, self.values).to(x.dtype)
        return linear_lut(xq, lo, hi, self.values).to(x.dtype)

    def extra_repr(self) -> str:
        sizes = f"{self.index.numel()}+{self.values.numel()}" if self.table == "dulut" else f"{self.values.numel()}"
        return f"{self.fn}, {self.table} ({sizes} entries), input {self.input_bits} bit"


class QuantSoftmax(nn.Module):
    """softmax(z) over the last dim with an 8-bit input. mode "raw": z quantized per tensor with a static symmetric
    scale (the plain int8 baseline: the attention peak shares 256 levels with the whole logit range); "qans": z - max
    (per row) clipped to [-beta, 0] then quantized to `bits` unsigned codes (step beta / (2^bits - 1)), beta chosen at
    calibration from `beta_candidates` as the one whose softmax is closest to the float one (mean L1 over rows).
    exp comes from `exp_table` (a LUTFunction over [-R, 0], R = beta or the raw logit span) or is exact (None).
    Masked logits (-inf) get probability 0 in every mode."""

    def __init__(self, mode: str, bits: int = 8, beta_candidates=(2, 4, 6, 8, 10, 12, 16, 20, 24, 32),
                 exp_table: LUTFunction | None = None, max_rows: int = 2048, device=None):
        super().__init__()
        if mode not in ("raw", "qans"):
            raise ValueError(f"softmax input mode must be 'raw' or 'qans', got {mode!r}")
        if exp_table is not None and exp_table.fn != "exp":
            raise ValueError(f"the softmax table must be exp, got {exp_table.fn}")
        self.mode, self.bits, self.max_rows = mode, bits, max_rows
        self.beta_candidates = tuple(float(b) for b in beta_candidates)
        # qans: beta; raw: the symmetric logit range a (scale a / 127)
        self.clip = nn.Parameter(torch.full((1,), float("nan"), device=device), requires_grad=False)
        self.exp_table = exp_table
        self.observing, self._rows, self._absmax = False, [], 0.0

    static = True
    calibrates_with_activations = True
    calibrates_children = True  # its exp table is fitted by its own freeze(), on the range it chose

    def calibrated(self) -> bool:
        return bool(torch.isfinite(self.clip).all()) and (self.exp_table is None or self.exp_table.calibrated())

    def observe(self):
        self.observing, self._rows, self._absmax = True, [], 0.0
        return self

    def _exp_range(self) -> float:
        return float(self.clip) if self.mode == "qans" else 2 * float(self.clip)

    @torch.no_grad()
    def freeze(self, name: str = ""):
        if not self._rows:
            raise RuntimeError(f"softmax {name or '?'} saw no calibration data")
        if self.mode == "raw":
            self.clip.fill_(self._absmax)
        else:
            rows = torch.cat(self._rows)[: self.max_rows]
            ref = rows.softmax(-1)
            dev = [float((self._qans_probs(rows, b, None) - ref).abs().sum(-1).mean()) for b in self.beta_candidates]
            self.deviations = dict(zip(self.beta_candidates, dev))
            self.clip.fill_(self.beta_candidates[min(range(len(dev)), key=dev.__getitem__)])
        if self.exp_table is not None:
            self.exp_table.fit(-self._exp_range(), 0.0)
        self.observing, self._rows = False, []

    def _qans_probs(self, z, beta, exp):
        keep = torch.isfinite(z)
        shifted = self._minus_row_max(z, keep)
        step = beta / (2**self.bits - 1)
        zq = -((-shifted.masked_fill(~keep, -beta)).clamp(0, beta) / step).round() * step
        return self._normalise(zq, keep, exp)

    @staticmethod
    def _minus_row_max(z, keep):
        """z - the max of each row's kept entries (masked entries become -inf)."""
        masked = z.masked_fill(~keep, -math.inf)
        return masked - masked.amax(-1, keepdim=True)

    @staticmethod
    def _normalise(zq, keep, exp):
        e = (exp(zq) if exp is not None else zq.exp()) * keep
        return e / e.sum(-1, keepdim=True).clamp(min=1e-30)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.observing:
            keep = torch.isfinite(z)
            self._absmax = max(self._absmax, float(z.masked_fill(~keep, 0).abs().max()))
            if sum(r.shape[0] for r in self._rows) < self.max_rows:
                flat = z.detach().float().reshape(-1, z.shape[-1])
                g = torch.Generator().manual_seed(len(self._rows))
                self._rows.append(flat[torch.randperm(flat.shape[0], generator=g)[:256]].cpu())
            return z.softmax(-1)
        if not self.calibrated():
            raise RuntimeError("QuantSoftmax is not calibrated: quantize with calibration data or load a checkpoint "
                               "that has its clip and tables")
        z = z.float()
        if self.mode == "qans":
            return self._qans_probs(z, float(self.clip), self.exp_table)
        keep = torch.isfinite(z)
        args = QuantArgs(bits=self.bits, symmetric=True, granularity="tensor")
        a = float(self.clip)
        zq = fake_quantize(z.masked_fill(~keep, 0).clamp(-a, a), args, torch.tensor(a / args.qmax),
                           torch.zeros(1))
        shifted = self._minus_row_max(zq, keep)
        return self._normalise(shifted.masked_fill(~keep, -2 * a), keep, self.exp_table)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, {self.bits} bit"
