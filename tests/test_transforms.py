"""hfq.transforms: Hadamard constructions, Stiefel rotations (geoopt), and exact fusion on tiny float32 models."""
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config

from hfq.transforms import (LayerTransform, Rotation, apply_hadamard, fuse_transforms_, hadamard_matrix, klt_rotation,
                            layer_params, random_hadamard, random_orthogonal, restore_online_rotations,
                            riemannian_adam, transform_layout, transform_shapes)
from hfq.transforms.hadamard import hadamard_factors

# ---------------------------------------------------------------------------------------------- Hadamard


@pytest.mark.parametrize("n", [1, 2, 12, 20, 28, 36, 40, 64, 128, 576, 768, 1536, 2048, 3072])
def test_hadamard_orthonormal_and_fast_matches_explicit(n):
    h = hadamard_matrix(n)
    assert torch.all(torch.isclose(h.abs(), torch.full_like(h, 1 / math.sqrt(n))))  # a scaled ±1 matrix
    rows = h if n <= 1536 else h[torch.randperm(n, generator=torch.Generator().manual_seed(0))[:256]]
    assert torch.allclose(rows @ rows.T, torch.eye(rows.shape[0], dtype=h.dtype), atol=1e-10)
    x = torch.randn(3, 2, n, dtype=torch.float64)
    assert torch.allclose(apply_hadamard(x), x @ h, atol=1e-10)
    assert max(f.shape[0] for f in hadamard_factors(n)) <= 64  # fast path never multiplies by a big dense matrix


def test_apply_hadamard_keeps_dtype_and_computes_in_float32():
    x = torch.randn(4, 576).to(torch.bfloat16)
    y = apply_hadamard(x)
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), x.float() @ hadamard_matrix(576, torch.float32), atol=2e-2)


@pytest.mark.parametrize("n", [172, 7, 344])
def test_hadamard_unsupported_size_names_it(n):
    with pytest.raises(ValueError, match=f"size {n}"):
        hadamard_matrix(n)


def test_random_rotations_are_orthogonal_and_seeded():
    for make in (random_hadamard, random_orthogonal):
        a, b, c = make(96, seed=1), make(96, seed=1), make(96, seed=2)
        assert torch.allclose(a @ a.T, torch.eye(96, dtype=a.dtype), atol=1e-12)
        assert torch.equal(a, b) and not torch.equal(a, c)
    rh = random_hadamard(12, seed=3)
    assert torch.allclose(rh.abs(), hadamard_matrix(12).abs())  # ±1 diagonal times H


def test_klt_rotation_diagonalises_sorted():
    q = random_orthogonal(16, seed=0)
    lam = torch.linspace(1, 16, 16, dtype=torch.float64)
    k = klt_rotation(q @ torch.diag(lam) @ q.T)
    d = k.T @ q @ torch.diag(lam) @ q.T @ k
    assert torch.allclose(d, torch.diag(lam.flip(0)), atol=1e-10)


# ---------------------------------------------------------------------------------------------- Stiefel


@pytest.mark.parametrize("batch", [(), (3,)])
def test_rotation_stays_orthogonal_and_learns(batch):
    n = 16
    init = torch.stack([random_hadamard(n, i) for i in range(3)])[: batch[0]] if batch else random_hadamard(n, 0)
    rot = Rotation(init.float())
    assert torch.allclose(rot.weight, init.float(), atol=1e-6)
    target = random_orthogonal(n, seed=7).float()
    x = torch.randn(256, n)
    loss_fn = lambda: ((x @ rot.weight - x @ target) ** 2).mean()  # noqa: E731
    opt = riemannian_adam([{"params": rot.parameters(), "lr": 0.2}], stabilize_every=10)
    first = loss_fn().item()
    for step in range(30):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert loss_fn().item() < 0.5 * first
    w = rot.weight.detach()
    assert (w.transpose(-1, -2) @ w - torch.eye(n)).abs().max() < 1e-5


def test_rotation_step_size_does_not_grow_with_the_matrix_size():
    """RiemannianAdam normalises a matrix's step by its whole gradient norm (the official OSTQuant optimizer), so
    the first step moves a 16 x 16 and a 256 x 256 rotation equally far; per-entry Adam would move the larger one
    16x further."""
    moved = []
    for n in (16, 256):
        rot = Rotation(random_hadamard(n, 0).float())
        opt = riemannian_adam([{"params": rot.parameters(), "lr": 0.01}])
        before = rot.weight.detach().clone()
        (torch.randn(64, n) @ rot.weight).pow(3).sum().backward()
        opt.step()
        moved.append((rot.weight.detach() - before).norm().item())
    assert 0.01 < moved[0] < 0.05 and abs(moved[1] / moved[0] - 1) < 0.05, moved


