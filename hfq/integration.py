"""The shared HfQuantizer base, the shared config fields, module targeting/replacement, and registration
with transformers. A method subclasses `HfqConfig` + `HfqQuantizer` and implements `quantize_model`."""
from __future__ import annotations

import math
from typing import ClassVar

import torch.nn as nn
from torch.nn.utils.parametrize import ParametrizationList
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.quantizers.quantizers_utils import should_convert_module
from transformers.utils import logging
from transformers.utils.quantization_config import QuantizationConfigMixin

from . import offload
from .eval.memory import PeakMemory
from .arch import get_adapter, marked_op
from .nn import (KERNELS, OPS, ActQuantizer, LUTFunction, PackedWeight, QuantConv1d, QuantConv2d, QuantExperts,
                 QuantLinear, QuantMultiheadAttention, QuantSoftmax, ScaledSiLU, is_fused_experts)
from .quant.lut import FUNCTIONS
from .nn.mamba import OnlineRotation, use_hfq_causal_lm
from .nn.vq import VQLinear, VQVector
from .quant import QuantArgs

logger = logging.get_logger(__name__)

METHODS: dict[str, tuple[type, type]] = {}  # quant_method -> (config class, quantizer class)


class HfqConfig(QuantizationConfigMixin):
    """Fields every hfq method shares.

    bits / group_size (None = one scale per output channel) / sym: the weight grid. sym_scale: "max" (max|w| maps
    to 2^(b-1) - 1, QuaRot's rule, the default) or "half" (max|w| maps to 2^(b-1) - 1/2, so all 2^b levels are used:
    the GPTQ reference's and compressed-tensors' rule). mse_max_shrink: how far observer="mse" (GPTQ's mse_clip) may
    shrink the range (0.8, the GPTQ reference; compressed-tensors uses 0.2).
    act_bits (None = weight-only) / act_sym / act_granularity ("token" or "tensor") / act_clip_ratio:
    dynamic activation quantization of every quantized layer's input.
    kernel: QuantLinear kernel (`hfq.nn.linear`): "auto" runs torch's CPU int4 / int8 kernels (bf16) per call,
    "reference" simulates exactly (dequantize + float matmul).
    modules_to_not_convert: module names/regexes kept in floating point, added to the output embedding
    (lm_head), which stays float unless quantize_lm_head=True.
    module_schemes: per-module exceptions {full module name: {"weight": {QuantArgs fields}, "act": {...} or None}},
    merged over the config's weight / activation args (e.g. {"model.layers.0.mlp.down_proj": {"weight": {"bits": 8}}}).
    Saved with the config, so the load skeleton rebuilds every module exactly; a method that picks schemes itself
    (per-layer bits, ...) writes its choices here."""

    quant_method: ClassVar[str]
    # which modules the method quantizes (see `module_kind`); vision methods add conv2d, attention and marked ops
    target_kinds: ClassVar[tuple[str, ...]] = ("linear", "experts")
    static_activations: ClassVar[bool] = False  # whether the method calibrates static activation scales
    # adapter `keep_float` entries this method quantizes anyway, because it runs that module's model code itself
    # (MambaQuant's mixer calls dt_proj as a module, where transformers' slow path reads dt_proj.weight)
    quantizes_keep_float: ClassVar[tuple[str, ...]] = ()
    runtime_fields: ClassVar[tuple[str, ...]] = ()  # never written to config.json
    # fields a nested config takes from the config that holds it (see `nested_config`)
    shared_fields: ClassVar[tuple[str, ...]] = (
        "bits", "group_size", "sym", "sym_scale", "mse_max_shrink", "observer", "clip_ratio", "act_bits", "act_sym",
        "act_granularity", "act_clip_ratio", "kernel", "modules_to_not_convert", "quantize_lm_head", "module_schemes")

    def __init__(self, bits: int = 4, group_size: int | None = 128, sym: bool = True, observer: str = "minmax",
                 clip_ratio: float = 1.0, act_bits: int | None = None, act_sym: bool = True,
                 act_granularity: str = "token", act_clip_ratio: float = 1.0, kernel: str = "auto",
                 modules_to_not_convert: list[str] | None = None, quantize_lm_head: bool = False,
                 module_schemes: dict | None = None, sym_scale: str = "max", mse_max_shrink: float = 0.8,
                 **kwargs):
        kwargs.pop("quant_method", None)
        if kwargs:
            raise TypeError(f"{type(self).__name__} got unknown fields {sorted(kwargs)}")
        self.quant_method = type(self).quant_method
        self.bits, self.group_size, self.sym, self.observer, self.clip_ratio = bits, group_size, sym, observer, clip_ratio
        self.sym_scale, self.mse_max_shrink = sym_scale, mse_max_shrink
        self.act_bits, self.act_sym, self.act_granularity = act_bits, act_sym, act_granularity
        self.act_clip_ratio, self.kernel = act_clip_ratio, kernel
        self.modules_to_not_convert = modules_to_not_convert
        self.quantize_lm_head = quantize_lm_head
        self.module_schemes = module_schemes
        self.post_init()

    def post_init(self):
        if self.group_size == -1:
            self.group_size = None
        if self.act_granularity not in ("token", "tensor"):
            raise ValueError(f"act_granularity must be 'token' or 'tensor', got {self.act_granularity!r}")
        self.weight_args()  # QuantArgs validates bits, group size, observer, clip ratio
        self.act_args()
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        if self.modules_to_not_convert is not None and not isinstance(self.modules_to_not_convert, (list, tuple)):
            raise TypeError("modules_to_not_convert must be a list of module names or regexes")
        if self.module_schemes is not None:
            if not isinstance(self.module_schemes, dict):
                raise TypeError("module_schemes must map module names to {'weight': {...}, 'act': {...} or None}")
            for name in self.module_schemes:
                self.scheme_for(name)  # validates every entry
        static = self.static_activation_sources()
        if static and not self.static_activations:
            raise ValueError(f"{type(self).__name__} does not calibrate static activation scales (dynamic=False in "
                             f"{static[0]}); use dynamic activations or hfq.PTQConfig")

    def weight_args(self) -> QuantArgs:
        return QuantArgs(bits=self.bits, symmetric=self.sym, granularity="group" if self.group_size else "channel",
                         group_size=self.group_size, observer=self.observer, clip_ratio=self.clip_ratio,
                         sym_scale=self.sym_scale, mse_max_shrink=self.mse_max_shrink)

    def act_args(self) -> QuantArgs | None:
        if self.act_bits is None:
            return None
        return QuantArgs(bits=self.act_bits, symmetric=self.act_sym, granularity=self.act_granularity,
                         dynamic=True, clip_ratio=self.act_clip_ratio)

    def static_activation_sources(self) -> list[str]:
        """Where static (calibrated) activation args come from: "the config" and/or module_schemes entries."""
        schemes = [("the config", self.act_args())] + [(repr(n), self.scheme_for(n)[1])
                                                       for n in self.module_schemes or {}]
        return [where for where, a in schemes if a is not None and not a.dynamic]

    def scheme_for(self, name: str) -> tuple[QuantArgs, QuantArgs | None]:
        """(weight args, activation args) of module `name`: the config's, with its `module_schemes` entry merged in."""
        w, a = self.weight_args(), self.act_args()
        entry = (self.module_schemes or {}).get(name)
        if entry is None:
            return w, a
        unknown = set(entry) - {"weight", "act"}
        if unknown or not isinstance(entry, dict):
            raise ValueError(f"module_schemes[{name!r}] may only have 'weight' and 'act' entries, got {entry!r}")
        try:
            if "weight" in entry:
                w = QuantArgs.from_dict({**w.to_dict(), **entry["weight"]})
            if "act" in entry:
                a = None if entry["act"] is None else QuantArgs.from_dict(
                    {**(a.to_dict() if a else {"dynamic": True, "granularity": "token"}), **entry["act"]})
        except (TypeError, ValueError) as e:
            raise ValueError(f"module_schemes[{name!r}]: {e}") from None
        return w, a

    def to_dict(self) -> dict:
        d = super().to_dict()
        for name in self.runtime_fields:
            d.pop(name, None)
        return d


