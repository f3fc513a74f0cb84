"""Mamba and Mamba2 mixers with the forward hfq runs itself, for MambaQuant (llm.md §4).

transformers' slow path reads `dt_proj.weight` and `conv1d.weight` directly and computes the scan's output matmul
(h . C) inside one function, so neither the convolution, the time-step projection nor that matmul can be quantized
there. `to_hfq_mixers(model)` swaps every mixer's class for a same-named subclass (state dict unchanged) whose
forward is the same computation written with modules:

  in_proj -> [conv1d input quantizer] causal conv1d -> `conv_act` -> x_proj -> dt_proj -> softplus
  -> recurrence h_t = exp(dt A) h_{t-1} + dt B x_t (float) -> y_t = `ssm_out`(h_t, C_t) (+ D x_t)
  -> gate (`gate_act`(z), or Mamba2's gated RMSNorm) -> `out_rotation` -> out_proj

`conv_act` / `gate_act` become `ScaledSiLU` when a smoothing scale is fused through them, `ssm_out` quantizes h and C
per token after an optional online Hadamard on the state dimension (R4), `out_rotation` is an online rotation of
out_proj's input (R2). The recurrence itself (exp(dt A), the state update, softplus, the D skip, the norms) stays
float, as in the paper. Caches (conv and recurrent states, `DynamicCache`) behave as transformers': prefill, then
one token per step; the conv state holds the quantized conv inputs."""
from __future__ import annotations

import functools
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.models.mamba import modeling_mamba
from transformers.models.mamba2 import modeling_mamba2
from transformers.modeling_utils import slice_logits_to_keep

from ..quant import QuantArgs
from .act import ActQuantizer, ScaledSiLU, is_silu
from .conv import QuantConv1d


