"""CFWS (Yang et al., 2023, arXiv 2312.10588): coarse & fine weight splitting of a re-parameterized (fused) conv.

Why: a fused RepVGG kernel is 3x3 + (1x1 padded to the centre) + (identity one-hot at the centre), each branch scaled
by its BatchNorm, so the centre tap is much larger than its 8 neighbours. One per-channel int8 grid sized by the
centre leaves the neighbours a few levels (most round to 0). CFWS quantizes the kernel as the SUM of two int8 kernels:

    coarse = the centre taps on a grid of step s_c = max|centre| / qmax, zero everywhere else (a 1x1 conv in effect);
    fine   = everything the coarse part left out: all neighbour taps + the centre's rounding residual (|.| <= s_c / 2),
             on its own grid s_f = max|fine| / qmax, which the (small) neighbours now set;

and runs conv(x, Q(coarse), Q(bias)) + conv(x, Q(fine)): two integer convolutions sharing the input. Every weight
is reconstructed to within half a FINE step (the centre included: its residual is on the fine grid).

What the official layer does (NeonHo/Coarse-Fine-Weight-Split, in_testing/parser/neon_exp_tools/rep_conv.py,
class RepVGGQuantConv2d, read for this module; the quantizer class behind it, hmquant's QuantParam, is not public):
- `divide_weight_headache` (used when `extract_center=True`, the default): centre = weight[:, :, 1, 1]; its step is
  max|centre| / w_qmax (w_qmax = 2^(w_bit-1) - 1 = 127) per output channel, or per tensor; coarse centre =
  floor(centre / step + 0.5) * step (round HALF UP, not half-to-even); fine = (kernel minus its centre) + (centre
  minus coarse centre). It is called with `channlewise = not need_fake_channelwise_coarseweight`, and the released
  configs (repvgg_ptq.py) set that flag from `--no_rep_perchannel`: per output channel by default.
- `search_w_bias_quant_param`: each part is then quantized to int8 with a per-output-channel scale
  max|part| / 127 (`need_fake_channelwise_coarseweight` overwrites the coarse scales with their maximum, i.e. one
  per-tensor scale; `w_channelwise` is hard-coded True, its unused False branch makes both parts per tensor).
  For the coarse part this second quantization is lossless: its largest integer is exactly qmax, so
  max|coarse| / qmax is the split step s_c again (up to one float ulp) and the integers come back unchanged.
  Here the coarse integers are therefore produced directly on s_c. The fine part's rounding mode lives in hmquant
  (unpublished); torch.round (half to even) is used, which differs only on exact ties.
- Bias: `bias_bit=16`, `bias_qmax = 1 << (bias_bit - 1)` = 32768 (not 32767), ONE per-tensor scale max|b| / 32768,
  independent of the input and weight scales; `quant_forward` adds the quantized bias to the coarse convolution only
  (the fine one gets zeros) and fake-quantizes the sum's output to 8 bits (`o_bit`), with hmquant's histogram
  (KL) calibration when `klconv` (RepVGGKLConfig) or min/max otherwise (RepVGGMinMaxConfig, the default
  `--ptq_cfg` of test_repvgg.py): see hfq.quant.kl.
- `extract_center=False` splits the whole kernel instead (`divide_weight_channelwise` / `divide_weight_tensorwise`:
  coarse = round-half-up(W / s) * s with s = max|W| / 127, fine = the residual): `centre_only=False` here.
- If the input was quantized per channel, the layer first folds the ratios s_in[c] / max(s_in) into the weight's
  input channels and divides the input by them, so the input becomes per-tensor: `fold_input_channel_scales`.
- There is no guard for a channel whose centre taps are all zero (0 / 0); here such a scale is clamped to 1e-8
  (the project's convention in qparams.py), which gives integer 0.

Math only: no modules, no hooks. Conventions as hfq.quant: symmetric, integers in [-2^(b-1), 2^(b-1) - 1] stored
as int16, scale = max / qmax ("max" sym_scale)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

_MIN_SCALE = 1e-8  # as hfq.quant.qparams: a channel of zeros gets integers 0, never a 0 / 0


@dataclass
class CoarseFineSplit:
    """The two integer kernels of a split, each with its scale ([out, 1, 1, 1] per channel, [1, 1, 1, 1] per tensor).

    coarse: int16 [out, in / groups, kh, kw], nonzero only at the centre tap (with `centre_only=True`).
    fine: int16, same shape. bits: the integer width of both (qmin = -2^(bits-1), qmax = 2^(bits-1) - 1)."""

    coarse: torch.Tensor
    coarse_scale: torch.Tensor
    fine: torch.Tensor
    fine_scale: torch.Tensor
    bits: int = 8

    def coarse_weight(self) -> torch.Tensor:
        return dequantize(self.coarse, self.coarse_scale)

    def fine_weight(self) -> torch.Tensor:
        return dequantize(self.fine, self.fine_scale)

    def reconstruct(self) -> torch.Tensor:
        """The float kernel the two integer kernels stand for: coarse * s_c + fine * s_f."""
        return self.coarse_weight() + self.fine_weight()


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()


def reconstruct(split: CoarseFineSplit) -> torch.Tensor:
    return split.reconstruct()


def _qmax(bits: int) -> int:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 2 to 8, got {bits!r}")
    return 2 ** (bits - 1) - 1


def _absmax(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """max|x| per output channel ([out, 1, 1, 1]) or per tensor ([1, 1, 1, 1])."""
    if granularity == "channel":
        return x.abs().amax(dim=tuple(range(1, x.dim())), keepdim=True)
    if granularity == "tensor":
        return x.abs().amax().reshape([1] * x.dim())
    raise ValueError(f"granularity must be 'channel' or 'tensor', got {granularity!r}")


def _centre_mask(weight: torch.Tensor) -> torch.Tensor:
    """Boolean [kh, kw], True at the centre tap (the official code hard-codes [1, 1] of a 3x3 kernel)."""
    if weight.dim() != 4:
        raise ValueError(f"expected a conv weight [out, in / groups, kh, kw], got shape {tuple(weight.shape)}")
    kh, kw = weight.shape[-2:]
    if kh % 2 == 0 or kw % 2 == 0 or kh * kw < 2:
        raise ValueError(f"the split needs an odd kernel with neighbour taps (e.g. 3x3), got {kh}x{kw}")
    mask = torch.zeros(kh, kw, dtype=torch.bool, device=weight.device)
    mask[kh // 2, kw // 2] = True
    return mask


@torch.no_grad()
def split_coarse_fine(weight: torch.Tensor, bits: int = 8, granularity: str = "channel",
                      fine_granularity: str = "channel", centre_only: bool = True) -> CoarseFineSplit:
    """Split a fused conv kernel [out, in / groups, kh, kw] into coarse + fine integer kernels (see the module doc).

    granularity: the coarse (centre) grid, one step per output channel (official default) or one per tensor
    (official `need_fake_channelwise_coarseweight` / `--no_rep_perchannel`). fine_granularity: the fine grid
    (per channel in the official layer). centre_only=False: the official `extract_center=False` split, whose coarse
    part is the whole kernel rounded to max|W| / qmax and whose fine part is the residual (|.| <= half a coarse step).
    Computed in float32 like the official layer."""
    qmax = _qmax(bits)
    w = weight.detach().float()
    mask = _centre_mask(w) if centre_only else torch.ones(w.shape[-2:], dtype=torch.bool, device=w.device)
    coarse_src = w * mask  # centre taps only (zero-padded back to the kernel), or the whole kernel
    s_c = (_absmax(coarse_src, granularity) / qmax).clamp(min=_MIN_SCALE)
    # round half up, as the official divide_weight_* (floor(x + 0.5)); |x / s_c| <= qmax, so no clamp is needed
    coarse = torch.floor(coarse_src / s_c + 0.5)
    fine_src = w - coarse * s_c  # neighbours + the centre's rounding residual (|.| <= s_c / 2)
    s_f = (_absmax(fine_src, fine_granularity) / qmax).clamp(min=_MIN_SCALE)
    fine = torch.clamp(torch.round(fine_src / s_f), -qmax - 1, qmax)
    return CoarseFineSplit(coarse.to(torch.int16), s_c, fine.to(torch.int16), s_f, bits)


def cfws_conv2d(x: torch.Tensor, split: CoarseFineSplit, bias: torch.Tensor | None = None, stride=1, padding=1,
                dilation=1, groups: int = 1) -> torch.Tensor:
    """The CFWS layer's output, simulated in float: conv(x, coarse, bias) + conv(x, fine) (the official
    `quant_forward`: the bias goes with the coarse convolution, the fine one has none). With x on an integer grid
    and the bias from `int16_bias`, each convolution is an integer convolution times its scale; the coarse one only
    touches the centre tap, so an engine may run it as a 1x1 conv (padding - dilation, same stride). The output's
    own 8-bit quantization (`kl_threshold` or min/max of |out|) is the caller's."""
    coarse = F.conv2d(x, split.coarse_weight().to(x.dtype), None if bias is None else bias.to(x.dtype), stride,
                      padding, dilation, groups)
    return coarse + F.conv2d(x, split.fine_weight().to(x.dtype), None, stride, padding, dilation, groups)


