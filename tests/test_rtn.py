"""Quantize-on-load, save, reload on tiny models of every supported family, and the refusals."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hfq
from hfq.nn import QuantExperts, QuantLinear
from hfq.quant import fake_quantize

from conftest import build_tiny

ARCHS = ["llama", "qwen2", "gemma3", "mixtral", "qwen2_moe", "mamba"]


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_quantize_on_load_save_reload_is_exact(arch, tiny_fp_dir, ids, tmp_path):
    cfg = hfq.RTNConfig(bits=4, group_size=32)
    model = AutoModelForCausalLM.from_pretrained(tiny_fp_dir(arch), quantization_config=cfg)
    kinds = {type(m) for m in model.modules()}
    assert QuantLinear in kinds
    assert (QuantExperts in kinds) == (arch in ("mixtral", "qwen2_moe"))
    assert not isinstance(model.get_output_embeddings(), QuantLinear)  # lm_head stays float by default
    if arch == "mamba":
        assert all(not isinstance(layer.mixer.dt_proj, QuantLinear) for layer in model.backbone.layers)
    before = _logits(model, ids)

    # the same as quantizing the already loaded full-precision model
    manual = hfq.quantize(build_tiny(arch), hfq.RTNConfig(bits=4, group_size=32))
    assert torch.equal(_logits(manual, ids), before)

    model.save_pretrained(tmp_path / "q")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    packed = [k for k in dtypes if k.endswith("proj.weight") and "dt_proj" not in k]
    assert packed and all(dtypes[k] == "U8" for k in packed)  # integers, no float copies
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "hfq_rtn" and saved["group_size"] == 32

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert reloaded.hf_quantizer.pre_quantized
    assert torch.equal(_logits(reloaded, ids), before)


def test_quantized_linear_equals_fake_quant_of_fp_weight(tiny_fp_dir, ids):
    fp = AutoModelForCausalLM.from_pretrained(tiny_fp_dir("llama"))
    q = AutoModelForCausalLM.from_pretrained(tiny_fp_dir("llama"), quantization_config=hfq.RTNConfig(bits=3, group_size=16))
    layer = q.model.layers[1].mlp.down_proj
    expected = fake_quantize(fp.model.layers[1].mlp.down_proj.weight, layer.weight_args)
    assert torch.equal(layer.dequantized_weight(), expected)


def test_w8a8_uses_integer_kernel_and_matches_reference(tiny_fp_dir, ids, tmp_path):
    cfg = hfq.RTNConfig(bits=8, group_size=None, act_bits=8)
    fast = AutoModelForCausalLM.from_pretrained(tiny_fp_dir("llama"), quantization_config=cfg)
    assert fast.model.layers[0].self_attn.q_proj.kernel_for(ids.numel()) == "int_mm"
    ref = AutoModelForCausalLM.from_pretrained(tiny_fp_dir("llama"),
                                               quantization_config=hfq.RTNConfig(bits=8, group_size=None, act_bits=8,
                                                                                 kernel="reference"))
    assert torch.allclose(_logits(fast, ids), _logits(ref, ids), atol=1e-4)
    fast.save_pretrained(tmp_path)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path), ids), _logits(fast, ids))


def test_asymmetric_and_modules_to_not_convert(tiny_fp_dir, ids, tmp_path):
    cfg = hfq.RTNConfig(bits=4, group_size=32, sym=False, modules_to_not_convert=["model.layers.0", "o_proj"])
    model = AutoModelForCausalLM.from_pretrained(tiny_fp_dir("llama"), quantization_config=cfg)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert type(model.model.layers[1].self_attn.o_proj) is torch.nn.Linear
    assert isinstance(model.model.layers[1].self_attn.q_proj, QuantLinear)
    assert model.model.layers[1].self_attn.q_proj.weight_zero.dtype == torch.uint8
    model.save_pretrained(tmp_path)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path), ids), _logits(model, ids))


def test_lm_head_is_quantized_untied_or_tied(tiny_fp_dir, ids, tmp_path):
    """Catches a tied lm_head quantized from anything but the embedding's weights (the old advice, loading with
    tie_word_embeddings=False, gave transformers' random init for the missing lm_head.weight), an embedding changed
    by quantizing its tied head, and a reload that ties them again."""
    model = AutoModelForCausalLM.from_pretrained(tiny_fp_dir("llama"),
                                                 quantization_config=hfq.RTNConfig(group_size=32, quantize_lm_head=True))
    assert isinstance(model.lm_head, QuantLinear)
    model.save_pretrained(tmp_path)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path), ids), _logits(model, ids))
    fp = AutoModelForCausalLM.from_pretrained(tiny_fp_dir("qwen2"))
    assert fp.lm_head.weight is fp.model.embed_tokens.weight
    cfg = hfq.RTNConfig(group_size=32, quantize_lm_head=True)
    tied = AutoModelForCausalLM.from_pretrained(tiny_fp_dir("qwen2"), quantization_config=cfg)
    assert isinstance(tied.lm_head, QuantLinear) and not tied.config.tie_word_embeddings
    assert torch.equal(tied.model.embed_tokens.weight, fp.model.embed_tokens.weight)
    assert torch.equal(tied.lm_head.dequantized_weight(), fake_quantize(fp.lm_head.weight, tied.lm_head.weight_args))
    tied.save_pretrained(tmp_path / "tied")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "tied")
    assert isinstance(back.lm_head, QuantLinear)
    assert torch.equal(_logits(back, ids), _logits(tied, ids))


def test_tied_embeddings_stay_tied(tiny_fp_dir, ids, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_fp_dir("qwen2"), quantization_config=hfq.RTNConfig(group_size=32))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight


def test_config_dict_round_trip():
    cfg = hfq.RTNConfig(bits=3, group_size=16, sym=False, act_bits=8, modules_to_not_convert=["lm_head"])
    d = cfg.to_dict()
    assert d["quant_method"] == "hfq_rtn"
    again = hfq.RTNConfig.from_dict(d)
    assert again.to_dict() == d
    assert hfq.config_from_dict(json.loads(json.dumps(d))).to_dict() == d


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(bits=1), ValueError, "bits must be an integer from 2 to 8"),
    (dict(bits=16), ValueError, "bits must be an integer from 2 to 8"),
    (dict(group_size=0), ValueError, "group_size"),
    (dict(kernel="cuda"), ValueError, "kernel must be one of"),
    (dict(act_bits=8, act_granularity="channel"), ValueError, "act_granularity"),
    (dict(bitz=4), TypeError, "unknown fields"),
])
def test_config_validation(kwargs, err, match):
    with pytest.raises(err, match=match):
        hfq.RTNConfig(**kwargs)


def test_group_size_that_does_not_divide_names_layer_and_sizes(tiny_fp_dir):
    with pytest.raises(ValueError, match=r"group_size 48 does not divide the input size 64 of layer "
                                         r"'model.layers.0.self_attn.q_proj'.*\[8, 16, 32, 64\]"):
        AutoModelForCausalLM.from_pretrained(tiny_fp_dir("llama"), quantization_config=hfq.RTNConfig(group_size=48))


def test_whole_model_on_disk_quantizes_block_by_block(tiny_fp_dir):
    """Catches RTN reading meta weights (or refusing) when every module, embeddings included, is offloaded to disk
    with no offload_folder given: the packed blocks go to a temporary folder and the logits equal the in-memory
    result. (tests/test_offload.py covers GPTQ, saving and the methods that refuse offloading.)"""
    ref = AutoModelForCausalLM.from_pretrained(tiny_fp_dir("llama"), quantization_config=hfq.RTNConfig(group_size=32))
    model = AutoModelForCausalLM.from_pretrained(tiny_fp_dir("llama"), quantization_config=hfq.RTNConfig(group_size=32),
                                                 device_map={"": "disk"})
    assert all(p.device.type == "meta" for p in model.model.layers.parameters())
    x = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)


def test_unsupported_architecture_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel
    with pytest.raises(NotImplementedError, match="architecture 'gpt2' is not supported"):
        hfq.quantize(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2)), hfq.RTNConfig(group_size=32))


def test_quantizing_twice_is_refused(tiny_fp_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_fp_dir("llama"), quantization_config=hfq.RTNConfig(group_size=32))
    with pytest.raises(ValueError, match="already quantized"):
        hfq.quantize(model, hfq.RTNConfig())


def test_unknown_hfq_method_in_checkpoint_is_refused(tiny_fp_dir, tmp_path):
    AutoModelForCausalLM.from_pretrained(tiny_fp_dir("llama"),
                                         quantization_config=hfq.RTNConfig(group_size=32)).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "hfq_from_the_future"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'hfq_from_the_future', which this hfq version does not know"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_checkpoint_missing_packed_tensor_is_refused(tiny_fp_dir, tmp_path):
    AutoModelForCausalLM.from_pretrained(tiny_fp_dir("llama"),
                                         quantization_config=hfq.RTNConfig(group_size=32)).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="corrupted or incomplete hfq checkpoint.*mlp.up_proj.weight"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_checkpoint_with_wrong_packed_shape_is_refused(tiny_fp_dir, tmp_path):
    """Catches a truncated packed tensor being loaded (or refused with an error that does not say which tensor)."""
    AutoModelForCausalLM.from_pretrained(tiny_fp_dir("llama"),
                                         quantization_config=hfq.RTNConfig(group_size=32)).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:, :2].contiguous()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"tensor 'model.layers.1.mlp.up_proj.weight' has shape \(128, 2, 4\).*needs "
                                         r"\(128, 8, 4\)"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


SCHEMES = {
    "model.layers.0.mlp.down_proj": {"weight": {"bits": 8, "granularity": "channel", "group_size": None}},
    "model.layers.1.self_attn.q_proj": {"weight": {"bits": 3, "symmetric": False}},
    "model.layers.1.mlp.up_proj": {"act": {"bits": 8}},
}


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_mixed_per_module_schemes_are_saved_and_reload_exactly(method, tiny_fp_dir, tmp_path, ids):
    """Catches a checkpoint whose layers differ (per-layer bits, granularity, activation quantizers) being rebuilt on
    load from the config's default scheme alone: the skeleton would not fit the stored tensors (or would run the
    wrong activation quantizer)."""
    common = dict(bits=4, group_size=32, module_schemes=SCHEMES)
    cfg = hfq.RTNConfig(**common) if method == "rtn" else hfq.GPTQConfig(**common, dataset=ids.tolist(), n_samples=2,
                                                                         seq_len=12)
    model = AutoModelForCausalLM.from_pretrained(tiny_fp_dir("llama"), quantization_config=cfg)
    layers = model.model.layers
    down = layers[0].mlp.down_proj.weight_args
    assert down.bits == 8 and down.granularity == "channel"
    assert layers[1].self_attn.q_proj.weight_args.bits == 3 and layers[1].self_attn.q_proj.weight_zero is not None
    assert layers[1].mlp.up_proj.act_args.bits == 8 and layers[1].mlp.gate_proj.act_args is None
    assert layers[1].self_attn.k_proj.weight_args.bits == 4
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.config.quantization_config.module_schemes == SCHEMES
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    with pytest.raises(ValueError, match="module_schemes.*bits"):
        hfq.RTNConfig(module_schemes={"model.layers.0.mlp.up_proj": {"weight": {"bits": 1}}})


def test_static_activations_need_a_calibrating_method():
    """Catches a non-calibrating method accepting static activation args (directly or per module): its static scales
    would never be calibrated, and the model would fail only at its first forward."""
    with pytest.raises(ValueError, match="does not calibrate static activation scales"):
        hfq.RTNConfig(act_bits=8, module_schemes={"model.layers.0.mlp.up_proj": {"act": {"dynamic": False,
                                                                                         "granularity": "tensor"}}})
    cfg = hfq.PTQConfig(module_schemes={"model.layers.0.mlp.up_proj": {"act": {"observer": "percentile"}}})
    assert cfg.scheme_for("model.layers.0.mlp.up_proj")[1].dynamic is False


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_packed_lm_head_of_mamba_models_sees_float_inputs(arch, tmp_path):
    """Catches transformers' Mamba CausalLM casting the lm_head input to `lm_head.weight.dtype` — uint8 once packed —
    which silently turned the logits into garbage (no error) for any method with quantize_lm_head=True: W8 logits
    must stay close to the float model's, also after save -> reload."""
    from conftest import TINY_CONFIGS

    cfg = TINY_CONFIGS[arch]()
    cfg.tie_word_embeddings = False
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    x = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x).logits
    hfq.quantize(model, hfq.RTNConfig(bits=8, group_size=None, quantize_lm_head=True))
    with torch.no_grad():
        out = model(x).logits
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path)(x).logits, out)
