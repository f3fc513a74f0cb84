"""I-LLM: FSBR (smoothing at six pairs + learnable clipping, block reconstruction) and the integer-only forward."""
import pytest
import torch
from conftest import build_tiny
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import AutoModelForCausalLM

import hfq
from hfq.integer.llama import is_integer, to_float, to_integer
from hfq.integer.ops import IntTensor
from hfq.transforms import LayerTransform, fuse_transforms_

CALIB = [torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(i)) for i in range(4)]


def _illm(model, **kw):
    cfg = dict(bits=8, act_bits=8, epochs=1, n_samples=4, seq_len=32, batch_size=2)
    return hfq.quantize(model, hfq.ILLMConfig(**{**cfg, **kw}), calibration=CALIB)


def _peaked_llama():
    """The tiny Llama with q / k weights scaled up, so attention is peaked and position-dependent (at init it is
    nearly uniform, which would hide RoPE, mask or softmax errors)."""
    model = build_tiny("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    return model


@pytest.fixture(scope="module")
def int_model():
    return _illm(_peaked_llama()).eval()


def test_six_smoothing_pairs_fuse_exactly():
    """Catches a smoothing pair whose fusion is not an equivalence (e.g. the gate <-> up pair scaling the rows without
    the ScaledSiLU that makes the sigmoid read gate / s, q <-> k scales not tied over RoPE pairs, v -> o not repeated
    over the GQA group): random positive scales at all six pairs leave the float logits unchanged."""
    model = build_tiny("llama")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    g = torch.Generator().manual_seed(1)
    r = lambda *shape: torch.rand(*shape, generator=g).double() * 3 + 0.2  # noqa: E731
    layers = [LayerTransform(s_attn_in=r(64), s_mlp_in=r(64), s_qk=r(2, 8), s_ov=r(2, 16), s_gate_up=r(128),
                             s_up_down=r(128)) for _ in range(2)]
    fuse_transforms_(model, None, layers)
    assert type(model.model.layers[0].mlp.act_fn).__name__ == "ScaledSiLU"
    with torch.no_grad():
        out = model(ids).logits
    assert (out - ref).abs().max() < 1e-4 * ref.abs().max()


def test_fsbr_learns_and_the_fused_block_is_the_trained_student():
    """Catches FSBR that does not learn (loss not decreasing), or a fusion that differs from what was trained (the
    quantized block after `fuse_and_quantize` must compute what the student computed with the same scales, clipping
    and activation quantization)."""
    from hfq.calibration.runner import capture_inputs
    from hfq.quantizers.illm.fsbr import FSBRTrainer, channel_maxima, init_scales
    from hfq.transforms import transform_layout

    model = build_tiny("llama")
    model.model.layers[0].mlp.act_fn = hfq.nn.ScaledSiLU(128)
    inputs, _ = capture_inputs(model, torch.stack(CALIB), batch_size=2)
    block, layout = model.model.layers[0], transform_layout(model)
    with torch.no_grad():
        targets = [inputs.call(block, k) for k in range(len(inputs))]
    cfg = hfq.ILLMConfig(bits=4, act_bits=8)
    init = init_scales(block, layout, 4, 2, channel_maxima(block, layout, inputs), 0.5, tuple(cfg.smooth_pairs))
    trainer = FSBRTrainer(block, layout, 4, 2, init, inputs, cfg.weight_args(), cfg.act_args(), lwc=True, steps=30,
                          let_lr=5e-3, lwc_lr=1e-2)
    losses = [trainer.step(k % len(inputs), teacher=targets[k % len(inputs)]) for k in range(30)]
    assert sum(losses[-4:]) < sum(losses[:4])
    with torch.no_grad():
        student = trainer.outputs(0, True)
    trainer.close()
    trainer.fuse_and_quantize(kernel="reference")
    assert isinstance(block.self_attn.q_proj, hfq.nn.QuantLinear)
    with torch.no_grad():
        fused = inputs.call(block, 0)
    assert (fused - student).abs().max() < 1e-4 * student.abs().max()


def _no_floats(tree, where):
    bad = [t.dtype for t in tree_leaves(tree) if torch.is_tensor(t) and t.is_floating_point()]
    assert not bad, f"{where}: floating-point tensors {bad}"


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.inside, self.float_ops, self.ops = False, [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.inside:
            self.ops += 1
            if any(t.is_floating_point() for t in tree_leaves(out) if torch.is_tensor(t)):
                self.float_ops.append(str(func))
        return out


def test_integer_forward_has_no_float_tensor_between_embedding_and_logits(int_model):
    """Catches any floating-point step in the integer-only forward (a float scale, a float RoPE table, a float
    softmax, ...): every aten op from the first decoder layer's input to lm_head's output returns integer (or bool)
    tensors, and every module called in between takes and returns integers only."""
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(3))
    rec, handles = _Recorder(), []
    first, head = int_model.model.layers[0], int_model.lm_head
    handles.append(first.register_forward_pre_hook(lambda m, a, kw: setattr(rec, "inside", True), with_kwargs=True))
    handles.append(head.register_forward_hook(lambda m, a, o: setattr(rec, "inside", False)))
    called = []
    for name, module in int_model.named_modules():
        if name.startswith(("model.layers", "model.norm", "lm_head")):
            def check(m, args, kwargs, out, name=name):
                called.append(name)
                _no_floats((args, kwargs, out), name)
            handles.append(module.register_forward_hook(check, with_kwargs=True))
    try:
        with torch.no_grad(), rec:
            logits = int_model(ids).logits
    finally:
        for h in handles:
            h.remove()
    assert logits.is_floating_point() and rec.ops > 100 and not rec.float_ops, rec.float_ops[:5]
    assert {"model.layers.0", "model.layers.1", "model.norm", "lm_head"} <= set(called)


def test_integer_forward_matches_its_fake_quant_float_model(int_model):
    """Catches an integer operator or scale bookkeeping error (RoPE tables, mask, softmax, norm, SwiGLU, residual
    adds) by comparing with the same checkpoint's float forward, whose linear inputs are fake-quantized at the same
    bits: each layer's output within 3% (relative L2; measured 1.0%, 1.5% and 1.7% for the two layers and the logits of this
    model at W8A8)."""
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(4))

    def layer_outputs():
        outs = []
        hooks = [layer.register_forward_hook(lambda m, a, o: outs.append(o.dequantize() if isinstance(o, IntTensor)
                                                                         else o[0] if isinstance(o, tuple) else o))
                 for layer in int_model.model.layers]
        try:
            with torch.no_grad():
                outs.append(int_model(ids).logits)
        finally:
            for h in hooks:
                h.remove()
        return outs

    got = layer_outputs()
    to_float(int_model)
    try:
        ref = layer_outputs()
    finally:
        to_integer(int_model)
    errors = [((g.float() - r.float()).norm() / r.float().norm()).item() for g, r in zip(got, ref)]
    assert max(errors) < 0.03


