"""MoEQuant: expert-balanced self-sampling (EBSS) + affinity-guided GPTQ (AGQ) for MoE LLMs (Chen et al., ICML 2025).

The released "MoEQuant++" configuration: a QuaRot-style rotation, then GPTQ (W4 per-channel symmetric, MSE clip,
damp 0.01, no act-order) on 128 x 512 tokens the model wrote itself with EBSS, with each expert's Hessian weighted
by the routing weights its tokens got (AGQ). Each part has a switch, for ablations:
- ebss: calibrate on EBSS samples (`hfq.calibration.ebss`; cached as jsonl); False: on `dataset`;
- affinity: H_e = 2/N sum_t g(t, e) x_t x_t^T over the tokens routed to expert e, g read where the model calls its
  experts, i.e. from its own router, in the block order attention -> experts; a gated shared expert (Qwen2-MoE) is
  weighted by sigmoid(gate(x)), ungated shared experts and dense layers are plain GPTQ;
- rotate: random Hadamard R1 on the residual stream (fused into embeddings, attention, router, every expert, the
  shared expert and lm_head) and R2 per KV head, exact, before GPTQ (`hfq.transforms`); the QuaRot online Hadamard
  before down_proj is not applied to routed experts.
Deviation, on purpose: the paper also GPTQ-quantizes the router; hfq keeps routers float (transformers 5 routers are
not `nn.Linear` modules, they hold < 0.1% of the weights, and llm-compressor keeps them float too).
An expert that no calibration token reached is solved on the Hessian of all the tokens entering its layer, logged
(`hfq_gptq`'s fallback).
"""
from __future__ import annotations

from transformers.utils import logging

from hfq.calibration.ebss import DEFAULTS, expert_coverage, moe_experts
from hfq.integration import register_method
from hfq.models import cache_dir
from hfq.transforms import LayerTransform, fuse_transforms_, transform_layout

from .gptq import GPTQConfig, GPTQHfQuantizer
from .ostquant.train import init_transforms

logger = logging.get_logger(__name__)


class MoEQuantConfig(GPTQConfig):
    """MoEQuant (MoEQuant++ with rotate=True, the default). Defaults from the released scripts: 4-bit per-channel
    symmetric weights, MSE clip, damp 0.01, no act-order, 128 x 512 calibration tokens.

    ebss: calibrate on expert-balanced self-generated samples (dataset must then be None or "self"); False: on
    `dataset` (e.g. "wikitext2"). ebss_tau (1.2), ebss_width (beam width 4), ebss_top_k (candidate tokens per beam),
    ebss_prefix (tokens sampled before scoring starts): see `hfq.calibration.ebss`. affinity: routing-weighted
    expert Hessians (AGQ). rotate: random Hadamard R1 + R2 fused before GPTQ. Runtime only: ebss_cache_dir (where
    generated samples are kept and reused; default $HFQ_CACHE/ebss or ~/.cache/hfq/ebss; False: not kept).
    Everything else: `GPTQConfig`."""

    quant_method = "hfq_moequant"
    runtime_fields = GPTQConfig.runtime_fields + ("ebss_cache_dir",)

    def __init__(self, bits: int = 4, group_size: int | None = None, sym: bool = True, act_order: bool = False,
                 damp: float = 0.01, mse_clip: bool = True, n_samples: int = 128, seq_len: int = 512,
                 ebss: bool = True, affinity: bool = True, rotate: bool = True, ebss_tau: float = DEFAULTS["tau"],
                 ebss_width: int = DEFAULTS["width"], ebss_top_k: int = DEFAULTS["top_k"],
                 ebss_prefix: int = DEFAULTS["prefix"], ebss_cache_dir=None, dataset=None, sampler: str | None = None,
                 **kwargs):
        if kwargs.pop("expert_affinity", affinity) != affinity:  # `affinity` is this method's name for it (saved)
            raise ValueError("MoEQuantConfig takes the routing-weighted Hessians as affinity=..., not expert_affinity")
        self.ebss, self.affinity, self.rotate = ebss, affinity, rotate
        self.ebss_tau, self.ebss_width, self.ebss_top_k, self.ebss_prefix = ebss_tau, ebss_width, ebss_top_k, \
            ebss_prefix
        self.ebss_cache_dir = ebss_cache_dir
        if ebss:
            if dataset not in (None, "self") or sampler not in (None, "ebss"):
                raise ValueError(f"MoEQuantConfig(ebss=True) calibrates on text the model writes itself; it cannot "
                                 f"also take dataset={dataset!r} / sampler={sampler!r}. Pass ebss=False to "
                                 f"calibrate on a dataset")
            dataset, sampler = "self", "ebss"
        super().__init__(bits=bits, group_size=group_size, sym=sym, act_order=act_order, damp=damp,
                         mse_clip=mse_clip, n_samples=n_samples, seq_len=seq_len, dataset=dataset,
                         sampler=sampler or "plain", expert_affinity=affinity, **kwargs)

    def post_init(self):
        super().post_init()
        for name in ("ebss", "affinity", "rotate"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.act_bits is not None and self.rotate:
            logger.warning("hfq_moequant: activation quantization with rotate=True: routed experts get no online "
                           "Hadamard before down_proj, so their down_proj inputs are not rotated")

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.pop("expert_affinity", None)  # saved as `affinity`
        return d

    def sampler_kwargs(self) -> dict:
        if self.sampler != "ebss":
            return {}
        cache = self.ebss_cache_dir
        return dict(tau=self.ebss_tau, width=self.ebss_width, top_k=self.ebss_top_k, prefix=self.ebss_prefix,
                    cache_dir=None if cache is False else (cache or cache_dir("ebss")))


class MoEQuantHfQuantizer(GPTQHfQuantizer):
    def calibrate(self, model, calibration=None):
        """The calibration samples (EBSS unless ebss=False or `calibration` is given), and their expert coverage
        (`self.coverage`: per MoE layer min / median / max tokens per expert, logged)."""
        cfg = self.quantization_config
        moe_experts(model)  # a dense model fails before any work
        if cfg.rotate:
            transform_layout(model)
        samples = super().calibrate(model, calibration)
        self.coverage = expert_coverage(model, samples)
        worst = min(self.coverage["layers"], key=lambda x: x["min"])
        logger.info(f"hfq_moequant: calibration coverage: min tokens per expert {self.coverage['min_tokens']} "
                    f"(worst layer: min {worst['min']}, median {worst['median']}, max {worst['max']}), mean std of "
                    f"expert usage {self.coverage['mean_std']:.4f}")
        return samples

    def transform(self, model, samples):
        """rotate: QuaRot's random Hadamard R1 and one random Hadamard R2 per KV head and layer, fused exactly."""
        cfg = self.quantization_config
        if cfg.rotate:
            r1, r2 = init_transforms(model, "hadamard", cfg.seed)
            fuse_transforms_(model, r1, [LayerTransform(r2=r) for r in r2])


register_method(MoEQuantConfig, MoEQuantHfQuantizer)
