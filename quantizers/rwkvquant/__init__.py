"""RWKVQuant: proxy-guided scalar / vector quantization + importance-weighted mu codebooks."""
from .config import RWKVQuantConfig
from .quantizer import RWKVQuantHfQuantizer

__all__ = ["RWKVQuantConfig", "RWKVQuantHfQuantizer"]
