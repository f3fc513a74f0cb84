"""hfq.train.TeacherStudentTrainer: the shared teacher-student loop (OSTQuant's is a subclass; tested there)."""
import pytest
import torch
import torch.nn as nn

from hfq.quant import QuantArgs
from hfq.train import TeacherStudentTrainer


class _QAT(TeacherStudentTrainer):
    """Learn the float weight behind a 3-bit fake-quantized linear (QAT of one layer) by block-output MSE."""

    def __init__(self, model, steps):
        self.w = nn.Parameter(model[0].weight.detach().clone())
        super().__init__(model, [{"params": [self.w], "lr": 3e-4}], steps=steps, loss="mse",
                         forward=lambda call, x: call(x), weight_args=QuantArgs(bits=3, granularity="channel"),
                         weight_targets=["0.weight"], desc="test qat")

    def student_params(self):
        return {"0.weight": self.w}


def _block(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 16))


def test_block_reconstruction_lowers_held_out_error_and_leaves_teacher_alone():
    """Catches a student that is not fake-quantized (loss would start at 0), gradients that do not reach the learned
    parameters (no improvement), hooks that leak into the teacher, and a model changed by training."""
    model = _block()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    train, held_out = torch.randn(256, 32, generator=g), torch.randn(128, 32, generator=g)
    trainer = _QAT(model, steps=150)
    seen = []
    trainer.hook_input(model[2], lambda x: seen.append(x.shape) or x)
    with torch.no_grad():
        start = trainer.loss(held_out).item()
        teacher = trainer.outputs(held_out, False)
    assert start > 0 and len(seen) == 1  # the hook ran for the student only
    losses = trainer.train(train, batch_size=32)
    with torch.no_grad():
        end = trainer.loss(held_out).item()
        assert torch.equal(trainer.outputs(held_out, False), teacher)
    trainer.close()
    assert len(losses) == 150 and end < 0.85 * start, (start, end)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert trainer.opt.param_groups[0]["lr"] == pytest.approx(0.0)  # linear decay to zero over `steps`


def test_unknown_loss_and_nan_loss_are_reported():
    """Catches a misspelt loss silently falling back to a default, and training that goes on with a NaN loss."""
    with pytest.raises(ValueError, match="loss must be one of"):
        TeacherStudentTrainer(_block(), [{"params": [nn.Parameter(torch.ones(1))]}], steps=1, loss="kl-top")
    trainer = _QAT(_block(), steps=1)
    with torch.no_grad():
        trainer.w.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="loss became nan"):
        trainer.step(torch.randn(4, 32))