def test_cached_decode_equals_the_full_forward_and_the_cache_holds_integers(int_model):
    """Catches a KV cache that stores floats or loses the per-token scales, positions or masks that differ between
    prefill and decode: every op is per token, so decoding token by token gives exactly the full forward's logits;
    `generate` runs on it."""
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = int_model(ids).logits
        out = int_model(ids[:, :8], use_cache=True)
        cache = out.cache
        step = [out.logits]
        for t in range(8, 12):
            out = int_model(ids[:, t:t + 1], cache=cache, use_cache=True)
            cache = out.cache
            step.append(out.logits)
    assert cache.layers[0].keys.dtype == torch.int16 and cache.layers[0].values.dtype == torch.int16
    assert torch.equal(torch.cat(step, 1), full)
    gen = int_model.generate(ids[:, :5], max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 9)


def test_save_reload_gives_identical_integer_outputs(int_model, tmp_path):
    """Catches a checkpoint that loses FSBR's state (fused norms, ScaledSiLU scales, packed integers), reloads into
    the float forward instead of the integer one, or loads random weights: the reloaded model is integer-only and
    its logits are bit-identical."""
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = int_model(ids).logits
    int_model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert is_integer(back) and type(back.model.layers[0].mlp.act_fn).__name__ == "ScaledSiLU"
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ref)


def test_reload_refuses_a_checkpoint_without_its_swiglu_scales(int_model, tmp_path):
    """Catches a missing ScaledSiLU scale loading silently (the skeleton's NaN / ones would change the model)."""
    from safetensors.torch import load_file, save_file

    int_model.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.act_fn.scale"]
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_quantize_on_load_unties_a_tied_output_embedding(tiny_fp_dir, tmp_path):
    """Catches quantize-on-load of a tied model failing (the output embedding must be quantized for integer-only
    inference) or quantizing the shared input embedding with it: lm_head becomes packed, the embedding stays float,
    and config.json says untied so the reload finds both."""
    model = build_tiny("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(tmp_path / "fp")
    q = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=hfq.ILLMConfig(
        bits=8, act_bits=8, epochs=0, n_samples=4, seq_len=32, batch_size=2, dataset=[c.tolist() for c in CALIB]))
    assert isinstance(q.lm_head, hfq.nn.QuantLinear) and q.model.embed_tokens.weight.is_floating_point()
    assert q.config.tie_word_embeddings is False and is_integer(q)


def test_config_presets_and_refusals():
    """Catches presets with the wrong bits, a config that accepts what the integer path cannot run (groups,
    asymmetric activations, no activation quantization, unknown pairs), and a lossy round trip."""
    c = hfq.ILLMConfig.preset("w4a8", epochs=2)
    assert (c.bits, c.act_bits, c.epochs) == (4, 8, 2)
    assert hfq.ILLMConfig.from_dict(c.to_dict()).to_dict() == c.to_dict()
    for bad, match in ((dict(group_size=64), "per output channel"), (dict(act_sym=False), "symmetric"),
                       (dict(act_bits=None), "activations"), (dict(smooth_pairs=["qk", "kv"]), "unknown"),
                       (dict(quantize_lm_head=False), "output embedding")):
        with pytest.raises(ValueError, match=match):
            hfq.ILLMConfig(**bad)
    with pytest.raises(ValueError, match="preset"):
        hfq.ILLMConfig.preset("w3a3")


def test_integer_path_refuses_what_it_cannot_run():
    """Catches to_integer silently running a model it does not implement: biased projections (Qwen2), float
    linears left in the model."""
    model = _illm(build_tiny("qwen2"), integer_only=False)
    with pytest.raises(NotImplementedError, match="bias"):
        to_integer(model)
    float_model = build_tiny("llama")
    with pytest.raises(ValueError, match="every linear"):
        to_integer(float_model)


def test_int_tensor_is_a_namedtuple_of_integers(int_model):
    """Catches the final norm handing lm_head anything but an IntTensor of integers (the hook test above sees only
    module boundaries that are called)."""
    seen = []
    h = int_model.lm_head.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        with torch.no_grad():
            int_model(torch.randint(0, 256, (1, 6)))
    finally:
        h.remove()
    assert isinstance(seen[0], IntTensor) and not seen[0].q.is_floating_point()
