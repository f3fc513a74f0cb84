import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfq
from hfq.cli import main
from hfq.recipe import load_recipe, parse_sets


def test_parse_sets_types_values():
    assert parse_sets(["bits=4", "group_size=null", "sym=false", "modules_to_not_convert=[lm_head, o_proj]"]) == {
        "bits": 4, "group_size": None, "sym": False, "modules_to_not_convert": ["lm_head", "o_proj"]}
    with pytest.raises(ValueError, match="key=value"):
        parse_sets(["bits"])


def test_recipes_build_their_configs():
    cfg = load_recipe("recipes/rtn-w8a8.yaml")
    assert isinstance(cfg, hfq.RTNConfig) and (cfg.bits, cfg.group_size, cfg.act_bits) == (8, None, 8)
    assert load_recipe("recipes/rtn-w4g64.yaml", {"bits": 3}).bits == 3


def test_bad_recipe_is_refused(tmp_path):
    (tmp_path / "r.yaml").write_text("method: rtn\nconfg: {bits: 4}\n")
    with pytest.raises(ValueError, match="unknown keys"):
        load_recipe(tmp_path / "r.yaml")


def test_cli_quantize_then_eval(tiny_fp_dir, tmp_path, capsys, ids):
    src = tiny_fp_dir("llama")
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(256)} | {"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(src)
    out = tmp_path / "q"
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 256}" for i in range(1100)))
    assert main(["quantize", src, "--method", "rtn", "--set", "bits=4", "--set", "group_size=32",
                 "--output", str(out), "--eval-ppl", str(text), "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["quantization_config"]["group_size"] == 32 and report["ratio"] < 0.35  # fp32 scales, g32
    with torch.no_grad():
        expected = hfq.quantize(AutoModelForCausalLM.from_pretrained(src), hfq.RTNConfig(group_size=32))(ids).logits
        assert torch.equal(AutoModelForCausalLM.from_pretrained(out)(ids).logits, expected)

    card = (out / "README.md").read_text()  # the model card, filled in from model_cards/
    assert f"`{src}`" in card and "- hfq_rtn" in card and '"group_size": 32' in card
    assert f"| perplexity | {report['perplexity']:.4g} |" in card  # --eval-ppl measured it into the card

    assert main(["eval", "ppl", str(out), "--data", str(text), "--seq-len", "64", "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["tokens"] == 17 * 63 and result["ppl"] > 1


def test_cli_reports_bad_input(tiny_fp_dir, tmp_path, capsys):
    """Catches bad input ending in a traceback or being silently ignored: an unknown method, an invalid field, a model
    path that does not exist, and a --recipe given together with a --method (one would silently win)."""
    assert main(["quantize", tiny_fp_dir("llama"), "--method", "nope", "--output", str(tmp_path)]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(["quantize", tiny_fp_dir("llama"), "--method", "rtn", "--set", "bits=12",
                 "--output", str(tmp_path)]) == 2
    assert "bits must be an integer from 2 to 8" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "nowhere"), "--method", "rtn", "--output", str(tmp_path / "o")]) == 2
    assert "nowhere" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["quantize", tiny_fp_dir("llama"), "--recipe", "recipes/rtn-w8a8.yaml", "--method", "gptq",
              "--output", str(tmp_path / "o")])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_cli_quantization_config_json(tiny_fp_dir, tmp_path, capsys):
    """Catches --quantization-config (JSON text or file) not reaching the method, or --set not refining it."""
    cfg = {"quant_method": "hfq_rtn", "bits": 8, "group_size": None}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    for source in (json.dumps(cfg), str(tmp_path / "cfg.json")):
        assert main(["quantize", tiny_fp_dir("llama"), "--quantization-config", source, "--set", "sym=false",
                     "--output", str(tmp_path / "q"), "--quiet"]) == 0
        report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["quantization_config"]
        assert (report["quant_method"], report["bits"], report["group_size"], report["sym"]) == ("hfq_rtn", 8, None,
                                                                                                 False)


def test_cli_push_uploads_checkpoint_and_card(tiny_fp_dir, tmp_path, monkeypatch):
    import huggingface_hub
    import transformers.utils.hub as hub
    from huggingface_hub.errors import EntryNotFoundError
    from test_hub import FakeHubApi

    api, uploads = FakeHubApi(tmp_path / "hub"), []
    monkeypatch.setattr(hub, "_hf_api", api)
    monkeypatch.setattr(hub.ModelCard, "load", lambda *a, **k: (_ for _ in ()).throw(EntryNotFoundError("none")))
    monkeypatch.setattr(huggingface_hub, "upload_file", lambda **kw: uploads.append(kw))
    out = tmp_path / "q"
    assert main(["quantize", tiny_fp_dir("llama"), "--method", "rtn", "--set", "group_size=32", "--output", str(out),
                 "--quiet"]) == 0
    assert main(["push", str(out), "org/tiny-q"]) == 0
    assert "model.safetensors" in api.commits[0][2]
    (card,) = uploads
    assert card["repo_id"] == "org/tiny-q" and card["path_in_repo"] == "README.md"
    assert 'from_pretrained("org/tiny-q")' in card["path_or_fileobj"].decode()
