"""PTQAT through PEFT (`hfq.PTQATConfig`): registration, PTQ step, discrepancy and selection, LSQ training of only
the selected layers, adapter save / resume, merge into packed hfq layers, Trainer, a conv model (PETR)."""
import copy
import json

import pytest
import torch
from conftest import build_tiny
from safetensors.torch import load_file, save_file

import hfq
from hfq.nn import QuantConv2d, QuantLinear
from hfq.ptqat import PTQATLayer, discrepancy_terms, select_layers

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(0))


def _ptqat(model=None, **kw):
    from peft import get_peft_model

    config = hfq.PTQATConfig(dataset=IDS[:4], n_samples=4, seq_len=16, task_type="CAUSAL_LM", **kw)
    return get_peft_model(model if model is not None else build_tiny("llama"), config), config


def _layers(peft_model):
    return {n.replace("base_model.model.", ""): m for n, m in peft_model.named_modules() if isinstance(m, PTQATLayer)}


def test_ptqat_is_a_registered_peft_method():
    """Catches the PeftType / mapping registration not holding on the installed PEFT (get_peft_model would raise
    KeyError), or the config's saved peft_type not mapping back to PTQATConfig (PeftConfig.from_pretrained)."""
    from peft import PeftModelForCausalLM
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType

    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType("HFQ_PTQAT")] is hfq.PTQATConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["HFQ_PTQAT"] is hfq.PTQATModel
    model, _ = _ptqat()
    assert isinstance(model, PeftModelForCausalLM)
    assert len(_layers(model)) == 14  # 7 linears x 2 blocks; lm_head stays float


def test_select_layers_ranks_rounds_and_seeds():
    """Catches "smallest" and "largest" swapped, ties broken differently from run to run, ratio rounding that
    trains the wrong number of layers, and a random selection that ignores its seed."""
    scores = {"a": 0.3, "b": 0.1, "c": 0.2, "d": 0.1, "e": 0.9}
    assert select_layers(scores, "smallest", 0.4) == {"b", "d"}
    assert select_layers(scores, "largest", 0.4) == {"e", "a"}
    assert select_layers(scores, "smallest", 0.0) == set() and len(select_layers(scores, "largest", 1.0)) == 5
    assert select_layers(scores, "random", 0.6, seed=1) == select_layers(scores, "random", 0.6, seed=1)
    assert len({frozenset(select_layers(scores, "random", 0.6, seed=s)) for s in range(6)}) > 1


def test_discrepancy_metrics():
    """Catches a metric that is not zero for identical outputs, an MSE that is not scale-free (layers of larger
    outputs would always look worse), cosine / KL reduced over the wrong dimension of a conv output (channels are
    dim 1), and a KL with its arguments swapped."""
    y = torch.randn(2, 5, 8)
    for metric in ("mse", "cosine", "kl"):
        num, den = discrepancy_terms(y, y.clone(), metric, conv=False)
        assert abs(num / den) < 1e-6
    yq = y + 0.1 * torch.randn_like(y)
    a, b = discrepancy_terms(y, yq, "mse", False), discrepancy_terms(10 * y, 10 * yq, "mse", False)
    assert abs(a[0] / a[1] - b[0] / b[1]) < 1e-5
    assert abs(discrepancy_terms(y, 3 * y, "cosine", False)[0]) < 1e-4  # cosine ignores a positive scale
    img = torch.randn(2, 4, 3, 3)
    num, den = discrepancy_terms(img, img * torch.tensor([1.0, 2, 3, 4]).reshape(1, 4, 1, 1), "cosine", conv=True)
    assert den == 2 * 3 * 3 and num > 0
    p, q = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    lp, lq = p.log_softmax(-1), q.log_softmax(-1)
    kl_pq = float((lp.exp() * (lp - lq)).sum())
    assert abs(discrepancy_terms(p, q, "kl", False)[0] - kl_pq) < 1e-6


@pytest.mark.parametrize("selection", ["smallest", "largest"])
def test_calibration_selects_by_discrepancy_and_only_those_train(selection):
    """Catches the recorded selection not matching the discrepancies (the paper's choice would be mis-applied),
    unselected layers left trainable (their PTQ weights / scales would drift), selected ones frozen, a trainable
    base weight (the adapter must hold what changes), and PTQ steps left uncalibrated."""
    model, config = _ptqat(selection=selection, ratio=0.5)
    scores = config.discrepancies
    assert len(scores) == 14 and len(config.selected_layers) == 7
    ranked = sorted(scores, key=lambda n: (scores[n], n), reverse=selection == "largest")
    assert set(config.selected_layers) == set(ranked[:7])
    for name, layer in _layers(model).items():
        trainable = name in config.selected_layers
        assert layer.is_trainable("default") == trainable
        assert layer.ptqat_weight_scale["default"].requires_grad == trainable
        assert layer.ptqat_act_scale["default"].requires_grad == trainable
        assert not layer.base_layer.weight.requires_grad
        assert torch.isfinite(layer.ptqat_weight_scale["default"]).all()
        assert torch.isfinite(layer.ptqat_act_scale["default"]).all()


