"""RWKV-4 (transformers) and RWKV-7 (hfq.modeling.rwkv7)."""
from dataclasses import dataclass, field

from .base import ArchAdapter


@dataclass(frozen=True)
class RwkvAdapter(ArchAdapter):
    """RWKV-4 blocks return (hidden_states, state, attentions) and the model unpacks all three.

    token_shift_mixes: {module in a block: its mix parameters mu}, each used as x_{t-1} + (x_t - x_{t-1}) * mu on
    the module's input x (RWKVQuant's element-wise multipliers). multiplier_taps: {"module.parameter": tap module}
    for other element-wise multipliers, whose input the model's code passes through that (identity) tap module."""

    token_shift_mixes: dict = field(default_factory=dict)
    multiplier_taps: dict = field(default_factory=dict)

    @staticmethod
    def passthrough(hidden_states, args: tuple, kwargs: dict):
        return hidden_states, kwargs.get("state"), None

    def float_only(self, model) -> tuple[str, ...]:
        # eval-mode `_rescale_layers` divides these weights in place, but only when rescale_every > 0
        return self.keep_float if getattr(model.config, "rescale_every", 0) > 0 else ()


@dataclass(frozen=True)
class Rwkv7Adapter(RwkvAdapter):
    """RWKV-7 blocks return (hidden_states, v_first, state): v_first (block 0's values) goes on to every block."""

    @staticmethod
    def passthrough(hidden_states, args: tuple, kwargs: dict):
        return hidden_states, kwargs.get("v_first"), None


ADAPTERS = {"hfq_rwkv7": Rwkv7Adapter(
    blocks="model.blocks", carried=("v_first",),
    token_shift_mixes={"att": ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"), "ffn": ("x_k",)},
    multiplier_taps={"att.k_k": "att.k_k_in", "att.k_a": "att.k_a_in", "att.r_k": "att.r_k_in"}),
    "rwkv": RwkvAdapter(
    blocks="rwkv.blocks", keep_float=("attention.output", "feed_forward.value"),
    token_shift_mixes={"attention": ("time_mix_key", "time_mix_value", "time_mix_receptance"),
                       "feed_forward": ("time_mix_key", "time_mix_receptance")})}
