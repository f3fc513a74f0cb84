"""RWKV-7 ("Goose", x070) as a Hugging Face custom-code model, with a converter from BlinkDL checkpoints."""
from .configuration_rwkv7 import Rwkv7Config
from .convert_rwkv7 import convert_blinkdl_state_dict
from .modeling_rwkv7 import Rwkv7ForCausalLM, Rwkv7Model, Rwkv7PreTrainedModel, wkv7

Rwkv7Config.register_for_auto_class("AutoConfig")
Rwkv7ForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["Rwkv7Config", "Rwkv7ForCausalLM", "Rwkv7Model", "Rwkv7PreTrainedModel", "convert_blinkdl_state_dict",
           "wkv7"]
