"""Exporting hfq checkpoints to formats other tools load without hfq (`hfq export`)."""
import json
import subprocess
import sys

import pytest
import torch
from conftest import build_tiny
from transformers import AutoModelForCausalLM

import hfq
from hfq.cli import main as cli
from hfq.export import ExportError, export_compressed_tensors, export_gguf

CALIB = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1)).tolist()
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
CONFIGS = {
    "rtn_w4_g32": lambda: hfq.RTNConfig(bits=4, group_size=32),
    "gptq_w3_channel_actorder": lambda: hfq.GPTQConfig(bits=3, group_size=None, act_order=True, n_samples=4,
                                                       seq_len=32, dataset=CALIB),
    "gptq_w4_g32_actorder": lambda: hfq.GPTQConfig(bits=4, group_size=32, act_order=True, n_samples=4, seq_len=32,
                                                   dataset=CALIB),
    "quarot_w4_fused_only": lambda: hfq.OSTQuantConfig(bits=4, learn=False, online_down=False, n_samples=2, seq_len=16,
                                                       dataset=CALIB, weight_solver=hfq.RTNConfig()),
    "moequant_w4_g32_mixtral": lambda: hfq.MoEQuantConfig(bits=4, group_size=32, ebss=False, rotate=True,
                                                          n_samples=4, seq_len=32, dataset=CALIB),
    "gptq_w4_qwen3_moe": lambda: hfq.GPTQConfig(bits=4, group_size=32, n_samples=4, seq_len=32, dataset=CALIB,
                                                expert_affinity=True),
    "rtn_w8": lambda: hfq.RTNConfig(bits=8, group_size=None),
    "rtn_w8a8": lambda: hfq.RTNConfig(bits=8, group_size=None, act_bits=8),
}

