"""Writing hfq-quantized models in formats other tools load natively."""
from .common import ExportError
from .compressed_tensors import export as export_compressed_tensors
from .gguf import export as export_gguf

__all__ = ["ExportError", "export_compressed_tensors", "export_gguf"]
