"""Quantizing a model offloaded to disk by accelerate: one block resident at a time, packed blocks written back."""
import pytest
import torch
from conftest import build_tiny
from transformers import AutoModelForCausalLM, LlamaConfig

import hfq
from hfq.offload import is_offloaded

DISK = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk",
        "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
CALIB = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    """A saved tiny Llama with 4 blocks (3 of them go to disk)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama4")
    AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=4,
                                                 num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                                 tie_word_embeddings=False)).save_pretrained(path)
    return path


CONFIGS = {"rtn": lambda: hfq.RTNConfig(bits=4, group_size=32),
           "gptq": lambda: hfq.GPTQConfig(bits=4, group_size=32, n_samples=4, seq_len=32, dataset=CALIB.tolist())}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_disk_offloaded_quantize_on_load_matches_in_memory(method, llama4, tmp_path):
    """Catches the offloaded path diverging from the in-memory one (other integers, a block quantized twice or not
    at all, GPTQ calibrating on meta weights), float weights staying resident after their block was packed, and a
    save of the offloaded result that does not reload exactly."""
    ref = AutoModelForCausalLM.from_pretrained(llama4, quantization_config=CONFIGS[method]())
    model = AutoModelForCausalLM.from_pretrained(llama4, quantization_config=CONFIGS[method](), device_map=DISK,
                                                 offload_folder=tmp_path / "offload")
    for i in (1, 2, 3):  # nothing of an offloaded block stays in memory, and it is packed
        block = model.model.layers[i]
        assert all(p.device.type == "meta" for p in block.parameters())
        assert isinstance(block.self_attn.q_proj, hfq.nn.QuantLinear)
    report = model.hf_quantizer.memory_report
    assert report["offloaded"] and report["peak_anon_rss_mb"] > 0 and report["float_weights_mb"] > 0
    assert sorted(p.name for p in (tmp_path / "offload").glob("hfq-*.safetensors")) == \
        [f"hfq-model-layers-{i}.safetensors" for i in (1, 2, 3)]
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(x).logits
        assert torch.equal(model(x).logits, want)
    model.save_pretrained(tmp_path / "saved")
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert not is_offloaded(saved)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in saved.state_dict().items())
    with torch.no_grad():
        assert torch.equal(saved(x).logits, want)


def test_auto_device_map_under_max_memory_is_offloaded_and_reported(llama4, tmp_path):
    """Catches device_map="auto" with a small max_memory not reaching the block-by-block path (a block quantized
    while its weights are on meta, or the whole float model made resident), and the memory report losing the
    budget it ran under."""
    ref = AutoModelForCausalLM.from_pretrained(llama4, quantization_config=CONFIGS["gptq"]())
    model = AutoModelForCausalLM.from_pretrained(llama4, quantization_config=CONFIGS["gptq"](), device_map="auto",
                                                 max_memory={"cpu": 100_000}, offload_folder=tmp_path / "offload")
    assert "disk" in set(model.hf_device_map.values())
    report = model.hf_quantizer.memory_report
    assert report["offloaded"] and report["max_memory_mb"]["cpu"] == pytest.approx(100_000 / 2**20)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)


def test_methods_that_need_the_whole_model_refuse_disk_offload(llama4, tmp_path):
    """Catches a method that cannot work block by block being run on an offloaded model (it would read meta
    weights or train on them): the error must say why and what to do."""
    with pytest.raises(ValueError, match="disk offload is not supported.*whole model"):
        AutoModelForCausalLM.from_pretrained(llama4, quantization_config=hfq.OSTQuantConfig(n_samples=2, seq_len=8),
                                             device_map=DISK, offload_folder=tmp_path)



def test_quarot_style_ostquant_on_an_offloaded_model_matches_in_memory(llama4, tmp_path):
    """Catches OSTQuant with learn=False (R1 / R2 fused block by block, online R4 before down_proj, GPTQ) reading meta
    weights, an online Hadamard not hooked on an offloaded down_proj, and any difference from the in-memory run;
    learn=True must still refuse (it trains over the whole model)."""
    def cfg():
        return hfq.OSTQuantConfig(bits=4, act_bits=8, learn=False, n_samples=4, seq_len=32, dataset=CALIB.tolist())

    ref = AutoModelForCausalLM.from_pretrained(llama4, quantization_config=cfg())
    model = AutoModelForCausalLM.from_pretrained(llama4, quantization_config=cfg(), device_map=DISK,
                                                 offload_folder=tmp_path / "o")
    assert all(p.device.type == "meta" for p in model.model.layers[2].parameters())
    assert model.model.layers[2].mlp.down_proj.online_rotation is not None
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)

@pytest.mark.parametrize("outside", ["cpu", "disk"])
def test_rotation_is_fused_block_by_block_on_an_offloaded_model(outside, tmp_path):
    """Catches the rotated methods (MoEQuant++: R1 + R2 fused, then AGQ) reading meta weights of offloaded blocks,
    a rotated block or embedding / lm_head that is not written back (the calibration and the saved model would
    see unrotated weights: other logits), and an offloaded run that differs from the in-memory one."""
    torch.manual_seed(0)
    build_tiny("mixtral").save_pretrained(tmp_path / "moe")

    def cfg():
        return hfq.MoEQuantConfig(bits=4, ebss=False, rotate=True, n_samples=4, seq_len=32, dataset=CALIB.tolist())

    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", quantization_config=cfg())
    device_map = {"model.embed_tokens": outside, "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": outside, "model.rotary_emb": "cpu", "lm_head": outside}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", quantization_config=cfg(), device_map=device_map,
                                                 offload_folder=tmp_path / "o")
    assert all(p.device.type == "meta" for p in model.model.layers[1].parameters())
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)
    model.save_pretrained(tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(again(x).logits, ref(x).logits)