# run in a fresh interpreter where `import hfq` fails: the folders must load through transformers alone
NO_HFQ = """
import json, sys, torch
sys.modules["hfq"] = None
from transformers import AutoModelForCausalLM
out = {}
for name, folder in json.loads(sys.argv[1]).items():
    m = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        out[name] = {"logits": m(torch.load(sys.argv[2])).logits,
                     "weights": {n: p.weight.detach().clone() for n, p in m.named_modules()
                                 if type(p).__name__ == "Linear" and n.startswith("model.layers.0.")},
                     "experts": {n: v.detach().clone() for n, v in m.named_parameters()
                                 if n.endswith(("experts.gate_up_proj", "experts.down_proj"))}}
torch.save(out, sys.argv[3])
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (hfq model reloaded from its own checkpoint, what the hfq-free process computed from the export)."""
    root = tmp_path_factory.mktemp("export")
    models, folders = {}, {}
    for name, make in CONFIGS.items():
        arch = next((a for a in ("mixtral", "qwen3_moe") if name.endswith(a)), "llama")
        fp = root / f"fp-{arch}"
        if not fp.exists():
            build_tiny(arch).save_pretrained(fp)
        AutoModelForCausalLM.from_pretrained(fp, quantization_config=make()).save_pretrained(root / name)
        # hfq's own reload, simulating exactly (the fast CPU kernels round activations to bf16)
        models[name] = hfq.nn.set_kernel(AutoModelForCausalLM.from_pretrained(root / name).eval(), "reference")
        folders[name] = str(export_compressed_tensors(models[name], root / f"{name}-ct"))
    torch.save(IDS, root / "ids.pt")
    proc = subprocess.run([sys.executable, "-c", NO_HFQ, json.dumps(folders), str(root / "ids.pt"),
                           str(root / "out.pt")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return models, torch.load(root / "out.pt")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_compressed_tensors_export_loads_without_hfq(name, exported):
    """Catches integers or scales written in another layout than compressed-tensors reads (packing order, signed vs
    unsigned range, group scales in act-order's permuted column order, a missing weight_shape), a module left out of
    the config groups (it would load as random or float weights), and a folder that needs hfq to load. Weight-only
    exports must give hfq's logits exactly; W8A8 the same weights and logits within its activation-rounding gap;
    fused MoE experts (written per expert, transformers fuses them back) the same expert weights exactly, so an
    expert's gate / up / down rows and their scales may not be swapped or misassigned."""
    models, got = exported
    model = models[name]
    for n, w in got[name]["weights"].items():
        assert torch.equal(w, model.get_submodule(n).dequantized_weight(torch.float32)), n
    for n, w in got[name]["experts"].items():  # per-expert checkpoint tensors fused back by transformers
        experts, part = model.get_submodule(n.rsplit(".", 1)[0]), n.rsplit(".", 1)[1][: -len("_proj")]
        assert isinstance(experts, hfq.nn.QuantExperts)
        assert torch.equal(w, torch.stack([experts.expert_weight(part, e, torch.float32)
                                           for e in range(experts.num_experts)])), n
    assert bool(got[name]["experts"]) == ("mixtral" in name or "moe" in name)
    with torch.no_grad():
        want = model(IDS).logits
    if got[name]["experts"]:  # transformers' expert loop sums in another order than hfq's: same weights, ~1e-7 apart
        assert torch.allclose(got[name]["logits"], want, rtol=0, atol=1e-5)
    elif name.endswith("a8"):  # compressed-tensors scales activations by absmax / 127.5, hfq by absmax / 127
        assert not torch.equal(got[name]["logits"], want)
        assert (got[name]["logits"] - want).norm() / want.norm() < 0.01
    else:
        assert torch.equal(got[name]["logits"], want)


def test_what_compressed_tensors_cannot_express_is_refused(tmp_path):
    """Catches an export that silently drops what the format has no place for: asymmetric zero points (transformers'
    loader would fail or mis-load them), OSTQuant's online R4 Hadamard (the exported model would compute something
    else), and experts' activation quantizers (the experts would run with float activations)."""
    fp = tmp_path / "fp"
    build_tiny("llama").save_pretrained(fp)
    asym = AutoModelForCausalLM.from_pretrained(fp, quantization_config=hfq.RTNConfig(bits=4, group_size=32,
                                                                                         sym=False))
    with pytest.raises(ExportError, match="asymmetric"):
        export_compressed_tensors(asym, tmp_path / "a")
    ost = AutoModelForCausalLM.from_pretrained(fp, quantization_config=hfq.OSTQuantConfig(
        bits=4, learn=False, n_samples=2, seq_len=16, dataset=CALIB, weight_solver=hfq.RTNConfig(bits=4)))
    with pytest.raises(ExportError, match="online rotations"):
        export_compressed_tensors(ost, tmp_path / "o")
    moe = hfq.quantize(build_tiny("mixtral"), hfq.RTNConfig(bits=8, group_size=None, act_bits=8))
    with pytest.raises(ExportError, match="experts with quantized activations"):
        export_compressed_tensors(moe, tmp_path / "m")
    assert not any((tmp_path / f).exists() for f in ("a", "a.tmp", "o", "o.tmp", "m", "m.tmp"))  # nothing written


def test_cli_export(tmp_path, capsys):
    """Catches `hfq export` not reloading the hfq checkpoint packed (it would quantize again or fail) and a refusal
    that surfaces as a traceback instead of a one-line error."""
    fp, q = tmp_path / "fp", tmp_path / "q"
    build_tiny("llama").save_pretrained(fp)
    rtn = hfq.RTNConfig(bits=4, group_size=32)
    AutoModelForCausalLM.from_pretrained(fp, quantization_config=rtn).save_pretrained(q)
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<0>": 0}, unk_token="<0>")))
    tok.save_pretrained(q)
    tok.save_pretrained(fp)
    assert cli(["export", str(q), "--format", "compressed-tensors", "--output", str(tmp_path / "ct"), "--quiet"]) == 0
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    assert (tmp_path / "ct" / "tokenizer.json").is_file()
    assert cli(["export", str(fp), "--format", "compressed-tensors", "--output", str(tmp_path / "x"), "--quiet",
                "--method", "rtn", "--set", "sym=false", "--set", "group_size=32"]) == 2
    err = capsys.readouterr().err
    assert "hfq: error: cannot export to compressed-tensors" in err and "asymmetric" in err, err[-500:]


GGUF_CONFIGS = {"q4_0": lambda: hfq.GPTQConfig(bits=4, group_size=32, act_order=True, n_samples=4, seq_len=32,
                                                dataset=CALIB),
                "q4_1": lambda: hfq.RTNConfig(bits=4, group_size=32, sym=False),
                "q8_0": lambda: hfq.RTNConfig(bits=8, group_size=32)}

NO_HFQ_GGUF = """
import json, sys, torch
sys.modules["hfq"] = None
from pathlib import Path
from transformers import AutoModelForCausalLM
out = {}
for name, file in json.loads(sys.argv[1]).items():
    m = AutoModelForCausalLM.from_pretrained(Path(file).parent, gguf_file=Path(file).name).eval()
    out[name] = {n: p.weight.detach().clone() for n, p in m.named_modules() if type(p).__name__ == "Linear"}
torch.save(out, sys.argv[2])
"""


def _gguf_reference(m) -> torch.Tensor:
    """What a GGUF block holds, dequantized: q times the float16 scale (Q4_1: plus the float16 -scale * zero)."""
    s = m.weight_scale.float()
    w = m.int_weight().float() * s.half().float().repeat_interleave(32, 1)
    if m.weight_zero is not None:
        w = w + (-(s * m._zero())).half().float().repeat_interleave(32, 1)
    return w


def test_gguf_export_loads_without_hfq(tmp_path):
    """Catches GGUF blocks in another layout than llama.cpp's (nibble order, the +8 offset, Q4_1's min term, scale
    bytes), Q/K rows not permuted as llama.cpp's converter does (transformers' loader would scramble the heads),
    a tensor under the wrong llama.cpp name, and a file that needs hfq to load: every linear transformers reads back
    equals hfq's integers times the float16-rounded scales exactly."""
    fp = tmp_path / "fp"
    build_tiny("llama").save_pretrained(fp)
    models, files = {}, {}
    for name, make in GGUF_CONFIGS.items():
        models[name] = AutoModelForCausalLM.from_pretrained(fp, quantization_config=make())
        files[name] = str(export_gguf(models[name], tmp_path / name / "model.gguf"))
    proc = subprocess.run([sys.executable, "-c", NO_HFQ_GGUF, json.dumps(files), str(tmp_path / "out.pt")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    for name, model in models.items():
        quantized = {n: m for n, m in model.named_modules() if isinstance(m, hfq.nn.QuantLinear)}
        assert len(quantized) == 14
        for n, m in quantized.items():
            assert torch.equal(got[name][n], _gguf_reference(m)), (name, n)
        assert torch.equal(got[name]["lm_head"], model.lm_head.weight)


def test_what_gguf_cannot_express_is_refused(tmp_path):
    """Catches an export that re-quantizes or silently drops what no GGUF block type holds (per-channel or
    group-128 scales, 3-bit weights, activation quantization) instead of naming the layer and the fix."""
    fp = tmp_path / "fp"
    build_tiny("llama").save_pretrained(fp)
    for cfg, match in [(hfq.RTNConfig(bits=4, group_size=None), "channel scales"),
                       (hfq.RTNConfig(bits=3, group_size=32), "3-bit"),
                       (hfq.RTNConfig(bits=8, group_size=32, act_bits=8), "activation quantization")]:
        model = AutoModelForCausalLM.from_pretrained(fp, quantization_config=cfg)
        with pytest.raises(ExportError, match=f"model.layers.0.self_attn.q_proj: {match}"):
            export_gguf(model, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "x.gguf.tmp").exists()
