"""A saved hfq checkpoint must never load into random weights: not in a process that never imported hfq, and not
when part of what it needs (packed tensors, the online-rotation spec) is missing."""
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfq
from conftest import build_tiny


def _ids(n, seq, seed=0):
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


CASES = {
    "rtn-w8": lambda: ("llama", hfq.RTNConfig(bits=8, group_size=None)),
    "rtn-w4": lambda: ("llama", hfq.RTNConfig(bits=4, group_size=32)),
    "rtn-w3-asym": lambda: ("llama", hfq.RTNConfig(bits=3, group_size=None, sym=False)),
    "rtn-moe-experts": lambda: ("mixtral", hfq.RTNConfig(bits=8, group_size=None)),
    "gptq-w4": lambda: ("llama", hfq.GPTQConfig(bits=4, group_size=32, n_samples=4, seq_len=16)),
    "ostquant-w4a4kv4": lambda: ("llama", hfq.OSTQuantConfig(act_bits=4, kv_bits=4, online_qk=True, learn=False,
                                                             n_samples=4, seq_len=16)),
}

_LOAD_WITHOUT_HFQ = """
import sys
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained(sys.argv[1])
except Exception as e:
    print("REFUSED", type(e).__name__, str(e))
    sys.exit(0)
assert "hfq" not in sys.modules
print("LOADED")
"""


@pytest.mark.parametrize("case", sorted(CASES))
def test_checkpoint_is_refused_by_a_process_without_hfq(case, tmp_path):
    """Catches packed tensors stored under names or shapes a float model accepts (e.g. `qweight` next to a missing
    `weight`, or 8-bit integers of the float weight's shape): transformers then only prints a load report and
    returns re-initialised linears. Every method and bit width must be refused instead."""
    arch, cfg = CASES[case]()
    model = hfq.quantize(build_tiny(arch), cfg, calibration=_ids(4, 16) if case.startswith(("gptq", "ost")) else None)
    model.save_pretrained(tmp_path)
    out = subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_HFQ, str(tmp_path)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("REFUSED"), out.stdout[-500:]
    assert "ignore_mismatched_sizes" in out.stdout  # transformers' size check, not some unrelated failure
    assert f"'{cfg.quant_method}'" in out.stderr or cfg.quant_method in out.stderr  # its warning names the method


@pytest.mark.parametrize("missing", ["down_proj", "qk", "kv"])
def test_ostquant_checkpoint_without_its_online_spec_is_refused(missing, tmp_path):
    """Catches an OSTQuant checkpoint silently running without R4 / R3 / its KV quantizer when
    config.hfq_online_rotations lost an entry (hand-edited config, a tool that drops unknown keys)."""
    cfg = hfq.OSTQuantConfig(act_bits=4, kv_bits=4, online_qk=True, learn=False, n_samples=4, seq_len=16)
    hfq.quantize(build_tiny("llama"), cfg, calibration=_ids(4, 16)).save_pretrained(tmp_path)
    AutoModelForCausalLM.from_pretrained(tmp_path)  # intact: loads
    config = json.loads((tmp_path / "config.json").read_text())
    del config["hfq_online_rotations"][missing]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"online pieces \\[.{missing}.\\].*hfq_online_rotations"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


_LOAD_PETR_WITHOUT_HFQ = """
import sys
sys.modules["hfq"] = None  # as if hfq were not installed: `import hfq` raises ImportError
from transformers import AutoModel
try:
    AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)
except Exception as e:
    print("REFUSED", type(e).__name__, str(e))
    sys.exit(0)
print("LOADED")
"""


def test_quantized_petr_is_refused_without_hfq(tmp_path):
    """Catches a quantized custom-code PETR loading without hfq: transformers would only warn about the unknown
    quant_method and build float modules; the shipped config must refuse with the fix (install hfq)."""
    import os

    from hfq.modeling.petr import PetrConfig, PetrForObjectDetection3D

    torch.manual_seed(0)
    cfg = PetrConfig(backbone_type="simple", simple_channels=[8, 16], neck_channels=16, embed_dims=16, num_queries=8,
                     num_decoder_layers=1, num_heads=2, ffn_dims=32, depth_num=4, dropout=0.0, input_size=(32, 64))
    model = PetrForObjectDetection3D(cfg).eval()
    batch = {"pixel_values": torch.randn(1, 2, 3, 32, 64), "lidar2img": torch.eye(4).repeat(1, 2, 1, 1) * 20}
    batch["lidar2img"][..., 3, 3] = 1
    hfq.quantize(model, hfq.PTQConfig(), calibration=[batch]).save_pretrained(tmp_path)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", _LOAD_PETR_WITHOUT_HFQ, str(tmp_path)], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("REFUSED ImportError"), out.stdout[-500:]
    assert "hfq_ptq" in out.stdout and "install hfq" in out.stdout
