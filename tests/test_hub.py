"""push_to_hub writes the same packed checkpoint as save_pretrained; tested against an in-process fake of the Hub
API (no Hub is reachable here), then loaded back by repo id from an offline cache layout."""
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.constants
import torch
import transformers.utils.hub as hub
from huggingface_hub.errors import EntryNotFoundError
from transformers import AutoModelForCausalLM

import hfq


class FakeHubApi:
    """create_repo / create_branch / create_commit, storing files under root/<repo_id>."""

    def __init__(self, root: Path):
        self.root, self.commits = root, []

    def create_repo(self, repo_id, **kwargs):
        (self.root / repo_id).mkdir(parents=True, exist_ok=True)
        return SimpleNamespace(repo_id=repo_id)

    def create_branch(self, **kwargs):
        pass

    def create_commit(self, repo_id, operations, commit_message=None, **kwargs):
        for op in operations:
            target = self.root / repo_id / op.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(op.path_or_fileobj, target)
        self.commits.append((repo_id, commit_message, sorted(op.path_in_repo for op in operations)))
        return SimpleNamespace(commit_url=f"fake://{repo_id}")


def test_push_to_hub_round_trip(tiny_fp_dir, ids, tmp_path, monkeypatch):
    api = FakeHubApi(tmp_path / "hub")
    monkeypatch.setattr(hub, "_hf_api", api)

    def no_card(*a, **k):
        raise EntryNotFoundError("no card")

    monkeypatch.setattr(hub.ModelCard, "load", no_card)
    model = AutoModelForCausalLM.from_pretrained(tiny_fp_dir("llama"), quantization_config=hfq.RTNConfig(group_size=32))
    model.push_to_hub("org/tiny-rtn")
    repo_id, _, files = api.commits[-1]
    assert repo_id == "org/tiny-rtn" and "model.safetensors" in files and "config.json" in files

    # lay the pushed files out as a Hub cache snapshot and load by repo id, offline
    cache = tmp_path / "cache"
    snapshot = cache / "models--org--tiny-rtn" / "snapshots" / "0"
    shutil.copytree(api.root / "org/tiny-rtn", snapshot)
    (cache / "models--org--tiny-rtn" / "refs").mkdir()
    (cache / "models--org--tiny-rtn" / "refs" / "main").write_text("0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    reloaded = AutoModelForCausalLM.from_pretrained("org/tiny-rtn", cache_dir=str(cache))
    assert reloaded.hf_quantizer.pre_quantized
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
