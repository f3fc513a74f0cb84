from .args import QuantArgs
from .packing import pack, packed_shape, packed_size, unpack
from .qparams import compute_qparams, dequantize, fake_quantize, fake_quantize_minmax, quantize

__all__ = ["QuantArgs", "compute_qparams", "quantize", "dequantize", "fake_quantize", "fake_quantize_minmax", "pack", "unpack", "packed_shape", "packed_size"]