def own_fields(config: HfqConfig) -> dict:
    """The fields of `config` that its method adds to the shared ones (e.g. GPTQ's damp, act_order, ...)."""
    d = config.to_dict()
    return {k: v for k, v in d.items() if k not in type(config).shared_fields and k != "quant_method"}


def nested_config(value, role: str) -> dict:
    """A config held by another config (e.g. OSTQuant's weight solver), stored as {"quant_method", own fields} so
    it round-trips through config.json; its shared fields (weight grid, activations, calibration) always come from
    the holder, so setting them on the nested config is an error rather than silently ignored."""
    if isinstance(value, dict):
        name = value.get("quant_method")
        if name not in METHODS:
            raise ValueError(f"{role} needs a quant_method from {sorted(METHODS)}, got {name!r}")
        value = METHODS[name][0].from_dict(dict(value))
    if not isinstance(value, HfqConfig):
        raise TypeError(f"{role} must be an hfq config (e.g. hfq.GPTQConfig(...)) or its dict, got "
                        f"{type(value).__name__}")
    defaults = type(value)().to_dict()
    given = value.to_dict()
    clash = [k for k in type(value).shared_fields if k in given and given[k] != defaults.get(k)]
    if clash:
        raise ValueError(f"{role}: {clash} are taken from the enclosing config; set them there, not on the "
                         f"{type(value).__name__}")
    return {"quant_method": value.quant_method, **own_fields(value)}


