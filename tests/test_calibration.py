"""Calibration data sources and the block-by-block runner (tiny models, offline)."""
import pytest
import torch
from conftest import build_tiny

from hfq.calibration import (HOLDOUT_TOKENS, capture_inputs, from_dataset, from_samples, get_calibration, lockstep,
                             random_windows, run_blocks)
from hfq.calibration.data import from_model
from hfq.eval.perplexity import token_windows


class CharTokenizer:
    """One token per character: enough to check token ranges without a real tokenizer."""

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        class Out:
            input_ids = torch.tensor([[ord(c) % 256 for c in text]])
        return Out()


def _final_logits(model, hidden):
    base = model.model
    return model.lm_head(base.norm(hidden))


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_identity_pass_equals_plain_model(arch):
    model = build_tiny(arch)
    ids = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    seen = []
    out = run_blocks(model, ids, [lambda block, i, inputs: seen.append((i, inputs.n_tokens))], batch_size=4)
    with torch.no_grad():
        logits = _final_logits(model, out.hidden[0])
    assert torch.equal(logits, ref)
    assert seen == [(0, 96), (1, 96)]


def test_runner_chunks_and_fp_propagation():
    model = build_tiny("llama")
    ids = torch.randint(0, 256, (5, 16), generator=torch.Generator().manual_seed(1))
    out = run_blocks(model, ids, [], batch_size=2, propagate="fp")
    assert [h.shape[0] for h in out.hidden] == [2, 2, 1]
    with torch.no_grad():
        ref = model(ids).logits
    logits = torch.cat([_final_logits(model, h) for h in out.hidden])
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


def test_mamba_runner_identity():
    model = build_tiny("mamba")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    out = run_blocks(model, ids, [lambda *a: None], batch_size=2)
    with torch.no_grad():
        logits = model.lm_head(model.backbone.norm_f(out.hidden[0]))
    assert torch.equal(logits, ref)


def test_lockstep_pauses_all_chunks_and_sees_changes():
    """One forward over all chunks: each watched layer is reached by every chunk before it runs; a change made
    at the pause (here: o_proj zeroed, as a solver would write its weights) is what every chunk then computes."""
    model = build_tiny("llama")
    ids = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(2))
    inputs, _ = capture_inputs(model, ids, batch_size=2)
    block = model.model.layers[0]
    attn = block.self_attn
    with torch.no_grad():
        plain = inputs.forward(block)
    watched = {"self_attn.q_proj": attn.q_proj, "self_attn.k_proj": attn.k_proj, "self_attn.o_proj": attn.o_proj}
    order = []

    def on_reach(name, calls):
        order.append((name, len(calls)))
        assert all(c is not None for c in calls)
        if name == "self_attn.k_proj":  # same input tensors as q_proj: shared, not recomputed
            assert all(a[0][0] is b for a, b in zip(calls, seen_q))
        if name == "self_attn.o_proj":
            attn.o_proj.weight.data.zero_()

    seen_q = []
    h = attn.q_proj.register_forward_pre_hook(lambda m, a: seen_q.append(a[0]) if len(seen_q) < 3 else None)
    outs = lockstep(inputs, block, watched, on_reach)
    h.remove()
    assert order == [("self_attn.q_proj", 3), ("self_attn.k_proj", 3), ("self_attn.o_proj", 3)]
    with torch.no_grad():  # o_proj == 0: the attention branch adds nothing, for every chunk
        ref = inputs.forward(block)
    assert all(torch.equal(o, r) for o, r in zip(outs, ref))
    assert not all(torch.equal(o, p) for o, p in zip(outs, plain))


