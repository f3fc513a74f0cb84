"""LoRA (PEFT) on an hfq-quantized model: get_peft_model with a plain LoraConfig, training, adapter save / load,
the refused merge."""
import pytest
import torch
from conftest import build_tiny

import hfq
from hfq.nn import QuantLinear

pytestmark = pytest.mark.usefixtures("one_thread")


def test_lora_trains_on_packed_layers_and_the_adapter_round_trips(tmp_path):
    """Catches PEFT refusing hfq's QuantLinear ("Target module ... is not supported"), an adapter that changes the
    model before training (B starts at zero), packed weights or scales that receive gradients or change, a LoRA
    path that does not train (loss must fall), an adapter that does not save / reload into the same outputs
    (`PeftModel.from_pretrained` in a config rebuilt from adapter_config.json), and merge_and_unload silently
    producing float weights instead of refusing."""
    from peft import LoraConfig, PeftModel, get_peft_model

    model = hfq.quantize(build_tiny("llama"), hfq.RTNConfig(bits=4, group_size=32))
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    packed = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    wrapped = [m for n, m in peft_model.named_modules() if type(m).__name__ == "QuantLinearLora"]
    assert len(wrapped) == 4 and all(isinstance(m.base_layer, QuantLinear) for m in wrapped)
    with torch.no_grad():
        assert torch.equal(peft_model(ids).logits, before)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = peft_model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    for n, p in peft_model.base_model.model.named_parameters():
        key = n.replace(".base_layer", "")
        if key in packed:
            assert torch.equal(p, packed[key]), n
    peft_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        tuned = peft_model(ids).logits
    base = hfq.quantize(build_tiny("llama"), hfq.RTNConfig(bits=4, group_size=32))
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, tuned)
    with pytest.raises(NotImplementedError, match="re-quantization"):
        reloaded.merge_and_unload()


def test_lora_on_hfq_model_runs_under_transformers_trainer_with_gradient_checkpointing(tmp_path):
    """Catches the LoRA-on-packed-layers path breaking under transformers.Trainer with gradient checkpointing (the
    frozen packed base gives checkpointed blocks inputs without grad unless the input embeddings require grad),
    i.e. no gradient reaching the adapters (their weights must change)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    model = hfq.quantize(build_tiny("llama"), hfq.RTNConfig(bits=4, group_size=32))
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights="gaussian"))
    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    start = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, gradient_checkpointing=True, disable_tqdm=True)
    Trainer(model=peft_model, args=args, train_dataset=data).train()
    changed = [n for n, p in peft_model.named_parameters() if p.requires_grad and not torch.equal(p, start[n])]
    assert changed and all("lora_" in n for n in changed) and len(changed) == len(start)


def test_lora_on_packed_moe_experts_trains_each_routed_expert_and_round_trips(tmp_path):
    """Catches PEFT refusing hfq's QuantExperts (or silently skipping them), an experts adapter that changes the
    model before training, the LoRA update bypassing the experts' routing (only experts that received tokens may get
    gradients, and every hit expert must), an adapter that does not reload into the same outputs, and
    merge_and_unload silently producing float experts instead of refusing."""
    from peft import LoraConfig, PeftModel, get_peft_model

    def quantized():
        return hfq.quantize(build_tiny("mixtral"), hfq.RTNConfig(bits=4, group_size=32))

    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    model = quantized()
    with torch.no_grad():
        before = model(ids).logits
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["experts"]))
    wrapped = [m for m in peft_model.modules() if type(m).__name__ == "QuantExpertsLora"]
    assert len(wrapped) == 2
    with torch.no_grad():
        assert torch.equal(peft_model(ids).logits, before)
    hits = []
    hook = peft_model.base_model.model.model.layers[0].mlp.experts.base_layer.register_forward_hook(
        lambda m, args, out: hits.append(args[1].unique()))
    peft_model(ids[:1, :1]).logits.square().sum().backward()  # one token: top-2 of the 4 experts
    hook.remove()
    grad = wrapped[0].lora_B["default"].gate_up.grad
    routed = set(hits[0].tolist())
    assert len(routed) == 2
    for e in range(grad.shape[0]):
        assert (grad[e].abs().sum() > 0) == (e in routed), (e, routed)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    opt.zero_grad()
    peft_model(ids, labels=ids).loss.backward()
    opt.step()
    with torch.no_grad():
        tuned = peft_model(ids).logits
    assert not torch.equal(tuned, before)
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(quantized(), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, tuned)
    with pytest.raises(NotImplementedError, match="re-quantization"):
        reloaded.merge_and_unload()
