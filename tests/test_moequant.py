"""MoEQuant: EBSS sampling, affinity-weighted (AGQ) Hessians, MoE rotations, the config and its checkpoints."""
import json

import pytest
import torch
from conftest import build_tiny
from transformers import AutoModelForCausalLM

import hfq
from hfq.arch import get_adapter
from hfq.calibration import ebss, get_calibration
from hfq.calibration.ebss import ebss_sampler, expert_coverage
from hfq.nn import QuantExperts
from hfq.solvers import Hessian
from hfq.quantizers.gptq import GPTQSolver

MOE = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]
ROTATABLE = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]


def _moe_blocks(model):
    return [b for b in get_adapter(model).get_blocks(model) if hasattr(b.mlp, "experts")]


@pytest.mark.parametrize("arch", MOE)
def test_routing_read_by_the_adapter_is_the_models_own(arch):
    """Catches the adapter reading the wrong arguments of an experts call (ids for weights, a stale or unrenormalised
    routing): the ids and weights it reads must equal what the model's own router returned for those tokens
    (softmax + renorm for Mixtral, no renorm for Qwen2-MoE / OLMoE, sigmoid + correction bias + group-limited top-k
    + scaling for DeepSeek-V3)."""
    model = build_tiny(arch)
    adapter = get_adapter(model)
    seen, routed = [], []
    for b in _moe_blocks(model):
        b.mlp.experts.register_forward_pre_hook(
            lambda m, a, k: seen.append(adapter.expert_inputs(a, k)), with_kwargs=True)
        b.mlp.gate.register_forward_hook(lambda m, a, out: routed.append(out))
    if arch == "deepseek_v3":  # make the correction bias matter: selection must use it, weights must not
        for b in _moe_blocks(model):
            b.mlp.gate.e_score_correction_bias.copy_(torch.linspace(-0.5, 0.5, 8))
    with torch.no_grad():
        model(torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0)))
    assert len(seen) == len(routed) == len(_moe_blocks(model)) > 0
    for (x, ids, w), (_, want_w, want_ids) in zip(seen, routed):
        assert x.shape[0] == ids.shape[0] == 32
        assert torch.equal(ids, want_ids)
        assert torch.equal(w, want_w)


def test_ebss_is_deterministic_and_reuses_its_cache(tmp_path, monkeypatch):
    """Catches EBSS samples that change between runs with the same seed, a cache that is not reused (samples
    regenerated), and an interrupted run's cut last line being read as a sample instead of regenerated."""
    model = build_tiny("mixtral")
    a = ebss_sampler(model, 3, 20, torch.Generator().manual_seed(5), cache_dir=tmp_path)
    (path,) = tmp_path.glob("ebss-*.jsonl")
    assert [json.loads(x)["ids"] for x in path.read_text().splitlines()] == a.tolist()
    path.write_text(path.read_text()[:-9])  # the last sample cut mid-line
    calls = []
    one = ebss._one_sample
    monkeypatch.setattr(ebss, "_one_sample", lambda *x, **k: calls.append(1) or one(*x, **k))
    b = ebss_sampler(model, 3, 20, torch.Generator().manual_seed(5), cache_dir=tmp_path)
    assert torch.equal(a, b) and len(calls) == 1
    c = ebss_sampler(model, 3, 20, torch.Generator().manual_seed(6), cache_dir=tmp_path)
    assert not torch.equal(a, c) and len(list(tmp_path.glob("ebss-*.jsonl"))) == 2  # another seed, another file
    loaded = get_calibration(str(path), n_samples=3, seq_len=20)  # the cache file is a calibration set
    assert all(torch.equal(x, y) for x, y in zip(loaded, a, strict=True))


def test_ebss_balances_experts_better_than_plain_sampling():
    """Catches an EBSS cost with the balance term's sign flipped, or ignored (beam search on likelihood alone): on
    the same model, EBSS samples must spread tokens over the experts far more evenly than the model's own
    ancestral samples (measured: usage std 0.0014 vs 0.044, min tokens per expert 127 vs 102)."""
    from hfq.calibration import from_model

    model = build_tiny("mixtral")
    balanced = expert_coverage(model, from_model(model, 4, 64, seed=1, sampler="ebss"))
    plain = expert_coverage(model, from_model(model, 4, 64, seed=1, sampler="plain"))
    assert balanced["mean_std"] < 0.25 * plain["mean_std"]
    assert balanced["min_tokens"] > plain["min_tokens"]


