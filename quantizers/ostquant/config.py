"""OSTQuantConfig: the paper's settings (llm.md §1.3) as one validated, round-tripping config."""
from __future__ import annotations

from hfq.calibration import CalibratedConfig
from hfq.integration import build_nested, nested_config
from hfq.quant import QuantArgs
from hfq.transforms import kv_quant_args

from .train import ROTATION_INITS

# the paper's weight solver after fusion: GPTQ, per-channel, damp 0.01, no act-order, MSE clipping search
DEFAULT_WEIGHT_SOLVER = {"quant_method": "hfq_gptq", "act_order": False, "mse_clip": True, "damp": 0.01}


class OSTQuantConfig(CalibratedConfig):
    """OSTQuant (defaults = official code / scripts, llm.md §1.3). Besides the shared `HfqConfig` fields (weights:
    4-bit per-output-channel symmetric; activations: act_bits None = A16, else dynamic per-token, asymmetric,
    act_clip_ratio) and the calibration fields (`hfq.calibration.CalibratedConfig`; the same windows train the
    transforms and calibrate the weight solver):

    kv_bits: K (after RoPE, and after R3 with online_qk) and V quantized where attention reads them, dynamic per
    token and head, kv_sym (default asymmetric), kv_clip_ratio (defaults of the official code; None = float KV).
    The student sees it (and R3) while the transforms train; the model gets it after the weight solver; restored on
    load. Simulated: the cache itself stays float, so this measures a KV4 cache's accuracy, not its memory.
    rotation_init: "hadamard" (random Hadamard R1 and R2), "klt_hadamard" (weight-KLT x random Hadamard, the
    official W4A4 `--use_klt`) or "random" (random orthogonal). learn: train the transforms (False = QuaRot-style
    baseline: rotations only, no scalings, no training). scalings: learn the per-layer diagonal scalings too.
    online_down: online Hadamard R4 before down_proj (default on, as the official code); online_qk: online Hadamard
    R3 on q/k after RoPE (off in the official scripts; only matters with a quantized KV cache).
    train_steps, train_batch_size (16 = 4 per GPU x 4 GPUs in the W4A16 script), lr_rotation, lr_scaling (linear
    decay to 0; geoopt RiemannianAdam, so lr_rotation is a step length per rotation matrix), kl_top_k,
    stabilize_every (project the rotations back onto the manifold every n steps). train_weight_quant: fake-quantize
    weights while training (None = auto: False with 4-bit (or lower) activations, as the official W4A4 script;
    True otherwise, as the W4A16 script: at A8 the activation error alone gives the loss almost nothing to learn,
    measured KL-Top 0.0015 on SmolLM2).
    weight_solver: the weight method run on the fused model, as a config (`hfq.GPTQConfig(...)`, `hfq.RTNConfig()`)
    or its dict; only its own fields are kept (GPTQ: damp, act_order, mse_clip, block_size, ...), the weight grid,
    activations and calibration come from this config. Default: GPTQ with damp 0.01, no act-order, MSE clip (the
    paper's).
    held_out (runtime only): token windows [n, seq] never trained on; KL-Top on them is measured every 5 steps
    (`quantizer.held_out_losses`, a training curve)."""

    quant_method = "hfq_ostquant"
    runtime_fields = CalibratedConfig.runtime_fields + ("held_out",)
    positive_ints = CalibratedConfig.positive_ints + ("train_steps", "train_batch_size", "kl_top_k")

    def __init__(self, bits: int = 4, group_size: int | None = None, sym: bool = True, act_bits: int | None = None,
                 act_sym: bool = False, kv_bits: int | None = None, kv_sym: bool = False, kv_clip_ratio: float = 1.0,
                 rotation_init: str = "hadamard", learn: bool = True, scalings: bool = True, online_down: bool = True,
                 online_qk: bool = False, train_steps: int = 100, train_batch_size: int = 16,
                 lr_rotation: float = 0.01689753, lr_scaling: float = 0.00178988, kl_top_k: int = 1000,
                 stabilize_every: int = 10, train_weight_quant: bool | None = None, weight_solver=None,
                 held_out=None, **kwargs):
        self.kv_bits, self.kv_sym, self.kv_clip_ratio = kv_bits, kv_sym, kv_clip_ratio
        self.rotation_init, self.learn, self.scalings = rotation_init, learn, scalings
        self.online_down, self.online_qk = online_down, online_qk
        self.train_steps, self.train_batch_size, self.lr_rotation, self.lr_scaling = train_steps, train_batch_size, \
            lr_rotation, lr_scaling
        self.kl_top_k, self.stabilize_every, self.train_weight_quant = kl_top_k, stabilize_every, train_weight_quant
        self.weight_solver = dict(DEFAULT_WEIGHT_SOLVER) if weight_solver is None else weight_solver
        self.held_out = held_out
        super().__init__(bits=bits, group_size=group_size, sym=sym, act_bits=act_bits, act_sym=act_sym, **kwargs)

    def post_init(self):
        super().post_init()
        self.kv_args()  # validates kv_bits / kv_clip_ratio
        if self.rotation_init not in ROTATION_INITS:
            raise ValueError(f"rotation_init must be one of {ROTATION_INITS}, got {self.rotation_init!r}")
        for name in ("learn", "scalings", "online_down", "online_qk", "kv_sym"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.train_weight_quant is not None and not isinstance(self.train_weight_quant, bool):
            raise TypeError(f"train_weight_quant must be None (auto), True or False, got {self.train_weight_quant!r}")
        if not isinstance(self.stabilize_every, int) or self.stabilize_every < 0:
            raise ValueError(f"stabilize_every must be an integer >= 0 (0 = never), got {self.stabilize_every!r}")
        for name in ("lr_rotation", "lr_scaling"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        self.weight_solver = nested_config(self.weight_solver, "OSTQuantConfig.weight_solver")
        if self.weight_solver["quant_method"] not in ("hfq_gptq", "hfq_rtn"):
            raise ValueError(f"OSTQuantConfig.weight_solver must be GPTQ or RTN, got "
                             f"{self.weight_solver['quant_method']}")
        self.solver_config()  # the solver validates its own fields with this config's grid

    def solver_config(self):
        """The weight solver's config as it runs on the fused model."""
        return build_nested(self, self.weight_solver)

    def kv_args(self) -> QuantArgs | None:
        if self.kv_bits is None:
            return None
        try:
            return kv_quant_args(self.kv_bits, self.kv_sym, self.kv_clip_ratio)
        except ValueError as e:
            raise ValueError(f"kv_bits / kv_clip_ratio: {e}") from None

    def weight_quant_in_training(self) -> bool:
        if self.train_weight_quant is None:
            return self.act_bits is None or self.act_bits >= 8
        return self.train_weight_quant
