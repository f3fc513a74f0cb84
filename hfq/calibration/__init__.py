"""Calibration data sources and the block-by-block runner shared by every calibrated method."""
from .data import (HOLDOUT_TOKENS, SAMPLERS, from_dataset, from_model, from_samples, get_calibration, random_windows,
                   register_sampler)
from .runner import BlockInputs, capture_inputs, get_blocks, lockstep, run_blocks

__all__ = ["HOLDOUT_TOKENS", "SAMPLERS", "from_dataset", "from_model", "from_samples", "get_calibration",
           "random_windows", "register_sampler", "BlockInputs", "capture_inputs", "get_blocks", "lockstep", "run_blocks"]
