"""Mamba / FalconMamba / Mamba2 (blocks at `backbone.layers`)."""
from .base import ArchAdapter

ADAPTERS = {
    # the slow path computes `self.dt_proj.weight @ ...` (modeling_mamba)
    "mamba": ArchAdapter(blocks="backbone.layers", keep_float=("dt_proj",), head_input_cast=True),
    "falcon_mamba": ArchAdapter(blocks="backbone.layers", keep_float=("dt_proj",), head_input_cast=True),
    "mamba2": ArchAdapter(blocks="backbone.layers", head_input_cast=True),
}
