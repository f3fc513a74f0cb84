"""Configuration of RWKV-7 ("Goose", x070) as a Hugging Face custom-code model."""
import math

from transformers import PretrainedConfig

# low-rank widths of the official checkpoints: max(32, round(f * sqrt(C) / 32) * 32)
LORA_FACTORS = {"decay_lora": 2.5, "aaa_lora": 2.5, "mv_lora": 1.7, "gate_lora": 5.0}


def default_lora(hidden_size: int, factor: float) -> int:
    return max(32, int(round(factor * math.sqrt(hidden_size) / 32) * 32))


class Rwkv7Config(PretrainedConfig):
    """RWKV-7 hyper-parameters; defaults = the official 0.1B model (768 wide, 12 layers, heads of 64, vocabulary
    65536). intermediate_size: the channel mix's width (4 x hidden in the official models). decay_lora / aaa_lora /
    mv_lora / gate_lora: widths of the low-rank w, a, v-residual and gate projections (None = the official rule).
    chunk_size: tokens per chunk of the chunked (prefill) form of the recurrence; 0 = token by token."""

    model_type = "hfq_rwkv7"

    def __init__(self, vocab_size=65536, hidden_size=768, num_hidden_layers=12, head_size=64, intermediate_size=None,
                 decay_lora=None, aaa_lora=None, mv_lora=None, gate_lora=None, layer_norm_eps=1e-5,
                 group_norm_eps=64e-5, chunk_size=16, use_cache=True, tie_word_embeddings=False, **kwargs):
        if hidden_size % head_size:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of head_size {head_size}")
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.head_size = head_size
        self.intermediate_size = intermediate_size or 4 * hidden_size
        for name, f in LORA_FACTORS.items():
            value = locals()[name]
            setattr(self, name, value if value is not None else default_lora(hidden_size, f))
        self.layer_norm_eps, self.group_norm_eps, self.chunk_size = layer_norm_eps, group_norm_eps, chunk_size
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def num_heads(self) -> int:
        return self.hidden_size // self.head_size
