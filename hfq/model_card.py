"""Model cards for quantized checkpoints (written by `hfq quantize`, uploaded by `hfq push`): what was quantized,
with which method (and its paper), how it was calibrated, how to load it, and measured metrics when given.

The metadata block is built by huggingface_hub (`ModelCardData`, `EvalResult` -> the Hub's `model-index`), the body
from the `model_cards/` templates; `ModelCard(text)` parses every card back (tested)."""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

# quant_method -> (title, paper)
METHODS = {
    "hfq_rtn": ("round-to-nearest", None),
    "hfq_gptq": ("GPTQ", "https://arxiv.org/abs/2210.17323"),
    "hfq_ostquant": ("OSTQuant", "https://arxiv.org/abs/2501.13987"),
    "hfq_moequant": ("MoEQuant (EBSS + AGQ)", "https://arxiv.org/abs/2505.03804"),
    "hfq_ptq": ("static post-training quantization (W8A8)", None),
    "hfq_fqpetr": ("FQ-PETR (W8A8, QANS softmax input, DULUT non-linears)", "https://arxiv.org/abs/2511.09347"),
    "hfq_cfws": ("CFWS (coarse & fine weight split, W8A8)", "https://arxiv.org/abs/2312.10588"),
}
CALIBRATION_FIELDS = ("dataset", "n_samples", "seq_len", "sampler", "seed")


def _config(model) -> dict:
    config = model.config.quantization_config
    return config if isinstance(config, dict) else config.to_dict()


def _describe(config: dict) -> tuple[str, str]:
    group = config.get("group_size")
    weights = (f"{config.get('bits')}-bit {'symmetric' if config.get('sym', True) else 'asymmetric'} weights, "
               + (f"groups of {group}" if group else "one scale per output channel"))
    act = config.get("act_bits")
    if config.get("quant_method") in ("hfq_ptq", "hfq_fqpetr", "hfq_cfws"):
        act = act or 8
        return weights, f"{act}-bit activations with static (calibrated) scales"
    return weights, f"{act}-bit dynamic per-token activations" if act else "activations in floating point"


def _calibration(config: dict) -> str:
    fields = {k: config[k] for k in CALIBRATION_FIELDS if config.get(k) is not None}
    if config.get("quant_method") in ("hfq_fqpetr", "hfq_cfws"):
        fields.pop("seq_len", None)  # images, not token windows
    if "dataset" not in fields and "n_samples" not in fields:
        return "No calibration data: the weights are rounded on their own."
    data = fields.get("dataset", "?")
    data = "token-id lists given in code" if isinstance(data, list) else data
    line = f"Calibration data: {data}"
    if "n_samples" in fields:
        line += f", {fields['n_samples']} samples" + (f" of {fields['seq_len']} tokens" if "seq_len" in fields else "")
    if "sampler" in fields:
        line += f", sampler `{fields['sampler']}`"
    if "seed" in fields:
        line += f", seed {fields['seed']}"
    return line + "."


def render_model_card(model, repo: str, base_model: str | None = None, metrics: dict | None = None,
                      recipe: str | None = None) -> str:
    """The card of a quantized model. metrics: {"dataset": name, "task": Hub task type, "results":
    {metric: value}, "settings": free text} (e.g. WikiText-2 perplexity; mAP / NDS for the vision models);
    recipe: the YAML recipe text it was made with."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from .eval.size import quantized_bytes

    config = _config(model)
    method = config.get("quant_method", "unknown")
    title, paper = METHODS.get(method, (method, None))
    vision = "ForCausalLM" not in type(model).__name__  # the custom-code vision models (PETR, ...)
    from .models import HUB_IDS

    base = base_model or getattr(model.config, "_name_or_path", "") or None
    base = HUB_IDS.get(base, base)
    hub_id = base if base and base.count("/") == 1 and not Path(base).exists() else None  # metadata wants a repo id
    name = repo.rsplit("/", 1)[-1]
    results = None
    if metrics:
        results = [EvalResult(task_type=metrics.get("task", "object-detection" if vision else "text-generation"),
                              dataset_type=metrics["dataset"], dataset_name=metrics["dataset"], metric_type=k,
                              metric_name=k, metric_value=float(v)) for k, v in metrics["results"].items()]
    data = ModelCardData(base_model=hub_id, library_name="transformers",
                         tags=["hfq", method, "quantized"], model_name=name, eval_results=results,
                         pipeline_tag=None if vision else "text-generation")
    weights, acts = _describe(config)
    size = quantized_bytes(model)
    template = "quantized_vision_model.md" if vision else "quantized_causal_lm.md"
    metric_lines = ""
    if metrics:
        metric_lines = "\n".join(f"| {k} | {v:.4g} |" for k, v in metrics["results"].items())
        metric_lines = (f"{metrics.get('settings', '')}\n\n| metric ({metrics['dataset']}) | value |\n|---|---|\n"
                        + metric_lines)
    card = ModelCard.from_template(
        data, template_str=resources.files("hfq.model_cards").joinpath(template).read_text(), name=name,
        base=base or "unknown", quant_method=method, method_title=title,
        paper=f" ([paper]({paper}))" if paper else "", weight_desc=weights, act_desc=acts, repo=repo,
        calibration=_calibration(config), config_json=json.dumps(config, indent=2, sort_keys=True),
        quantized_mb=f"{size['quantized_bytes'] / 2**20:.2f}", ratio=f"{size['ratio'] or 0.0:.3f}",
        metrics=metric_lines or "Not measured for this checkpoint.", recipe=recipe)
    return str(card)


def write_model_card(model, folder: str | Path, repo: str | None = None, base_model: str | None = None,
                     metrics: dict | None = None, recipe: str | None = None) -> Path:
    path = Path(folder) / "README.md"
    path.write_text(render_model_card(model, repo or Path(folder).name, base_model, metrics, recipe))
    return path