def test_joint_discrepancy_differs_after_the_first_layer():
    """Catches discrepancy="joint" measuring layers in isolation (the two must agree on the first layers, which read
    the float embeddings either way, and differ deeper in the network where quantized inputs arrive)."""
    _, iso = _ptqat(discrepancy="isolation", metric="cosine")
    _, joint = _ptqat(discrepancy="joint", metric="cosine")
    first = "model.layers.0.self_attn.q_proj"
    assert abs(iso.discrepancies[first] - joint.discrepancies[first]) < 1e-6
    deep = "model.layers.1.mlp.down_proj"
    assert joint.discrepancies[deep] > iso.discrepancies[deep]


def test_training_moves_only_the_selected_layers_and_lsq_steps_learn():
    """Catches gradients not reaching the LSQ steps (straight-through rounding broken), frozen layers whose scales
    change, base weights that change, and a task loss that does not fall."""
    model, config = _ptqat(ratio=0.5)
    layers = _layers(model)
    before = {n: {k: v.detach().clone() for k, v in m.state_dict().items()} for n, m in layers.items()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(6):
        loss = model(input_ids=IDS, labels=IDS).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    for name, layer in layers.items():
        after = layer.state_dict()
        for key, value in before[name].items():
            changed = not torch.equal(after[key], value)
            expect = name in config.selected_layers and "ptqat_" in key
            assert changed == expect, (name, key)


def test_adapter_resume_merge_save_reload_identical(tmp_path):
    """Catches an adapter that saves the float model instead of what changed, a resume that calibrates again or
    loads a different selection, a merge whose integers round differently from the training forward, a merged model
    that does not save as an hfq checkpoint, and a reload that differs from the merged model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, config = _ptqat(ratio=0.5)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(3):
        loss = model(input_ids=IDS, labels=IDS).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        tuned = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert not any("base_layer" in k for k in saved)
    assert sum(k.endswith("ptqat_delta") for k in saved) == 7
    assert json.load(open(tmp_path / "adapter" / "adapter_config.json"))["selected_layers"] == config.selected_layers
    resumed = PeftModel.from_pretrained(build_tiny("llama"), tmp_path / "adapter", is_trainable=True)
    with torch.no_grad():
        assert torch.equal(resumed(input_ids=IDS).logits, tuned)
    assert resumed.peft_config["default"].selected_layers == config.selected_layers
    merged = hfq.nn.set_kernel(resumed.merge_and_unload(), "reference")  # exact simulation, not bf16 kernels
    assert isinstance(merged.model.layers[0].self_attn.q_proj, QuantLinear)
    assert not any(isinstance(m, PTQATLayer) for m in merged.modules())
    with torch.no_grad():
        out = merged(input_ids=IDS).logits
    assert (out - tuned).abs().max() < 1e-4
    merged.save_pretrained(tmp_path / "merged")
    saved_config = json.load(open(tmp_path / "merged" / "config.json"))["quantization_config"]
    assert saved_config["quant_method"] == "hfq_ptq" and saved_config["bits"] == 4
    reloaded = hfq.nn.set_kernel(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), "reference")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS).logits, out)


def test_ptq_step_is_hfq_ptq():
    """Catches PTQAT's starting point (ratio=0: nothing trains) drifting from `hfq.PTQConfig` on the same scheme and
    calibration data (weight steps, observed activation ranges), i.e. a PTQ row that is not the library's PTQ."""
    model, config = _ptqat(ratio=0.0)
    merged = model.merge_and_unload()
    ptq = hfq.quantize(build_tiny("llama"), config.ptq_config(dataset=IDS[:4]))
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=IDS).logits, ptq(input_ids=IDS).logits, atol=1e-5)


def test_missing_adapter_tensor_refuses_to_run(tmp_path):
    """Catches an adapter file without a layer's steps loading into NaN (or random) scales and running anyway."""
    from peft import PeftModel

    model, _ = _ptqat(ratio=0.5)
    model.save_pretrained(tmp_path / "a")
    sd = load_file(tmp_path / "a" / "adapter_model.safetensors")
    del sd[next(k for k in sd if k.endswith("ptqat_weight_scale"))]
    save_file(sd, tmp_path / "a" / "adapter_model.safetensors", metadata={"format": "pt"})
    broken = PeftModel.from_pretrained(build_tiny("llama"), tmp_path / "a")
    with pytest.raises(RuntimeError, match="calibrated step sizes"):
        broken(input_ids=IDS)