def test_lockstep_errors_reach_the_caller_and_leave_nothing_behind():
    model = build_tiny("llama")
    ids = torch.randint(0, 256, (4, 8), generator=torch.Generator().manual_seed(0))
    inputs, _ = capture_inputs(model, ids, batch_size=1)
    block = model.model.layers[0]

    def boom(name, calls):
        raise KeyError("solver failed")

    with pytest.raises(KeyError, match="solver failed"):
        lockstep(inputs, block, {"mlp.down_proj": block.mlp.down_proj}, boom)
    # a chunk whose MLP is skipped never reaches down_proj: it cannot be kept in step with the others
    calls = {"n": 0}
    mlp_forward = block.mlp.forward

    def mlp_skipping_second_chunk(x):
        calls["n"] += 1
        return x if calls["n"] == 2 else mlp_forward(x)

    block.mlp.forward = mlp_skipping_second_chunk
    with pytest.raises(RuntimeError, match="different paths"):
        lockstep(inputs, block, {"mlp.down_proj": block.mlp.down_proj}, lambda n, c: None)
    del block.mlp.forward
    assert not block.mlp.down_proj._forward_pre_hooks
    assert torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
    with torch.no_grad():
        torch.testing.assert_close(inputs.run(block, 0), inputs.forward(block)[0])


def test_calibration_windows_never_overlap_eval_windows(tmp_path):
    """Catches calibration windows drawn from the evaluation range (tokens before HOLDOUT_TOKENS): the text is random,
    so each 256-token window occurs once and its start is known exactly; with the hold-out dropped (planted:
    holdout_tokens=0), most of the 64 windows start inside it."""
    g = torch.Generator().manual_seed(0)
    text = "".join(chr(97 + int(c)) for c in torch.randint(0, 26, (HOLDOUT_TOKENS + 8000,), generator=g))
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    tok = CharTokenizer()
    windows = from_dataset(str(path), tok, n_samples=64, seq_len=256, seed=3)
    ids = tok(text).input_ids[0]
    eval_end = sum(w.numel() for w in token_windows(ids, 2048, 0, 20))  # windows 0-19 at the longest seq_len
    assert eval_end <= HOLDOUT_TOKENS
    every = ids.unfold(0, 256, 1)  # [starts, 256]
    starts = []
    for w in windows:
        found = (every == w).all(1).nonzero().flatten().tolist()
        assert len(found) == 1, "a calibration window is not a unique span of the text"
        starts.append(found[0])
    assert windows.shape == (64, 256)
    assert min(starts) >= HOLDOUT_TOKENS, min(starts)
    assert len(set(starts)) > 60  # random starts, not one window repeated
    # deterministic for a seed, different for another
    assert torch.equal(windows, from_dataset(str(path), tok, n_samples=64, seq_len=256, seed=3))
    assert not torch.equal(windows, from_dataset(str(path), tok, n_samples=64, seq_len=256, seed=4))


def test_random_windows_range_and_errors():
    ids = torch.arange(1000)
    w = random_windows(ids, 50, 100, seed=0, start=600)
    assert w.shape == (50, 100) and int(w.min()) >= 600 and int(w.max()) < 1000
    with pytest.raises(ValueError, match="shorter seq_len"):
        random_windows(ids, 1, 500, start=600)


def test_sample_lists_and_errors():
    rows = from_samples([[1, 2, 3], torch.tensor([4, 5]), {"input_ids": [6]}])
    assert [r.tolist() for r in rows] == [[1, 2, 3], [4, 5], [6]]
    assert [r.tolist() for r in from_samples(["ab"], CharTokenizer())] == [[97, 98]]
    with pytest.raises(ValueError, match="calibration"):
        get_calibration(None)
    with pytest.raises(TypeError):
        get_calibration(3.5)


def test_self_sampling_is_deterministic():
    model = build_tiny("llama")
    a = from_model(model, n_samples=2, seq_len=6, seed=0)
    b = get_calibration("self", n_samples=2, seq_len=6, seed=0, model=model)
    assert a.shape == (2, 6) and torch.equal(a, torch.stack(b))


def test_validation_range_sits_between_evaluation_and_calibration():
    """Catches a validation range that overlaps the evaluation windows 0-19 or the calibration tokens."""
    from hfq.calibration import EVAL_WINDOWS, validation_range

    for seq_len in (128, 256, 512):
        first, n = validation_range(seq_len)
        assert first * seq_len >= EVAL_WINDOWS * seq_len and first * seq_len == 10240
        assert (first + n) * seq_len <= HOLDOUT_TOKENS and n > 0
    assert validation_range(512) == (20, 60)
    with pytest.raises(ValueError, match="validate at seq_len <= 512"):
        validation_range(1024)
