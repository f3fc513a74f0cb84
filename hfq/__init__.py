"""hfq: research quantization methods as Hugging Face quantizers. Importing hfq registers every method
with transformers, so `from_pretrained(..., quantization_config=hfq.RTNConfig(...))` and reloading saved
hfq checkpoints just work."""
from . import models
from .calibration import CalibratedConfig
from .integration import HfqConfig, HfqQuantizer, config_from_dict, quantize
from . import lora  # noqa: F401,E402  (registers LoRA on hfq's packed layers with every peft.LoraConfig)
from .ptqat import PTQATConfig, PTQATModel  # noqa: E402  (registers the PTQAT tuner with PEFT)
from .kv_cache import HfqQuantizedCache  # noqa: E402
from .quantizers import (CFWSConfig, CFWSHfQuantizer, FQPETRConfig, FQPETRHfQuantizer, GPTQConfig, GPTQHfQuantizer, ILLMConfig, ILLMHfQuantizer, MambaQuantConfig,
                         MambaQuantHfQuantizer, MoEQuantConfig, MoEQuantHfQuantizer, OSTQuantConfig, OSTQuantHfQuantizer,
                         PTQConfig, PTQHfQuantizer, RTNConfig, RTNHfQuantizer, RWKVQuantConfig, RWKVQuantHfQuantizer)

__version__ = "0.1.0"
__all__ = ["models", "CalibratedConfig", "HfqConfig", "HfqQuantizer", "quantize", "config_from_dict", "RTNConfig",
           "RTNHfQuantizer", "GPTQConfig", "GPTQHfQuantizer", "OSTQuantConfig", "OSTQuantHfQuantizer", "PTQConfig", "PTQHfQuantizer",
           "MoEQuantConfig", "MoEQuantHfQuantizer", "ILLMConfig", "ILLMHfQuantizer",
           "MambaQuantConfig", "MambaQuantHfQuantizer", "RWKVQuantConfig", "RWKVQuantHfQuantizer",
           "FQPETRConfig", "FQPETRHfQuantizer", "CFWSConfig", "CFWSHfQuantizer", "PTQATConfig", "PTQATModel", "HfqQuantizedCache"]
