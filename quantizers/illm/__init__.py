"""I-LLM: FSBR + integer-only inference."""
from .config import ILLMConfig
from .quantizer import ILLMHfQuantizer

__all__ = ["ILLMConfig", "ILLMHfQuantizer"]
