"""Exact fusion of rotations and smoothing scales into decoder-only models, placed through the arch adapter.

Convention: nn.Linear is y = x W^T + b on row vectors and a rotation R maps x -> x R. Everything is computed in
float64 and cast back. `layer_params` / `global_params` are pure (differentiable) functions of the original
weights, so a training loop can evaluate the transformed model without fusing; `fuse_transforms_` applies them
in place.

Equivalence points (OSTQuant, llm.md §1.2), in fusion order:
  norm weights absorbed into the following linears (the norm becomes the identity: weight 1, or 0 for Gemma's
  (1 + w)); s_up_down (up rows / s, down columns * s); s_qk (k rows * s, q rows / s, tied over RoPE pairs; folded
  into q_norm/k_norm when the model has them); s_ov (v rows / s, o columns * s); R1 on the residual stream; R2 per
  KV head on v/o; s_attn_in / s_mlp_in (norm weight 1/s, consumers W * s, in the rotated basis); online Hadamard R4
  before down_proj (W_down <- W_down diag(s) H, the order that keeps s_up_down exact); R3 on q/k after RoPE;
  s_gate_up (I-LLM: gate rows * s, up rows / s, and the MLP's activation becomes x sigmoid(x / s), `ScaledSiLU`,
  installed by `fuse_transforms_`; `layer_params` callers that train through it apply it themselves).
Two fusions of the official OSTQuant code are not exact and are done differently here: its s_qk is untied across
RoPE pairs (here s is given for half a head and repeated), and it fuses W_down H diag(s) instead of W_down diag(s) H.

Gemma2/3 sandwich norms (post_attention_layernorm / post_feedforward_layernorm) act on the branch output before the
residual add; an R1 commutes with them only when their weight is uniform, so R1 is refused otherwise."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .. import offload
from ..arch import TransformLayout, get_adapter
from ..nn.act import ScaledSiLU, is_silu
from ..quant import QuantArgs
from .online import CONFIG_KEY, OnlineHadamard, attach_input_rotation, online_spec, record, use_rotated_attention


MOE_ROTATIONS_ONLY = ("MoE blocks take R1 and R2 only: the MLP scalings (s_mlp_in, s_up_down) and the online "
                      "down_proj Hadamard are not defined for routed experts")


@dataclass
class LayerTransform:
    """Per-block transforms; any may be None (= identity). Shapes: see `transform_shapes`."""

    r2: torch.Tensor | None = None         # [n_kv, head_dim, head_dim] (or [head_dim, head_dim] for every KV head)
    s_attn_in: torch.Tensor | None = None  # [hidden]: attention norm -> q, k, v
    s_mlp_in: torch.Tensor | None = None   # [hidden]: MLP norm -> gate, up
    s_qk: torch.Tensor | None = None       # [n_kv, head_dim // 2], or [head_dim // 2] with q/k norms
    s_ov: torch.Tensor | None = None       # [n_kv, head_dim]
    s_up_down: torch.Tensor | None = None  # [intermediate]
    s_gate_up: torch.Tensor | None = None  # [intermediate]: I-LLM's SwiGLU smoothing (needs ScaledSiLU, see below)


def smoothing_scale(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-channel scale s = max|X|^alpha / max|W|^(1 - alpha) (both clamped to >= 1e-5, s >= 1e-5):
    dividing the activation by s and multiplying the weight's input columns by s leaves the product unchanged."""
    s = act_absmax.clamp(min=1e-5).pow(alpha) / weight_absmax.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


def transform_layout(model) -> TransformLayout:
    layout = get_adapter(model).transforms
    if layout is None:
        raise NotImplementedError(
            f"hfq.transforms does not support model_type {model.config.model_type!r} (fused q/k/v or gate/up, "
            f"MoE experts and non-transformer blocks have no layout yet); add a TransformLayout to its ArchAdapter")
    return layout