# ---------------------------------------------------------------------------------------------- fusion

C = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
         intermediate_size=96, max_position_embeddings=64)
CONFIGS = {
    "llama": lambda: LlamaConfig(**C, attention_bias=True, mlp_bias=True, tie_word_embeddings=False),
    "qwen2": lambda: Qwen2Config(**C, tie_word_embeddings=True),
    "qwen3": lambda: Qwen3Config(**C, head_dim=16, tie_word_embeddings=True),
    "gemma3": lambda: Gemma3TextConfig(**C, head_dim=16, sliding_window=6),
}


def tiny(arch, seed=0, attn="sdpa", uniform_branch_norms=False):
    """A tiny float32 model whose norms and biases are random too (zeros / ones would hide absorption bugs)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch](), attn_implementation=attn).eval()
    off = transform_layout(model).norm_offset
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if "norm" in name:
            branch = any(b in name for b in transform_layout(model).branch_norms)
            p.data = (torch.full(p.shape, 1.3) if branch and uniform_branch_norms else
                      torch.rand(p.shape, generator=g) + 0.5) - off
        elif name.endswith("bias"):
            p.data = torch.randn(p.shape, generator=g) * 0.2
    return model


def inputs():
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: the attention mask must survive the rotated-attention wrapper
    return dict(input_ids=ids, attention_mask=mask)


@torch.no_grad()
def logits(model):
    return model(**inputs()).logits


def random_layers(model, fields, seed=0):
    shapes = transform_shapes(model)
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i in range(model.config.num_hidden_layers):
        kw = {}
        for f in fields:
            if f == "r2":
                kw[f] = torch.stack([random_orthogonal(shapes["r2"][1], seed=100 * i + h)
                                     for h in range(shapes["r2"][0])])
            else:
                kw[f] = torch.rand(shapes[f], generator=g, dtype=torch.float64) * 1.5 + 0.25
        layers.append(LayerTransform(**kw))
    return layers


SCALES = ["s_attn_in", "s_mlp_in", "s_qk", "s_ov", "s_up_down"]
CASES = {
    "norms": {}, "r1": dict(r1=True), "r2": dict(fields=["r2"]), **{s: dict(fields=[s]) for s in SCALES},
    "online_down": dict(online_down=True), "online_qk": dict(online_qk=True),
    "all": dict(r1=True, fields=["r2", *SCALES], online_down=True, online_qk=True),
}


def apply_case(model, case, seed=0):
    spec = CASES[case]
    r1 = random_orthogonal(model.config.hidden_size, seed=seed + 5) if spec.get("r1") else None
    fuse_transforms_(model, r1, random_layers(model, spec.get("fields", []), seed), online_seed=seed + 9,
                     online_down=spec.get("online_down", False), online_qk=spec.get("online_qk", False))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_fusion_is_exact(arch, case):
    model = tiny(arch)
    ref = logits(model)
    if arch == "gemma3" and CASES[case].get("r1"):
        with pytest.raises(NotImplementedError, match="post_attention_layernorm"):
            apply_case(model, case)
        return
    apply_case(model, case)
    absorbed = tiny(arch)
    apply_case(absorbed, "norms")
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, absorbed.state_dict()[k])]
    assert bool(changed) == (case not in ("norms", "online_qk"))  # each transform (but R3) really edits weights
    assert (logits(model) - ref).abs().max() <= 1e-4


def test_gemma3_r1_allowed_with_uniform_sandwich_norms_and_eager():
    model = tiny("gemma3", attn="eager", uniform_branch_norms=True)
    ref = logits(model)
    apply_case(model, "all")
    assert model.config._attn_implementation == "hfq_qk_rotated_eager"
    assert (logits(model) - ref).abs().max() <= 1e-4
    assert model.model.layers[0].input_layernorm.weight.abs().max() > 0  # s_attn_in lives in the (1 + w) norm


def test_tied_embeddings_stay_tied_when_possible():
    model = tiny("qwen2")
    model.model.norm.weight.data.fill_(1.0)
    ref = logits(model)
    apply_case(model, "r1")
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.config.tie_word_embeddings
    assert (logits(model) - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_save_reload_with_online_rotations(arch, tmp_path):
    model = tiny(arch)
    ref = logits(model)
    apply_case(model, "all" if arch == "qwen2" else "online_down")
    if arch == "gemma3":
        fuse_transforms_(model, online_qk=True, online_seed=None)
    assert not model.config.tie_word_embeddings  # the random final norm had to go into lm_head
    out = logits(model)
    assert (out - ref).abs().max() <= 1e-4
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (logits(again) - out).abs().max() > 1e-3  # plain from_pretrained does not know the online rotations
    restore_online_rotations(again)
    restore_online_rotations(again)  # idempotent
    assert torch.equal(logits(again), out)


def test_online_rotation_hook_survives_module_replacement():
    model = tiny("llama")
    apply_case(model, "online_down")
    ref = logits(model)
    for layer in model.model.layers:  # what a quantizer does: swap in a new module with the same weights
        old = layer.mlp.down_proj
        new = torch.nn.Linear(old.in_features, old.out_features, bias=True)
        new.load_state_dict(old.state_dict(), strict=False)
        layer.mlp.down_proj = new
    assert (logits(model) - ref).abs().max() > 1e-3
    restore_online_rotations(model)
    assert torch.equal(logits(model), ref)


def test_layer_params_is_differentiable():
    model = tiny("llama")
    layout, block = transform_layout(model), model.model.layers[0]
    rot = Rotation(random_hadamard(16, 0).float().expand(2, 16, 16).clone())
    s = torch.ones(96, requires_grad=True)
    out = layer_params(block, layout, 4, 2, r1=random_hadamard(64, 1), dtype=torch.float32,
                       t=LayerTransform(r2=rot.weight, s_up_down=s))
    (out["self_attn.o_proj.weight"].square().sum() + out["mlp.down_proj.weight"].square().sum()).backward()
    assert s.grad is not None and all(p.grad is not None for p in rot.parameters())


def test_down_scale_order_matters():
    """OSTQuant's code fuses W_down H diag(s) while the activation is (m / s) H: only W_down diag(s) H is exact."""
    g = torch.Generator().manual_seed(0)
    m, w, s = torch.randn(5, 12, generator=g), torch.randn(4, 12, generator=g), torch.rand(12, generator=g) + 0.5
    h = hadamard_matrix(12, torch.float32)
    ref = m @ w.T
    act = (m / s) @ h
    assert torch.allclose(act @ (w * s @ h).T, ref, atol=1e-5)
    assert not torch.allclose(act @ ((w @ h) * s).T, ref, atol=1e-2)


