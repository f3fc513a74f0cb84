"""Lookup tables for non-linear functions on an integer datapath (FQ-PETR's DULUT; math only).

A *linear* LUT has `n` entries at uniformly spaced inputs over [lo, hi] and interpolates linearly between the two
entries around the input (the input is clamped to the range: values outside saturate).

DULUT (FQ-PETR, arXiv 2511.09347; its internals come from a third-party note, no official code: the construction
below is this project's reading, see docs/fqpetr.md) cascades two small linear LUTs: LUT-1, the index mapper, maps the
input to a fractional index s in [0, m - 1] of LUT-2 (monotone; steep where the function bends, so high-curvature
regions get many LUT-2 entries and flat ones few); LUT-2 holds m function values and interpolates at s. Both are
ordinary uniform linear LUTs, the hardware a 256-entry single table uses, so (32 + 32) entries store 4x fewer numbers.
The LUT-2 breakpoints come from an error-driven split / merge search over LUT-1's intervals (`fit_dulut`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# the functions FQ-PETR evaluates through tables, by name (a checkpoint stores the name)
FUNCTIONS = {
    "exp": torch.exp,
    "sigmoid": torch.sigmoid,
    # mmdet's inverse_sigmoid as PETR uses it: inputs clamped to [0, 1], both terms to >= 1e-5 (so +-11.51 at the ends)
    "inverse_sigmoid": lambda x: torch.log(x.clamp(0, 1).clamp(min=1e-5) / (1 - x.clamp(0, 1)).clamp(min=1e-5)),
    "gelu": F.gelu,
    "silu": F.silu,
}


def linear_lut(x: torch.Tensor, lo: float, hi: float, values: torch.Tensor) -> torch.Tensor:
    """Uniform linear LUT: `values` at len(values) evenly spaced inputs over [lo, hi], linear interpolation."""
    n = values.shape[0]
    pos = ((x - lo) / (hi - lo)).clamp(0, 1) * (n - 1)
    i = pos.floor().clamp(max=n - 2)
    frac = pos - i
    i = i.long()
    return torch.lerp(values[i], values[i + 1], frac.to(values.dtype))


def dulut(x: torch.Tensor, lo: float, hi: float, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """DULUT: LUT-2 (`values`, at indices 0..m-1) read at the fractional index LUT-1 (`index` over [lo, hi]) gives."""
    return linear_lut(linear_lut(x, lo, hi, index), 0.0, values.shape[0] - 1.0, values)


def fit_single(fn: str, lo: float, hi: float, entries: int = 256) -> torch.Tensor:
    """The single linear LUT's values: the function at its `entries` evenly spaced inputs."""
    return FUNCTIONS[fn](torch.linspace(lo, hi, entries, dtype=torch.float64)).float()


def _group_knots(group, coarse):
    """Input positions of a group's LUT-2 breakpoints: a run of coarse intervals [a, b) cut into n equal pieces."""
    a, b, n = group
    return torch.linspace(float(coarse[a]), float(coarse[b]), n + 1, dtype=torch.float64)


def _group_error(group, coarse, f, x, y):
    """Sum of squared (chord - f) of the group's pieces (LUT-2 values = f at the breakpoints) on the grid points
    inside. Squared error, not the largest: with the largest, a function with a near-singular end (inverse sigmoid)
    pulls every breakpoint to that end for a tiny gain there (measured: mean error 0.50 vs 0.04 on [0, 1])."""
    knots = _group_knots(group, coarse)
    inside = (x >= knots[0]) & (x <= knots[-1])
    xs, ys = x[inside], y[inside]
    if xs.numel() == 0:
        return 0.0
    fk = f(knots)
    j = (torch.searchsorted(knots, xs, right=True) - 1).clamp(0, knots.numel() - 2)
    t = (xs - knots[j]) / (knots[j + 1] - knots[j])
    return float((fk[j] + t * (fk[j + 1] - fk[j]) - ys).square().sum())


