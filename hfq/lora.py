"""LoRA on hfq's packed layers (QLoRA-style fine-tuning of an hfq checkpoint) through PEFT's own extension point for
custom layers: `LoraConfig._register_custom_module({QuantLinear: QuantLinearLora, QuantExperts: QuantExpertsLora})`
(fused MoE experts: target the experts module, e.g. `target_modules=["experts"]`; each expert gets its own low-rank
update of gate_up_proj and down_proj). Importing hfq registers the mapping on every `LoraConfig` (its `__post_init__`),
so `peft.get_peft_model(hfq_model, LoraConfig(...))` and
`PeftModel.from_pretrained` work unchanged. The packed weights stay frozen and integer; the adapter is float and
added to the layer's output. `merge_and_unload()` is refused: a float low-rank update cannot be folded into packed
integers without re-quantizing (dequantize, merge and quantize again with a method of your choice instead)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .nn import QuantExperts, QuantLinear

try:  # peft is a dependency; the extension point is experimental, so check it exists
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer
    _HAS_EXTENSION_POINT = hasattr(LoraConfig, "_register_custom_module")
except ImportError:  # pragma: no cover - peft is installed with hfq
    LoraConfig = LoraLayer = None
    _HAS_EXTENSION_POINT = False


if LoraLayer is not None:
    class _PackedLora(nn.Module, LoraLayer):
        """What the LoRA layers on packed storage share: merging is refused (no re-quantization behind the user's
        back)."""

        def __init__(self, base_layer, adapter_name: str, config, r: int = 0, lora_alpha: int = 1, **kwargs):
            super().__init__()
            LoraLayer.__init__(self, base_layer)
            self.fan_in_fan_out = False
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            raise NotImplementedError(
                "merging LoRA into hfq's packed integer weights would need a re-quantization: keep the adapter "
                "unmerged (PeftModel), or load the float model, merge there and quantize again")

        def unmerge(self) -> None:
            pass  # never merged

        def __repr__(self) -> str:
            return "lora." + super().__repr__()

    class QuantLinearLora(_PackedLora):
        """LoRA around a `QuantLinear`: y = base(x) + B(A(dropout(x))) * scaling for each active adapter."""

        def resolve_lora_variant(self, *, config, **kwargs):
            if getattr(config, "use_dora", False):
                raise ValueError("DoRA needs the float weight's norm; it is not supported on hfq's packed layers")
            return None

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            result = self.base_layer(x, *args, **kwargs)
            if self.disable_adapters:
                return result
            for name in self.active_adapters:
                if name not in self.lora_A.keys():
                    continue
                lora_A, lora_B = self.lora_A[name], self.lora_B[name]
                update = lora_B(lora_A(self.lora_dropout[name](x.to(lora_A.weight.dtype)))) * self.scaling[name]
                result = result + update.to(result.dtype)
            return result

    class ExpertsLowRank(nn.Module):
        """One side of the per-expert LoRA factors: `gate_up` and `down`, each [experts, rows, cols]."""

        def __init__(self, shapes: dict[str, tuple[int, int, int]], dtype=None, device=None):
            super().__init__()
            for name, shape in shapes.items():
                self.register_parameter(name, nn.Parameter(torch.zeros(shape, dtype=dtype, device=device)))


    class QuantExpertsLora(_PackedLora):
        """LoRA around `QuantExperts`: expert e's projection `name` (gate_up, down) becomes
        W_e x + B_e(A_e(dropout(x))) * scaling, through the experts' own routing (`QuantExperts.forward(linear=)`).
        A starts Kaiming-uniform (PEFT's LoRA default), B at zero, so the adapter starts as the identity update."""

        def _get_in_out_features(self, module):
            return module.hidden_dim, module.hidden_dim  # the experts map hidden states to hidden states

        def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config, **kwargs) -> None:
            if r <= 0:
                raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
            if getattr(config, "use_dora", False) or getattr(config, "lora_bias", False):
                raise ValueError("DoRA and lora_bias are not supported on hfq's packed experts")
            base = self.get_base_layer()
            shapes = base.shapes()
            device = base.gate_up_scale.device
            dtype = base.gate_up_scale.dtype
            e = base.num_experts
            self.r[adapter_name], self.lora_alpha[adapter_name] = r, lora_alpha
            self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if config.use_rslora else r)
            self.use_rslora[adapter_name] = config.use_rslora
            self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
            self.lora_A[adapter_name] = ExpertsLowRank({n: (e, r, i) for n, (o, i) in shapes.items()}, dtype, device)
            self.lora_B[adapter_name] = ExpertsLowRank({n: (e, o, r) for n, (o, i) in shapes.items()}, dtype, device)
            if config.init_lora_weights:
                for name in shapes:
                    for expert in getattr(self.lora_A[adapter_name], name):
                        nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
            self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

        def _linear(self, x: torch.Tensor, name: str, expert: int) -> torch.Tensor:
            base = self.get_base_layer()
            result = base._linear(x, name, expert)
            for adapter in self.active_adapters:
                if adapter not in self.lora_A.keys():
                    continue
                a = getattr(self.lora_A[adapter], name)[expert]
                b = getattr(self.lora_B[adapter], name)[expert]
                h = self.lora_dropout[adapter](x.to(a.dtype))
                result = result + ((h @ a.t()) @ b.t() * self.scaling[adapter]).to(result.dtype)
            return result

        def forward(self, hidden_states, top_k_index, top_k_weights):
            base = self.get_base_layer()
            if self.disable_adapters:
                return base(hidden_states, top_k_index, top_k_weights)
            return base(hidden_states, top_k_index, top_k_weights, linear=self._linear)
else:  # pragma: no cover
    QuantLinearLora = QuantExpertsLora = None


def _register_on_every_lora_config() -> None:
    """Wrap LoraConfig.__post_init__ once so every config maps hfq's packed layers to their LoRA layers."""
    if not _HAS_EXTENSION_POINT or getattr(LoraConfig.__post_init__, "_hfq", False):
        return
    original = LoraConfig.__post_init__

    def __post_init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self._register_custom_module({QuantLinear: QuantLinearLora, QuantExperts: QuantExpertsLora})

    __post_init__._hfq = True
    LoraConfig.__post_init__ = __post_init__


_register_on_every_lora_config()
