"""LoRA on hfq's packed layers (QLoRA-style fine-tuning of an hfq checkpoint) through PEFT's own extension point for
custom layers: `LoraConfig._register_custom_module({QuantLinear: QuantLinearLora})`. Importing hfq registers the
mapping on every `LoraConfig` (its `__post_init__`), so `peft.get_peft_model(hfq_model, LoraConfig(...))` and
`PeftModel.from_pretrained` work unchanged. The packed weights stay frozen and integer; the adapter is float and
added to the layer's output. `merge_and_unload()` is refused: a float low-rank update cannot be folded into packed
integers without re-quantizing (dequantize, merge and quantize again with a method of your choice instead)."""
from __future__ import annotations

import torch
import torch.nn as nn

from .nn import QuantLinear

try:  # peft is a dependency; the extension point is experimental, so check it exists
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer
    _HAS_EXTENSION_POINT = hasattr(LoraConfig, "_register_custom_module")
except ImportError:  # pragma: no cover - peft is installed with hfq
    LoraConfig = LoraLayer = None
    _HAS_EXTENSION_POINT = False


if LoraLayer is not None:
    class QuantLinearLora(nn.Module, LoraLayer):
        """LoRA around a `QuantLinear`: y = base(x) + B(A(dropout(x))) * scaling for each active adapter."""

        def __init__(self, base_layer, adapter_name: str, config, r: int = 0, lora_alpha: int = 1, **kwargs):
            super().__init__()
            LoraLayer.__init__(self, base_layer)
            self.fan_in_fan_out = False
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

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

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            raise NotImplementedError(
                "merging LoRA into hfq's packed integer weights would need a re-quantization: keep the adapter "
                "unmerged (PeftModel), or load the float model, merge there and quantize again")

        def unmerge(self) -> None:
            pass  # never merged

        def __repr__(self) -> str:
            return "lora." + super().__repr__()
else:  # pragma: no cover
    QuantLinearLora = None


def _register_on_every_lora_config() -> None:
    """Wrap LoraConfig.__post_init__ once so every config maps QuantLinear to QuantLinearLora."""
    if not _HAS_EXTENSION_POINT or getattr(LoraConfig.__post_init__, "_hfq", False):
        return
    original = LoraConfig.__post_init__

    def __post_init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self._register_custom_module({QuantLinear: QuantLinearLora})

    __post_init__._hfq = True
    LoraConfig.__post_init__ = __post_init__


_register_on_every_lora_config()
