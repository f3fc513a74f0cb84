"""ILLMConfig: I-LLM's settings (llm.md §2) as one validated, round-tripping config."""
from __future__ import annotations

from hfq.calibration import CalibratedConfig

from .fsbr import PAIRS

PRESETS = {"w8a8": (8, 8), "w6a6": (6, 6), "w4a8": (4, 8), "w4a4": (4, 4)}


class ILLMConfig(CalibratedConfig):
    """I-LLM (Hu et al., 2024): FSBR block reconstruction, then integer-only inference. Weights: `bits`, symmetric,
    one scale per output channel (DI-MatMul folds per-channel multipliers; groups are refused). Activations:
    `act_bits`, symmetric, dynamic per token (every linear's input). `ILLMConfig.preset("w4a4")` etc. give the
    paper's settings (W8A8, W6A6, W4A8, W4A4).

    FSBR: smooth_pairs (any of "attn_in", "mlp_in", "qk", "ov", "gate_up", "up_down"; all by default, () for none),
    alpha (SmoothQuant migration strength of the initial scales), lwc (learnable weight clipping), epochs (passes
    over the calibration chunks per block; 0 = SmoothQuant-style initial scales only, nothing learned), let_lr /
    lwc_lr (AdamW learning rates of the smoothing scales and clipping factors, linear decay to 0).
    Integer-only inference: integer_only (switch the quantized model to `hfq.integer.llama.to_integer` after
    quantizing and after every load; False keeps the fake-quant float forward of the same checkpoint: "I-LLM with
    float non-linearities"), residual_bits (the residual stream's per-token bits), softmax_clip (DI-ClippedSoftmax's
    clip in logit units, None = no clip). The output embedding is quantized too (lm_head_bits, 8-bit inputs): an
    integer-only model has no float linear; a tied output embedding is untied first."""

    quant_method = "hfq_illm"
    positive_ints = CalibratedConfig.positive_ints + ("residual_bits",)

    def __init__(self, bits: int = 4, act_bits: int | None = 4, group_size: int | None = None,
                 smooth_pairs=PAIRS, alpha: float = 0.5, lwc: bool = True, epochs: int = 20, let_lr: float = 5e-3,
                 lwc_lr: float = 1e-2, integer_only: bool = True, residual_bits: int = 16,
                 softmax_clip: float | None = 15.0, lm_head_bits: int = 8, n_samples: int = 128, seq_len: int = 2048,
                 **kwargs):
        self.smooth_pairs, self.alpha, self.lwc, self.epochs = list(smooth_pairs), alpha, lwc, epochs
        self.let_lr, self.lwc_lr, self.integer_only = let_lr, lwc_lr, integer_only
        self.residual_bits, self.softmax_clip, self.lm_head_bits = residual_bits, softmax_clip, lm_head_bits
        kwargs.setdefault("quantize_lm_head", True)
        schemes = dict(kwargs.pop("module_schemes", None) or {})
        schemes.setdefault("lm_head", {"weight": {"bits": lm_head_bits}, "act": {"bits": 8}})
        super().__init__(bits=bits, act_bits=act_bits, group_size=group_size, module_schemes=schemes,
                         n_samples=n_samples, seq_len=seq_len, **kwargs)

    @classmethod
    def preset(cls, name: str, **kwargs) -> "ILLMConfig":
        if name.lower() not in PRESETS:
            raise ValueError(f"unknown I-LLM preset {name!r}; known: {sorted(PRESETS)}")
        bits, act_bits = PRESETS[name.lower()]
        return cls(bits=bits, act_bits=act_bits, **kwargs)

    def post_init(self):
        super().post_init()
        unknown = [p for p in self.smooth_pairs if p not in PAIRS]
        if unknown:
            raise ValueError(f"smooth_pairs: unknown {unknown}; choose from {PAIRS}")
        if self.group_size is not None:
            raise ValueError("I-LLM quantizes weights per output channel (DI-MatMul); use group_size=None")
        if not self.sym or not self.act_sym or self.act_granularity != "token":
            raise ValueError("I-LLM's integer path takes symmetric weights and symmetric per-token activations "
                             "(sym=True, act_sym=True, act_granularity='token')")
        if self.act_bits is None:
            raise ValueError("I-LLM quantizes activations (act_bits 2..8); for weight-only use hfq.GPTQConfig")
        for name in ("lwc", "integer_only"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.epochs, int) or isinstance(self.epochs, bool) or self.epochs < 0:
            raise ValueError(f"epochs must be an integer >= 0 (0 = initial smoothing only), got {self.epochs!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        for name in ("let_lr", "lwc_lr"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        if not 8 <= self.residual_bits <= 30:
            raise ValueError(f"residual_bits must be 8..30, got {self.residual_bits}")
        if self.softmax_clip is not None and not self.softmax_clip > 0:
            raise ValueError(f"softmax_clip must be > 0 or None, got {self.softmax_clip}")
        if self.integer_only and not self.quantize_lm_head:
            raise ValueError("integer_only=True needs the output embedding quantized (quantize_lm_head=True)")
