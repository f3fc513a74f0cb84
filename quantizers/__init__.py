"""One module per method: <Method>Config + <Method>HfQuantizer, registered with transformers on import."""
from .cfws import CFWSConfig, CFWSHfQuantizer
from .fqpetr import FQPETRConfig, FQPETRHfQuantizer
from .gptq import GPTQConfig, GPTQHfQuantizer
from .illm import ILLMConfig, ILLMHfQuantizer
from .mambaquant import MambaQuantConfig, MambaQuantHfQuantizer
from .moequant import MoEQuantConfig, MoEQuantHfQuantizer
from .ostquant import OSTQuantConfig, OSTQuantHfQuantizer
from .ptq import PTQConfig, PTQHfQuantizer
from .rtn import RTNConfig, RTNHfQuantizer
from .rwkvquant import RWKVQuantConfig, RWKVQuantHfQuantizer

__all__ = ["RTNConfig", "RTNHfQuantizer", "GPTQConfig", "GPTQHfQuantizer", "OSTQuantConfig", "OSTQuantHfQuantizer",
           "PTQConfig", "PTQHfQuantizer", "MoEQuantConfig", "MoEQuantHfQuantizer",
           "ILLMConfig", "ILLMHfQuantizer", "MambaQuantConfig", "MambaQuantHfQuantizer",
           "RWKVQuantConfig", "RWKVQuantHfQuantizer", "FQPETRConfig", "FQPETRHfQuantizer",
           "CFWSConfig", "CFWSHfQuantizer"]
