"""Calibration data sources, the shared calibration config fields and the block-by-block runner."""
from .config import CalibratedConfig
from .data import (HOLDOUT_TOKENS, SAMPLERS, from_dataset, from_model, from_samples, get_calibration, random_windows,
                   register_sampler)
from .runner import BlockInputs, capture_inputs, get_blocks, lockstep, run_blocks
from .stats import STATS, BlockStatistics, GroupSolver, InputStats, token_weights

__all__ = ["CalibratedConfig", "HOLDOUT_TOKENS", "SAMPLERS", "from_dataset", "from_model", "from_samples",
           "get_calibration", "random_windows", "register_sampler", "BlockInputs", "capture_inputs", "get_blocks",
           "lockstep", "run_blocks", "STATS", "BlockStatistics", "GroupSolver", "InputStats", "token_weights"]
