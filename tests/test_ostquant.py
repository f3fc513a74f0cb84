"""OSTQuant: config, KL-Top loss, transform training, exact fusion, accuracy vs RTN/GPTQ, save -> reload."""
import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig

import hfq
from hfq.integration import quantization_targets
from hfq.nn import QuantLinear
from hfq.quantizers.ostquant import OSTQuantTrainer, OSTTransforms, init_transforms
from hfq.train import kl_top_loss
from hfq.quant import QuantArgs
from hfq.recipe import load_recipe
from hfq.transforms import fuse_transforms_
from tests.conftest import build_tiny

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def outlier_llama(seed=0):
    """Tiny Llama with peaked outputs (init std 0.1) and outlier channels in both norms' outputs, so per-token
    4-bit activations really suffer and rotations really help."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, max_position_embeddings=128,
                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=False,
                      initializer_range=0.1)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    for layer in model.model.layers:
        layer.input_layernorm.weight.data[:3] = 10.0
        layer.post_attention_layernorm.weight.data[5:7] = 8.0
    return model


def ids(n, seq=32, seed=1):
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x):
    return model(input_ids=x).logits


# ---------------------------------------------------------------------------------------------- config
def test_config_defaults_validation_and_roundtrip():
    cfg = hfq.OSTQuantConfig(dataset="wikitext2", tokenizer=object(), act_bits=4)
    assert (cfg.bits, cfg.group_size, cfg.sym, cfg.act_sym, cfg.act_granularity) == (4, None, True, False, "token")
    assert (cfg.train_steps, cfg.kl_top_k, cfg.lr_rotation, cfg.lr_scaling) == (100, 1000, 0.01689753, 0.00178988)
    assert cfg.weight_solver == {"quant_method": "hfq_gptq", "act_order": False, "mse_clip": True, "damp": 0.01,
                                 "static_groups": False, "block_size": 128, "true_sequential": True} and cfg.online_down
    solver = cfg.solver_config()  # the nested GPTQ config runs on this config's grid and calibration
    assert isinstance(solver, hfq.GPTQConfig) and (solver.bits, solver.group_size, solver.dataset) == (4, None, "wikitext2")
    assert solver.weight_args().observer == "mse" and solver.act_args() == cfg.act_args()
    # a config object or its dict; shared fields set on the nested config are refused, not silently dropped
    assert hfq.OSTQuantConfig(weight_solver=hfq.GPTQConfig(damp=0.05)).weight_solver["damp"] == 0.05
    assert hfq.OSTQuantConfig(weight_solver=hfq.RTNConfig()).solver_config().quant_method == "hfq_rtn"
    with pytest.raises(ValueError, match=r"\['bits'\] are taken from the enclosing config"):
        hfq.OSTQuantConfig(weight_solver=hfq.GPTQConfig(bits=3))
    assert not cfg.weight_quant_in_training()  # W4A4 script: float weights while training
    assert hfq.OSTQuantConfig().weight_quant_in_training()  # W4A16 script: fake-quantized weights
    assert hfq.OSTQuantConfig(act_bits=8).weight_quant_in_training()  # A8: the weight error dominates
    d = cfg.to_dict()
    assert d["quant_method"] == "hfq_ostquant" and "tokenizer" not in d and "device" not in d
    again = hfq.OSTQuantConfig.from_dict(d)
    assert again.to_dict() == d
    assert hfq.config_from_dict(d).to_dict() == d
    assert hfq.OSTQuantConfig(kv_bits=4).kv_args().granularity == "token"
    assert hfq.OSTQuantConfig().kv_args() is None
    with pytest.raises(ValueError, match="kv_bits"):
        hfq.OSTQuantConfig(kv_bits=1)
    for bad, err in [(dict(rotation_init="qr"), ValueError), (dict(weight_solver={"quant_method": "awq"}), ValueError),
                     (dict(train_steps=0), ValueError), (dict(kl_top_k=-1), ValueError),
                     (dict(learn="yes"), TypeError), (dict(lr_rotation=-1.0), ValueError),
                     (dict(kv_bits=4, kv_clip_ratio=0.0), ValueError), (dict(kv_sym=1), TypeError),
                     (dict(weight_solver={"quant_method": "hfq_gptq", "damp": 2.0}), ValueError),
                     (dict(weight_solver="gptq"), TypeError), (dict(nonsense=1), TypeError)]:
        with pytest.raises(err):
            hfq.OSTQuantConfig(**bad)


def test_recipes_load():
    cfgs = {p.stem: load_recipe(p) for p in RECIPES.glob("*.yaml") if p.stem.startswith(("ostquant", "quarot"))}
    assert {"ostquant-w4a16", "ostquant-w4a8", "ostquant-w4a4", "ostquant-w4a4kv4", "quarot-w4a4"} <= set(cfgs)
    assert cfgs["ostquant-w4a4kv4"].kv_bits == 4 and cfgs["ostquant-w4a4kv4"].online_qk and cfgs["ostquant-w4a4"].kv_bits is None
    assert cfgs["ostquant-w4a16"].act_bits is None and cfgs["ostquant-w4a8"].act_bits == 8
    assert cfgs["ostquant-w4a4"].act_bits == 4 and cfgs["ostquant-w4a4"].rotation_init == "klt_hadamard"
    assert cfgs["quarot-w4a4"].learn is False and cfgs["quarot-w4a4"].act_bits == 4
    assert all(isinstance(c, hfq.OSTQuantConfig) for c in cfgs.values())


def test_unsupported_architecture_is_a_clear_error():
    with pytest.raises(NotImplementedError, match="mixtral"):
        hfq.quantize(build_tiny("mixtral"), hfq.OSTQuantConfig(n_samples=2, seq_len=8), calibration=ids(2, 8))


# ---------------------------------------------------------------------------------------------- loss
def test_kl_top_loss_properties():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, 5, 50, generator=g) * 3
    s = torch.randn(3, 5, 50, generator=g) * 3
    assert kl_top_loss(t, t, 10).abs() < 1e-6 and kl_top_loss(t.clone(), t, 50).abs() < 1e-6
    full = F.kl_div(F.log_softmax(s, -1).reshape(-1, 50), F.log_softmax(t, -1).reshape(-1, 50), log_target=True,
                    reduction="batchmean")
    assert torch.allclose(kl_top_loss(s, t, 50), full, atol=1e-6)  # k = vocab: the plain KL
    # permuting the student's logits OUTSIDE the teacher's top-k keeps its softmax normaliser and its top-k
    # probabilities, so KL-Top is unchanged, while the full KL changes
    k = 10
    top = t.topk(k, -1).indices
    s2 = s.clone()
    for b in range(3):
        for i in range(5):
            rest = torch.tensor([j for j in range(50) if j not in top[b, i].tolist()])
            s2[b, i, rest] = s[b, i, rest[torch.randperm(rest.numel(), generator=g)]]
    assert torch.allclose(kl_top_loss(s2, t, k), kl_top_loss(s, t, k), atol=1e-6)
    assert not torch.allclose(kl_top_loss(s2, t, 50), kl_top_loss(s, t, 50), atol=1e-4)
    # not renormalised over the top-k: the top-k terms of the full-vocabulary KL
    p, lq = F.softmax(t, -1), F.log_softmax(s, -1)
    terms = (p * (p.log() - lq)).gather(-1, top).sum(-1).mean()
    assert torch.allclose(kl_top_loss(s, t, k), terms, atol=1e-6)


# ---------------------------------------------------------------------------------------------- training
def test_training_reduces_kl_top_keeps_rotations_orthogonal_and_fuses_exactly():
    """Catches a trainer whose gradients do not reach the transforms (KL-Top on HELD-OUT tokens must drop: measured
    0.085 -> 0.064), rotations that leave the Stiefel manifold, scalings that never move, a teacher changed by
    training, hooks left behind, and a fusion that is not exact."""
    model = outlier_llama()
    x, held = ids(4), ids(2, seed=7)
    ref, ref_held = logits(model, x), logits(model, held)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    r1, r2 = init_transforms(model, "klt_hadamard", seed=0)
    tf = OSTTransforms(model, r1, r2)
    exact = OSTQuantTrainer(model, tf, quantization_targets(model, hfq.OSTQuantConfig()), kl_top_k=64)
    with torch.no_grad():  # no quantizer: the transformed student computes the teacher's function
        assert exact.loss(x).abs() < 1e-5
        assert (exact.outputs(x, True) - ref).abs().max() < 1e-4
    exact.close()
    act = QuantArgs(bits=4, symmetric=False, granularity="token", dynamic=True)  # the W4A4 script: float weights
    trainer = OSTQuantTrainer(model, tf, quantization_targets(model, hfq.OSTQuantConfig()), act_args=act,
                              kl_top_k=64, lr_rotation=0.05, lr_scaling=0.005, steps=40, stabilize_every=10,
                              online_seed=3)
    with torch.no_grad():
        before = trainer.loss(held).item()
    trainer.train(x, batch_size=4)
    with torch.no_grad():
        after = trainer.loss(held).item()
    trainer.close()
    assert after < 0.85 * before, (before, after)
    eye = torch.eye
    w1, w2 = tf.r1.weight.detach(), tf.r2.weight.detach()
    assert (w1.T @ w1 - eye(64)).abs().max() < 1e-5
    assert (w2.transpose(-1, -2) @ w2 - eye(16)).abs().max() < 1e-5
    assert any((p - 1).abs().max() > 1e-4 for p in tf.scaling_parameters())  # the scalings learned too
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # the teacher is untouched
    assert torch.equal(logits(model, x), ref)  # hooks gone
    r1, layers = tf.export()
    fuse_transforms_(model, r1, layers, online_down=True, online_qk=True, online_seed=3)
    assert (logits(model, held) - ref_held).abs().max() <= 1e-4  # fused float model == FP model


@pytest.mark.parametrize("uniform_final_norm", [True, False])
def test_student_equals_teacher_on_tied_qwen2_without_quantizers(uniform_final_norm):
    model = build_tiny("qwen2")
    if not uniform_final_norm:
        model.model.norm.weight.data = torch.rand(64, generator=torch.Generator().manual_seed(0)) + 0.5
    x = ids(2, 12)
    r1, r2 = init_transforms(model, "random", seed=1)
    tf = OSTTransforms(model, r1, r2)
    with torch.no_grad():
        for p in tf.scaling_parameters():
            p.uniform_(0.5, 1.5)
    trainer = OSTQuantTrainer(model, tf, quantization_targets(model, hfq.OSTQuantConfig()), kl_top_k=16)
    with torch.no_grad():
        assert (trainer.outputs(x, True) - logits(model, x)).abs().max() < 1e-4
    trainer.close()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # training never unties


def test_student_attention_reads_r3_and_quantized_kv_teacher_stays_float():
    from hfq.transforms.online import kv_quant_args

    model = build_tiny("llama")
    x = ids(2, 12)
    ref = logits(model, x)
    r1, r2 = init_transforms(model, "random", seed=1)
    targets = quantization_targets(model, hfq.OSTQuantConfig())
    out = {}
    for kv in (None, 4):
        trainer = OSTQuantTrainer(model, OSTTransforms(model, r1, r2), targets, kl_top_k=16, online_qk=True,
                                  kv_args=None if kv is None else kv_quant_args(kv))
        with torch.no_grad():
            out[kv] = trainer.outputs(x, True)
            assert torch.equal(trainer.outputs(x, False), ref)  # the teacher never sees R3 or the KV quantizer
        assert all(a.kv_quant is None and a.qk_rotation is None for a in trainer.attention)
        trainer.close()
    assert (out[None] - ref).abs().max() < 1e-4  # R3 alone changes nothing
    assert (out[4] - ref).abs().max() > 1e-3  # 4-bit K/V does


# ---------------------------------------------------------------------------------------------- accuracy
def test_ostquant_beats_rtn_and_gptq_at_w4a4():
    """Catches rotations that do not reach the quantized model (QuaRot and OSTQuant must both be far closer to FP than
    RTN / GPTQ on held-out tokens at W4A4 with outlier channels). OSTQuant vs QuaRot is NOT asserted: on this tiny model
    their KL differs by less than the seed spread (seeds 0/1/2: OSTQuant 0.055 / 0.064 / 0.059, QuaRot 0.067 / 0.061 /
    0.063), so such a test could not tell a working trainer from a broken one; the trainer's effect is tested on
    held-out tokens in test_training_reduces_kl_top_keeps_rotations_orthogonal_and_fuses_exactly."""
    fp = outlier_llama()
    x = ids(4)
    ref = logits(fp, x)
    calib = ids(16, seed=2)
    common = dict(bits=4, group_size=None, act_bits=4, act_sym=False)
    configs = {
        "rtn": hfq.RTNConfig(**common),
        "gptq": hfq.GPTQConfig(**common, act_order=False, n_samples=16, seq_len=32),
        "quarot": hfq.OSTQuantConfig(act_bits=4, learn=False, n_samples=16, seq_len=32),
        "ostquant": hfq.OSTQuantConfig(act_bits=4, n_samples=16, seq_len=32, train_steps=60, train_batch_size=4,
                                       kl_top_k=64, lr_rotation=0.05, lr_scaling=0.005),
    }
    err = {}
    for name, cfg in configs.items():
        model = hfq.quantize(copy.deepcopy(fp), cfg, calibration=None if name == "rtn" else calib)
        err[name] = kl_top_loss(logits(model, x), ref, 256).item()
    print("W4A4 KL to FP:", {k: round(v, 4) for k, v in err.items()})
    assert err["quarot"] < 0.7 * min(err["rtn"], err["gptq"]), err
    assert err["ostquant"] < 0.7 * min(err["rtn"], err["gptq"]), err


# ---------------------------------------------------------------------------------------------- save / reload
@pytest.mark.parametrize("arch,weight_method", [("llama", "gptq"), ("qwen2", "rtn")])
def test_on_load_save_reload_exact_with_online_rotations(arch, weight_method, tmp_path):
    """Catches quantize-on-load that forgets an online piece (without R4 the logits' relative error doubles: measured
    0.12 -> 0.24 on llama, 0.11 -> 0.25 on qwen2), lm_head left tied to a rotated embedding, and a reload that is not
    bit-exact or does not restore R3 / R4 / the KV quantizer."""
    fp = build_tiny(arch)
    if arch == "qwen2":  # tied embeddings + a non-uniform final norm: lm_head must be untied for the transforms
        fp.model.norm.weight.data = torch.rand(64, generator=torch.Generator().manual_seed(0)) + 0.5
    fp.save_pretrained(tmp_path / "fp")
    cfg = hfq.OSTQuantConfig(act_bits=8, dataset=ids(8, 16, seed=3).tolist(), n_samples=8, seq_len=16,
                             train_steps=3, train_batch_size=4, kl_top_k=32, online_qk=True,
                             weight_solver={"quant_method": f"hfq_{weight_method}"}, train_weight_quant=arch == "llama",
                             kv_bits=4 if arch == "llama" else None)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=cfg)
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    assert set(model.config.hfq_online_rotations) == {"down_proj", "qk"} | ({"kv"} if arch == "llama" else set())
    assert model.config.tie_word_embeddings is False if arch == "qwen2" else True
    assert model.model.layers[0].mlp.down_proj.online_rotation is not None
    x = ids(2, 12)
    out, ref = logits(model, x), logits(fp, x)
    assert ((out - ref).norm() / ref.norm()).item() < 0.16
    model.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert again.config.quantization_config.quant_method == "hfq_ostquant"
    assert again.config._attn_implementation.startswith("hfq_qk_rotated_")
    assert torch.equal(logits(again, x), out)
    assert (again.model.layers[1].self_attn.kv_quant is not None) == (arch == "llama")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        packed = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert packed.dtype == torch.uint8 and packed.dim() == 3  # integers and scales, no float weights
    assert "model.layers.0.self_attn.q_proj.weight_scale" in keys


def test_kv_quantizer_sees_k_after_rope_and_r3_and_v_per_head(monkeypatch):
    """What attention reads: K after RoPE and R3, V, each fake-quantized per token and head; cached decoding
    matches the full forward (re-quantizing cached K/V is idempotent)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from hfq.quant import fake_quantize
    from hfq.transforms import fuse_transforms_, set_kv_quant
    from hfq.transforms.online import kv_quant_args

    model = outlier_llama()
    r1 = init_transforms(model, "hadamard", 0)[0]
    fuse_transforms_(model, r1, [None] * len(model.model.layers), online_down=True, online_qk=True)
    x = ids(2, 12)
    fp = logits(model, x)
    args = kv_quant_args(4)
    set_kv_quant(model, args)
    seen, values = {}, {}
    base = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def spy(module, query, key, value, *a, **kw):
        seen.setdefault(id(module), (key, value))
        return base(module, query, key, value, *a, **kw)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", spy)
    attn = model.model.layers[0].self_attn
    h = attn.v_proj.register_forward_hook(lambda m, i, o: values.setdefault("v", o))
    out = logits(model, x)
    h.remove()
    key, value = seen[id(attn)]
    hd = attn.head_dim
    v_ref = values["v"].view(2, 12, -1, hd).transpose(1, 2)
    assert torch.equal(value, fake_quantize(v_ref, args))
    assert max(len(row.unique()) for row in key.reshape(-1, hd)) <= 16  # 4-bit levels per (token, head)
    assert 0 < (out - fp).abs().max() < 5
    # the KV spec travels with the config; removing it restores the float attention exactly
    assert model.config.hfq_online_rotations["kv"]["bits"] == 4
    with torch.no_grad():
        full = model(x).logits[:, -1]
        past = model(x[:, :-1], use_cache=True).past_key_values
        step = model(x[:, -1:], past_key_values=past, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)
    set_kv_quant(model, None)
    assert "kv" not in model.config.hfq_online_rotations and attn.kv_quant is None
    assert torch.equal(logits(model, x), fp)