@torch.no_grad()
def int16_bias(bias: torch.Tensor, input_scale: torch.Tensor | float | None = None,
               weight_scale: torch.Tensor | float | None = None, bits: int = 16):
    """(q int32 in [-2^(bits-1), 2^(bits-1) - 1], scale) of a bias [out].

    Official (input_scale None): one per-tensor scale max|b| / 2^(bits-1) (rep_conv.py: bias_qmax = 1 << 15, not
    2^15 - 1), independent of the input and weight scales; the largest POSITIVE bias lands on 2^(bits-1), one past
    the int16 range, and saturates to 2^(bits-1) - 1 (an error of one step, 3e-5 relative; hmquant's clamp is
    unpublished, the int16 range is assumed). The float simulation just adds q * scale.
    Accumulator-aligned (input_scale and weight_scale given): scale = input_scale * weight_scale (per output channel
    with the coarse split's [out, 1, 1, 1] scale), the scale of the coarse convolution's integer accumulator, so an
    integer engine adds q straight into it; values beyond the int range saturate (compare q * scale with the bias
    to see how much)."""
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be from 2 to 16, got {bits}")
    b = bias.detach().float().reshape(-1)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if input_scale is None and weight_scale is None:
        scale = (b.abs().max() / 2 ** (bits - 1)).clamp(min=_MIN_SCALE).reshape(1)
    elif input_scale is not None and weight_scale is not None:
        scale = (torch.as_tensor(input_scale, dtype=torch.float32) *
                 torch.as_tensor(weight_scale, dtype=torch.float32)).reshape(-1)
        if scale.numel() not in (1, b.numel()):
            raise ValueError(f"input_scale * weight_scale has {scale.numel()} values for a bias of {b.numel()}")
    else:
        raise ValueError("give both input_scale and weight_scale (accumulator-aligned) or neither (official)")
    q = torch.clamp(torch.round(b / scale), lo, hi).to(torch.int32)
    return q, scale