def transform_shapes(model) -> dict[str, tuple[int, ...]]:
    """Expected shapes of r1 and of every LayerTransform field for this model."""
    layout = transform_layout(model)
    heads, kv, hd = get_adapter(model).attention_dims(model)
    d = model.config.hidden_size
    inter = None if layout.moe_inputs else \
        get_adapter(model).get_blocks(model)[0].get_submodule(f"{layout.mlp}.{layout.up}").out_features
    return {"r1": (d, d), "r2": (kv, hd, hd), "s_attn_in": (d,), "s_mlp_in": (d,),
            "s_qk": (hd // 2,) if layout.qk_norms else (kv, hd // 2), "s_ov": (kv, hd), "s_up_down": (inter,),
            "s_gate_up": (inter,), "online_down": (inter,), "online_qk": (hd,)}


def layer_params(block: nn.Module, layout: TransformLayout, n_heads: int, n_kv: int, *,
                 r1: torch.Tensor | None = None, t: LayerTransform | None = None,
                 down_rotation=None, dtype=torch.float64) -> dict[str, torch.Tensor]:
    """Transformed parameters of one decoder block (names relative to the block), norms absorbed.

    down_rotation: the online R4 (a callable x -> x H); applied to the rows of W_down too, so x H (W H)^T = x W^T."""
    params = dict(block.named_parameters())
    device = next(iter(params.values())).device
    get = lambda name: params[name].to(dtype) if name in params else None  # noqa: E731
    cast = lambda x: None if x is None else x.to(device=device, dtype=dtype)  # noqa: E731
    t = LayerTransform(**{k: cast(v) for k, v in vars(t or LayerTransform()).items()})
    r1 = cast(r1)
    off, hd = layout.norm_offset, block.get_submodule(layout.attn).head_dim
    groups = n_heads // n_kv
    q, k, v, o = (f"{layout.attn}.{x}" for x in (layout.q, layout.k, layout.v, layout.o))
    gate, up, down = (f"{layout.mlp}.{x}" for x in (layout.gate, layout.up, layout.down))
    moe = bool(layout.moe_inputs)
    if moe and (t.s_mlp_in is not None or t.s_up_down is not None or t.s_gate_up is not None
                or down_rotation is not None):
        raise NotImplementedError(MOE_ROTATIONS_ONLY)
    names = (q, k, v, o) if moe else (q, k, v, o, gate, up, down)
    W = {n: get(n + ".weight") for n in names}
    B = {n: get(n + ".bias") for n in names}
    out = {}

    def scale_rows(n, s):  # output channels of n multiplied by s
        W[n] = W[n] * s[:, None]
        if B[n] is not None:
            B[n] = B[n] * s

    for norm, consumers in ((layout.attn_norm, (q, k, v)), (layout.mlp_norm, () if moe else (gate, up))):
        gamma = get(norm + ".weight") + off
        for n in consumers:
            W[n] = W[n] * gamma
    if moe:  # parameters, fused [E, out, in] experts included: columns read the MLP norm, rows write the residual
        P = {p: get(f"{layout.mlp}.{p}") for p in layout.moe_inputs + layout.moe_outputs}
        missing = [p for p, v in P.items() if v is None]
        if missing:
            raise NotImplementedError(f"this block has no {missing} under {layout.mlp!r} (a dense layer in an MoE "
                                      f"model?); the MoE layout cannot place a rotation there")
        gamma = get(layout.mlp_norm + ".weight") + off
        for p in layout.moe_inputs:
            P[p] = P[p] * gamma if r1 is None else (P[p] * gamma) @ r1
        for p in layout.moe_outputs:
            P[p] = P[p] if r1 is None else r1.T @ P[p]
        out.update({f"{layout.mlp}.{p}": v for p, v in P.items()})
    if t.s_up_down is not None:
        s = t.s_up_down
        scale_rows(up, 1 / s)
        W[down] = W[down] * s
    if t.s_gate_up is not None:  # silu(g) u = (g s) sigmoid((g s) / s) (u / s): the MLP's act_fn must read g / s
        scale_rows(gate, t.s_gate_up)
        scale_rows(up, 1 / t.s_gate_up)
    if t.s_qk is not None:
        s = torch.cat([t.s_qk, t.s_qk], -1)  # RoPE mixes channels i and i + head_dim/2: equal scales
        if layout.qk_norms:
            qn, kn = (f"{layout.attn}.{x}.weight" for x in layout.qk_norms)
            out[qn] = (get(qn) + off) / s - off
            out[kn] = (get(kn) + off) * s - off
        else:
            scale_rows(k, s.reshape(-1))
            scale_rows(q, 1 / s.repeat_interleave(groups, 0).reshape(-1))
    if t.s_ov is not None:
        s = t.s_ov
        scale_rows(v, 1 / s.reshape(-1))
        W[o] = W[o] * s.repeat_interleave(groups, 0).reshape(-1)
    if r1 is not None:
        for n in (q, k, v) if moe else (q, k, v, gate, up):
            W[n] = W[n] @ r1
        for n in (o,) if moe else (o, down):
            W[n] = r1.T @ W[n]
            if B[n] is not None:
                B[n] = B[n] @ r1
    if t.r2 is not None:
        r = t.r2
        r = r.expand(n_kv, hd, hd) if r.ndim == 2 else r
        W[v] = torch.einsum("hji,hjk->hik", r, W[v].reshape(n_kv, hd, -1)).reshape(n_kv * hd, -1)
        if B[v] is not None:
            B[v] = torch.einsum("hji,hj->hi", r, B[v].reshape(n_kv, hd)).reshape(-1)
        wo = W[o].reshape(W[o].shape[0], n_heads, hd)
        W[o] = torch.einsum("ojd,jde->oje", wo, r.repeat_interleave(groups, 0)).reshape(W[o].shape[0], -1)
    for norm, consumers, s in ((layout.attn_norm, (q, k, v), t.s_attn_in),
                               (layout.mlp_norm, () if moe else (gate, up), t.s_mlp_in)):
        w = get(norm + ".weight")
        if s is None:
            out[norm + ".weight"] = torch.full_like(w, 1.0 - off)
        else:
            out[norm + ".weight"] = 1 / s - off
            for n in consumers:
                W[n] = W[n] * s
    if down_rotation is not None:
        W[down] = down_rotation(W[down])
    out.update({n + ".weight": W[n] for n in names})
    out.update({n + ".bias": B[n] for n in names if B[n] is not None})
    return out


@torch.no_grad()
def weight_klt_rotation(model) -> torch.Tensor:
    """OSTQuant's `--use_klt` basis for R1 (no data needed): eigenvectors, by decreasing eigenvalue, of the
    covariance of the row-stacked, column-centred, norm-absorbed q/k/v/gate/up weights of all layers. The official
    code multiplies it by a random Hadamard: r1 = weight_klt_rotation(model) @ random_hadamard(d, seed)."""
    from .hadamard import klt_rotation

    layout = transform_layout(model)
    heads, kv, _ = get_adapter(model).attention_dims(model)
    total, rows, outer = 0.0, 0, 0.0
    for block in get_adapter(model).get_blocks(model):
        p = layer_params(block, layout, heads, kv)
        for n in (layout.q, layout.k, layout.v):
            w = p[f"{layout.attn}.{n}.weight"]
            total, rows, outer = total + w.sum(0), rows + w.shape[0], outer + w.T @ w
        for n in (layout.gate, layout.up):
            w = p[f"{layout.mlp}.{n}.weight"]
            total, rows, outer = total + w.sum(0), rows + w.shape[0], outer + w.T @ w
    mean = total / rows
    return klt_rotation(outer / rows - torch.outer(mean, mean))


def _effective_norm(model, layout, path):
    """The norm's multiplier (weight + the layout's offset), read through accelerate's hooks when offloaded."""
    return offload.read_tensor(model, path + ".weight").detach().double() + layout.norm_offset


def _uniform(w: torch.Tensor) -> bool:
    return bool(torch.allclose(w, w.flatten()[0].expand_as(w), rtol=0, atol=1e-12))


def global_params(model, r1: torch.Tensor | None = None, dtype=torch.float64) -> dict[str, torch.Tensor]:
    """Transformed embedding / final norm / lm_head (full names). The final norm is absorbed into lm_head only
    when its weight is not uniform (a uniform norm commutes with R1 and tied embeddings can stay tied)."""
    layout = transform_layout(model)
    emb, head = model.get_submodule(layout.embed).weight, model.get_submodule(layout.lm_head).weight
    out = {}
    gamma = _effective_norm(model, layout, layout.final_norm).to(head.device)
    w_head = head.to(dtype)
    r1 = None if r1 is None else r1.to(device=head.device, dtype=dtype)
    if not _uniform(gamma):
        w_head = w_head * gamma.to(dtype)
        out[layout.final_norm + ".weight"] = torch.full_like(gamma, 1.0 - layout.norm_offset).to(dtype)
    if r1 is not None:
        out[layout.embed + ".weight"] = emb.to(dtype) @ r1.to(emb.device)
        w_head = w_head @ r1
    if r1 is not None or not _uniform(gamma):
        out[layout.lm_head + ".weight"] = w_head
    return out


def _check_orthogonal(name, r, shape):
    if tuple(r.shape) != tuple(shape) and not (name == "r2" and tuple(r.shape) == tuple(shape[1:])):
        raise ValueError(f"{name} has shape {tuple(r.shape)}, expected {tuple(shape)}")
    r = r.detach().double()
    err = (r.transpose(-1, -2) @ r - torch.eye(r.shape[-1], dtype=torch.float64, device=r.device)).abs().max().item()
    if err > 1e-4:
        raise ValueError(f"{name} is not orthogonal (max |R^T R - I| = {err:.2e}); the fusion would not be exact")


def _copy_(param: nn.Parameter, value: torch.Tensor):
    param.data.copy_(value.to(dtype=param.dtype, device=param.device))


@torch.no_grad()
def fuse_transforms_(model, r1: torch.Tensor | None = None, layers: list[LayerTransform] | None = None, *,
                     online_down: bool = False, online_qk: bool = False, online_seed: int | None = None):
    """Fuse norms, R1, per-layer transforms and online Hadamards into `model` in place; logits are unchanged.

    online_seed: None uses H itself, an int uses diag(random ±1) H (recomputed from the seed after reloading)."""
    layout = transform_layout(model)
    shapes = transform_shapes(model)
    blocks = get_adapter(model).get_blocks(model)
    heads, kv, hd = get_adapter(model).attention_dims(model)
    layers = layers if layers is not None else [None] * len(blocks)
    if len(layers) != len(blocks):
        raise ValueError(f"got {len(layers)} LayerTransforms for {len(blocks)} blocks")
    if r1 is not None:
        _check_orthogonal("r1", r1, shapes["r1"])
        for i, block in enumerate(blocks):
            for norm in layout.branch_norms:
                if not _uniform(_effective_norm(block, layout, norm)):
                    raise NotImplementedError(
                        f"{model.config.model_type}: blocks[{i}].{norm} scales the branch output per channel before "
                        f"the residual add, which a residual rotation R1 does not commute with (it would need a "
                        f"dense online rotation); use r1=None (R2, R3, R4 and the scalings still apply)")
    for t in layers:
        for name, value in vars(t or LayerTransform()).items():
            if value is None:
                continue
            if name == "r2":
                _check_orthogonal("r2", value, shapes["r2"])
            elif tuple(value.shape) != shapes[name]:
                raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {shapes[name]}")
    if layout.moe_inputs and (online_down or any(t is not None and (t.s_mlp_in is not None or t.s_up_down is not None)
                                                 for t in layers)):
        raise NotImplementedError(f"{model.config.model_type}: {MOE_ROTATIONS_ONLY}")
    spec = online_spec(model)
    for kind, wanted in (("down_proj", online_down), ("qk", online_qk)):
        if wanted and kind in spec:
            raise ValueError(f"model already has an online {kind} rotation ({spec[kind]}); a second one is not "
                             f"supported (R4 is fused into down_proj, and one R3 per attention is all it can hold)")

    emb, head = model.get_submodule(layout.embed), model.get_submodule(layout.lm_head)
    tied = head.weight is emb.weight
    outside = [layout.embed, layout.lm_head, layout.final_norm]
    if tied and any(offload.is_offloaded(model.get_submodule(n)) for n in outside):
        raise NotImplementedError(f"{model.config.model_type}: rotating a model whose tied embedding is offloaded is "
                                  f"not supported; keep {layout.embed} and {layout.lm_head} in memory (device_map)")

    def fuse_outside():
        nonlocal tied
        new = global_params(model, r1)
        if tied and layout.final_norm + ".weight" in new:  # final norm absorbed: lm_head must differ from the embedding
            untie_output_embedding(model)
            tied = False
        for name, value in new.items():
            if tied and name == layout.lm_head + ".weight":
                continue
            _copy_(model.get_parameter(name), value)

    offload.changed_in_place(model, outside, fuse_outside)
    down_rot = OnlineHadamard(shapes["online_down"][0], online_seed) if online_down else None
    prefix = get_adapter(model).blocks
    for i, (block, t) in enumerate(zip(blocks, layers)):  # an offloaded block is resident only while it is fused
        def fuse_block(block=block, t=t):
            for name, value in layer_params(block, layout, heads, kv, r1=r1, t=t, down_rotation=down_rot).items():
                _copy_(block.get_parameter(name), value)
            if t is not None and t.s_gate_up is not None:
                mlp = block.get_submodule(layout.mlp)
                set_gate_scale(mlp, t.s_gate_up, mlp.get_submodule(layout.up).weight)
        offload.changed_in_place(model, [f"{prefix}.{i}"], fuse_block)
    if online_down:
        record(model, "down_proj", size=shapes["online_down"][0], seed=online_seed)
    if online_qk:
        record(model, "qk", size=hd, seed=online_seed)
    restore_online_rotations(model)
    return model


def untie_output_embedding(model) -> bool:
    """Give the output embedding its own copy of a tied weight (and say so in the config, so the saved checkpoint
    stores both); returns whether it was tied."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight is not emb.weight:
        return False
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    for cfg in {id(c): c for c in (model.config, getattr(model.config, "get_text_config", lambda: None)())
                if c is not None}.values():
        cfg.tie_word_embeddings = False
    return True


def scaled_silu(mlp: nn.Module, like: torch.Tensor) -> ScaledSiLU:
    """The MLP's activation as a `ScaledSiLU`: the one it has, or one with scale 1 (= SiLU) in place of its SiLU, with
    the width, dtype and device of `like` (the up projection's weight). Any other activation is refused."""
    act = getattr(mlp, "act_fn", None)
    if isinstance(act, ScaledSiLU):
        return act
    if not is_silu(act):
        raise NotImplementedError(f"s_gate_up smooths SwiGLU (a silu activation); this MLP uses {act!r}")
    mlp.act_fn = ScaledSiLU(like.shape[0], dtype=like.dtype, device=like.device)
    return mlp.act_fn


def set_gate_scale(mlp: nn.Module, s: torch.Tensor, like: torch.Tensor) -> None:
    """Make the MLP's activation x sigmoid(x / s) (composing with an existing ScaledSiLU), for s_gate_up."""
    act = scaled_silu(mlp, like)
    act.scale.data = (act.scale.double() * s.to(act.scale.device).double()).to(act.scale.dtype)


def set_kv_quant(model, args: QuantArgs | None):
    """Quantize K (after RoPE and R3, when present) and V where every attention layer reads them (None: float).
    Recorded in the model config, so a saved model gets it back from `restore_online_rotations`."""
    specs = online_spec(model)
    specs.pop("kv", None)
    if args is not None:
        specs["kv"] = args.to_dict()
    setattr(model.config, CONFIG_KEY, specs)
    for m in model.modules():
        if getattr(m, "kv_quant", None) is not None:
            m.kv_quant = None
    return restore_online_rotations(model)


def restore_online_rotations(model):
    """(Re)install the run-time pieces recorded in `model.config.hfq_online_rotations` (online Hadamards, KV
    quantizer): call after from_pretrained, and after replacing down_proj modules (e.g. by quantized ones).
    Idempotent."""
    spec = online_spec(model)
    if not spec:
        return model
    layout = transform_layout(model)
    kv = QuantArgs.from_dict(spec["kv"]) if "kv" in spec else None
    for block in get_adapter(model).get_blocks(model):
        if "down_proj" in spec:
            attach_input_rotation(block.get_submodule(f"{layout.mlp}.{layout.down}"),
                                  OnlineHadamard(**spec["down_proj"]))
        attn = block.get_submodule(layout.attn)
        attn.qk_rotation = OnlineHadamard(**spec["qk"]) if "qk" in spec else None
        attn.kv_quant = kv
    if "qk" in spec or kv is not None:
        use_rotated_attention(model)
    return model
