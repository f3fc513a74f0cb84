"""`TeacherStudentTrainer`: learn parameters (transforms, scales, clipping, weights) so that a quantized student
matches the full-precision teacher, without copying the model.

Teacher and student are the same modules. The teacher runs them as they are; the student runs them through
`torch.func.functional_call` on overridden parameters (`student_params()`, differentiable in what is learned),
with the weights of `weight_targets` fake-quantized (min/max scales in the graph, straight-through rounding) and
input / output hooks that act only in student mode (activation fake-quantization, online rotations, ...). The loss
compares student and teacher outputs (`hfq.train.LOSSES`: KL-Top, KL, MSE, or any callable); one optimizer holds
one group per kind of parameter (own learning rate), with a linear decay to zero over `steps`.

A method subclasses it (OSTQuant: rotations and scalings through `layer_params`) or uses it directly for block
reconstruction (model = one block, forward = how to call it, loss = "mse") or QAT on chosen layers."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from torch.func import functional_call
from tqdm.auto import tqdm
from transformers.utils import logging

from ..progress import is_quiet
from ..quant import QuantArgs, fake_quantize_minmax
from .losses import LOSSES

logger = logging.get_logger(__name__)


def causal_lm_logits(call, batch):
    """Default forward: a causal LM on token ids [batch, seq] -> logits."""
    return call(input_ids=batch, use_cache=False).logits


class TeacherStudentTrainer:
    """model: teacher and student modules (frozen here; what is learned lives in `param_groups`).
    param_groups: optimizer groups ({"params": [...], "lr": ...}), one per kind of learned parameter.
    loss: a name of `hfq.train.LOSSES` ("kl_top", "kl", "mse") with `loss_kwargs`, or a callable(student, teacher).
    forward: callable(call, batch) -> output tensor, where call(*args, **kwargs) runs the model (teacher) or its student.
    weight_args / weight_targets: fake-quantize these parameter names (e.g. "model.layers.0.mlp.up_proj.weight") in
    the student, after `student_params()` transformed them. optimizer: callable(groups) -> torch optimizer (Adam)."""

    def __init__(self, model: nn.Module, param_groups: list[dict], *, steps: int, loss="kl_top",
                 loss_kwargs: dict | None = None, forward=causal_lm_logits, weight_args: QuantArgs | None = None,
                 weight_targets=(), optimizer=None, desc: str = "hfq train"):
        if isinstance(loss, str):
            if loss not in LOSSES:
                raise ValueError(f"loss must be one of {sorted(LOSSES)} or a callable, got {loss!r}")
            self.loss_name, loss = loss, partial(LOSSES[loss], **(loss_kwargs or {}))
        else:
            self.loss_name = getattr(loss, "__name__", "loss")
        self.model, self.loss_fn, self.forward = model, loss, forward
        self.weight_args, self.weight_names = weight_args, set(weight_targets)
        self.desc, self.student, self._handles = desc, False, []
        model.requires_grad_(False)
        param_groups = [g for g in param_groups if g["params"]]
        self.opt = (optimizer or torch.optim.Adam)(param_groups) if param_groups else None  # None: nothing to learn
        self.sched = None if self.opt is None else torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: max(0.0, 1 - s / max(steps, 1)))
        self.steps, self.step_count = steps, 0

    # ---------------------------------------------------------------- student hooks and parameters
    def hook_input(self, module: nn.Module, fn) -> None:
        """In student mode, replace the first positional input x of `module` by fn(x)."""
        def pre(mod, args, kwargs):
            return ((fn(args[0]), *args[1:]), kwargs) if self.student else None
        self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))

    def hook_output(self, module: nn.Module, fn) -> None:
        """In student mode, replace the output y of `module` by fn(y)."""
        self._handles.append(module.register_forward_hook(lambda mod, args, out: fn(out) if self.student else None))

    def student_params(self) -> dict[str, torch.Tensor]:
        """Parameter overrides of the student, differentiable in the learned parameters (none by default)."""
        return {}

    def set_student(self, active: bool) -> None:
        """Switch student mode on / off (a subclass also switches its own run-time pieces here)."""
        self.student = active

    def params(self) -> dict[str, torch.Tensor]:
        """`student_params()` with the weight targets fake-quantized."""
        out = self.student_params()
        if self.weight_args is not None:
            for name in self.weight_names:
                out[name] = fake_quantize_minmax(out[name] if name in out else self.model.get_parameter(name),
                                                 self.weight_args)
        return out

    # ---------------------------------------------------------------- training
    def outputs(self, batch, student: bool, params: dict | None = None) -> torch.Tensor:
        self.set_student(student)
        try:
            if not student:
                return self.forward(self.model, batch)
            params = self.params() if params is None else params
            return self.forward(lambda *args, **kw: functional_call(self.model, params, args, kw), batch)
        finally:
            self.set_student(False)

    def loss(self, batch, teacher: torch.Tensor | None = None) -> torch.Tensor:
        if teacher is None:
            with torch.no_grad():
                teacher = self.outputs(batch, False)
        return self.loss_fn(self.outputs(batch, True), teacher)

    def step(self, batch, teacher: torch.Tensor | None = None) -> float:
        """One optimizer step on `batch`; `teacher`: precomputed target outputs (e.g. block reconstruction, where
        the target is the float block on float inputs and the student reads quantized inputs)."""
        if self.opt is None:
            raise ValueError(f"{self.desc}: there is nothing to learn (no parameter groups with parameters)")
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(batch, teacher)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{self.desc}: the loss became {loss.item()} at step {self.step_count}; lower the "
                                     f"learning rates or use more calibration samples")
        loss.backward()
        self.opt.step()
        self.sched.step()
        self.step_count += 1
        return loss.item()

    def train(self, samples: torch.Tensor, batch_size: int, seed: int = 0, held_out=None,
              held_out_every: int = 5) -> list[float]:
        """`steps` optimizer steps over shuffled batches of `samples` (first dim = samples, cycled epoch after
        epoch); returns the losses. `held_out`: a batch never trained on, whose loss is measured before step 0 and
        every `held_out_every` steps into `self.held_out_losses` [(step, loss)], a training curve that shows
        whether what is learned generalises."""
        g = torch.Generator().manual_seed(seed)
        order, losses = torch.empty(0, dtype=torch.long), []
        self.held_out_losses = []
        bar = tqdm(range(self.steps), desc=self.desc, disable=is_quiet())
        for step in bar:
            if held_out is not None and step % held_out_every == 0:
                self._measure_held_out(held_out, step)
            if order.numel() < batch_size:
                order = torch.cat([order, torch.randperm(samples.shape[0], generator=g)])
            idx, order = order[:batch_size], order[batch_size:]
            losses.append(self.step(samples[idx]))
            bar.set_postfix({self.loss_name: f"{losses[-1]:.4f}"})
        if held_out is not None:
            self._measure_held_out(held_out, self.steps)
        if losses:
            logger.info(f"{self.desc}: {self.loss_name} {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps")
        return losses

    def _measure_held_out(self, batch, step: int) -> None:
        with torch.no_grad():
            self.held_out_losses.append((step, self.loss(batch).item()))

    def close(self) -> None:
        """Remove the hooks (the model is as before; what was learned stays in the parameter groups)."""
        for h in self._handles:
            h.remove()
        self._handles = []
