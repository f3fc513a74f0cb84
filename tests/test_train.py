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


def test_held_out_curve_is_measured_without_changing_training():
    """Catches a held-out measurement that trains on the held-out batch or perturbs training (the training losses must
    be identical with and without it), and a curve missing its first or last point."""
    g = torch.Generator().manual_seed(1)
    train, held_out = torch.randn(64, 32, generator=g), torch.randn(16, 32, generator=g)
    plain = _QAT(_block(), steps=12)
    a = plain.train(train, batch_size=16)
    curved = _QAT(_block(), steps=12)
    b = curved.train(train, batch_size=16, held_out=held_out, held_out_every=5)
    assert a == b
    assert [s for s, _ in curved.held_out_losses] == [0, 5, 10, 12]
    with torch.no_grad():
        assert curved.held_out_losses[-1][1] == pytest.approx(curved.loss(held_out).item())  # the trained state


def test_ostquant_records_its_held_out_curve():
    """Catches OSTQuant ignoring its runtime `held_out` windows (no curve) or saving them into config.json."""
    import hfq
    from conftest import build_tiny

    ids = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(0))
    cfg = hfq.OSTQuantConfig(act_bits=8, n_samples=4, seq_len=16, train_steps=6, train_batch_size=2, kl_top_k=32,
                             held_out=ids[4:])
    model = hfq.quantize(build_tiny("llama"), cfg, calibration=ids[:4])
    assert [s for s, _ in model.hf_quantizer.held_out_losses] == [0, 5, 6]
    assert "held_out" not in model.config.quantization_config.to_dict()
