"""RWKVQuantConfig: RWKVQuant's settings (llm.md §5) as one validated, round-tripping config."""
from __future__ import annotations

from hfq.calibration import CalibratedConfig

PROXIES = ("coarse_fine", "crest", "sq", "vq")
MU_IMPORTANCE = ("mean_square", "abs_mean")


class RWKVQuantConfig(CalibratedConfig):
    """RWKVQuant (Xu et al., 2025): per weight matrix a proxy picks scalar quantization (GPTQ) or vector quantization
    (GPTVQ with 1-D codebooks), and the element-wise multipliers (token-shift mixes mu) get importance-weighted
    codebooks. Every linear of the decoder blocks is quantized; embeddings and the head stay float (as the official
    code, which collects layers per block).

    Scalar path: GPTQ, `bits`, asymmetric, one scale / zero point per `group_size` columns (the official: 3-bit, 64;
    hfq's default 128 keeps it under 3.5 bits per weight with its 16-bit scales and 8-bit zero points), damp.
    Vector path: `bits`-bit indices into 2^bits centroids shared by `vq_rows_per_group` x `vq_columns_per_group`
    weights (8 x 32 = 256: 3 + 64 / 256 = 3.25 bits per weight with 8-bit codebooks; the official 2 x 32 costs 4.0),
    k-means `kmeans_iters` (Mahalanobis initialisation), GPTQ-style error feedback, an M-step of `m_step_iters` Adam
    steps on the Hessian-weighted error, 8-bit codebooks with one scale per column block.
    proxy: "coarse_fine" (the paper's: scalar when hce < tau_coarse and fine < tau_fine), "crest" (the released
    command's: scalar when max|W| / RMS(W) <= tau_crest), "sq" (GPTQ everywhere) or "vq" (VQ everywhere). Neither
    the paper nor the code publishes tau_coarse / tau_fine: the defaults are the ones chosen on validation windows
    for the tiny RWKV-4 of `benchmarks/rwkvquant.py --tune` (the 0.75-quantiles of its 28 matrices' proxies,
    `rwkvquant_validation.json`); "fine" grows with the number of weights, so re-tune them for another model.
    mu_codebooks: codebook-quantize the token-shift mixes (mu_bits-bit indices, groups of mu_group channels, k-means
    weighted per channel by mu_importance of the multiplier's input, the token-shift difference: "mean_square" =
    E[x^2], the paper's error model, or "abs_mean" = |E[x]|, the released code's).
    Written by the quantizer and saved (so a checkpoint rebuilds every module): vq_modules (names of the
    vector-quantized linears) and mu_params ("module.parameter" names of the codebook-quantized mixes)."""

    quant_method = "hfq_rwkvquant"
    positive_ints = CalibratedConfig.positive_ints + ("vq_rows_per_group", "vq_columns_per_group", "mu_bits",
                                                      "mu_group", "kmeans_iters", "block_size")

    def __init__(self, bits: int = 3, group_size: int | None = 128, sym: bool = False, proxy: str = "coarse_fine",
                 tau_coarse: float = 2.613, tau_fine: float = 1.336e9, tau_crest: float = 8.0,
                 vq_rows_per_group: int = 8, vq_columns_per_group: int = 32, kmeans_iters: int = 100,
                 m_step_iters: int = 25, damp: float = 0.01,
                 block_size: int = 128, mu_codebooks: bool = True, mu_importance: str = "mean_square",
                 mu_bits: int = 3, mu_group: int = 64, vq_modules: list[str] | None = None,
                 mu_params: list[str] | None = None, **kwargs):
        self.proxy, self.tau_coarse, self.tau_fine, self.tau_crest = proxy, tau_coarse, tau_fine, tau_crest
        self.vq_rows_per_group, self.vq_columns_per_group = vq_rows_per_group, vq_columns_per_group
        self.kmeans_iters, self.m_step_iters, self.damp, self.block_size = kmeans_iters, m_step_iters, damp, block_size
        self.mu_codebooks, self.mu_importance, self.mu_bits, self.mu_group = mu_codebooks, mu_importance, mu_bits, \
            mu_group
        self.vq_modules, self.mu_params = vq_modules, mu_params
        super().__init__(bits=bits, group_size=group_size, sym=sym, **kwargs)

    def post_init(self):
        super().post_init()
        if self.proxy not in PROXIES:
            raise ValueError(f"proxy must be one of {PROXIES}, got {self.proxy!r}")
        if self.mu_importance not in MU_IMPORTANCE:
            raise ValueError(f"mu_importance must be one of {MU_IMPORTANCE}, got {self.mu_importance!r}")
        for name in ("tau_coarse", "tau_fine", "tau_crest"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{name} must be a number, got {v!r}")
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp must be in [0, 1), got {self.damp}")
        if not isinstance(self.m_step_iters, int) or self.m_step_iters < 0:
            raise ValueError(f"m_step_iters must be an integer >= 0, got {self.m_step_iters!r}")
        if not 2 <= self.mu_bits <= 8:
            raise ValueError(f"mu_bits must be in 2..8, got {self.mu_bits}")
        if self.block_size % self.vq_columns_per_group:
            raise ValueError(f"block_size {self.block_size} must be a multiple of vq_columns_per_group "
                             f"{self.vq_columns_per_group}")
        if not isinstance(self.mu_codebooks, bool):
            raise TypeError(f"mu_codebooks must be True or False, got {self.mu_codebooks!r}")
        if self.act_bits is not None:
            raise ValueError("RWKVQuant quantizes weights only (act_bits=None)")
