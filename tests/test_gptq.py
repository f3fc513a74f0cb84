"""GPTQ solver and method (tiny layers/models, offline)."""
import logging

import pytest
import torch
from conftest import build_tiny
from transformers import AutoModelForCausalLM

import hfq
from hfq.quant import QuantArgs, compute_qparams, dequantize, quantize
from hfq.solvers import Hessian, gptq_quantize


def _layer(seed=0, out=48, cols=128, tokens=1024):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, cols, generator=g)
    X = torch.randn(tokens, cols, generator=g) @ (0.3 * torch.randn(cols, cols, generator=g)) \
        + torch.randn(cols, generator=g)
    return W, X


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("group", [None, 32])
def test_gptq_beats_rtn_on_layer_output(bits, group):
    W, X = _layer()
    args = QuantArgs(bits=bits, granularity="group" if group else "channel", group_size=group)
    s, z = compute_qparams(W, args)
    rtn = dequantize(quantize(W, s, z, args), s, z, args)
    h = Hessian(W.shape[1])
    h.add(X)
    for act_order in (False, True):
        q, s2, z2 = gptq_quantize(W, h.matrix(), args, act_order=act_order, static_groups=act_order)
        assert q.dtype == torch.int16 and s2.shape == s.shape
        assert int(q.min()) >= args.qmin and int(q.max()) <= args.qmax
        gq = dequantize(q, s2, z2, args)
        assert (X @ W.T - X @ gq.T).norm() < (X @ W.T - X @ rtn.T).norm()


def test_zero_sample_weights_equal_dropping_samples():
    _, X = _layer(tokens=96)
    X = X.reshape(6, 16, -1)  # 6 samples x 16 tokens
    keep = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    weighted, dropped = Hessian(X.shape[-1]), Hessian(X.shape[-1])
    weighted.add(X, keep)
    dropped.add(X[keep > 0])
    assert torch.equal(weighted.matrix(), dropped.matrix())
    per_token = Hessian(X.shape[-1])
    per_token.add(X, keep[:, None].expand(6, 16))
    assert torch.equal(per_token.matrix(), dropped.matrix())
    W, _ = _layer()
    args = QuantArgs(bits=3, granularity="group", group_size=32)
    a = gptq_quantize(W, weighted.matrix(), args)
    b = gptq_quantize(W, dropped.matrix(), args)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_act_order_with_groups_needs_static_groups():
    W, X = _layer()
    h = Hessian(W.shape[1])
    h.add(X)
    with pytest.raises(ValueError, match="static_groups"):
        gptq_quantize(W, h.matrix(), QuantArgs(granularity="group", group_size=32), act_order=True)
    with pytest.raises(ValueError, match="static_groups"):
        hfq.GPTQConfig(act_order=True, group_size=64, static_groups=False)
    assert hfq.GPTQConfig(act_order=True, group_size=64).static_groups is True


def test_config_fields_and_roundtrip():
    cfg = hfq.GPTQConfig(bits=3, group_size=64, dataset=[[1, 2, 3]], tokenizer=object(), seq_len=512)
    d = cfg.to_dict()
    assert d["quant_method"] == "hfq_gptq" and d["dataset"] is None and "tokenizer" not in d
    assert hfq.config_from_dict(d).seq_len == 512
    assert hfq.integration.METHODS["hfq_gptq"][0] is hfq.GPTQConfig
    with pytest.raises(ValueError, match="damp"):
        hfq.GPTQConfig(damp=1.5)


def test_missing_calibration_is_a_clear_error():
    model = build_tiny("llama")
    with pytest.raises(ValueError, match="dataset="):
        hfq.quantize(model, hfq.GPTQConfig(group_size=32))


def test_on_load_save_reload_exact(tiny_fp_dir, tmp_path, ids):
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(2)).tolist()
    cfg = hfq.GPTQConfig(bits=4, group_size=32, dataset=calib, n_samples=8, seq_len=32)
    model = AutoModelForCausalLM.from_pretrained(tiny_fp_dir("llama"), quantization_config=cfg)
    assert isinstance(model.model.layers[0].self_attn.q_proj, hfq.nn.QuantLinear)
    assert isinstance(model.lm_head, torch.nn.Linear)
    model.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert again.hf_quantizer.pre_quantized
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    # the same model through hfq.quantize with calibration= gives the same integers
    fp = AutoModelForCausalLM.from_pretrained(tiny_fp_dir("llama"))
    hfq.quantize(fp, hfq.GPTQConfig(bits=4, group_size=32, n_samples=8, seq_len=32), calibration=calib)
    assert torch.equal(fp.model.layers[1].mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight)


