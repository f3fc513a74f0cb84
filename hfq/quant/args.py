"""What a quantizer does, as plain data: `QuantArgs` is the one description shared by weights,
activations and the KV cache, by every method and by the checkpoint format."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

GRANULARITIES = ("tensor", "channel", "group", "token")
# "kl" / "kl_improved": TensorRT entropy calibration and this project's KL + relative MSE (hfq.quant.kl; per tensor)
OBSERVERS = ("minmax", "percentile", "mse", "kl", "kl_improved")
# symmetric scale: "max" maps max|x| to qmax (QuaRot / OSTQuant; the level -2^(b-1) is left to values beyond -max),
# "half" maps it to qmax + 1/2, so the 2^b levels cover [-max, max] (GPTQ reference, AutoGPTQ, compressed-tensors)
SYM_SCALES = ("max", "half")


@dataclass
class QuantArgs:
    """bits: 2..8. symmetric: zero point fixed at 0 (int range [-2^(b-1), 2^(b-1)-1]) or asymmetric
    (unsigned [0, 2^b-1] with a zero point). granularity: one scale per tensor, per output channel (row),
    per `group_size` consecutive input elements of a row, or per token (activations, last dim reduced).
    dynamic: scales computed from each input at run time (activations) instead of stored. clip_ratio shrinks
    the observed range; observer picks how the range is found (min/max, a percentile of |x|, or an MSE search).
    sym_scale: how a symmetric range becomes a scale (see SYM_SCALES). mse_max_shrink: how far the "mse" observer
    may shrink the range (0.8: down to 0.2 x, the GPTQ reference / QuaRot; compressed-tensors' observer uses 0.2)."""

    bits: int = 4
    symmetric: bool = True
    granularity: str = "channel"
    group_size: int | None = None
    dynamic: bool = False
    clip_ratio: float = 1.0
    observer: str = "minmax"
    percentile: float = 0.999
    sym_scale: str = "max"
    mse_max_shrink: float = 0.8

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer from 2 to 8, got {self.bits!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or self.group_size <= 0:
                raise ValueError(f"granularity='group' needs a positive integer group_size, got {self.group_size!r}")
        elif self.group_size is not None:
            raise ValueError(f"group_size={self.group_size} only applies to granularity='group' (got {self.granularity!r})")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise ValueError(f"clip_ratio must be in (0, 1], got {self.clip_ratio}")
        if self.observer not in OBSERVERS:
            raise ValueError(f"observer must be one of {OBSERVERS}, got {self.observer!r}")
        if not 0.5 < self.percentile <= 1.0:
            raise ValueError(f"percentile must be in (0.5, 1], got {self.percentile}")
        if not 0.0 < self.mse_max_shrink < 1.0:
            raise ValueError(f"mse_max_shrink must be in (0, 1), got {self.mse_max_shrink}")
        if self.sym_scale not in SYM_SCALES:
            raise ValueError(f"sym_scale must be one of {SYM_SCALES}, got {self.sym_scale!r}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantArgs":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown QuantArgs fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)