@pytest.mark.parametrize("arch", MOE)
def test_ebss_candidates_see_their_beam_and_themselves_only(arch):
    """Catches a broken tree mask in EBSS's batched candidate forward (candidates attending to each other, a wrong
    position, the mask ignored by an architecture): each candidate's logits and routing must equal a plain cached
    forward of that one token after its own beam."""
    from hfq.calibration.data import decode_step

    model = build_tiny(arch)
    beams = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    cand = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), ebss.record_routing(model) as routes:
        _, cache = decode_step(model, beams)
        got = ebss.candidate_forward(model, cache, cand, 7).logits.reshape(10, -1)
        got_routes = routes[-1]
        want, want_routes = [], []
        for b in range(2):
            for j in range(5):
                _, c = decode_step(model, beams[b:b + 1])
                out, _ = decode_step(model, cand[b:b + 1, j:j + 1], c)
                want.append(out.logits[0, -1])
                want_routes.append(routes[-1][0])
    torch.testing.assert_close(got, torch.stack(want), atol=1e-5, rtol=1e-5)
    assert torch.equal(got_routes, torch.stack(want_routes))


def test_ebss_flags_loops():
    """Catches the degenerate-sample filter missing a loop (or flagging ordinary text)."""
    assert ebss._degenerate([1, 2, 3] * 20, 0.3)
    assert not ebss._degenerate(torch.randperm(60).tolist(), 0.3)


def _record_stats(monkeypatch):
    """Every InputStats handed to the GPTQ solver: {(block, layer or (experts, part)): stats}."""
    seen = {}
    solve, solve_experts = GPTQSolver.solve, GPTQSolver.solve_experts

    def rec_solve(self, index, names, modules, stats):
        for n in names:
            seen[(index, n)] = stats
        return solve(self, index, names, modules, stats)

    def rec_experts(self, index, name, module, part, stats):
        seen[(index, name, part)] = stats
        return solve_experts(self, index, name, module, part, stats)

    monkeypatch.setattr(GPTQSolver, "solve", rec_solve)
    monkeypatch.setattr(GPTQSolver, "solve_experts", rec_experts)
    return seen


@pytest.mark.parametrize("true_sequential", [True, False])
def test_agq_hessians_are_weighted_by_routing_and_shared_gate(monkeypatch, true_sequential):
    """Catches AGQ weighting the wrong tokens or not at all: each expert's Hessian must be 2/sum(g) sum g(t,e) x x^T
    over the tokens routed to it, g its routing weight; the gated shared expert's layers must weight each token by
    sigmoid(shared_expert_gate(x)); and the shared-expert gate itself (which reads the same tensor) must keep the
    plain Hessian rather than be grouped with the weighted layers. Attention stays float so block 0's MLP sees the
    float model's inputs in both calibration orders."""
    model = build_tiny("qwen2_moe")
    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(3))
    mlp = model.model.layers[0].mlp
    inputs, routes = [], []
    def record(module, args):
        inputs.append(args[0].detach().clone())
        routes.append(args[1:])
    mlp.experts.register_forward_pre_hook(record)
    with torch.no_grad():
        model(calib)
    x, (ids, w) = inputs[0], routes[0]
    gate = torch.sigmoid(x @ mlp.shared_expert_gate.weight.detach().T).reshape(-1)
    seen = _record_stats(monkeypatch)
    cfg = hfq.MoEQuantConfig(ebss=False, rotate=False, n_samples=4, seq_len=16, batch_size=4,
                             true_sequential=true_sequential, modules_to_not_convert=[r".*self_attn"])
    hfq.quantize(model, cfg, calibration=calib)

    def hessian(rows, weights=None):
        h = Hessian(rows.shape[-1])
        h.add(rows, weights)
        return h.matrix()

    experts = seen[(0, "mlp.experts", "gate_up")]
    for e in range(4):
        hit = (ids == e)
        tokens = hit.any(-1)
        torch.testing.assert_close(experts[e].hessian(), hessian(x[tokens], (w * hit).sum(-1)[tokens]))
    torch.testing.assert_close(seen[(0, "mlp.shared_expert.gate_proj")].hessian(), hessian(x, gate))
    torch.testing.assert_close(seen[(0, "mlp.shared_expert_gate")].hessian(), hessian(x))