def build_nested(holder: HfqConfig, nested: dict) -> HfqConfig:
    """The nested config as its method runs it: its own fields plus the holder's shared fields."""
    cls = METHODS[nested["quant_method"]][0]
    shared = {k: getattr(holder, k) for k in cls.shared_fields if hasattr(holder, k)}
    return cls(**shared, **{k: v for k, v in nested.items() if k != "quant_method"})


def _divisors(n: int) -> list[int]:
    return [d for d in range(8, n + 1) if n % d == 0]


def module_kind(module: nn.Module) -> str | None:
    """What kind of quantizable module this is: "attention" (nn.MultiheadAttention, its projections included),
    "linear", "conv2d", "conv1d", "experts" (fused 3-D MoE experts), "op" (a model's own add / matmul marked with
    `hfq_op`) or "nonlinear" (a model's own non-linear function marked with `hfq_op` = its name in
    `hfq.quant.lut.FUNCTIONS`, e.g. "sigmoid": evaluated through a lookup table by methods that target it)."""
    if isinstance(module, nn.MultiheadAttention):
        return "attention"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Conv1d):
        return "conv1d"
    if is_fused_experts(module):
        return "experts"
    if marked_op(module) in OPS:
        return "op"
    if marked_op(module) in FUNCTIONS:
        return "nonlinear"
    return None


