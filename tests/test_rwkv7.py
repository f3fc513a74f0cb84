"""RWKV-7 custom-code model: the chunked recurrence against the token loop, cached decoding, generate, the
trust_remote_code round trip and the BlinkDL converter."""
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from hfq.modeling.rwkv7 import Rwkv7Config, Rwkv7ForCausalLM, convert_blinkdl_state_dict, wkv7

IDS = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))


def _tiny(seed=0, **kw):
    torch.manual_seed(seed)
    model = Rwkv7ForCausalLM(Rwkv7Config(**{"vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2,
                                            "head_size": 16, **kw}))
    with torch.no_grad():  # non-trivial mixes, decays and norms (the init values would hide a swapped parameter)
        for name, p in model.named_parameters():
            if p.dim() != 2 or "emb" in name or "head" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def _inputs(dtype, T=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, H, N = 2, 2, 8
    r, k, v = (torch.randn(B, T, H, N, generator=g, dtype=dtype) for _ in range(3))
    w = torch.exp(-torch.exp(-F.softplus(torch.randn(B, T, H, N, generator=g, dtype=dtype)) - 0.5))
    kk = F.normalize(torch.randn(B, T, H, N, generator=g, dtype=dtype), dim=-1)
    a = torch.rand(B, T, H, N, generator=g, dtype=dtype)
    S0 = torch.randn(B, H, N, N, generator=g, dtype=dtype)
    return (r, w, k, v, -kk, kk * a), S0


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_chunked_recurrence_equals_token_loop(chunk):
    """Catches a chunked (prefill) form that is not the recurrence S_t = S_{t-1}(diag(w) + a b^T) + v k^T: wrong
    decay exponents (c_t vs c_{t-1}), a missing S_0 term, the z_t = S_{t-1} a_t coupling taken from S_t, or chunk
    boundaries (37 tokens is no multiple of the chunk). float64 to 1e-10, float32 to 1e-5."""
    args, S0 = _inputs(torch.float64)
    y0, s0 = wkv7(*args, S0, chunk_size=0)
    y1, s1 = wkv7(*args, S0, chunk_size=chunk)
    assert (y1 - y0).abs().max() < 1e-10 * y0.abs().max() and (s1 - s0).abs().max() < 1e-10 * s0.abs().max()
    args, S0 = _inputs(torch.float32)
    y0, _ = wkv7(*args, S0, chunk_size=0)
    y1, _ = wkv7(*args, S0, chunk_size=chunk)
    assert (y1 - y0).abs().max() < 1e-5 * y0.abs().max()


def test_step_matches_the_reference_update_order():
    """Catches a state update in the wrong order or layout: one step of wkv7 equals the reference S' = S diag(w) +
    (S a) b^T + v k^T, y = S' r on an explicit [value, key] state (BlinkDL's layout)."""
    (r, w, k, v, a, b), S0 = _inputs(torch.float64, T=1)
    y, S = wkv7(r, w, k, v, a, b, S0, chunk_size=0)
    ref = S0 * w[:, 0, :, None, :] + (S0 @ a[:, 0, :, :, None]) @ b[:, 0, :, None, :] + \
        v[:, 0, :, :, None] @ k[:, 0, :, None, :]
    assert torch.allclose(S, ref) and torch.allclose(y[:, 0], (ref @ r[:, 0, :, :, None])[..., 0])


def test_model_chunked_prefill_cached_decoding_and_generate():
    """Catches the model's prefill (chunked) differing from token-by-token evaluation, a state that does not carry
    the token shifts and wkv state across calls, or generate not feeding the state (it must equal a greedy loop
    over full forwards)."""
    model = _tiny()
    with torch.no_grad():
        full = model(IDS).logits
        model.config.chunk_size = 0
        assert (model(IDS).logits - full).abs().max() < 1e-5 * full.abs().max()
        model.config.chunk_size = 16
        out = model(IDS[:, :30], use_cache=True)
        steps, state = [out.logits], out.state
        for t in range(30, 40):
            out = model(IDS[:, t:t + 1], state=state, use_cache=True)
            steps.append(out.logits)
            state = out.state
        assert (torch.cat(steps, 1) - full).abs().max() < 1e-5 * full.abs().max()
        x = IDS[:, :8]
        for _ in range(6):
            x = torch.cat([x, model(x).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(model.generate(IDS[:, :8], max_new_tokens=6, do_sample=False), x)


def test_trust_remote_code_round_trip(tmp_path):
    """Catches a custom-code model whose saved folder does not load back by itself (missing auto_map or code files)."""
    model = _tiny()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "modeling_rwkv7.py").is_file()
    again = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, model(IDS).logits)


def _blinkdl_state_dict(C=64, H=4, N=16, n_layer=2, vocab=256, dw=32, da=32, dv=32, dg=64, with_ln0=True):
    """A state dict with the official x070 keys and shapes (BlinkDL RWKV-v7 train_temp/src/model.py), random values."""
    g = torch.Generator().manual_seed(3)
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    sd = {"emb.weight": rnd(vocab, C), "ln_out.weight": rnd(C) + 1, "ln_out.bias": rnd(C), "head.weight": rnd(vocab, C)}
    for i in range(n_layer):
        p = f"blocks.{i}."
        if i == 0 and with_ln0:
            sd[p + "ln0.weight"], sd[p + "ln0.bias"] = rnd(C) + 1, rnd(C)
        for ln in ("ln1", "ln2", "att.ln_x"):
            sd[p + ln + ".weight"], sd[p + ln + ".bias"] = rnd(C) + 1, rnd(C)
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a"):
            sd[p + "att." + name] = rnd(1, 1, C)
        for name, d in (("w", dw), ("a", da), ("v", dv), ("g", dg)):
            sd[p + f"att.{name}1"], sd[p + f"att.{name}2"] = rnd(C, d), rnd(d, C)
        sd[p + "att.r_k"] = rnd(H, N)
        for name in ("receptance", "key", "value", "output"):
            sd[p + f"att.{name}.weight"] = rnd(C, C)
        sd[p + "ffn.x_k"] = rnd(1, 1, C)
        sd[p + "ffn.key.weight"], sd[p + "ffn.value.weight"] = rnd(4 * C, C), rnd(C, 4 * C)
    return sd


@pytest.mark.parametrize("with_ln0", [True, False])
def test_converter_maps_every_official_key(with_ln0):
    """Catches a converter that drops, misnames or mis-orients a tensor of the official layout: every model
    parameter is filled (strict load), the low-rank [in, out] matrices land transposed in nn.Linear, the unused
    blocks.0.att.v0/v1/v2 are dropped, the sizes come from the tensors, and a missing ln0 becomes the identity."""
    sd = _blinkdl_state_dict(with_ln0=with_ln0)
    config, converted = convert_blinkdl_state_dict(sd)
    assert (config.num_heads, config.head_size, config.decay_lora, config.gate_lora) == (4, 16, 32, 64)
    model = Rwkv7ForCausalLM(config)
    model.load_state_dict(converted, strict=True)
    att = model.model.blocks[1].att
    assert torch.equal(att.w1.weight, sd["blocks.1.att.w1"].t())
    assert torch.equal(att.g2.weight, sd["blocks.1.att.g2"].t())
    assert torch.equal(att.x_a, sd["blocks.1.att.x_a"]) and torch.equal(model.head.weight, sd["head.weight"])
    if not with_ln0:
        assert torch.equal(model.model.blocks[0].ln0.weight, torch.ones(64))
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()
    with pytest.raises(ValueError, match="RWKV-7"):
        convert_blinkdl_state_dict({"emb.weight": torch.zeros(4, 4)})


def test_block_runner_carries_v_first():
    """Catches the block runner dropping RWKV-7's v_first (block 0's values, an input of every later block besides
    the hidden states): running the blocks one at a time must give the model's own hidden states exactly."""
    from hfq.calibration.runner import run_blocks

    model = _tiny(num_hidden_layers=3)
    ids = IDS[:, :32]
    with torch.no_grad():
        ref = model(ids).logits
    out = run_blocks(model, ids, [lambda *a: None], batch_size=1)
    with torch.no_grad():
        assert torch.equal(model.head(model.model.ln_out(torch.cat(out.hidden))), ref)


@pytest.mark.parametrize("method", ["gptq", "rwkvquant"])
def test_quantized_rwkv7_reloads_with_its_code(method, tmp_path):
    """Catches RWKV-7 not being quantizable block by block (v_first not handed on, mixes not found), or a quantized
    custom-code checkpoint that does not come back through trust_remote_code with identical logits."""
    import hfq

    model = _tiny()
    calib = IDS[:, :32]
    cfg = (hfq.GPTQConfig(bits=4, group_size=32, n_samples=2, seq_len=32) if method == "gptq" else
           hfq.RWKVQuantConfig(group_size=32, block_size=32, mu_group=32, n_samples=2, seq_len=32, proxy="vq"))
    hfq.quantize(model, cfg, calibration=calib)
    if method == "rwkvquant":  # per block: x_r..x_g, ffn.x_k and the tapped k_k, k_a, r_k
        mu = model.config.quantization_config.mu_params
        assert len(mu) == 2 * 10 and "model.blocks.1.att.r_k" in mu
        assert len(torch.unique(model.model.blocks[1].att.r_k.detach()[:2])) <= 8  # one 3-bit codebook per 32
    with torch.no_grad():
        out = model(IDS).logits
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, out)