@torch.no_grad()
def fold_input_channel_scales(weight: torch.Tensor, input_scale: torch.Tensor, groups: int = 1):
    """Make a per-input-channel activation scale per-tensor, as the official layer does before splitting.

    factor[c] = s_in[c] / max(s_in); the weight's input channel c is multiplied by factor[c] and the input divided
    by it: conv(x / factor, W * factor) == conv(x, W), and x / factor quantizes on the single scale max(s_in) to the
    same integers x quantized to on s_in[c]. Returns (folded weight, factor [C], max(s_in)). groups > 1 maps input
    channel c to column c % (C / groups) of its group's rows (the official code only handles groups = 1)."""
    s = input_scale.detach().float().reshape(-1)
    out_ch, cin_g = weight.shape[:2]
    if s.numel() != cin_g * groups or out_ch % groups:
        raise ValueError(f"{s.numel()} input scales do not fit a weight {tuple(weight.shape)} with groups={groups}")
    s_max = s.max()
    factor = s / s_max
    per_row = factor.reshape(groups, 1, cin_g).expand(groups, out_ch // groups, cin_g).reshape(out_ch, cin_g)
    return weight * per_row[:, :, None, None].to(weight.dtype), factor, s_max


@torch.no_grad()
def centre_neighbour_stats(weight: torch.Tensor, bits: int = 8) -> dict:
    """Per-layer statistics of a fused kernel that say whether the split is worth it (all Python floats).

    max_abs_centre, max_abs_neighbour: over the layer; centre_neighbour_ratio: their ratio; median_channel_ratio:
    the median over output channels of max|centre| / max|neighbours|. std_centre, std_neighbour: the official
    `cal_std` (statistic.py) print. Under ONE per-channel int8 grid (max|W_channel| / qmax): neighbour_range_share =
    mean over channels of max|neighbours| / max|W_channel| (the share of the grid's range the neighbours use),
    neighbour_levels = mean number of integer levels their range spans (2 * round(max|nbr| / s) + 1 of 2 * qmax + 1),
    neighbour_zero_fraction = share of neighbour taps that round to 0. rel_error_plain, rel_error_cfws:
    ||W - Q(W)|| / ||W|| of that plain per-channel grid and of the CFWS split (per-channel coarse and fine)."""
    qmax = _qmax(bits)
    w = weight.detach().float()
    mask = _centre_mask(w)
    out_ch = w.shape[0]
    centre = w[..., mask].reshape(out_ch, -1)
    nbr = w[..., ~mask].reshape(out_ch, -1)
    c_ch = centre.abs().amax(1)
    n_ch = nbr.abs().amax(1)
    s = (torch.maximum(c_ch, n_ch) / qmax).clamp(min=_MIN_SCALE)
    plain = torch.clamp(torch.round(w / s[:, None, None, None]), -qmax - 1, qmax) * s[:, None, None, None]
    cfws = split_coarse_fine(w, bits).reconstruct()
    norm = w.norm().clamp(min=1e-30)
    tiny = torch.finfo(torch.float32).tiny
    return {
        "max_abs_centre": float(c_ch.max()),
        "max_abs_neighbour": float(n_ch.max()),
        "centre_neighbour_ratio": float(c_ch.max() / n_ch.max().clamp(min=tiny)),
        "median_channel_ratio": float((c_ch / n_ch.clamp(min=tiny)).median()),
        "std_centre": float(centre.std()),
        "std_neighbour": float(nbr.std()),
        "neighbour_range_share": float((n_ch / (s * qmax)).mean()),
        "neighbour_levels": float((2 * torch.round(n_ch / s) + 1).mean()),
        "neighbour_zero_fraction": float((torch.round(nbr / s[:, None]) == 0).float().mean()),
        "rel_error_plain": float((w - plain).norm() / norm),
        "rel_error_cfws": float((w - cfws).norm() / norm),
    }
