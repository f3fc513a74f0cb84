"""hfq.PTQConfig on a language model: static activation scales from text calibration, saved and reloaded."""
import pytest
import torch
from transformers import AutoModelForCausalLM

import hfq
from hfq.nn import QuantLinear
from conftest import build_tiny


def test_static_w8a8_llm_saves_and_reloads_exactly(tmp_path):
    """Catches static activation scales that are not saved (or not rebuilt by the load skeleton), a reloaded model
    that recalibrates or runs dynamic scales, and the int_mm kernel ignoring the stored scale."""
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    model = build_tiny("llama")
    cfg = hfq.PTQConfig(weight_granularity="channel", batch_size=2)
    q = hfq.quantize(model, cfg, calibration=ids)
    lin = q.model.layers[0].self_attn.q_proj
    assert isinstance(lin, QuantLinear) and lin.kernel_for(64) == "int_mm" and lin.input_quant.static
    x = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = q(x).logits
    q.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    lin2 = back.model.layers[0].self_attn.q_proj
    assert torch.equal(lin2.input_quant.scale, lin.input_quant.scale)
    with torch.no_grad():
        assert torch.equal(back(x).logits, ref)
    with pytest.raises(ValueError, match="weight samples"):
        hfq.quantize(build_tiny("llama"), cfg, calibration=ids, sample_weights=torch.ones(4))