def test_gptq_orders_beat_rtn_on_held_out_tokens(ids):
    """Catches a GPTQ path (lockstep default, the two-pass order, act-order + MSE clip) that is no better than RTN on
    tokens it was not calibrated on, or two orders that secretly run the same code (identical integers)."""
    calib = torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(3))
    held_out = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = build_tiny("llama")(held_out).logits
    errs, models = {}, {}
    for name, cfg in {"rtn": hfq.RTNConfig(bits=3, group_size=32),
                      "gptq_lockstep": hfq.GPTQConfig(bits=3, group_size=32),
                      "gptq_two_pass": hfq.GPTQConfig(bits=3, group_size=32, true_sequential=False),
                      "gptq_act_order_mse": hfq.GPTQConfig(bits=3, group_size=32, act_order=True, mse_clip=True)
                      }.items():
        m = models[name] = build_tiny("llama")
        hfq.quantize(m, cfg, calibration=None if name == "rtn" else calib)
        with torch.no_grad():
            errs[name] = (m(held_out).logits - ref).pow(2).mean().item()
    assert max(v for k, v in errs.items() if k != "rtn") < 0.9 * errs["rtn"], errs
    a, b = (models[k].model.layers[1].mlp.down_proj.int_weight() for k in ("gptq_lockstep", "gptq_two_pass"))
    assert not torch.equal(a, b)


def test_two_pass_solves_every_layer_from_the_float_block():
    """Catches the two-pass order (true_sequential=False) feeding a layer inputs that went through the already
    quantized layers before it: block 0's down_proj must be exactly GPTQ on the Hessian of the FLOAT model's
    down_proj inputs (lockstep, the default, must not be)."""
    calib = torch.randint(0, 256, (8, 24), generator=torch.Generator().manual_seed(5))
    cfg = hfq.GPTQConfig(bits=4, group_size=32, batch_size=2, true_sequential=False)
    fp = build_tiny("llama")
    down = fp.model.layers[0].mlp.down_proj
    h = Hessian(down.in_features)
    hook = down.register_forward_pre_hook(lambda m, a: h.add(a[0]))
    with torch.no_grad():
        for chunk in calib.split(2):
            fp(chunk)
    hook.remove()
    q, _, _ = gptq_quantize(down.weight.detach(), h.matrix(), cfg.weight_args(), **cfg.solver_kwargs())
    two_pass = hfq.quantize(build_tiny("llama"), cfg, calibration=calib)
    assert torch.equal(two_pass.model.layers[0].mlp.down_proj.int_weight(), q)
    lockstep = hfq.quantize(build_tiny("llama"), hfq.GPTQConfig(bits=4, group_size=32, batch_size=2),
                            calibration=calib)
    assert not torch.equal(lockstep.model.layers[0].mlp.down_proj.int_weight(), q)


