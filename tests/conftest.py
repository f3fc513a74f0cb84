"""Tiny models built from configs (hidden 64, 2 layers), saved once per session as full-precision folders."""
import os

import pytest
import torch

os.environ.setdefault("HFQ_QUIET", "1")
# the CI layout: ../shared/data beside the repository (`make test` exports the same)
os.environ.setdefault("HFQ_DATA_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))

from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    DeepseekV3Config,
    FalconMambaConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GraniteConfig,
    LlamaConfig,
    Mamba2Config,
    MambaConfig,
    MistralConfig,
    MixtralConfig,
    Olmo2Config,
    OlmoeConfig,
    Phi3Config,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
    RwkvConfig,
)

COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, max_position_embeddings=128)
ATTN = dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON, **ATTN, tie_word_embeddings=False),
    "qwen2": lambda: Qwen2Config(**COMMON, **ATTN, tie_word_embeddings=True),
    "gemma3": lambda: Gemma3TextConfig(**COMMON, **ATTN, head_dim=16, sliding_window=32),
    "mixtral": lambda: MixtralConfig(**COMMON, **ATTN, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda: Qwen2MoeConfig(**COMMON, **ATTN, num_experts=4, num_experts_per_tok=2,
                                        moe_intermediate_size=64, shared_expert_intermediate_size=128),
    "mamba": lambda: MambaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, state_size=8,
                                 intermediate_size=128, time_step_rank=8),
    # the rest of the architectures hfq has an adapter for (tests/test_architectures.py runs each)
    "mistral": lambda: MistralConfig(**COMMON, **ATTN, tie_word_embeddings=False),
    "gemma": lambda: GemmaConfig(**COMMON, **ATTN, head_dim=16),
    "gemma2": lambda: Gemma2Config(**COMMON, **ATTN, head_dim=16, sliding_window=32),
    "phi3": lambda: Phi3Config(**COMMON, **ATTN, tie_word_embeddings=False, pad_token_id=0),
    "olmo2": lambda: Olmo2Config(**COMMON, **ATTN, tie_word_embeddings=False, pad_token_id=0),
    "granite": lambda: GraniteConfig(**COMMON, **ATTN, tie_word_embeddings=False),
    "qwen3": lambda: Qwen3Config(**COMMON, **ATTN, head_dim=16, tie_word_embeddings=False),
    "qwen3_moe": lambda: Qwen3MoeConfig(**COMMON, **ATTN, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                        moe_intermediate_size=64, tie_word_embeddings=False),
    # layer 0 dense (first_k_dense_replace), then MoE: sigmoid router, correction bias, 2 groups of 4, MLA attention
    "deepseek_v3": lambda: DeepseekV3Config(
        vocab_size=256, hidden_size=64, num_hidden_layers=3, max_position_embeddings=128, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
        q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
        tie_word_embeddings=False),
    "olmoe": lambda: OlmoeConfig(**COMMON, **ATTN, num_experts=4, num_experts_per_tok=2, pad_token_id=0,
                                 eos_token_id=None, tie_word_embeddings=False),
    "falcon_mamba": lambda: FalconMambaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, state_size=8,
                                              intermediate_size=128, time_step_rank=8),
    "mamba2": lambda: Mamba2Config(vocab_size=256, hidden_size=64, num_hidden_layers=2, state_size=16, expand=2,
                                   head_dim=16, num_heads=8, n_groups=1, chunk_size=16),
    "rwkv": lambda: RwkvConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, attention_hidden_size=64,
                               intermediate_size=128, context_length=64, rescale_every=0),
}
TINY_CONFIGS["gemma3_text"] = TINY_CONFIGS["gemma3"]  # "gemma3" here is the text model (model_type gemma3_text)


def build_tiny(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(TINY_CONFIGS[arch]()).eval()


@pytest.fixture(scope="session")
def tiny_fp_dir(tmp_path_factory):
    """arch -> folder of a saved full-precision tiny model (float32)."""
    root = tmp_path_factory.mktemp("tiny_fp")
    cache = {}

    def get(arch: str) -> str:
        if arch not in cache:
            path = root / arch
            build_tiny(arch).save_pretrained(path)
            cache[arch] = str(path)
        return cache[arch]

    return get


@pytest.fixture
def one_thread():
    """One intra-op thread for a test, restored after (modules of tiny tensors use it: a shared 2-core box spins with
    more; setting it at module level instead would leak into every later module, e.g. the fresh-process reload tests
    that compare bits against another thread count)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def ids():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
