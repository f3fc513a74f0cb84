"""Every architecture hfq has an adapter for (README's list) quantizes, saves and reloads exactly."""
import pytest
import torch
from transformers import AutoModelForCausalLM

import hfq
from hfq.arch import ADAPTERS
from hfq.nn import QuantExperts, QuantLinear
from conftest import TINY_CONFIGS, build_tiny

LLM_TYPES = sorted(t for t in ADAPTERS if not t.startswith("hfq_"))  # hfq_* are custom-code models, tested in their own files
MOE = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"}


def test_every_adapter_has_a_tiny_model():
    """Catches an architecture added to the adapters (and so to README's list) without a test model."""
    missing = [t for t in LLM_TYPES if t not in TINY_CONFIGS]
    assert not missing, missing


@pytest.mark.parametrize("arch", LLM_TYPES)
def test_gptq_quantizes_saves_and_reloads_every_listed_architecture(arch, tmp_path):
    """Catches a listed architecture that GPTQ cannot run (block outputs, expert calls), whose layers stay float,
    whose kept-float layers (adapter.float_only: keep_float where it applies to the config) get quantized, or whose
    checkpoint does not reload bit-exactly.
    MoE models run the routing-affinity path (expert_affinity=True, AGQ) and must pack their experts."""
    model = build_tiny(arch)
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    cfg = hfq.GPTQConfig(bits=4, group_size=32, n_samples=4, seq_len=32, expert_affinity=arch in MOE)
    hfq.quantize(model, cfg, calibration=calib)
    kinds = {type(m) for m in model.modules()}
    assert QuantLinear in kinds
    assert (QuantExperts in kinds) == (arch in MOE)
    keep = ADAPTERS[arch].float_only(model)
    kept = [n for n, m in model.named_modules() if any(n.endswith(k) for k in keep)]
    assert all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in kept) and (kept or not keep)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)


def test_rwkv_rescaled_layers_stay_float_only_when_rescaled():
    """Catches RWKV-4's output / value layers quantized while eval-mode `_rescale_layers` divides their weights in
    place (rescale_every > 0: the packed integers would be lost), or kept float needlessly when it never runs."""
    from hfq.integration import quantization_targets

    for every, expect in ((6, False), (0, True)):
        model = build_tiny("rwkv")
        model.config.rescale_every = every
        names = quantization_targets(model, hfq.RTNConfig(group_size=None))
        assert any(n.endswith("attention.output") for n in names) == expect