def test_moe_dead_experts_warn_and_use_the_layer_hessian(caplog):
    """Catches an expert no calibration token reached being left float, silently rounded, or solved on an empty
    Hessian: it must be solved by GPTQ on the Hessian of ALL the tokens entering the layer (so its integers equal a
    GPTQ solve on that Hessian, and differ from RTN), and the warning must name the layer and the experts."""
    model = build_tiny("mixtral")
    block = model.model.layers[0].mlp

    def route_to_0_and_1(hidden):  # experts 2 and 3 of layer 0 never see a token
        n = hidden.shape[0]
        idx = torch.tensor([[0, 1]]).expand(n, 2)
        return torch.zeros(n, 4), torch.full((n, 2), 0.5), idx

    block.gate.forward = route_to_0_and_1
    experts_fp = block.experts.gate_up_proj.detach().clone()
    layer_inputs = []
    block.experts.register_forward_pre_hook(lambda m, a: layer_inputs.append(a[0].detach().clone()))
    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    cfg = hfq.GPTQConfig(bits=4, group_size=32, true_sequential=False)
    with caplog.at_level(logging.WARNING):
        hfq.quantize(model, cfg, calibration=calib)
    text = caplog.text
    assert "model.layers.0.mlp.experts.gate_up" in text and "model.layers.0.mlp.experts.down" in text
    assert "experts [2, 3]" in text and "all the tokens entering the layer" in text and "model.layers.1" not in text
    q = model.model.layers[0].mlp.experts
    assert isinstance(q, hfq.nn.QuantExperts)
    h = Hessian(experts_fp.shape[-1])
    h.add(torch.cat(layer_inputs[:len(calib) // cfg.batch_size]))  # the two-pass statistics forward
    args = q.weight_args
    for e in (2, 3):
        got = q.expert_weight("gate_up", e)
        torch.testing.assert_close(got, dequantize(*gptq_quantize(experts_fp[e], h.matrix(), args,
                                                                  **cfg.solver_kwargs()), args))
        s, z = compute_qparams(experts_fp[e], args)
        assert not torch.equal(got, dequantize(quantize(experts_fp[e], s, z, args), s, z, args))  # not RTN


def test_hessian_accumulates_xtx_symmetric():
    _, X = _layer(tokens=300)
    h = Hessian(X.shape[1])
    h.add(X[:100])
    h.add(X[100:].reshape(4, 50, -1))
    ref = X.double().T @ X.double() * (2 / 300)  # GPTQ's H = 2/n XᵀX
    got = h.matrix()
    assert torch.equal(got, got.T)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4)


def test_autocast_calibration_validated_and_close_to_float32():
    with pytest.raises(ValueError, match="autocast_dtype"):
        hfq.GPTQConfig(autocast_dtype="int8")
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(4))
    models = {}
    for name, dtype in {"fp32": None, "bf16": "bfloat16"}.items():
        models[name] = build_tiny("llama")
        hfq.quantize(models[name], hfq.GPTQConfig(bits=4, group_size=32, autocast_dtype=dtype), calibration=calib)
        # weights and activations between blocks stay float32: only the calibration forwards ran in bfloat16
        assert models[name].model.layers[0].self_attn.q_proj.weight_scale.dtype == torch.float32
    a = models["fp32"].model.layers[0].self_attn.q_proj.int_weight()
    b = models["bf16"].model.layers[0].self_attn.q_proj.int_weight()
    assert (a == b).float().mean() > 0.9  # the first layer's inputs differ only by bfloat16 rounding
    rtn = build_tiny("llama")
    hfq.quantize(rtn, hfq.RTNConfig(bits=4, group_size=32))
    with torch.no_grad():  # later layers drift further apart, but both stay well ahead of RTN
        ref = build_tiny("llama")(calib).logits
        err = {k: (m(calib).logits - ref).pow(2).mean().item() for k, m in {**models, "rtn": rtn}.items()}
    assert max(err["fp32"], err["bf16"]) < 0.8 * err["rtn"], err


def _block_pass(cfg, model, siblings=None):
    from hfq.calibration import BlockStatistics
    from hfq.quantizers.gptq import GPTQSolver

    block = model.model.layers[0]
    targets = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    p = BlockStatistics(model, {0: targets}, GPTQSolver(cfg))
    p._siblings = dict(siblings or {})
    return p, block, targets


def test_lockstep_solves_each_layer_from_all_chunks_and_stacking_changes_nothing():
    """Default (true-sequential, lockstep) GPTQ of block 0: q_proj's integers are exactly GPTQ on the Hessian of
    every chunk's normed block input; solving q/k/v stacked (siblings known) gives the same integers as one by one."""
    from hfq.calibration import capture_inputs

    calib = torch.randint(0, 256, (8, 24), generator=torch.Generator().manual_seed(5))
    cfg = hfq.GPTQConfig(bits=4, group_size=32, batch_size=2)
    results = {}
    for name, siblings in {"alone": None, "stacked": {"self_attn.q_proj": ["self_attn.k_proj", "self_attn.v_proj"],
                                                      "mlp.gate_proj": ["mlp.up_proj"]}}.items():
        model = build_tiny("llama")
        inputs, _ = capture_inputs(model, calib, batch_size=2)
        p, block, targets = _block_pass(cfg, model, siblings)
        w_q = targets["self_attn.q_proj"].weight.detach().clone()
        p(block, 0, inputs)
        results[name] = {n: q for n, (q, _, _) in ((n, p.solver.results[m]) for n, m in targets.items())}
        assert len(inputs) == 4
    for n in results["alone"]:
        assert torch.equal(results["alone"][n], results["stacked"][n]), n
    h = Hessian(w_q.shape[1])
    with torch.no_grad():
        for x in inputs.hidden:
            h.add(block.input_layernorm(x))
    q, _, _ = gptq_quantize(w_q, h.matrix(), cfg.weight_args(), **cfg.solver_kwargs())
    assert torch.equal(q, results["alone"]["self_attn.q_proj"])


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("true_sequential", [True, False])
def test_sample_weights_reach_every_layer_moe_included(arch, true_sequential):
    """Catches sample weights that some layers never see or cannot take: routed experts and the shared expert get
    their tokens flattened ([b*s, h]), where per-sample weights used to fail or be applied to the wrong tokens. A
    weight of 0 per sample (or per token) must give exactly the integers of calibrating without those samples."""
    calib = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(5))
    keep = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    cfg = dict(bits=4, group_size=32, n_samples=6, seq_len=16, batch_size=1, true_sequential=true_sequential)
    dropped = hfq.quantize(build_tiny(arch), hfq.GPTQConfig(**cfg), calibration=calib[keep > 0]).state_dict()
    for weights in (keep, keep[:, None].expand(6, 16)):
        weighted = hfq.quantize(build_tiny(arch), hfq.GPTQConfig(**cfg), calibration=calib,
                                sample_weights=weights).state_dict()
        assert all(torch.equal(weighted[k], dropped[k]) for k in dropped)
    plain = hfq.quantize(build_tiny(arch), hfq.GPTQConfig(**cfg), calibration=calib).state_dict()
    assert not all(torch.equal(plain[k], dropped[k]) for k in dropped)  # the weights did change something


