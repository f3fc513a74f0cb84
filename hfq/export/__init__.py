"""Writing hfq-quantized models in formats other tools load natively."""
from .compressed_tensors import ExportError, export as export_compressed_tensors

__all__ = ["ExportError", "export_compressed_tensors"]
