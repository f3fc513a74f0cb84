"""`QuantExperts`: packed integer weights for the fused 3-D MoE experts of transformers 5
(Mixtral, Qwen2-MoE, Qwen3-MoE, ...: `gate_up_proj` [E, 2I, H], `down_proj` [E, H, I], `act_fn`).

The packed integers keep the float parameters' names (`gate_up_proj` [E, 2I, ceil(H/8), bits], `down_proj`
[E, H, ceil(I/8), bits]): transformers' checkpoint conversions split them into per-expert `w1/w3/w2` on save and
merge them back on load, exactly as for float weights, and their extra dimension makes a process without hfq refuse
the checkpoint (size mismatch) instead of loading random experts. Scales and zero points (`gate_up_scale`, ...)
avoid those names, so the conversions leave them alone."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quant import QuantArgs, dequantize, pack, packed_shape, unpack
from ..solvers.rtn import rtn
from .act import ActQuantizer
from .linear import scale_shape

FUSED_PARAMS = {"gate_up_proj": "gate_up", "down_proj": "down"}


def is_fused_experts(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, p, None), nn.Parameter) and getattr(module, p).dim() == 3
               for p in FUSED_PARAMS)


class QuantExperts(nn.Module):
    def __init__(self, num_experts: int, hidden_dim: int, intermediate_dim: int, act_fn: nn.Module,
                 weight_args: QuantArgs, act_args: QuantArgs | None = None, dtype=None, device=None):
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_dim, intermediate_dim
        self.act_fn, self.weight_args, self.act_args = act_fn, weight_args, act_args
        if act_args is not None and not act_args.dynamic:
            raise NotImplementedError("static activation scales are not supported for fused experts (each expert "
                                      "sees other tokens); use dynamic activation quantization")
        self.input_quant = None if act_args is None else ActQuantizer(act_args)
        dtype = dtype or torch.get_default_dtype()
        frozen = dict(requires_grad=False)
        for name, (out_f, in_f) in self.shapes().items():
            rows, cols = scale_shape(out_f, in_f, weight_args)
            self.register_parameter(f"{name}_proj", nn.Parameter(torch.empty(
                num_experts, out_f, *packed_shape(in_f, weight_args.bits), dtype=torch.uint8, device=device), **frozen))
            self.register_parameter(f"{name}_scale", nn.Parameter(
                torch.empty(num_experts, rows, cols, dtype=dtype, device=device), **frozen))
            self.register_parameter(f"{name}_zero", None if weight_args.symmetric else nn.Parameter(
                torch.empty(num_experts, rows, cols, dtype=torch.uint8, device=device), **frozen))

    def shapes(self) -> dict[str, tuple[int, int]]:
        return {"gate_up": (2 * self.intermediate_dim, self.hidden_dim), "down": (self.hidden_dim, self.intermediate_dim)}

    @classmethod
    def empty_like(cls, experts: nn.Module, weight_args: QuantArgs, act_args: QuantArgs | None = None, device=None):
        if not is_fused_experts(experts) or not hasattr(experts, "act_fn"):
            raise NotImplementedError(
                f"{type(experts).__name__}: only fused experts with gate_up_proj/down_proj 3-D weights and act_fn "
                f"are supported; add an adapter for this layout")
        extra = [n for n, _ in experts.named_parameters(recurse=False) if n not in FUSED_PARAMS]
        if extra:
            raise NotImplementedError(f"{type(experts).__name__} has parameters {extra} that QuantExperts cannot hold")
        e, two_i, h = experts.gate_up_proj.shape
        return cls(e, h, two_i // 2, experts.act_fn, weight_args, act_args, dtype=experts.gate_up_proj.dtype,
                   device=device if device is not None else experts.gate_up_proj.device)

    @classmethod
    def from_experts(cls, experts: nn.Module, weight_args: QuantArgs, act_args: QuantArgs | None = None):
        """Round-to-nearest of every expert."""
        module = cls.empty_like(experts, weight_args, act_args)
        for param, name in FUSED_PARAMS.items():
            module.set_quantized(name, *rtn(getattr(experts, param), weight_args))
        return module

    def set_quantized(self, name: str, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, expert=None):
        """Store integers for all experts ([E, out, in]) or, with `expert`, for one ([out, in])."""
        a = self.weight_args
        targets = [(f"{name}_proj", pack(q, a.bits, a.qmin)), (f"{name}_scale", scale), (f"{name}_zero", zero)]
        for attr, value in targets:
            p = getattr(self, attr)
            if p is None:
                continue
            view = p.data if expert is None else p.data[expert]
            view.copy_(value.reshape(view.shape).to(p.dtype))

    def expert_weight(self, name: str, expert: int, dtype=None) -> torch.Tensor:
        a = self.weight_args
        out_f, in_f = self.shapes()[name]
        q = unpack(getattr(self, f"{name}_proj")[expert], a.bits, a.qmin, in_f)
        scale = getattr(self, f"{name}_scale")[expert]
        zero = getattr(self, f"{name}_zero")
        zero = torch.zeros(()) if zero is None else zero[expert].float()
        return dequantize(q, scale.reshape(1) if a.granularity == "tensor" else scale, zero, a,
                          dtype or scale.dtype)

    def _linear(self, x, name, expert):
        if self.input_quant is not None:
            x = self.input_quant(x)
        return F.linear(x, self.expert_weight(name, expert, x.dtype))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                linear=None):
        """Same routing arithmetic as the eager transformers experts, dequantizing only the experts hit.
        linear(x, name, expert): each expert projection (default: the packed one; LoRA adds its update to it)."""
        linear = linear or self._linear
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)  # +1: padding slot
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for (e,) in hit.tolist():
            if e == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(mask[e])
            gate, up = linear(hidden_states[token_idx], "gate_up", e).chunk(2, dim=-1)
            h = linear(self.act_fn(gate) * up, "down", e)
            out.index_add_(0, token_idx, (h * top_k_weights[token_idx, top_k_pos, None]).to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, " \
               f"w={self.weight_args.bits}bit/{self.weight_args.granularity}"