def test_gptq_on_rwkv_quantizes_blocks_and_reloads_exactly(tmp_path):
    """Catches the block runner assuming Llama-like block outputs: RWKV-4 blocks return (hidden, state, attentions)
    and the model unpacks all three, so capturing block inputs failed with 'not enough values to unpack'. With
    rescale_every=0 the model never rescales attention.output / feed_forward.value in place, so they are quantized
    too (tests/test_architectures.py checks that they stay float when rescale_every > 0)."""
    from transformers import RwkvConfig

    torch.manual_seed(0)
    cfg = RwkvConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, attention_hidden_size=64,
                     intermediate_size=128, context_length=64, rescale_every=0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    hfq.quantize(model, hfq.GPTQConfig(bits=4, group_size=32, n_samples=4, seq_len=16), calibration=calib)
    block = model.rwkv.blocks[0]
    assert isinstance(block.attention.key, hfq.nn.QuantLinear)
    assert isinstance(block.feed_forward.key, hfq.nn.QuantLinear)
    assert isinstance(block.attention.output, hfq.nn.QuantLinear)  # not rescaled at rescale_every=0
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(model(calib).logits, again(calib).logits)


def test_gptq_on_mamba2_reloads_exactly(tmp_path):
    """Catches Mamba2 being refused (no adapter) or its mixer's linears not surviving save -> reload."""
    from transformers import Mamba2Config

    torch.manual_seed(0)
    cfg = Mamba2Config(vocab_size=256, hidden_size=64, num_hidden_layers=2, state_size=16, expand=2, head_dim=16,
                       num_heads=8, n_groups=1, chunk_size=16)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    hfq.quantize(model, hfq.GPTQConfig(bits=4, group_size=32, n_samples=4, seq_len=32), calibration=calib)
    assert isinstance(model.backbone.layers[1].mixer.in_proj, hfq.nn.QuantLinear)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(model(calib).logits, again(calib).logits)
