"""OSTQuant training: learned orthogonal + scaling transforms with the KL-Top loss (llm.md §1).

`quantizer.py` is the lifecycle; this file is the method's own idea:
- `init_transforms`: R1 (one global residual rotation), R2 (one per KV head per layer) and the per-layer diagonal
  scalings (all ones), from a random Hadamard, a weight-KLT x random Hadamard, or a random orthogonal matrix;
- the KL-Top loss (`hfq.train.kl_top_loss`): KL(teacher || student) on the teacher's top-k tokens;
- `OSTQuantTrainer`: end-to-end training over the whole model (not block by block) on the shared
  `hfq.train.TeacherStudentTrainer`. The teacher is the model itself with its original parameters; the student is
  the same modules evaluated through `torch.func.functional_call` on the transformed parameters
  (`hfq.transforms.layer_params` / `global_params`), with fake-quantized weights (optional) and dynamic
  fake-quantized activations (straight-through rounding) at every quantized linear's input, and the online R4
  Hadamard before down_proj. Rotations are geoopt Stiefel points trained with RiemannianAdam, as
  in the official code (`hfq.transforms.Rotation`, `riemannian_adam`).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from transformers.utils import logging

from hfq.arch import get_adapter
from hfq.quant import QuantArgs, fake_quantize_minmax
from hfq.train import TeacherStudentTrainer
from hfq.transforms import (LayerTransform, OnlineHadamard, Rotation, global_params, layer_params, random_hadamard,
                            random_orthogonal, riemannian_adam, transform_layout, transform_shapes,
                            use_rotated_attention, weight_klt_rotation)
from hfq.transforms.hadamard import klt_rotation

logger = logging.get_logger(__name__)

ROTATION_INITS = ("hadamard", "klt_hadamard", "random")
SCALES = ("s_attn_in", "s_mlp_in", "s_qk", "s_ov", "s_up_down")

__all__ = ["ROTATION_INITS", "SCALES", "OSTTransforms", "OSTQuantTrainer", "init_transforms", "orthogonalize"]


# ---------------------------------------------------------------------------------------------- transforms
def orthogonalize(r: torch.Tensor) -> torch.Tensor:
    """Nearest orthogonal matrix (polar factor) in float64: removes float32 drift before an exact fusion."""
    u, _, vh = torch.linalg.svd(r.detach().double())
    return u @ vh


@torch.no_grad()
def _r2_klt(model, seed: int) -> torch.Tensor:
    """Per KV head: eigenvectors of the covariance of the o_proj input columns of that head's group (rows of
    W_o[:, head] stacked over the GQA group), times a random Hadamard (OSTQuant `--use_klt` for R_ov)."""
    layout = transform_layout(model)
    heads, kv, _ = get_adapter(model).attention_dims(model)
    groups = heads // kv
    out = []
    for i, block in enumerate(get_adapter(model).get_blocks(model)):
        attn = block.get_submodule(layout.attn)
        hd = attn.head_dim
        wo = block.get_submodule(f"{layout.attn}.{layout.o}").weight.detach().double()
        wo = wo.reshape(wo.shape[0], heads, hd)
        for h in range(kv):
            rows = wo[:, h * groups:(h + 1) * groups].permute(1, 0, 2).reshape(-1, hd)
            rows = rows - rows.mean(0)
            out.append(klt_rotation(rows.T @ rows / rows.shape[0]) @ random_hadamard(hd, seed + 1000 + i * kv + h))
    return torch.stack(out).reshape(len(get_adapter(model).get_blocks(model)), kv, hd, hd)


def init_transforms(model, rotation_init: str = "hadamard", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(r1 [d, d], r2 [n_layers, n_kv, head_dim, head_dim]) in float64, as the official code initialises them."""
    if rotation_init not in ROTATION_INITS:
        raise ValueError(f"rotation_init must be one of {ROTATION_INITS}, got {rotation_init!r}")
    shapes = transform_shapes(model)
    d = shapes["r1"][0]
    kv, hd = shapes["r2"][0], shapes["r2"][1]
    n = len(get_adapter(model).get_blocks(model))
    if rotation_init == "random":
        r1 = random_orthogonal(d, seed)
        r2 = torch.stack([random_orthogonal(hd, seed + 1000 + j) for j in range(n * kv)]).reshape(n, kv, hd, hd)
    elif rotation_init == "hadamard":
        r1 = random_hadamard(d, seed)
        r2 = torch.stack([random_hadamard(hd, seed + 1000 + j) for j in range(n * kv)]).reshape(n, kv, hd, hd)
    else:
        r1 = weight_klt_rotation(model) @ random_hadamard(d, seed)
        r2 = _r2_klt(model, seed)
    return r1, r2


