from .experts import QuantExperts, is_fused_experts
from .linear import KERNELS, QuantLinear

__all__ = ["QuantLinear", "QuantExperts", "is_fused_experts", "KERNELS"]
