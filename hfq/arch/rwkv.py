"""RWKV-4."""
from dataclasses import dataclass

from .base import ArchAdapter


@dataclass(frozen=True)
class RwkvAdapter(ArchAdapter):
    """RWKV-4 blocks return (hidden_states, state, attentions) and the model unpacks all three."""

    @staticmethod
    def passthrough(hidden_states, args: tuple, kwargs: dict):
        return hidden_states, kwargs.get("state"), None


# eval-mode `_rescale_layers` divides these weights in place (modeling_rwkv)
ADAPTERS = {"rwkv": RwkvAdapter(blocks="rwkv.blocks", keep_float=("attention.output", "feed_forward.value"))}