class OSTTransforms(nn.Module):
    """The learnable state: `r1` (Rotation [d, d]), `r2` (Rotation [n_layers * n_kv, hd, hd]) and one parameter
    per scaling kind, [n_layers, *shape], initialised to ones (scalings=False: none, QuaRot-style)."""

    def __init__(self, model, r1: torch.Tensor, r2: torch.Tensor, scalings: bool = True):
        super().__init__()
        shapes = transform_shapes(model)
        self.n_layers = len(get_adapter(model).get_blocks(model))
        self.kv, self.hd = shapes["r2"][0], shapes["r2"][1]
        self.r1 = Rotation(r1.float())
        self.r2 = Rotation(r2.reshape(-1, self.hd, self.hd).float())
        self.scales = nn.ParameterDict({name: nn.Parameter(torch.ones(self.n_layers, *shapes[name]))
                                        for name in (SCALES if scalings else ())})

    def layer(self, i: int, r2: torch.Tensor | None = None) -> LayerTransform:
        r2 = self.r2.weight if r2 is None else r2
        return LayerTransform(r2=r2.reshape(self.n_layers, self.kv, self.hd, self.hd)[i],
                              **{name: p[i] for name, p in self.scales.items()})

    @torch.no_grad()
    def export(self) -> tuple[torch.Tensor, list[LayerTransform]]:
        """(r1, layers) in float64, rotations re-orthogonalised, ready for `fuse_transforms_`."""
        r1 = orthogonalize(self.r1.weight)
        r2 = orthogonalize(self.r2.weight).reshape(self.n_layers, self.kv, self.hd, self.hd)
        layers = [LayerTransform(r2=r2[i], **{n: p[i].detach().double().clone() for n, p in self.scales.items()})
                  for i in range(self.n_layers)]
        return r1, layers

    def rotation_parameters(self):
        return list(self.r1.parameters()) + list(self.r2.parameters())

    def scaling_parameters(self):
        return list(self.scales.parameters())


