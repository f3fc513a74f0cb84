"""Every LLM method x every architecture it supports: quantize, save, reload in a FRESH process, same logits; and
each method's checkpoint pushed to and downloaded from an in-process fake of the Hub."""
import json
import shutil
import subprocess
import sys

import huggingface_hub.constants
import pytest
import torch
import transformers.utils.hub as hub
from conftest import TINY_CONFIGS, build_tiny
from huggingface_hub.errors import EntryNotFoundError
from test_hub import FakeHubApi
from transformers import AutoModelForCausalLM

import hfq
from hfq.arch import ADAPTERS

LLM_TYPES = sorted(t for t in ADAPTERS if not t.startswith("hfq_"))
MOE = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"}
CALIB = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1)).tolist()
X = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
METHODS = {
    "rtn": lambda arch: hfq.RTNConfig(bits=4, group_size=32),
    "gptq": lambda arch: hfq.GPTQConfig(bits=4, group_size=32, n_samples=2, seq_len=32, dataset=CALIB,
                                        expert_affinity=arch in MOE),
    "ostquant": lambda arch: hfq.OSTQuantConfig(bits=4, act_bits=8, n_samples=2, seq_len=32, dataset=CALIB,
                                                train_steps=2, train_batch_size=1, weight_solver=hfq.RTNConfig()),
    "moequant": lambda arch: hfq.MoEQuantConfig(bits=4, ebss=False, rotate=arch in ROTATABLE, n_samples=2,
                                                seq_len=32, dataset=CALIB),
}
# what each method must support: rotations wherever an adapter declares a TransformLayout (OSTQuant: dense only)
ROTATABLE = {t for t, a in ADAPTERS.items() if a.transforms is not None}
MUST_SUPPORT = {"rtn": set(LLM_TYPES), "gptq": set(LLM_TYPES), "moequant": MOE, "ostquant": ROTATABLE - MOE}

RELOAD = """
import json, sys, torch
import hfq  # noqa: F401  (hfq checkpoints need hfq; importing it is what a user does)
from transformers import AutoModelForCausalLM
torch.set_num_threads(int(sys.argv[4]))  # the quantizing process's count: matmul rounding depends on it
x = torch.load(sys.argv[2])
out = {}
for name, folder in json.loads(sys.argv[1]).items():
    with torch.no_grad():
        out[name] = AutoModelForCausalLM.from_pretrained(folder).eval()(x).logits
torch.save(out, sys.argv[3])
"""


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """(method, arch) -> logits of the quantized model in this process; plus the saved folders and refusals."""
    root = tmp_path_factory.mktemp("matrix")
    logits, folders, refused = {}, {}, {}
    for method, make in METHODS.items():
        for arch in LLM_TYPES:
            if method == "moequant" and arch not in MOE:
                continue
            torch.manual_seed(0)
            try:
                model = hfq.quantize(build_tiny(arch), make(arch))
            except (ValueError, NotImplementedError) as e:
                refused[(method, arch)] = str(e)
                continue
            key = f"{method}-{arch}"
            model.save_pretrained(root / key)
            with torch.no_grad():
                logits[key] = model(X).logits
            folders[key] = str(root / key)
    torch.save(X, root / "x.pt")
    proc = subprocess.run([sys.executable, "-c", RELOAD, json.dumps(folders), str(root / "x.pt"),
                           str(root / "out.pt"), str(torch.get_num_threads())], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return logits, torch.load(root / "out.pt"), refused


def test_every_method_and_architecture_reloads_in_a_fresh_process(matrix):
    """Catches a (method, architecture) pair whose checkpoint does not reload exactly in a new process (state that
    lives only in the quantizing process: online rotations, fused scalings, expert packing, kept-float layers), a
    method that stops supporting an architecture it supported, and a refusal without a reason."""
    logits, reloaded, refused = matrix
    for key, want in logits.items():
        assert torch.equal(reloaded[key], want), key
    for method, archs in MUST_SUPPORT.items():
        lost = {a for a in archs if f"{method}-{a}" not in logits}
        assert not lost, {a: refused.get((method, a)) for a in lost}
    for (method, arch), why in refused.items():
        assert arch in why or "architecture" in why or "model_type" in why, (method, arch, why)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_push_and_download_through_a_fake_hub(method, tmp_path, monkeypatch):
    """Catches push_to_hub writing another checkpoint than save_pretrained (missing shards, config without the
    quantization config) and a download by repo id that quantizes again or loads float weights."""
    arch = "mixtral" if method == "moequant" else "llama"
    api = FakeHubApi(tmp_path / "hub")
    monkeypatch.setattr(hub, "_hf_api", api)
    monkeypatch.setattr(hub.ModelCard, "load", lambda *a, **k: (_ for _ in ()).throw(EntryNotFoundError("none")))
    torch.manual_seed(0)
    model = hfq.quantize(build_tiny(arch), METHODS[method](arch))
    repo = f"org/tiny-{method}"
    model.push_to_hub(repo)
    cache = tmp_path / "cache"
    folder = cache / f"models--org--tiny-{method}"
    shutil.copytree(api.root / repo, folder / "snapshots" / "0")
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    again = AutoModelForCausalLM.from_pretrained(repo, cache_dir=str(cache))
    assert again.hf_quantizer.pre_quantized
    assert json.loads((folder / "snapshots" / "0" / "config.json").read_text())["quantization_config"][
        "quant_method"] == f"hfq_{method}"
    with torch.no_grad():
        assert torch.equal(again(X).logits, model(X).logits)


def test_matrix_covers_every_tiny_config():
    """Catches an architecture with an adapter but no tiny model (it would silently drop out of the matrix)."""
    assert set(LLM_TYPES) <= set(TINY_CONFIGS)
