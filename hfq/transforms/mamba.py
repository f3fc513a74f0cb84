"""Exact fusion of MambaQuant's rotations and smoothing scales into Mamba, FalconMamba and Mamba2 models
(llm.md §4), on the mixers of `hfq.nn.mamba` (which run every online piece as a module).

Convention as `fuse.py`: y = x W^T + b, a rotation maps x -> x R, everything in float64. Per mixer (names of
transformers' modules; E = intermediate size, N = state size, R = dt rank, G = B/C groups):
  S7  conv1d input: in_proj's conv rows / s, conv weights * s (depthwise, so exact; bias unchanged).
  S5  dt_proj input (Mamba): x_proj's dt rows / s, dt_proj columns * s.
  R5  (Mamba, offline): x_proj's dt rows <- R^T W, dt_proj <- W R, so the dt activation becomes dt R. The official
      code applies R^T instead (a slip: its KLT then decorrelates nothing); here R = K H acts as written.
  S4  scan output y = sum_n h_n C_n: C * s, B / s (h is linear in B, so h / s), s per state (per group and state in
      Mamba2), the official direction. Mamba fuses it into x_proj rows; Mamba2's B and C come out of the
      convolution and a SiLU, so there conv weights and bias * t and the SiLU of those channels becomes
      u sigmoid(u / t) (`conv_act` as ScaledSiLU), t = s for C and 1 / s for B.
  R4  online Hadamard on the state dimension: h R4 at run time (`ssm_out.rotation`); C R4 fused into x_proj's C rows
      (Mamba), online (Mamba2).
  S2  out_proj input: Mamba: in_proj's gate rows / s and the gate SiLU becomes z sigmoid(s z) (`gate_act`,
      ScaledSiLU with scale 1 / s), so the gate gives SiLU(z) / s; Mamba2: the gated RMSNorm weight / s. out_proj
      columns * s.
  R2  online rotation of out_proj's input (`out_rotation`), out_proj <- W R2: a Hadamard (no stored tensor), or
      MambaQuant's K H (a stored matrix per layer; the official code's loop reads a stale layer index and chains
      R2 = K R2 across layers, here each layer gets its own K).
  R1  residual stream (offline): norms folded into in_proj, in_proj <- W R1, out_proj <- R1^T W (bias b R1),
      embeddings E R1, final norm folded into the (untied) lm_head, lm_head <- W R1.
FalconMamba RMS-normalises dt, B and C without weights: rotations commute with those norms, scalings do not, so S4
and S5 are refused there."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..nn.mamba import OnlineRotation, SSMOutput, mixers, scaled_act, to_hfq_mixers
from ..quant import QuantArgs
from .fuse import untie_output_embedding
from .hadamard import random_hadamard
from .online import OnlineHadamard

SPEC_KEY = "hfq_mamba"  # model.config entry: the mixers' run-time pieces, rebuilt after loading


@dataclass
class MixerTransform:
    """One mixer's transforms; None = identity. Shapes: s_conv [conv channels], s_dt [R], r_dt [R, R] (Mamba),
    s_state [N] (Mamba) or [G, N] (Mamba2), s_out [E], r_out [E, E] (a stored online rotation; see `fuse_mamba_`)."""

    s_conv: torch.Tensor | None = None
    s_dt: torch.Tensor | None = None
    r_dt: torch.Tensor | None = None
    s_state: torch.Tensor | None = None
    s_out: torch.Tensor | None = None
    r_out: torch.Tensor | None = None


def is_mamba2(mixer) -> bool:
    return hasattr(mixer, "n_groups")


def is_falcon(mixer) -> bool:
    return hasattr(mixer, "dt_layernorm")


def _set(param: nn.Parameter, value: torch.Tensor) -> None:
    param.data = value.to(dtype=param.dtype, device=param.device)


def _fuse_mixer(mixer, t: MixerTransform, r_out: torch.Tensor | None) -> None:
    E = mixer.intermediate_size
    f64 = lambda p: None if p is None else p.detach().double()  # noqa: E731
    W_in, b_in = f64(mixer.in_proj.weight), f64(mixer.in_proj.bias)
    W_out = f64(mixer.out_proj.weight)
    conv_w, conv_b = f64(mixer.conv1d.weight), f64(mixer.conv1d.bias)
    conv_rows = slice(E, E + mixer.conv_dim) if is_mamba2(mixer) else slice(0, E)
    gate_rows = slice(0, E) if is_mamba2(mixer) else slice(E, 2 * E)

    def scale_rows(rows, s):
        W_in[rows] = W_in[rows] * s[:, None]
        if b_in is not None:
            b_in[rows] = b_in[rows] * s

    if t.s_conv is not None:
        s = t.s_conv.double().to(W_in.device)
        scale_rows(conv_rows, 1 / s)
        conv_w = conv_w * s[:, None, None]
    if is_mamba2(mixer):
        if t.s_state is not None:  # B / s, C * s through conv + SiLU: u' = u t, act u' sigmoid(u' / t)
            s = t.s_state.double().to(conv_w.device).reshape(-1)
            tc = torch.cat([torch.ones(E, dtype=torch.float64, device=s.device), 1 / s, s])
            conv_w = conv_w * tc[:, None, None]
            conv_b = None if conv_b is None else conv_b * tc
            act = scaled_act(mixer, "conv_act", mixer.conv_dim)
            _set(act.scale, act.scale.double() * tc)
        if t.s_out is not None:
            s = t.s_out.double().to(W_out.device)
            _set(mixer.norm.weight, mixer.norm.weight.double() / s)
            W_out = W_out * s[None, :]
    else:
        W_x, W_dt = f64(mixer.x_proj.weight), f64(mixer.dt_proj.weight)
        R, N = mixer.time_step_rank, mixer.ssm_state_size
        dt_rows, b_rows, c_rows = slice(0, R), slice(R, R + N), slice(R + N, R + 2 * N)
        if is_falcon(mixer) and (t.s_dt is not None or t.s_state is not None):
            raise NotImplementedError("FalconMamba RMS-normalises dt, B and C: the S5 / S4 scalings do not commute "
                                      "with those norms (rotations do); use smoothing without them")
        if t.s_dt is not None:
            s = t.s_dt.double().to(W_x.device)
            W_x[dt_rows] = W_x[dt_rows] / s[:, None]
            W_dt = W_dt * s[None, :]
        if t.r_dt is not None:
            r = t.r_dt.double().to(W_x.device)
            W_x[dt_rows] = r.T @ W_x[dt_rows]
            W_dt = W_dt @ r
        if t.s_state is not None:
            s = t.s_state.double().to(W_x.device)
            W_x[c_rows] = W_x[c_rows] * s[:, None]
            W_x[b_rows] = W_x[b_rows] / s[:, None]
        rotation = mixer.ssm_out.rotation
        if rotation is not None:  # C R4 fused: C' = x (R4^T W_c)^T
            W_x[c_rows] = rotation(W_x[c_rows].T.contiguous()).T
        _set(mixer.x_proj.weight, W_x)
        _set(mixer.dt_proj.weight, W_dt)
        if t.s_out is not None:
            s = t.s_out.double().to(W_in.device)
            scale_rows(gate_rows, 1 / s)
            act = scaled_act(mixer, "gate_act", E)
            _set(act.scale, act.scale.double() / s)  # z' sigmoid(s z') with z' = z / s: SiLU(z) / s
            W_out = W_out * s[None, :]
    if r_out is not None:  # x R2 (W R2)^T = x W^T
        W_out = W_out @ r_out.double().to(W_out.device)
    _set(mixer.in_proj.weight, W_in)
    if b_in is not None:
        _set(mixer.in_proj.bias, b_in)
    _set(mixer.out_proj.weight, W_out)
    _set(mixer.conv1d.weight, conv_w)
    if conv_b is not None:
        _set(mixer.conv1d.bias, conv_b)


def _fuse_r1(model, r1: torch.Tensor) -> None:
    """Norms folded, R1 on the residual stream; the output embedding untied and the final norm folded into it."""
    backbone = model.backbone
    r1 = r1.double()
    for block in backbone.layers:
        mixer = block.mixer
        gamma = block.norm.weight.double()
        w = mixer.in_proj.weight.double() * gamma.to(mixer.in_proj.weight.device)
        _set(mixer.in_proj.weight, w @ r1.to(w.device))
        _set(block.norm.weight, torch.ones_like(gamma))
        w_out = mixer.out_proj.weight.double()
        _set(mixer.out_proj.weight, r1.T.to(w_out.device) @ w_out)
        if mixer.out_proj.bias is not None:
            _set(mixer.out_proj.bias, mixer.out_proj.bias.double() @ r1.to(w_out.device))
    untie_output_embedding(model)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    _set(emb.weight, emb.weight.double() @ r1.to(emb.weight.device))
    gamma = backbone.norm_f.weight.double()
    _set(head.weight, (head.weight.double() * gamma.to(head.weight.device)) @ r1.to(head.weight.device))
    _set(backbone.norm_f.weight, torch.ones_like(gamma))


def fuse_mamba_(model, r1: torch.Tensor | None = None, layers: list[MixerTransform] | None = None, *,
                out_hadamard_seed: int | None = None, state_hadamard_seed: int | None = None) -> None:
    """Fuse MambaQuant's transforms into `model` in place (logits unchanged) and install its run-time pieces.

    r1: [hidden, hidden] orthogonal. layers: one MixerTransform per mixer (r_out: a stored online R2). Online
    Hadamards: out_hadamard_seed (R2 = diag(±1) H on out_proj's input, when no r_out is given) and
    state_hadamard_seed (R4 on the state dimension); None = not used. The run-time spec goes to
    `model.config.hfq_mamba` (`restore_mixers` rebuilds it after loading)."""
    ms = to_hfq_mixers(model)
    layers = layers if layers is not None else [MixerTransform() for _ in ms]
    if len(layers) != len(ms):
        raise ValueError(f"got {len(layers)} MixerTransforms for {len(ms)} mixers")
    stored = [t.r_out is not None for t in layers]
    if any(stored) and not all(stored):
        raise ValueError("r_out (a stored R2) must be given for every mixer or for none")
    if stored[0] and out_hadamard_seed is not None:
        raise ValueError("give either stored r_out rotations or out_hadamard_seed, not both")
    spec = {"gate_scale": any(t.s_out is not None and not is_mamba2(m) for m, t in zip(ms, layers)),
            "conv_scale": any(t.s_state is not None and is_mamba2(m) for m, t in zip(ms, layers)),
            "out_rotation": "stored" if stored[0] else (None if out_hadamard_seed is None else
                                                        {"size": ms[0].intermediate_size, "seed": out_hadamard_seed}),
            "state_rotation": None if state_hadamard_seed is None else {"size": ms[0].ssm_state_size,
                                                                        "seed": state_hadamard_seed},
            "state_act": (current_spec(model) or {}).get("state_act")}
    configure_mixers(model, spec, init=1.0)
    with torch.no_grad():
        for m, t in zip(ms, layers):
            if t.r_out is not None:
                _check_orthogonal(t.r_out, m.intermediate_size, "r_out")
                m.out_rotation.rotation.data = t.r_out.to(m.out_rotation.rotation)
            _fuse_mixer(m, t, t.r_out if out_hadamard_seed is None else
                        random_hadamard(m.intermediate_size, out_hadamard_seed))
        if r1 is not None:
            _check_orthogonal(r1, model.config.hidden_size, "r1")
            _fuse_r1(model, r1)


def _check_orthogonal(r: torch.Tensor, n: int, name: str) -> None:
    if tuple(r.shape) != (n, n):
        raise ValueError(f"{name} must be [{n}, {n}], got {tuple(r.shape)}")
    eye = torch.eye(n, dtype=torch.float64, device=r.device)
    if not torch.allclose(r.double() @ r.double().T, eye, atol=1e-6):
        raise ValueError(f"{name} is not orthogonal (R R^T != I); fusing it would change the model's outputs")


def current_spec(model) -> dict | None:
    return getattr(model.config, SPEC_KEY, None)


def configure_mixers(model, spec: dict, init: float = float("nan")) -> None:
    """Give every mixer the run-time pieces of `spec` (and record it in `model.config.hfq_mamba`): ScaledSiLU gate /
    conv activations (created with `init`: NaN for a load skeleton, whose values must come from the checkpoint),
    the out_proj rotation (stored matrix or Hadamard), the state rotation and the per-token quantizers of h and C."""
    ms = to_hfq_mixers(model)
    state_act = None if spec.get("state_act") is None else QuantArgs.from_dict(spec["state_act"])
    for m in ms:
        if spec["gate_scale"]:
            scaled_act(m, "gate_act", m.intermediate_size, init)
        if spec["conv_scale"]:
            scaled_act(m, "conv_act", m.conv_dim, init)
        out = spec["out_rotation"]
        if out == "stored":
            if not isinstance(m.out_rotation, OnlineRotation):
                m.out_rotation = OnlineRotation(m.intermediate_size, device=m.A_log.device)
                m.out_rotation.rotation.data.fill_(init)
        else:
            m.out_rotation = nn.Identity() if out is None else OnlineHadamard(**out)
        state = spec["state_rotation"]
        m.ssm_out = SSMOutput(state_act, None if state is None else OnlineHadamard(**state), rotate_c=is_mamba2(m))
    setattr(model.config, SPEC_KEY, dict(spec))


def set_state_quant(model, args: QuantArgs | None) -> None:
    """Quantize the scan output matmul's operands (h and C, per token) with `args` (None: float)."""
    spec = dict(current_spec(model) or {"gate_scale": False, "conv_scale": False, "out_rotation": None,
                                         "state_rotation": None})
    spec["state_act"] = None if args is None else args.to_dict()
    configure_mixers(model, spec, init=1.0)


def restore_mixers(model) -> None:
    """After loading an hfq Mamba checkpoint: hfq's mixers with the recorded run-time pieces."""
    spec = current_spec(model)
    if spec is None:
        raise ValueError("this checkpoint has no hfq_mamba entry in its config.json, so its mixers' online rotations "
                         "and smoothing activations are unknown; restore config.json from the saved model (or "
                         "re-quantize from full precision)")
    configure_mixers(model, spec)


__all__ = ["MixerTransform", "SPEC_KEY", "configure_mixers", "fuse_mamba_", "mixers", "restore_mixers",
           "set_state_quant"]