def test_errors():
    from tests.conftest import build_tiny

    with pytest.raises(NotImplementedError, match="deepseek_v3"):
        fuse_transforms_(build_tiny("deepseek_v3"))
    model = tiny("llama")
    with pytest.raises(ValueError, match="not orthogonal"):
        fuse_transforms_(model, torch.randn(64, 64))
    with pytest.raises(ValueError, match="shape"):
        fuse_transforms_(model, None, [LayerTransform(s_ov=torch.ones(3))] * 2)
    fuse_transforms_(model, online_down=True)
    with pytest.raises(ValueError, match="already has an online down_proj"):
        fuse_transforms_(model, online_down=True)


def test_weight_klt_r1_init_is_orthogonal_and_exact():
    from hfq.transforms import weight_klt_rotation

    model = tiny("llama")
    ref = logits(model)
    r1 = weight_klt_rotation(model) @ random_hadamard(64, seed=0)
    fuse_transforms_(model, r1)
    assert (logits(model) - ref).abs().max() <= 1e-4


def test_smollm2_shapes_quarot_style():
    """SmolLM2-135M widths (hidden 576 = 36 * 16, 9 heads / 3 KV heads of 64, MLP 1536 = 12 * 128), one layer."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=576, intermediate_size=1536, num_hidden_layers=1,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=64, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ref = logits(model)
    layers = [LayerTransform(r2=random_hadamard(64, seed=1))]
    fuse_transforms_(model, random_hadamard(576, seed=0), layers, online_down=True, online_qk=True, online_seed=2)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # unit final norm: stays tied
    assert (logits(model) - ref).abs().max() <= 1e-4
