"""RWKV-7 ("Goose", x070) in pure PyTorch as a Hugging Face custom-code model (the math of BlinkDL's reference
`RWKV-v7/rwkv_v7_demo.py`).

Per head the state S [value, key] evolves as S_t = S_{t-1} (diag(w_t) + a_t b_t^T) + v_t k_t^T and the output is
y_t = S_t r_t, with a = -kk, b = kk * a (RWKV-7's in-context learning rate). `wkv7` computes it token by token
(`chunk_size=0`, the form `generate` uses one token at a time) or in chunks: within a chunk the only non-diagonal
coupling is through z_t = S_{t-1} a_t, which solves a unit-triangular system, so each chunk is a few batched matmuls
and one triangular solve (exact, not an approximation; `tests/test_rwkv7.py` checks it against the token loop).
The low-rank projections (w1/w2, a1/a2, v1/v2, g1/g2) are `nn.Linear` modules, so weight quantizers find them;
`convert_rwkv7.py` maps BlinkDL checkpoints (which store them as [in, out] matrices) onto this layout."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_rwkv7 import Rwkv7Config


def _step(S, r, w, k, v, a, b):
    """One token: S [B, H, N, N] (float32), the rest [B, H, N]."""
    S = S * w[:, :, None, :] + (S @ a[..., None]) @ b[:, :, None, :] + v[..., None] @ k[:, :, None, :]
    return S, (S @ r[..., None])[..., 0]


def _chunk(S, r, w, k, v, a, b):
    """L tokens at once (inputs [B, H, L, N]): exact, through z_t = S_{t-1} a_t.

    With c_t = sum_{i<=t} log w_i (per key channel):
      S_t = S_0 e^{c_t} + sum_{s<=t} (z_s b_s^T + v_s k_s^T) e^{c_t - c_s},
      z_t = S_0 (e^{c_{t-1}} a_t) + sum_{s<t} z_s [b_s e^{c_{t-1}-c_s} . a_t] + v_s [k_s e^{c_{t-1}-c_s} . a_t]."""
    L = r.shape[2]
    c = torch.cumsum(torch.log(w), dim=2)  # [B, H, L, N]
    c_prev = c - torch.log(w)  # c_{t-1}
    t_idx = torch.arange(L, device=r.device)
    strict = (t_idx[:, None] > t_idx[None, :])  # s < t
    upto = (t_idx[:, None] >= t_idx[None, :])  # s <= t

    def pair(end, mask):  # e^{end_t - c_s} [B, H, L(t), L(s), N], zero outside mask (exponent <= 0 inside)
        diff = end[:, :, :, None, :] - c[:, :, None, :, :]
        return torch.exp(diff.masked_fill(~mask[:, :, None], float("-inf")))

    d_prev, d_now = pair(c_prev, strict), pair(c, upto)
    A_ab = torch.einsum("bhtn,bhtsn,bhsn->bhts", a, d_prev, b)
    A_ak = torch.einsum("bhtn,bhtsn,bhsn->bhts", a, d_prev, k)
    A_rb = torch.einsum("bhtn,bhtsn,bhsn->bhts", r, d_now, b)
    A_rk = torch.einsum("bhtn,bhtsn,bhsn->bhts", r, d_now, k)
    # Z^T [B, H, L, Nv]: (I - A_ab) Z^T = (e^{c_{t-1}} a_t) S_0^T + A_ak V^T
    rhs = (torch.exp(c_prev) * a) @ S.transpose(-1, -2) + A_ak @ v
    eye = torch.eye(L, device=r.device, dtype=r.dtype)
    Z = torch.linalg.solve_triangular(eye - A_ab, rhs, upper=False, unitriangular=True)
    y = (torch.exp(c) * r) @ S.transpose(-1, -2) + A_rb @ Z + A_rk @ v
    tail = torch.exp(c[:, :, -1:, :] - c)  # e^{c_L - c_s} [B, H, L, N]
    S = S * torch.exp(c[:, :, -1, None, :]) + Z.transpose(-1, -2) @ (b * tail) + v.transpose(-1, -2) @ (k * tail)
    return S, y


def wkv7(r, w, k, v, a, b, state=None, chunk_size: int = 16):
    """The RWKV-7 recurrence over [B, T, H, N] inputs (w: decay factors in (0, 1)); returns (y [B, T, H, N],
    final state [B, H, N, N]), computed in float32 (float64 inputs stay float64)."""
    B, T, H, N = r.shape
    work = torch.promote_types(r.dtype, torch.float32)
    r, w, k, v, a, b = (x.to(work).transpose(1, 2) for x in (r, w, k, v, a, b))  # [B, H, T, N]
    S = torch.zeros(B, H, N, N, dtype=work, device=r.device) if state is None else state.to(work)
    ys = []
    if chunk_size and T > 1:
        for t0 in range(0, T, chunk_size):
            sl = slice(t0, t0 + chunk_size)
            S, y = _chunk(S, r[:, :, sl], w[:, :, sl], k[:, :, sl], v[:, :, sl], a[:, :, sl], b[:, :, sl])
            ys.append(y)
        y = torch.cat(ys, dim=2)
    else:
        for t in range(T):
            S, y_t = _step(S, r[:, :, t], w[:, :, t], k[:, :, t], v[:, :, t], a[:, :, t], b[:, :, t])
            ys.append(y_t)
        y = torch.stack(ys, dim=2)
    return y.transpose(1, 2), S


def _shift(x, prev):
    """x_{t-1} for every t (prev: the last token of the previous call, or zeros)."""
    first = torch.zeros_like(x[:, :1]) if prev is None else prev[:, None].to(x.dtype)
    return torch.cat([first, x[:, :-1]], dim=1)


class Rwkv7TimeMix(nn.Module):
    def __init__(self, config: Rwkv7Config, layer_id: int):
        super().__init__()
        C, H = config.hidden_size, config.num_heads
        self.layer_id, self.num_heads, self.head_size = layer_id, H, config.head_size
        # layer 0 has no value residual (it defines v_first), so no v0 / v1 / v2
        names = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k", "k_a") + (("v0",) if layer_id else ())
        for name in names:
            setattr(self, name, nn.Parameter(torch.zeros(1, 1, C)))
        self.r_k = nn.Parameter(torch.zeros(H, config.head_size))
        lora = {"w": config.decay_lora, "a": config.aaa_lora, "g": config.gate_lora}
        if layer_id:
            lora["v"] = config.mv_lora
        for p, d in lora.items():
            setattr(self, f"{p}1", nn.Linear(C, d, bias=False))
            setattr(self, f"{p}2", nn.Linear(d, C, bias=False))
        self.receptance, self.key, self.value, self.output = (nn.Linear(C, C, bias=False) for _ in range(4))
        self.ln_x = nn.GroupNorm(H, C, eps=config.group_norm_eps)
        # identity taps on what k_k, k_a and r_k multiply (quantizers read those inputs; no parameters)
        self.k_k_in, self.k_a_in, self.r_k_in = nn.Identity(), nn.Identity(), nn.Identity()

    def forward(self, x, v_first, state=None, chunk_size: int = 16):
        B, T, C = x.shape
        H, N = self.num_heads, self.head_size
        xx = _shift(x, None if state is None else state[0]) - x
        xr, xw, xk, xv, xa, xg = (x + xx * p for p in (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))
        r = self.receptance(xr)
        w = -F.softplus(-(self.w0 + self.w2(torch.tanh(self.w1(xw))))) - 0.5
        k = self.key(xk)
        v = self.value(xv)
        if self.layer_id == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + self.v2(self.v1(xv)))
        a = torch.sigmoid(self.a0 + self.a2(self.a1(xa)))
        g = self.g2(torch.sigmoid(self.g1(xg)))
        kk = F.normalize((self.k_k_in(k) * self.k_k).view(B, T, H, N), dim=-1, p=2.0).view(B, T, C)
        k = k + self.k_a_in((a - 1) * k) * self.k_a  # = k * (1 + (a - 1) * k_a)
        heads = lambda t: t.view(B, T, H, N)  # noqa: E731
        decay = torch.exp(-torch.exp(w.float()))
        y, S = wkv7(heads(r), heads(decay), heads(k), heads(v), heads(-kk), heads(kk * a),
                    None if state is None else state[1], chunk_size)
        y = self.ln_x(y.reshape(B * T, C).to(x.dtype)).view(B, T, C)
        y = y + ((self.r_k_in(heads(r) * heads(k)) * self.r_k).sum(-1, keepdim=True) * heads(v)).view(B, T, C)
        return self.output(y * g), v_first, (x[:, -1], S)


class Rwkv7ChannelMix(nn.Module):
    def __init__(self, config: Rwkv7Config):
        super().__init__()
        self.x_k = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.key = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.value = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x, state=None):
        xx = _shift(x, state) - x
        return self.value(torch.relu(self.key(x + xx * self.x_k)) ** 2), x[:, -1]


class Rwkv7Block(nn.Module):
    def __init__(self, config: Rwkv7Config, layer_id: int):
        super().__init__()
        C, eps = config.hidden_size, config.layer_norm_eps
        self.ln0 = nn.LayerNorm(C, eps=eps) if layer_id == 0 else None
        self.ln1, self.ln2 = nn.LayerNorm(C, eps=eps), nn.LayerNorm(C, eps=eps)
        self.att, self.ffn = Rwkv7TimeMix(config, layer_id), Rwkv7ChannelMix(config)

    def forward(self, x, v_first=None, state=None, chunk_size: int = 16):
        """(x, v_first, (time-mix shift, wkv state, channel-mix shift)) for this block."""
        if self.ln0 is not None:
            x = self.ln0(x)
        att, v_first, (att_shift, S) = self.att(self.ln1(x), v_first, None if state is None else state[:2], chunk_size)
        x = x + att
        ffn, ffn_shift = self.ffn(self.ln2(x), None if state is None else state[2])
        return x + ffn, v_first, (att_shift, S, ffn_shift)


@dataclass
class Rwkv7Output(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    state: list | None = None
    hidden_states: torch.Tensor | None = None


class Rwkv7PreTrainedModel(PreTrainedModel):
    config_class = Rwkv7Config
    base_model_prefix = "model"
    _no_split_modules = ["Rwkv7Block"]

    def _init_weights(self, module):
        """Small random weights for models trained from scratch (official checkpoints overwrite everything)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, Rwkv7TimeMix):
            with torch.no_grad():
                for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
                    getattr(module, name).fill_(0.5)
                module.w0.fill_(-0.5)
                module.k_k.fill_(0.85)
                module.k_a.fill_(1.0)
                module.r_k.normal_(std=0.1)
                module.a0.zero_()
                if module.layer_id:
                    module.v0.zero_()
        elif isinstance(module, Rwkv7ChannelMix):
            with torch.no_grad():
                module.x_k.fill_(0.5)


