"""Weight solvers: the math that turns a float weight (and calibration statistics) into integers + scales."""
from .gptq import Hessian, gptq_quantize
from .rtn import rtn

__all__ = ["Hessian", "gptq_quantize", "rtn"]