@pytest.mark.parametrize("arch", ROTATABLE)
def test_rotation_fuses_exactly_into_moe_blocks(arch):
    """Catches a rotation applied on the wrong side of fused experts ([E, out, in]), a router or shared expert left
    unrotated, or the MLP norm not absorbed: logits after fusing R1 + R2 must equal the float model's."""
    from hfq.transforms import LayerTransform, fuse_transforms_
    from hfq.quantizers.ostquant.train import init_transforms

    model = build_tiny(arch)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        r1, r2 = init_transforms(model, "random", seed=0)
        fuse_transforms_(model, r1, [LayerTransform(r2=r) for r in r2])
        out = model(ids).logits
    fp_experts = build_tiny(arch).model.layers[0].mlp.experts
    assert not torch.allclose(model.model.layers[0].mlp.experts.gate_up_proj, fp_experts.gate_up_proj)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NotImplementedError, match="R1 and R2 only"):  # refused before touching any weight
        fuse_transforms_(model, None, [LayerTransform(s_mlp_in=torch.ones(64))] * len(r2))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("arch", MOE)
def test_moequant_quantizes_saves_and_reloads(arch, tmp_path):
    """Catches a MoE architecture MoEQuant cannot run end to end (EBSS on its router, AGQ, the rotation where the
    architecture has a layout), experts left float, or a checkpoint that does not reload bit-exactly with its
    MoEQuant fields saved (and the runtime cache folder not saved)."""
    model = build_tiny(arch)
    cfg = hfq.MoEQuantConfig(n_samples=2, seq_len=16, rotate=arch in ROTATABLE, ebss_cache_dir=False)
    hfq.quantize(model, cfg)
    assert sum(isinstance(m, QuantExperts) for m in model.modules()) == len(_moe_blocks(build_tiny(arch)))
    assert model.hf_quantizer.coverage["min_tokens"] >= 0
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "hfq_moequant" and saved["affinity"] and saved["ebss"]
    assert "ebss_cache_dir" not in saved and "expert_affinity" not in saved
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)


def test_moequant_refuses_what_it_cannot_do():
    """Catches silent fallbacks: a dataset passed together with ebss=True, a dense model, a rotation on an
    architecture with no MoE transform layout (DeepSeek-V3's MLA), and GPT-OSS (transposed, biased, interleaved
    experts) must each fail before any work with an error naming the problem."""
    with pytest.raises(ValueError, match="ebss=False"):
        hfq.MoEQuantConfig(dataset="wikitext2")
    with pytest.raises(ValueError, match="no fused MoE experts"):
        hfq.quantize(build_tiny("llama"), hfq.MoEQuantConfig(rotate=False, n_samples=2, seq_len=8))
    with pytest.raises(NotImplementedError, match="deepseek_v3"):
        hfq.quantize(build_tiny("deepseek_v3"), hfq.MoEQuantConfig(n_samples=2, seq_len=8))
    from transformers import GptOssConfig

    gpt_oss = AutoModelForCausalLM.from_config(GptOssConfig(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=32, num_local_experts=4, sliding_window=8))
    with pytest.raises(NotImplementedError, match="gpt_oss"):
        hfq.quantize(gpt_oss, hfq.MoEQuantConfig(rotate=False, n_samples=2, seq_len=8))


def test_moequant_quantizes_on_load(tiny_fp_dir, tmp_path):
    """Catches MoEQuant working through hfq.quantize only: from_pretrained(quantization_config=MoEQuantConfig(...))
    must generate its EBSS samples from the loaded weights (cached where ebss_cache_dir says) and pack the experts."""
    cfg = hfq.MoEQuantConfig(n_samples=2, seq_len=16, ebss_cache_dir=tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_fp_dir("mixtral"), quantization_config=cfg)
    assert isinstance(model.model.layers[0].mlp.experts, QuantExperts)
    assert len(list(tmp_path.glob("ebss-*.jsonl"))) == 1