class OnlineRotation(nn.Module):
    """x -> x @ R on the last dimension, R [n, n] a stored orthogonal matrix (MambaQuant's KLT-enhanced R2, which no
    fast transform computes), in float32 at least. Starts as NaN: it must be set or loaded."""

    def __init__(self, size: int, dtype=torch.float32, device=None):
        super().__init__()
        self.rotation = nn.Parameter(torch.full((size, size), float("nan"), dtype=dtype, device=device),
                                     requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        work = torch.promote_types(x.dtype, torch.float32)
        return (x.to(work) @ self.rotation.to(work)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"size={self.rotation.shape[0]}"


class SSMOutput(nn.Module):
    """The scan's output matmul of one time step: y[b, g, k] = sum_n h[b, g, k, n] C[b, g, n] (g: B/C groups).

    rotation (R4, on the state dimension n): applied to h, and to C when `rotate_c` (Mamba2, whose C comes out of
    a convolution and a SiLU; Mamba fuses C's rotation into x_proj instead). act_args: h and C quantized per token
    (one scale per batch row and time step, over all of h's [g, k, n], resp. C's [g, n])."""

    def __init__(self, act_args: QuantArgs | None = None, rotation: nn.Module | None = None, rotate_c: bool = False):
        super().__init__()
        self.rotation, self.rotate_c = rotation, rotate_c
        self.h_quant = None if act_args is None else ActQuantizer(act_args)
        self.c_quant = None if act_args is None else ActQuantizer(act_args)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.rotation is not None:
            h = self.rotation(h)
            c = self.rotation(c) if self.rotate_c else c
        if self.h_quant is not None:
            b = h.shape[0]
            h = self.h_quant(h.reshape(b, -1)).view_as(h)
            c = self.c_quant(c.reshape(b, -1)).view_as(c)
        return torch.einsum("bgkn,bgn->bgk", h, c.to(h.dtype))


def _conv(mixer, x: torch.Tensor, conv_state, cache, seq_len: int) -> torch.Tensor:
    """The causal depthwise convolution of x [b, channels, seq] (its input quantized when conv1d is a
    `QuantConv1d`), with transformers' cache protocol; returns [b, seq, channels] after `conv_act`."""
    conv = mixer.conv1d
    if isinstance(conv, QuantConv1d):
        x = conv.quantize_input(x)
        w = conv.dequantized_weight(x.dtype)
    else:
        w = conv.weight.squeeze(1)
    if conv_state is not None and seq_len == 1 and not cache.is_recording_past(mixer.layer_idx):
        out = modeling_mamba.causal_conv1d_update(x, conv_state, w, conv.bias)
    else:
        if cache is not None:
            x = cache.update_conv_state(x, mixer.layer_idx, conv_kernel_size=mixer.conv_kernel_size)
        out = modeling_mamba.causal_conv1d_fn(x, w, conv.bias)
        if cache is not None:
            out = out[:, :, -seq_len:]
    return mixer.conv_act(out.transpose(1, 2))


def _states(cache, layer_idx):
    if cache is None:
        return None, None
    return cache.get_conv_state(layer_idx, state_idx=0), cache.get_recurrent_state(layer_idx, state_idx=0)


def _store_state(cache, layer_idx, recurrent, h, decode: bool):
    if decode:
        recurrent.copy_(h.to(recurrent.dtype))
    elif cache is not None:
        cache.update_recurrent_state(h, layer_idx)


def mamba_forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
    """MambaMixer (Mamba-1; FalconMamba, which RMS-normalises dt, B and C without weights) with modules for every
    quantized operation."""
    b, seq_len, _ = hidden_states.shape
    dtype = hidden_states.dtype
    conv_state, recurrent = _states(cache, self.layer_idx)
    mask = modeling_mamba.apply_mask_to_padding_states
    x, z = self.in_proj(mask(hidden_states, attention_mask)).transpose(1, 2).chunk(2, dim=1)
    x = mask(_conv(self, x, conv_state, cache, seq_len), attention_mask)  # [b, seq, E]
    dt, B, C = torch.split(self.x_proj(x), [self.time_step_rank, self.ssm_state_size, self.ssm_state_size], dim=-1)
    if hasattr(self, "dt_layernorm"):  # FalconMamba
        dt, B, C = self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)
    dt = F.softplus(self.dt_proj(dt)).float()  # [b, seq, E]
    A = -torch.exp(self.A_log.float())  # [E, N]
    decode = recurrent is not None and seq_len == 1
    h = recurrent.float() if decode else x.new_zeros(b, self.intermediate_size, self.ssm_state_size,
                                                     dtype=torch.float32)
    ys = []
    for t in range(seq_len):
        d = dt[:, t, :, None]
        h = torch.exp(d * A) * h + d * B[:, t, None, :].float() * x[:, t, :, None].float()
        ys.append(self.ssm_out(h[:, None], C[:, t, None].float())[:, 0])
    _store_state(cache, self.layer_idx, recurrent, h, decode)
    y = torch.stack(ys, dim=1) + x.float() * self.D.float()
    y = y * self.gate_act(z.transpose(1, 2).float())
    return self.out_proj(self.out_rotation(y.to(dtype)))


def mamba2_forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
    """Mamba2Mixer with modules for every quantized operation (the chunked scan written as its recurrence)."""
    b, seq_len, _ = hidden_states.shape
    dtype = hidden_states.dtype
    conv_state, recurrent = _states(cache, self.layer_idx)
    mask = modeling_mamba2.apply_mask_to_padding_states
    z, xbc, dt = self.in_proj(mask(hidden_states, attention_mask)).split(
        [self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
    xbc = mask(_conv(self, xbc.transpose(1, 2), conv_state, cache, seq_len), attention_mask)
    gn = self.n_groups * self.ssm_state_size
    x, B, C = torch.split(xbc, [self.intermediate_size, gn, gn], dim=-1)
    dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.time_step_limit)  # [b, seq, H]
    A = -torch.exp(self.A_log.float())  # [H]
    H, P, N, G = self.num_heads, self.head_dim, self.ssm_state_size, self.n_groups
    x = x.float().view(b, seq_len, H, P)
    B = B.float().view(b, seq_len, G, 1, N).expand(b, seq_len, G, H // G, N).reshape(b, seq_len, H, N)
    C = C.float().view(b, seq_len, G, N)
    decode = recurrent is not None and seq_len == 1
    h = recurrent.float() if recurrent is not None else x.new_zeros(b, H, P, N)
    ys = []
    for t in range(seq_len):
        d = dt[:, t, :, None, None]
        h = torch.exp(d * A[:, None, None]) * h + d * B[:, t, :, None, :] * x[:, t, :, :, None]
        ys.append(self.ssm_out(h.view(b, G, H // G * P, N), C[:, t]).view(b, H, P))
    _store_state(cache, self.layer_idx, recurrent, h, decode)
    y = torch.stack(ys, dim=1) + x * self.D.float()[:, None]
    y = self.norm(y.reshape(b, seq_len, -1) * self.gate_act(z.float()))
    return self.out_proj(self.out_rotation(y.to(dtype)))


def causal_lm_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, cache=None, labels=None,
                      output_hidden_states=None, return_dict=None, use_cache=None, logits_to_keep=0, **kwargs):
    """transformers' Mamba / Mamba2 / FalconMamba CausalLM forward without its cast of the lm_head input to
    `lm_head.weight.dtype` (the packed uint8 storage once lm_head is quantized)."""
    out = self.backbone(input_ids, cache=cache, inputs_embeds=inputs_embeds, output_hidden_states=output_hidden_states,
                        return_dict=True, use_cache=use_cache, attention_mask=attention_mask)
    logits = self.lm_head(slice_logits_to_keep(out.last_hidden_state, logits_to_keep)).float()
    loss = None if labels is None else self.loss_function(logits=logits, labels=labels,
                                                          vocab_size=self.config.vocab_size, **kwargs)
    output_cls = getattr(sys.modules[type(self).__module__],
                         type(self).__name__.replace("ForCausalLM", "CausalLMOutput"))
    result = output_cls(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states)
    return_dict = return_dict if return_dict is not None else self.config.return_dict
    return result if return_dict else result.to_tuple()


FORWARDS = {"MambaMixer": mamba_forward, "FalconMambaMixer": mamba_forward, "Mamba2Mixer": mamba2_forward,
            "MambaForCausalLM": causal_lm_forward, "FalconMambaForCausalLM": causal_lm_forward,
            "Mamba2ForCausalLM": causal_lm_forward}


@functools.lru_cache(maxsize=None)
def _hfq_class(cls: type) -> type:
    forward = next(f for base in cls.__mro__ for name, f in FORWARDS.items() if base.__name__ == name)
    return type(cls.__name__, (cls,), {"forward": forward, "hfq_mixer": True, "__module__": cls.__module__})


def mixers(model) -> list[nn.Module]:
    """The model's Mamba / Mamba2 mixers (hfq's or transformers')."""
    return [m for m in model.modules() if any(c.__name__ in FORWARDS and c.__name__.endswith("Mixer")
                                              for c in type(m).__mro__)]


def use_hfq_causal_lm(model) -> None:
    """A Mamba / FalconMamba / Mamba2 CausalLM gets `causal_lm_forward` (same-named subclass; idempotent), whose
    lm_head input is not cast to `lm_head.weight.dtype`: needed by any method that packs lm_head."""
    if type(model).__name__ in FORWARDS and not getattr(type(model), "hfq_mixer", False):
        model.__class__ = _hfq_class(type(model))


def to_hfq_mixers(model) -> list[nn.Module]:
    """Swap every mixer's class for hfq's (idempotent) and give it its run-time modules (float, identity: SiLU
    activations, no rotation, no quantization); returns the mixers. A CausalLM gets hfq's `causal_lm_forward`."""
    out = mixers(model)
    if not out:
        raise NotImplementedError(f"no Mamba / Mamba2 mixer in {type(model).__name__}")
    use_hfq_causal_lm(model)
    for m in out:
        if not getattr(type(m), "hfq_mixer", False):
            if m.activation != "silu":
                raise NotImplementedError(f"hfq's Mamba mixer supports the silu activation, got {m.activation!r}")
            m.__class__ = _hfq_class(type(m))
            m.conv_act, m.gate_act = nn.SiLU(), nn.SiLU()
            m.out_rotation, m.ssm_out = nn.Identity(), SSMOutput(rotate_c=hasattr(m, "n_groups"))
    return out


def scaled_act(mixer: nn.Module, name: str, channels: int, init: float = 1.0) -> ScaledSiLU:
    """`mixer.<name>` ("conv_act" / "gate_act") as a ScaledSiLU (created with `init`, replacing a plain SiLU)."""
    act = getattr(mixer, name)
    if not isinstance(act, ScaledSiLU):
        if not is_silu(act):
            raise NotImplementedError(f"{name} is {act!r}, not a SiLU")
        like = mixer.out_proj.weight if hasattr(mixer.out_proj, "weight") else mixer.A_log
        act = ScaledSiLU(channels, dtype=torch.float32, device=like.device)
        act.scale.data.fill_(init)
        setattr(mixer, name, act)
    return act
