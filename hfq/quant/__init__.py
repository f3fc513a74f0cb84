from .args import QuantArgs
from .packing import pack, packed_shape, unpack
from .qparams import (compute_qparams, dequantize, fake_quantize, fake_quantize_minmax, qparams_from_range,
                      quantize)

__all__ = ["QuantArgs", "compute_qparams", "quantize", "dequantize", "fake_quantize", "fake_quantize_minmax", "qparams_from_range", "pack",
           "unpack", "packed_shape"]
