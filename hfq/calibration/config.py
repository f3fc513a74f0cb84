"""The calibration fields every calibrated method shares, validated once: a method's config subclasses
`CalibratedConfig` and adds only its own fields."""
from __future__ import annotations

import torch

from hfq.integration import HfqConfig

from .data import SAMPLERS, get_calibration

AUTOCAST_DTYPES = (None, "bfloat16", "float16")


class CalibratedConfig(HfqConfig):
    """dataset: "wikitext2", another `datasets` name, a local text file, "self" (text sampled from the model with
    `sampler`) or a list of token-id lists / strings. n_samples x seq_len tokens drawn with `seed`. batch_size:
    calibration samples per forward chunk. sampler: the self-sampling strategy for dataset="self" (registered in
    `hfq.calibration.SAMPLERS`; "plain" = ancestral sampling). autocast_dtype: "bfloat16" / "float16" runs the
    calibration forwards under torch.autocast (statistics stay float32).
    Runtime only (not saved): tokenizer (default model.name_or_path), device (where each block is calibrated;
    default where the model is), sample_weights (one weight per calibration sample [n] or per token [n, seq],
    e.g. from a sampler that rates its samples; `hfq.quantize(..., sample_weights=...)` overrides it)."""

    runtime_fields = ("tokenizer", "device", "sample_weights")
    shared_fields = HfqConfig.shared_fields + ("dataset", "n_samples", "seq_len", "batch_size", "sampler", "seed",
                                               "autocast_dtype", "tokenizer", "device", "sample_weights")
    positive_ints: tuple[str, ...] = ("n_samples", "seq_len", "batch_size")

    def __init__(self, dataset=None, n_samples: int = 128, seq_len: int = 2048, batch_size: int = 2,
                 sampler: str = "plain", seed: int = 0, autocast_dtype: str | None = None, tokenizer=None,
                 device=None, sample_weights=None, **kwargs):
        self.dataset, self.n_samples, self.seq_len, self.batch_size = dataset, n_samples, seq_len, batch_size
        self.sampler, self.seed, self.autocast_dtype = sampler, seed, autocast_dtype
        self.tokenizer, self.device, self.sample_weights = tokenizer, device, sample_weights
        super().__init__(**kwargs)

    def post_init(self):
        super().post_init()
        for name in self.positive_ints:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"seed must be an integer, got {self.seed!r}")
        if self.autocast_dtype not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast_dtype must be one of {AUTOCAST_DTYPES}, got {self.autocast_dtype!r}")
        if self.dataset is not None and not isinstance(self.dataset, (str, list, tuple, torch.Tensor)):
            raise TypeError(f"dataset must be a name, a path, 'self' or a list of token-id lists / strings, got "
                            f"{type(self.dataset).__name__}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {sorted(SAMPLERS)} (registered with "
                             f"hfq.calibration.register_sampler), got {self.sampler!r}")

    def to_dict(self) -> dict:
        d = super().to_dict()
        if not isinstance(d.get("dataset"), (str, type(None))):
            d["dataset"] = None  # in-memory samples are not worth a config.json; the checkpoint needs none
        return d

    def calibration_samples(self, model, calibration=None) -> list[torch.Tensor]:
        """The calibration windows: `calibration` (same forms as `dataset`) or `dataset`."""
        data = calibration if calibration is not None else self.dataset
        if data is None:
            raise ValueError(f"{self.quant_method} needs calibration data: set {type(self).__name__}(dataset="
                             f"'wikitext2') (or a local text file, 'self', or a list of token-id lists), or pass "
                             f"calibration=... to hfq.quantize")
        tokenizer = self.tokenizer or getattr(model, "name_or_path", None) or None
        return get_calibration(data, tokenizer, self.n_samples, self.seq_len, self.seed, model=model,
                               sampler=self.sampler, sampler_kwargs=self.sampler_kwargs())

    def sampler_kwargs(self) -> dict:
        """Keyword arguments for the self-sampling `sampler` (none by default; a method with its own sampler
        settings returns them)."""
        return {}

    def autocast(self) -> torch.dtype | None:
        return getattr(torch, self.autocast_dtype) if self.autocast_dtype else None
