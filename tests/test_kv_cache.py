"""`hfq.HfqQuantizedCache`: K / V stored as packed integers, equal to the simulated KV quantizer."""
import pytest
import torch
from conftest import build_tiny

import hfq
from hfq.kv_cache import HfqQuantizedCache
from hfq.transforms import set_kv_quant
from hfq.transforms.online import kv_quant_args

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def _ostquant_kv4():
    cfg = hfq.OSTQuantConfig(act_bits=None, kv_bits=4, online_qk=True, learn=False, n_samples=2, seq_len=16)
    return hfq.quantize(build_tiny("llama"), cfg, calibration=IDS[:, :16])


def test_kv4_cache_equals_the_simulated_kv4_with_r3_in_prefill_decode_and_generate():
    """Catches a cache that quantizes K before R3 (OSTQuant's simulated KV4 quantizes the rotated K), hands
    attention the rotated K (the wrapper rotates again), re-quantizes stored tokens on every step (decoding would
    drift from the one-pass prefill), or loses tokens / order when appending."""
    model = _ostquant_kv4()
    with torch.no_grad():
        simulated = model(IDS).logits
        prefill = model(IDS, past_key_values=HfqQuantizedCache(model), use_cache=True).logits
        cache = HfqQuantizedCache(model)
        steps = [model(IDS[:, :16], past_key_values=cache, use_cache=True).logits]
        steps += [model(IDS[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(16, 24)]
    tol = 1e-5 * simulated.abs().max()
    assert (prefill - simulated).abs().max() < tol
    assert (torch.cat(steps, 1) - simulated).abs().max() < tol
    assert cache.get_seq_length() == 24
    greedy = dict(max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(IDS[:, :8]), pad_token_id=0)
    assert torch.equal(model.generate(IDS[:, :8], cache=HfqQuantizedCache(model), **greedy),
                       model.generate(IDS[:, :8], **greedy))


def test_cache_bytes_are_packed_codes_plus_one_scale_per_token_and_head():
    """Catches codes stored unpacked (one byte or more per 4-bit value), or more than one float32 scale (and uint8
    zero point) per token and head: the memory the cache is for."""
    model = build_tiny("llama")  # 2 layers, 2 KV heads, head_dim 16
    for bits, symmetric, per_head in ((4, False, 16 // 2 + 4 + 1), (8, True, 16 + 4)):
        cache = HfqQuantizedCache(model, bits=bits, symmetric=symmetric)
        with torch.no_grad():
            model(IDS, past_key_values=cache, use_cache=True)
        assert cache.nbytes() == 2 * 2 * IDS.shape[0] * 2 * IDS.shape[1] * per_head  # layers, K/V, batch, heads, tokens


def test_int8_cache_on_a_float_model_is_close_and_equals_the_simulated_int8():
    """Catches the bits / symmetric arguments ignored (a float model has no recorded KV quantizer) and a cache far
    from the simulated quantizer of the same settings."""
    model = build_tiny("llama")
    with torch.no_grad():
        fp = model(IDS).logits
        cached = model(IDS, past_key_values=HfqQuantizedCache(model, bits=8, symmetric=True), use_cache=True).logits
        set_kv_quant(model, kv_quant_args(8, symmetric=True))
        simulated = model(IDS).logits
    assert (cached - simulated).abs().max() < 1e-5 * fp.abs().max()
    assert 0 < (cached - fp).abs().max() < 0.05 * fp.abs().max()


def test_cache_errors():
    """Catches a cache built without settings on a model that records none, and sliding-window models accepted
    (their layers drop old tokens, which this cache does not)."""
    with pytest.raises(ValueError, match="bits="):
        HfqQuantizedCache(build_tiny("llama"))
    with pytest.raises(ValueError, match="full-attention"):
        HfqQuantizedCache(build_tiny("gemma2"), bits=4)