def quantization_targets(model: nn.Module, config: HfqConfig) -> dict[str, nn.Module]:
    """Every module the method will quantize: modules of the config's `target_kinds`, minus the adapter's
    float-only layers, `modules_to_not_convert` and (unless asked) the output embedding. Validates that the
    group size divides every target's input size, naming the first layer that breaks it."""
    adapter = get_adapter(model)
    skip = list(config.modules_to_not_convert or []) + [k for k in adapter.float_only(model)
                                                          if k not in config.quantizes_keep_float]
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {m: n for n, m in model.named_modules()}
    if out_emb is not None:
        if not config.quantize_lm_head:
            skip.append(names[out_emb])
    targets, inside = {}, ()
    for n, m in model.named_modules():
        if inside and n.startswith(inside):
            continue  # inside nn.MultiheadAttention: quantized as a whole, or not at all (it reads out_proj.weight)
        kind = module_kind(m)
        inside = (f"{n}.",) if kind == "attention" else inside
        if kind in config.target_kinds and should_convert_module(n, skip):
            targets[n] = m
    if config.group_size:
        in_sizes = {n: [m.in_features] if isinstance(m, nn.Linear) else [m.gate_up_proj.shape[2], m.down_proj.shape[2]]
                    for n, m in targets.items() if module_kind(m) in ("linear", "experts")}
        common = math.gcd(*[s for sizes in in_sizes.values() for s in sizes])
        for n, sizes in in_sizes.items():
            bad = [s for s in sizes if s % config.group_size]
            if bad:
                raise ValueError(
                    f"group_size {config.group_size} does not divide the input size {bad[0]} of layer {n!r}. "
                    f"Group sizes that divide every quantized layer: {_divisors(common) or [common]}; "
                    f"or group_size=None for one scale per output channel")
    return targets


def targets_by_block(model: nn.Module, targets: dict[str, nn.Module]
                     ) -> tuple[dict[int, dict[str, nn.Module]], dict[str, nn.Module]]:
    """The targets inside the decoder blocks as {block index: {name within the block: module}}, and the others."""
    prefix = get_adapter(model).blocks + "."
    per_block: dict[int, dict[str, nn.Module]] = {}
    outside = {}
    for name, module in targets.items():
        if name.startswith(prefix):
            index, local = name[len(prefix):].split(".", 1)
            per_block.setdefault(int(index), {})[local] = module
        else:
            outside[name] = module
    return per_block, outside


def replace_targets(model: nn.Module, targets: dict[str, nn.Module], build) -> None:
    """Swap each target for `build(name, module)`; `build` returns the quantized module."""
    for name, module in targets.items():
        model.set_submodule(name, build(name, module))


CONVS = {"conv2d": QuantConv2d, "conv1d": QuantConv1d}  # module kind -> its quantized module


def _needs_act(kind: str, name: str, act: QuantArgs | None) -> QuantArgs:
    if act is None:
        raise ValueError(f"{name} is an activation x activation {kind}: it needs activation args (act_bits), or "
                         f"list it in modules_to_not_convert")
    return act


def empty_quantized(name: str, module: nn.Module, config: HfqConfig, dtype=None) -> nn.Module:
    """Skeleton with the exact stored shapes/dtypes of module `name`, for loading a saved checkpoint."""
    w, a = config.scheme_for(name)
    kind = module_kind(module)
    if kind == "linear":
        return QuantLinear(module.in_features, module.out_features, module.bias is not None, w, a, config.kernel,
                           dtype=dtype or module.weight.dtype, device=module.weight.device)
    if kind in CONVS:
        return CONVS[kind].empty_like(module, w, a, dtype=dtype)
    if kind == "attention":
        return QuantMultiheadAttention.empty_like(module, w, _needs_act(kind, name, a), dtype=dtype)
    if kind == "op":
        return OPS[marked_op(module)](_needs_act(marked_op(module), name, a))
    if kind == "nonlinear":
        return config.nonlinear_module(marked_op(module))
    return QuantExperts.empty_like(module, w, a)


def rtn_module(name: str, module: nn.Module, config: HfqConfig) -> nn.Module:
    """Module `name` with its weights rounded to nearest under its scheme (`config.scheme_for`)."""
    w, a = config.scheme_for(name)
    kind = module_kind(module)
    if kind == "linear":
        return QuantLinear.from_linear(module, w, a, config.kernel)
    if kind in CONVS:
        return CONVS[kind].from_conv(module, w, a)
    if kind == "attention":
        return QuantMultiheadAttention.from_mha(module, w, _needs_act(kind, name, a))
    if kind in ("op", "nonlinear"):
        return empty_quantized(name, module, config)  # no weights: activation quantizers / a table, calibrated later
    return QuantExperts.from_experts(module, w, a)


