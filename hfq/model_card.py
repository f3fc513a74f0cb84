"""Model cards for quantized checkpoints, filled in from `model_cards/` templates (written by `hfq quantize`,
uploaded by `hfq push`) so a pushed repo says what it is and how to load it."""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

TITLES = {"hfq_rtn": "round-to-nearest", "hfq_gptq": "GPTQ", "hfq_ostquant": "OSTQuant", "hfq_ptq": "static PTQ",
          "hfq_moequant": "MoEQuant (EBSS + AGQ)"}


def _template(name: str) -> str:
    return resources.files("hfq.model_cards").joinpath(name).read_text()


def render_model_card(model, repo: str, base_model: str | None = None) -> str:
    """The card of a quantized causal LM (`model.config.quantization_config` says how it was quantized)."""
    from .eval.size import quantized_bytes

    config = model.config.quantization_config
    config = config if isinstance(config, dict) else config.to_dict()
    method = config.get("quant_method", "unknown")
    group = config.get("group_size")
    weight_desc = f"{config.get('bits')}-bit {'symmetric' if config.get('sym', True) else 'asymmetric'} weights, " + \
        (f"groups of {group}" if group else "one scale per output channel")
    act = config.get("act_bits")
    act_desc = f"{act}-bit dynamic per-token activations" if act else "activations in floating point"
    size = quantized_bytes(model)
    return _template("quantized_causal_lm.md").format(
        base_model=base_model or getattr(model.config, "_name_or_path", "") or "unknown", quant_method=method,
        name=repo.rsplit("/", 1)[-1], method_title=TITLES.get(method, method), weight_desc=weight_desc,
        act_desc=act_desc, repo=repo, config_json=json.dumps(config, indent=2, sort_keys=True),
        quantized_mb=size["quantized_bytes"] / 2**20, ratio=size["ratio"] or 0.0)


def write_model_card(model, folder: str | Path, repo: str | None = None, base_model: str | None = None) -> Path:
    path = Path(folder) / "README.md"
    path.write_text(render_model_card(model, repo or Path(folder).name, base_model))
    return path