def test_config_errors():
    """Catches bad settings accepted silently: unknown metric / selection / discrepancy, a ratio outside [0, 1], no
    calibration data, and a target that is not a Linear or Conv2d."""
    from peft import get_peft_model

    for kw, match in (({"metric": "l1"}, "metric"), ({"selection": "middle"}, "selection"),
                      ({"discrepancy": "both"}, "discrepancy"), ({"ratio": 1.5}, "ratio")):
        with pytest.raises(ValueError, match=match):
            hfq.PTQATConfig(**kw)
    with pytest.raises(ValueError, match="calibration data"):
        get_peft_model(build_tiny("llama"), hfq.PTQATConfig())
    with pytest.raises(ValueError, match="Linear and Conv2d"):
        get_peft_model(build_tiny("llama"), hfq.PTQATConfig(dataset=IDS, target_modules=["input_layernorm"]))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_ptqat_under_transformers_trainer(tmp_path, checkpointing):
    """Catches PTQAT not training under transformers.Trainer (the quantized-model guard refusing it), or, with
    gradient checkpointing, a selected layer in a checkpointed block that gets no gradient (every selected delta
    must change)."""
    from transformers import Trainer, TrainingArguments

    model, config = _ptqat(ratio=0.5)
    layers = _layers(model)
    before = {n: layers[n].ptqat_delta["default"].detach().clone() for n in config.selected_layers}
    rows = [{"input_ids": IDS[i], "labels": IDS[i]} for i in range(IDS.shape[0])]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                             learning_rate=1e-3, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
                             disable_tqdm=True, gradient_checkpointing=checkpointing)
    Trainer(model=model, args=args, train_dataset=rows).train()
    assert all(not torch.equal(layers[n].ptqat_delta["default"], b) for n, b in before.items())


def test_ptqat_on_petr_folds_bn_merges_convs_and_reloads(tmp_path):
    """Catches a conv model failing under PTQAT: BatchNorm not folded first (the merged checkpoint's layout would
    not match the hfq_ptq skeleton), convolutions not merged into QuantConv2d, the detection loss not reaching the
    selected layers, float modules hfq_ptq would quantize on reload (attention, marked adds) not kept float, or a
    reload that differs from the merged model."""
    from peft import get_peft_model
    from test_petr import _random_inputs, tiny_config
    from transformers import AutoModel

    from hfq.modeling.petr import PetrForObjectDetection3D

    torch.manual_seed(0)
    model = PetrForObjectDetection3D(tiny_config()).eval()
    calib, test = _random_inputs(2, seed=1), _random_inputs(1, seed=2)
    peft_model = get_peft_model(copy.deepcopy(model), hfq.PTQATConfig(dataset=[calib], ratio=0.5))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in peft_model.modules())
    layers = _layers(peft_model)
    assert any(layer.is_conv for layer in layers.values())
    boxes = {"boxes": torch.tensor([[5.0, 2, 0, 2, 4, 1.5, 0, 0, 0]]), "class_labels": torch.tensor([0])}
    peft_model.train()
    loss = peft_model(**calib, labels=[boxes, boxes]).loss
    loss.backward()
    selected = peft_model.peft_config["default"].selected_layers
    assert all(layers[n].ptqat_delta["default"].grad is not None for n in selected)
    peft_model.eval()
    with torch.no_grad():
        tuned = peft_model(**test)
    merged = hfq.nn.set_kernel(peft_model.merge_and_unload(), "reference")  # exact simulation, not bf16 kernels
    assert any(isinstance(m, QuantConv2d) for m in merged.modules())
    with torch.no_grad():
        out = merged(**test)
    assert (out.logits - tuned.logits).abs().max() < 1e-3
    merged.save_pretrained(tmp_path / "q")
    assert json.load(open(tmp_path / "q" / "config.json"))["quantization_config"]["modules_to_not_convert"]
    reloaded = hfq.nn.set_kernel(AutoModel.from_pretrained(tmp_path / "q", trust_remote_code=True).eval(), "reference")
    with torch.no_grad():
        again = reloaded(**test)
    assert torch.equal(again.logits, out.logits) and torch.equal(again.pred_boxes, out.pred_boxes)


def test_ptqat_on_a_fused_repvgg_trains_with_its_classification_loss():
    """Catches the classifier's own loss (labels=) not reaching the selected convolutions, or a RepVGG after
    reparameterize() not wrapping every fused 3x3 conv and the classifier."""
    from peft import get_peft_model

    from hfq.modeling.repvgg import RepVGGConfig, RepVGGForImageClassification

    torch.manual_seed(0)
    model = RepVGGForImageClassification(RepVGGConfig(num_blocks=(1, 1), width_multiplier=(1, 1),
                                                      base_channels=(8, 16), stage_strides=(1, 2, 2),
                                                      num_labels=3, image_size=8)).eval()
    model.reparameterize()
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    peft_model = get_peft_model(model, hfq.PTQATConfig(dataset=[{"pixel_values": x}], ratio=0.5))
    layers = _layers(peft_model)
    assert len(layers) == convs + 1
    peft_model.train()
    peft_model(pixel_values=x, labels=y).loss.backward()
    selected = peft_model.peft_config["default"].selected_layers
    assert len(selected) == round(0.5 * len(layers))
    assert all(layers[n].ptqat_delta["default"].grad.abs().sum() > 0 for n in selected)
