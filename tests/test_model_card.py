"""Model cards: every method's card parses as a Hub model card and says what was done."""
import json

import pytest
import torch
from conftest import build_tiny
from huggingface_hub import ModelCard

import hfq
from hfq.model_card import METHODS, render_model_card

CALIB = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1)).tolist()
LLM_CONFIGS = {
    "hfq_rtn": ("llama", lambda: hfq.RTNConfig(bits=4, group_size=32)),
    "hfq_gptq": ("llama", lambda: hfq.GPTQConfig(bits=3, group_size=None, n_samples=2, seq_len=16, dataset=CALIB)),
    "hfq_ostquant": ("llama", lambda: hfq.OSTQuantConfig(bits=4, learn=False, n_samples=2, seq_len=16,
                                                         dataset=CALIB, weight_solver=hfq.RTNConfig())),
    "hfq_moequant": ("mixtral", lambda: hfq.MoEQuantConfig(bits=4, ebss=False, rotate=False, n_samples=2, seq_len=16,
                                                           dataset=CALIB)),
}


def _parsed(text: str) -> ModelCard:
    card = ModelCard(text)  # parses the YAML block and the model-index back into EvalResults
    assert card.data.library_name == "transformers" and "hfq" in card.data.tags
    return card


@pytest.mark.parametrize("method", sorted(LLM_CONFIGS))
def test_every_llm_method_card(method):
    """Catches a card that does not parse as a Hub card (broken YAML / model-index), names the wrong method or no
    paper, leaves out the calibration set or the recipe it was given, loses the metrics, or puts a local path in
    base_model (the Hub rejects it)."""
    arch, make = LLM_CONFIGS[method]
    model = hfq.quantize(build_tiny(arch), make())
    metrics = {"dataset": "wikitext2", "results": {"perplexity": 12.5}, "settings": "windows 0-19"}
    text = render_model_card(model, "org/tiny-q", base_model="/some/local/path", metrics=metrics,
                             recipe="quant_method: " + method)
    card = _parsed(text)
    title, paper = METHODS[method]
    assert method in card.data.tags and f"**{title}**" in text and (paper is None or paper in text)
    assert card.data.base_model is None  # a local path is not a Hub id
    (result,) = card.data.eval_results
    assert (result.metric_type, result.metric_value, result.dataset_type) == ("perplexity", 12.5, "wikitext2")
    assert "| perplexity | 12.5 |" in text and "quant_method: " + method in text
    calibrated = method != "hfq_rtn"
    assert ("2 samples of 16 tokens" in text) == calibrated
    assert ("No calibration data" in text) != calibrated
    config = json.loads(text.split("```json\n", 1)[1].split("```", 1)[0])
    assert config["quant_method"] == method
    assert 'from_pretrained("org/tiny-q")' in text


def test_card_for_embedded_model_names_its_hub_repo():
    """Catches the embedded model's short name (not a repo id) reaching base_model, and a card without metrics
    claiming any."""
    model = hfq.quantize(build_tiny("llama"), hfq.RTNConfig(bits=4, group_size=32))
    card = _parsed(render_model_card(model, "tiny", base_model="smollm2-135m"))
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.eval_results is None and "Not measured" in card.text


def test_vision_card_has_task_metrics_and_remote_code_usage():
    """Catches a vision model getting the causal-LM card (AutoModelForCausalLM usage, perplexity) instead of
    detection metrics and trust_remote_code loading."""
    from hfq.modeling.petr import PetrForObjectDetection3D
    from test_petr import _random_inputs, tiny_config

    torch.manual_seed(0)
    model = hfq.quantize(PetrForObjectDetection3D(tiny_config()).eval(), hfq.PTQConfig(),
                         calibration=[_random_inputs(1, seed=1)])
    metrics = {"dataset": "nuscenes-synthetic", "results": {"mAP": 0.4, "NDS": 0.35}}
    text = render_model_card(model, "org/petr-w8a8", metrics=metrics)
    card = _parsed(text)
    assert {r.metric_type for r in card.data.eval_results} == {"mAP", "NDS"}
    assert {r.task_type for r in card.data.eval_results} == {"object-detection"}
    assert "trust_remote_code=True" in text and "AutoModelForCausalLM" not in text
    assert "static (calibrated) scales" in text