class HfqQuantizer(HfQuantizer):
    """The lifecycle every method shares; a method overrides only its own stages.

    Quantizing a float model (on load, or `hfq.quantize`): `calibrate` (the run's calibration data, or None) ->
    `transform` (equivalent transforms fused into the float weights) -> `solve` (float weights -> packed modules) ->
    `attach` (what runs beside the packed weights: online rotations, calibrated activation quantizers).
    Loading an hfq checkpoint: `prepare_skeleton` (layout changes the method made, e.g. folded BatchNorm) -> packed
    skeleton per module (`empty_quantized`) -> transformers loads the tensors -> `check_loaded` -> `restore` (online
    pieces without tensors, from the saved config). Loading never re-runs calibration."""

    requires_calibration = False
    # whether quantize_model works block by block on a model offloaded by accelerate (`hfq.offload`): each block's
    # float weights are resident only while it is quantized, then written packed to the offload folder
    supports_offload = False

    def validate_environment(self, device_map=None, **kwargs):
        if not self.pre_quantized and isinstance(device_map, dict) and "disk" in device_map.values():
            self.check_offload()

    def adjust_max_memory(self, max_memory):
        """Called by transformers with the memory map (bytes per device) the model is placed under with a
        device_map string; recorded for `memory_report` (the budget the run was given), not changed."""
        self.max_memory = dict(max_memory)
        return max_memory

    def check_offload(self) -> None:
        """Refuse an offloaded model (disk entries in device_map, accelerate hooks) when this config cannot
        quantize it block by block, saying why."""
        why = self.offload_refusal()
        if why:
            raise ValueError(f"{self.quantization_config.quant_method}: disk offload is not supported while quantizing "
                             f"with this method and config ({why}); quantize with enough memory, save, then load the "
                             f"quantized folder with any device_map")

    def offload_refusal(self) -> str | None:
        """Why this config cannot quantize an offloaded model (None: it can)."""
        if not self.supports_offload:
            return "it needs the whole model in memory"
        if self.quantization_config.quantize_lm_head:
            return "quantize_lm_head=True needs the output embedding resident"
        return None

    def _process_model_before_weight_loading(self, model, dtype=None, checkpoint_files=None, **kwargs):
        if self.pre_quantized:
            self.prepare_skeleton(model)
        targets = quantization_targets(model, self.quantization_config)  # fail before loading any weight
        if self.pre_quantized:
            replace_targets(model, targets, lambda n, m: self.empty_module(n, m, dtype))
            check_shapes(model, checkpoint_files)
            keep_head_input_float(model)

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            check_loaded(model)
            self.restore(model)
        else:
            self.quantize_model(model)
        return model

    def quantize_model(self, model, calibration=None, sample_weights=None):
        """Quantize the loaded float model in place. calibration / sample_weights override the config's (methods
        that calibrate); per sample [n] or per token [n, seq] weights of the calibration samples."""
        quantization_targets(model, self.quantization_config)  # unsupported models fail before any work
        if offload.is_offloaded(model):
            self.check_offload()
        if self.quantization_config.quantize_lm_head:  # a tied lm_head gets its own copy of the embedding first
            from .transforms.fuse import untie_output_embedding
            untie_output_embedding(model)
        float_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        with PeakMemory() as memory:
            data = self.calibrate(model, calibration)
            self.transform(model, data)
            self.solve(model, data, sample_weights)
            self.attach(model, data)
        keep_head_input_float(model)
        budget = getattr(self, "max_memory", None)
        self.memory_report = {**memory.report(), "float_weights_mb": float_mb,
                              "offloaded": offload.is_offloaded(model),
                              "max_memory_mb": {str(k): v / 2**20 for k, v in budget.items()} if budget else None}
        if self.memory_report["offloaded"] and memory.peak_anon_mb is not None:
            logger.info(f"{self.quantization_config.quant_method}: peak anonymous RSS {memory.peak_anon_mb:.0f} MiB "
                        f"(at start {memory.start_anon_mb:.0f}) for {float_mb:.0f} MiB of float weights"
                        + (f", peak GPU {memory.peak_gpu_mb:.0f} MiB" if memory.peak_gpu_mb else ""))
        return model

    # ---------------------------------------------------------------- stages (defaults: nothing to do)
    def calibrate(self, model, calibration=None):
        """The calibration data of this run: the config's samples for calibrated methods, else None."""
        cfg = self.quantization_config
        return cfg.calibration_samples(model, calibration) if hasattr(cfg, "calibration_samples") else None

    def transform(self, model, data) -> None:
        """Equivalent transforms fused into the float model before its weights are solved."""

    def solve(self, model, data, sample_weights=None) -> None:
        """Replace every target by its packed quantized module."""
        raise NotImplementedError(f"{type(self).__name__} must implement solve (or quantize_model)")

    def attach(self, model, data) -> None:
        """Run-time pieces beside the packed weights, after solving (online rotations, activation scales)."""

    def empty_module(self, name, module, dtype=None):
        """The packed skeleton of target `name` for loading (default: `empty_quantized`; a method whose modules differ,
        e.g. CFWS's split convolutions, overrides it)."""
        return empty_quantized(name, module, self.quantization_config, dtype)

    def prepare_skeleton(self, model) -> None:
        """Before a checkpoint loads: give the float skeleton the layout `transform` left (e.g. folded BatchNorm)."""

    def restore(self, model) -> None:
        """After a checkpoint loaded: rebuild online pieces that carry no tensors, from the saved config."""

    def param_needs_quantization(self, model, param_name, **kwargs) -> bool:
        return False

    def is_serializable(self):
        return True

    @property
    def is_trainable(self):
        """Adapters (PEFT LoRA, `hfq.lora`) train on top of the frozen packed layers; transformers' Trainer asks this
        and still refuses a quantized model without adapters."""
        return True