# ---------------------------------------------------------------------------------------------- trainer
class OSTQuantTrainer(TeacherStudentTrainer):
    """End-to-end training of `transforms` on `model` (which is left unchanged: call `close()` after training to
    remove the hooks, then fuse `transforms.export()`), on `hfq.train.TeacherStudentTrainer` with the KL-Top loss.

    weight_args: fake-quantize the transformed weights of `targets` (None: float weights, OSTQuant's W4A4 setting).
    act_args: dynamic fake-quantization of every target's input (None: A16). online_down: R4 before down_proj
    (seed as in `fuse_transforms_`). kv_args / online_qk: the student's attention reads K (after RoPE, and after
    the R3 Hadamard with online_qk) and V fake-quantized, as the fused model will. targets: {full module name:
    nn.Linear} that will be quantized."""

    def __init__(self, model, transforms: OSTTransforms, targets: dict[str, nn.Module], *,
                 weight_args: QuantArgs | None = None, act_args: QuantArgs | None = None, online_down: bool = True,
                 online_seed: int | None = 0, kl_top_k: int = 1000, lr_rotation: float = 0.01689753,
                 lr_scaling: float = 0.00178988, steps: int = 100, stabilize_every: int = 10,
                 kv_args: QuantArgs | None = None, online_qk: bool = False):
        self.tf = transforms
        self.layout = transform_layout(model)
        self.heads, self.kv, head_dim = get_adapter(model).attention_dims(model)
        self.prefix = get_adapter(model).blocks + "."
        self.act_args = act_args
        inter = transform_shapes(model)["online_down"][0]
        self.down_rotation = OnlineHadamard(inter, online_seed) if online_down else None
        self.attention = [b.get_submodule(self.layout.attn) for b in get_adapter(model).get_blocks(model)]
        self.kv_args, self.qk_rotation = kv_args, OnlineHadamard(head_dim, online_seed) if online_qk else None
        if kv_args is not None or online_qk:
            use_rotated_attention(model)
        groups = [{"params": transforms.rotation_parameters(), "lr": lr_rotation}]
        if transforms.scaling_parameters():
            groups.append({"params": transforms.scaling_parameters(), "lr": lr_scaling})
        super().__init__(model, groups, steps=steps, loss="kl_top", loss_kwargs={"k": kl_top_k},
                         weight_args=weight_args, optimizer=lambda g: riemannian_adam(g, stabilize_every),
                         weight_targets=[n + ".weight" for n in targets if n.startswith(self.prefix)],
                         desc="hfq_ostquant train")
        self.hook_output(model.get_submodule(self.layout.embed), lambda out: out @ self._io["r1"].to(out.dtype))
        self.hook_input(model.get_submodule(self.layout.lm_head), self._head_input)
        down_suffix = f".{self.layout.mlp}.{self.layout.down}"
        for name, module in targets.items():
            if name.startswith(self.prefix):
                self.hook_input(module, partial(self._target_input, self.down_rotation
                                                if name.endswith(down_suffix) else None))

    def _head_input(self, x):
        x = x @ self._io["r1"].T.to(x.dtype)
        return x if self._io["gamma"] is None else x * self._io["gamma"].to(x.dtype)

    def _target_input(self, rotate, x):
        if rotate is not None:
            x = rotate(x)
        return x if self.act_args is None else fake_quantize_minmax(x, self.act_args)

    def set_student(self, active: bool) -> None:
        super().set_student(active)
        for attn in self.attention:  # the student's attention as the fused model's; the teacher's float
            attn.kv_quant, attn.qk_rotation = (self.kv_args, self.qk_rotation) if active else (None, None)

    def student_params(self) -> dict[str, torch.Tensor]:
        """Transformed parameters of the whole model, differentiable in the transforms (weight fake-quantization
        is applied after, by the base class)."""
        r1, r2 = self.tf.r1.weight, self.tf.r2.weight
        # embedding and lm_head: rotating the [vocab, d] matrices costs 2 * vocab * d^2 per step; the hooks rotate
        # the looked-up rows and lm_head's input instead (x (W g R1)^T = ((x R1^T) * g) W^T), which is the same
        out = global_params(self.model, None, dtype=torch.float32)
        out.pop(self.layout.lm_head + ".weight", None)
        norm_key = self.layout.final_norm + ".weight"
        self._io = {"r1": r1, "gamma": None}
        if norm_key in out:  # final norm absorbed into lm_head: the student's norm is 1, lm_head input times gamma
            self._io["gamma"] = (self.model.get_parameter(norm_key).detach().float() + self.layout.norm_offset)
        for i, block in enumerate(get_adapter(self.model).get_blocks(self.model)):
            p = layer_params(block, self.layout, self.heads, self.kv, r1=r1, t=self.tf.layer(i, r2),
                             down_rotation=self.down_rotation, dtype=torch.float32)
            out.update({f"{self.prefix}{i}.{name}": value for name, value in p.items()})
        return out
