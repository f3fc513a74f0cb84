"""Training pieces shared by methods that learn something against the full-precision model (OSTQuant's transforms,
block reconstruction, QAT): distillation losses and the teacher-student trainer."""
from .losses import LOSSES, kl_loss, kl_top_loss, mse_loss
from .trainer import TeacherStudentTrainer, causal_lm_logits

__all__ = ["LOSSES", "kl_loss", "kl_top_loss", "mse_loss", "TeacherStudentTrainer", "causal_lm_logits"]
