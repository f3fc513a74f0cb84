"""Calibration data sources, the shared calibration config fields and the block-by-block runner."""
from .config import CalibratedConfig
from . import ebss  # noqa: F401  (registers the "ebss" sampler)
from .data import (EVAL_WINDOWS, HOLDOUT_TOKENS, SAMPLERS, VALIDATION_TOKENS, from_dataset, from_model, from_samples,
                   get_calibration, random_windows, register_sampler, validation_range)
from .runner import BlockInputs, capture_inputs, get_blocks, lockstep, run_blocks
from .stats import STATS, BlockStatistics, GroupSolver, InputStats, token_weights

__all__ = ["CalibratedConfig", "EVAL_WINDOWS", "HOLDOUT_TOKENS", "VALIDATION_TOKENS", "validation_range", "SAMPLERS",
           "from_dataset", "from_model", "from_samples", "get_calibration", "random_windows", "register_sampler",
           "BlockInputs", "capture_inputs", "get_blocks", "lockstep", "run_blocks", "STATS", "BlockStatistics",
           "GroupSolver", "InputStats", "token_weights"]