def keep_head_input_float(model) -> None:
    """Where the model's own code casts the lm_head input to `lm_head.weight.dtype` (`ArchAdapter.head_input_cast`)
    and lm_head is packed (uint8 storage), swap in hfq's forward without that cast; otherwise the logits would be
    computed from a uint8 input."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, (PackedWeight, VQLinear)) and get_adapter(model).head_input_cast:
        use_hfq_causal_lm(model)


def _quantized_tensors(model) -> dict[str, nn.Parameter]:
    """Every tensor of the quantized modules (packed weights, codebooks, scales, stored rotations) by name."""
    def quantized(m):
        if isinstance(m, (PackedWeight, QuantExperts, ActQuantizer, ScaledSiLU, OnlineRotation, VQLinear, VQVector,
                          LUTFunction, QuantSoftmax)):
            return True
        return isinstance(m, ParametrizationList) and any(isinstance(p, VQVector) for p in m)

    return {f"{n}.{p}": t for n, m in model.named_modules() if quantized(m)
            for p, t in m.named_parameters(recurse=False)}


def check_shapes(model, checkpoint_files) -> None:
    """Every quantized tensor of the checkpoint must have the shape its module expects (read from the safetensors
    headers before anything loads); transformers' own size check only says "see the report"."""
    if not checkpoint_files:
        return
    from safetensors import safe_open

    expected = {k: tuple(t.shape) for k, t in _quantized_tensors(model).items()}
    for path in checkpoint_files:
        if not str(path).endswith(".safetensors"):
            continue
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                if key in expected and tuple(f.get_slice(key).get_shape()) != expected[key]:
                    raise ValueError(f"corrupted or incompatible hfq checkpoint: tensor {key!r} has shape "
                                     f"{tuple(f.get_slice(key).get_shape())} in {path}, but its quantization config "
                                     f"needs {expected[key]}; re-save the model with hfq or re-quantize it from full "
                                     f"precision")


