from .args import QuantArgs
from .packing import pack, packed_shape, packed_size, unpack
from .qparams import compute_qparams, dequantize, fake_quantize, quantize

__all__ = ["QuantArgs", "compute_qparams", "quantize", "dequantize", "fake_quantize", "pack", "unpack", "packed_shape", "packed_size"]