def fit_dulut(fn: str, lo: float, hi: float, index_entries: int = 32, value_entries: int = 32, grid: int = 4097,
              max_steps: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(LUT-1, LUT-2) for `fn` on [lo, hi].

    LUT-1's entries sit at index_entries evenly spaced inputs, so they cut the range into coarse intervals. Each
    LUT-2 segment is either a piece of one coarse interval cut into n equal pieces (split) or one run of several
    coarse intervals (merged): LUT-1 then rises linearly across every segment, so the cascade is exactly the linear
    interpolation of f between the segment ends (LUT-2 holds f there). Start: one segment per coarse interval (spare
    LUT-2 entries go to the worst segments). Step: split the segment with the largest error further (a run is halved,
    an interval gets one more piece) and pay for it with the cheapest merge (one piece fewer somewhere, or two
    adjacent single-segment runs joined), kept only if the total squared error on the grid falls."""
    if not hi > lo:
        raise ValueError(f"a lookup table needs a non-empty input range, got [{lo}, {hi}]")
    if index_entries < 2 or value_entries < index_entries:
        raise ValueError(f"DULUT needs index_entries >= 2 and value_entries >= index_entries (every LUT-1 interval "
                         f"starts as one LUT-2 segment), got {index_entries} and {value_entries}")
    f = FUNCTIONS[fn]
    x = torch.linspace(lo, hi, grid, dtype=torch.float64)
    y = f(x)
    coarse = torch.linspace(lo, hi, index_entries, dtype=torch.float64)
    groups = [(c, c + 1, 1) for c in range(index_entries - 1)]  # (first interval, end interval, pieces)
    spare = value_entries - index_entries  # LUT-2 entries beyond one per coarse interval: pieces to hand out
    if spare:
        groups = _grow(groups, spare, coarse, f, x, y)
    err = [_group_error(g, coarse, f, x, y) for g in groups]
    for _ in range(max_steps):
        w = max(range(len(groups)), key=err.__getitem__)
        a, b, n = groups[w]
        split = [(a, (a + b) // 2, 1), ((a + b) // 2, b, 1)] if b - a > 1 else [(a, b, n + 1)]
        best = None
        for k in range(len(groups)):  # merges that free one LUT-2 entry, never touching the group being split
            if k == w:
                continue
            ga = groups[k]
            options = []
            if ga[2] > 1:
                options.append(([k], [(ga[0], ga[1], ga[2] - 1)]))
            if k + 1 < len(groups) and k + 1 != w and ga[2] == 1 and groups[k + 1][2] == 1:
                options.append(([k, k + 1], [(ga[0], groups[k + 1][1], 1)]))
            for replace, new in options:
                delta = sum(_group_error(g, coarse, f, x, y) for g in new) - sum(err[i] for i in replace)
                if best is None or delta < best[0]:
                    best = (delta, replace, new)
        if best is None:
            break
        gain = err[w] - sum(_group_error(g, coarse, f, x, y) for g in split)
        if best[0] >= gain:
            break
        _, replace, merged = best
        trial = {i: [g] for i, g in enumerate(groups)}
        trial[w] = split
        trial[replace[0]] = merged
        for i in replace[1:]:
            trial[i] = []
        groups = [g for i in range(len(groups)) for g in trial[i]]
        err = [_group_error(g, coarse, f, x, y) for g in groups]
    return _tables(groups, coarse, f, index_entries)


def _grow(groups, spare, coarse, f, x, y):
    """Hand out `spare` extra LUT-2 entries one at a time to the group with the largest squared error."""
    for _ in range(spare):
        err = [_group_error(g, coarse, f, x, y) for g in groups]
        w = max(range(len(groups)), key=err.__getitem__)
        a, b, n = groups[w]
        groups = groups[:w] + ([(a, (a + b) // 2, 1), ((a + b) // 2, b, 1)] if b - a > 1 else [(a, b, n + 1)]) \
            + groups[w + 1:]
    return groups


def _tables(groups, coarse, f, index_entries):
    """LUT-1 (fractional LUT-2 index at every coarse knot) and LUT-2 (f at every segment end) of a grouping."""
    index = torch.zeros(index_entries, dtype=torch.float64)
    knots, s = [float(coarse[0])], 0.0
    for a, b, n in groups:
        for c in range(a + 1, b + 1):  # a merged run rises 1 / (b - a) per interval; a split interval rises n
            index[c] = s + n * (c - a) / (b - a)
        s += n
        knots += _group_knots((a, b, n), coarse)[1:].tolist()
    return index.float(), f(torch.tensor(knots, dtype=torch.float64)).float()


def table_error(approx, fn: str, lo: float, hi: float, input_bits: int | None = None, output_bits: int | None = None,
                points: int = 65537) -> dict:
    """Max and mean |approx(x) - fn(x)| over [lo, hi] (`points` evenly spaced inputs, or the 2^input_bits codes
    of a uniform input quantizer over the range); with output_bits, the approximation's output is rounded to that
    many bits over the function's output range (what the next int8 layer sees), the reference is not."""
    n = points if input_bits is None else 2 ** input_bits
    x = torch.linspace(lo, hi, n, dtype=torch.float64)
    ref = FUNCTIONS[fn](x)
    out = approx(x.float()).double()
    if output_bits is not None:
        ylo, yhi = float(ref.min()), float(ref.max())
        step = (yhi - ylo) / (2 ** output_bits - 1)
        out = ((out - ylo) / step).round().clamp(0, 2 ** output_bits - 1) * step + ylo
    err = (out - ref).abs()
    return {"max": float(err.max()), "mean": float(err.mean())}
