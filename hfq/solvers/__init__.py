"""Weight solvers: the math that turns a float weight (and calibration statistics) into integers + scales."""
from .gptq import Hessian, gptq_quantize

__all__ = ["Hessian", "gptq_quantize"]
