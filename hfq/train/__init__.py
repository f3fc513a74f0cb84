"""Training pieces shared by methods that learn something against the full-precision model (OSTQuant's transforms,
block reconstruction, QAT): distillation losses."""
from .losses import LOSSES, kl_loss, kl_top_loss, mse_loss

__all__ = ["LOSSES", "kl_loss", "kl_top_loss", "mse_loss"]