class Rwkv7Model(Rwkv7PreTrainedModel):
    def __init__(self, config: Rwkv7Config):
        super().__init__(config)
        self.emb = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList([Rwkv7Block(config, i) for i in range(config.num_hidden_layers)])
        self.ln_out = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.emb

    def set_input_embeddings(self, value):
        self.emb = value

    def forward(self, input_ids, state=None, use_cache=False):
        x = self.emb(input_ids)
        chunk = self.config.chunk_size
        v_first, new_state = None, []
        for i, block in enumerate(self.blocks):
            x, v_first, s = block(x, v_first=v_first, state=None if state is None else state[i], chunk_size=chunk)
            new_state.append(s)
        return self.ln_out(x), (new_state if use_cache else None)


class Rwkv7ForCausalLM(Rwkv7PreTrainedModel, GenerationMixin):
    def __init__(self, config: Rwkv7Config):
        super().__init__(config)
        self.model = Rwkv7Model(config)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.head

    def set_output_embeddings(self, value):
        self.head = value

    def forward(self, input_ids=None, state=None, labels=None, use_cache=None, attention_mask=None, **kwargs):
        """state: per block (time-mix shift [B, C], wkv state [B, H, N, N], channel-mix shift [B, C]) from the
        previous call; the output's `state` continues it (use_cache)."""
        use_cache = self.config.use_cache if use_cache is None else use_cache
        hidden, new_state = self.model(input_ids, state, use_cache)
        logits = self.head(hidden).float()
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return Rwkv7Output(loss=loss, logits=logits, state=new_state)

    def prepare_inputs_for_generation(self, input_ids, state=None, use_cache=None, **kwargs):
        if state is not None:
            input_ids = input_ids[:, -1:]
        return {"input_ids": input_ids, "state": state, "use_cache": True}

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        model_kwargs["state"] = outputs.state
        return super()._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder, num_new_tokens)
