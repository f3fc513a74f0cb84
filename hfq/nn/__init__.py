from .act import ActQuantizer, ScaledSiLU, act_quantizers, calibrate_static, is_silu
from .attention import QuantMultiheadAttention
from .conv import QuantCFWSConv2d, QuantConv1d, QuantConv2d
from .experts import QuantExperts, is_fused_experts
from .linear import KERNELS, PackedWeight, QuantLinear, set_kernel
from .lut import LUTFunction, QuantSoftmax
from .ops import OPS, QuantAdd, QuantMatMul

__all__ = ["ActQuantizer", "ScaledSiLU", "is_silu", "act_quantizers", "calibrate_static", "PackedWeight", "QuantLinear", "QuantConv1d", "QuantConv2d", "QuantCFWSConv2d",
           "QuantExperts", "QuantMatMul", "QuantAdd", "QuantMultiheadAttention", "OPS", "is_fused_experts", "KERNELS",
           "LUTFunction", "QuantSoftmax", "set_kernel"]