def check_loaded(model) -> None:
    """A packed tensor absent from the checkpoint would be left as uninitialised memory: refuse it."""
    missing = [k for k, t in _quantized_tensors(model).items() if not getattr(t, "_is_hf_initialized", False)]
    if missing:
        raise ValueError(f"corrupted or incomplete hfq checkpoint: {len(missing)} quantized tensors are missing "
                         f"(first: {missing[:3]}); re-save the model with hfq or re-quantize it from full precision")


def _refuse_unknown_hfq_methods():
    """transformers only warns on an unknown quant_method and then loads packed integers as floats (garbage);
    for hfq_* names, fail instead with the fix."""
    from transformers.quantizers.auto import AutoHfQuantizer

    original = AutoHfQuantizer.supports_quant_method
    if getattr(original, "_hfq_guard", False):
        return

    def supports_quant_method(quantization_config_dict):
        name = quantization_config_dict.get("quant_method")
        if isinstance(name, str) and name.startswith("hfq_") and name not in AUTO_QUANTIZATION_CONFIG_MAPPING:
            raise ValueError(f"this checkpoint was quantized with {name!r}, which this hfq version does not know "
                             f"(known: {sorted(METHODS)}); upgrade hfq")
        return original(quantization_config_dict)

    supports_quant_method._hfq_guard = True
    AutoHfQuantizer.supports_quant_method = staticmethod(supports_quant_method)


_refuse_unknown_hfq_methods()


def register_method(config_cls: type[HfqConfig], quantizer_cls: type[HfqQuantizer]):
    """Register with transformers (idempotent, so re-imports and custom-code copies are harmless)."""
    name = config_cls.quant_method
    if not name.startswith("hfq_"):
        raise ValueError(f"hfq quant_method names start with 'hfq_' so they never collide with transformers': {name}")
    if name not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(name)(config_cls)
    if name not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(name)(quantizer_cls)
    METHODS[name] = (config_cls, quantizer_cls)
    return quantizer_cls


def quantize(model, config: HfqConfig | dict, calibration=None, sample_weights=None):
    """Quantize an already loaded model in place (what `from_pretrained(..., quantization_config=config)`
    does on load) and return it; `save_pretrained` then writes the packed checkpoint.

    calibration: calibration data for methods that calibrate (same forms as their config's `dataset`);
    sample_weights: one weight per calibration sample [n] or per token [n, seq] (e.g. from a sampler)."""
    if isinstance(config, dict):
        config = config_from_dict(config)
    if (calibration is not None or sample_weights is not None) and not hasattr(config, "calibration_samples"):
        raise ValueError(f"{config.quant_method} does not calibrate, so calibration= / sample_weights= would be "
                         f"ignored; drop them or use a calibrated method (e.g. hfq.GPTQConfig)")
    if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
        raise ValueError("the model is already quantized; load its full-precision weights to quantize again")
    quantization_targets(model, config)
    quantizer = mark_quantized(model, config)
    quantizer.quantize_model(model, calibration=calibration, sample_weights=sample_weights)
    return model


def mark_quantized(model, config: HfqConfig) -> HfqQuantizer:
    """Make `model` what `from_pretrained(..., quantization_config=config)` returns: `save_pretrained` writes its
    packed tensors with `config`; returns the method's quantizer."""
    _, quantizer_cls = METHODS[config.quant_method]
    quantizer = quantizer_cls(config, pre_quantized=False)
    model.is_quantized, model.quantization_method, model.hf_quantizer = True, config.quant_method, quantizer
    model.config.quantization_config = config
    return quantizer


def config_from_dict(d: dict) -> HfqConfig:
    name = d.get("quant_method")
    if name not in METHODS:
        raise ValueError(f"unknown hfq quant_method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name][0].from_dict(d)
