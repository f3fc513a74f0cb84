"""RWKVQuant: proxy-guided scalar / vector quantization and importance-weighted codebooks for RWKV (llm.md §5).

Lifecycle (config `config.py`, the proxies `proxy.py`; the VQ math is `hfq.solvers.vq`, its storage `hfq.nn.vq`):
1. calibration windows (`dataset`, n_samples x seq_len);
2. block by block (`run_blocks`, each block on the outputs of the quantized blocks before it):
   a. the token-shift mixes mu (the adapter's `token_shift_mixes`) get codebooks: per channel the importance of the
      multiplier's input x_t - x_{t-1} (E[x^2] or |E[x]|) weights a k-means over groups of `mu_group` channels;
      the model's code then reads the dequantized mu through a parametrization;
   b. every linear: the proxy on its weight picks GPTQ (scalar) or GPTVQ (vector), both on the same Hessian of its
      inputs (lockstep order: each layer sees inputs that went through the quantized layers before it);
3. the choices are written to the config (`vq_modules`, `mu_params`) and saved, so loading rebuilds each module as it
   was quantized. `quantizer.choices` holds each matrix's proxy values and choice, `quantizer.bits_per_weight` the
   stored bits per quantized weight, codebooks and scales included."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize
from transformers.utils import logging

from hfq.arch import get_adapter
from hfq.calibration import BlockStatistics, run_blocks
from hfq.eval.size import quantized_bytes
from hfq.integration import HfqQuantizer, quantization_targets, register_method, targets_by_block
from hfq.nn import QuantLinear
from hfq.nn.vq import VQLinear, install_vq_vector
from hfq.quant import dequantize
from hfq.solvers import gptq_quantize
from hfq.solvers.vq import dequantize_vq, gptvq_quantize, kmeans_1d, quantize_codebook

from ..gptq import GPTQSolver
from .config import RWKVQuantConfig
from .proxy import proxy_values

logger = logging.get_logger(__name__)


def choose(cfg: RWKVQuantConfig, proxies: dict) -> str:
    """"sq" or "vq" for one weight matrix."""
    if cfg.proxy in ("sq", "vq"):
        return cfg.proxy
    if cfg.proxy == "crest":
        return "sq" if proxies["crest"] <= cfg.tau_crest else "vq"
    return "sq" if proxies["hce"] < cfg.tau_coarse and proxies["fine"] < cfg.tau_fine else "vq"


class RWKVQuantSolver(GPTQSolver):
    """Per layer: the proxy's choice, then GPTQ or GPTVQ on the layer's Hessian (`BlockStatistics` protocol)."""

    def __init__(self, config: RWKVQuantConfig, prefix: str, choices: dict):
        super().__init__(config, prefix)
        self.choices = choices

    def solve(self, block_index, names, modules, stats) -> list:
        cfg, H = self.cfg, stats.hessian()
        out = []
        for name, module in zip(names, modules):
            wargs = self.scheme(block_index, name, module)[0]
            full = f"{self.prefix}{block_index}.{name}"
            proxies = proxy_values(module.weight)
            kind = choose(cfg, proxies)
            self.choices[full] = {**proxies, "choice": kind}
            if kind == "sq":
                out.append(("sq", gptq_quantize(module.weight, H, wargs, damp=cfg.damp, act_order=False,
                                                block_size=cfg.block_size)))
            else:
                out.append(("vq", gptvq_quantize(module.weight, H, cfg.bits, cfg.vq_rows_per_group,
                                                 cfg.vq_columns_per_group, damp=cfg.damp,
                                                 kmeans_iters=cfg.kmeans_iters, block_size=cfg.block_size,
                                                 m_step_iters=cfg.m_step_iters)))
        return out

    def commit(self, block_index, name, module, result) -> None:
        kind, res = result
        dtype = module.weight.dtype
        if kind == "sq":
            q, scale, zero = res
            w = dequantize(q, scale.to(dtype).float(), zero, self.scheme(block_index, name, module)[0], dtype)
        else:
            w = dequantize_vq(*res, self.cfg.vq_rows_per_group, self.cfg.vq_columns_per_group).to(dtype)
        module.weight.data = w
        self.results[module] = result

    def _pack(self, module, res, wargs, aargs):
        kind, r = res
        if kind == "sq":
            return QuantLinear.from_quantized(*r, wargs, aargs, module.bias, self.cfg.kernel, dtype=module.weight.dtype)
        cfg = self.cfg
        return VQLinear.from_quantized(*r, cfg.vq_rows_per_group, cfg.vq_columns_per_group, cfg.bits, module.bias,
                                       aargs, dtype=module.weight.dtype)


def _shift_difference(x: torch.Tensor) -> torch.Tensor:
    """x_t - x_{t-1} (x_{-1} = 0, the token shift without a carried state)."""
    return x - F.pad(x, (0, 0, 1, -1))


class MuCodebooks:
    """`run_blocks` pass: the block's element-wise multipliers replaced by importance-weighted codebooks. mixes:
    {module: token-shift mix parameters} (their input: the module input's token-shift difference); taps: {"module.
    param": tap module} (their input: what the tap module, an identity in the model's code, receives)."""

    def __init__(self, cfg: RWKVQuantConfig, prefix: str, mixes: dict, taps: dict, done: list):
        self.cfg, self.prefix, self.mixes, self.taps, self.done = cfg, prefix, mixes, taps, done

    @torch.no_grad()
    def __call__(self, block, index, inputs):
        cfg = self.cfg
        sums = {}

        def hook(name, shift: bool, width: int | None = None):
            def fn(module, args, kwargs):
                x = (args[0] if args else next(iter(kwargs.values()))).float()
                d = _shift_difference(x) if shift else x
                d = d.reshape(-1, width or x.shape[-1])
                s = sums.setdefault(name, [0.0, 0.0, 0])
                s[0] = s[0] + d.pow(2).sum(0)
                s[1] = s[1] + d.sum(0)
                s[2] += d.shape[0]
            return fn

        handles = [block.get_submodule(n).register_forward_pre_hook(hook(n, True), with_kwargs=True)
                   for n in self.mixes]
        handles += [block.get_submodule(tap).register_forward_pre_hook(
            hook(full, False, block.get_parameter(full).numel()), with_kwargs=True) for full, tap in self.taps.items()]
        try:
            inputs.forward(block)
        finally:
            for h in handles:
                h.remove()
        targets = [(f"{n}.{p}", n) for n, params in self.mixes.items() for p in params]
        targets += [(full, full) for full in self.taps]
        for full, key in targets:
            sq, s1, count = sums[key]
            importance = sq / count if cfg.mu_importance == "mean_square" else (s1 / count).abs()
            module_name, p = full.rsplit(".", 1)
            module = block.get_submodule(module_name)
            mu = getattr(module, p).detach().float().reshape(-1)
            if mu.numel() % cfg.mu_group:
                raise ValueError(f"{full} has {mu.numel()} elements, not a multiple of mu_group {cfg.mu_group}")
            c, assign = kmeans_1d(mu.reshape(-1, cfg.mu_group), 2**cfg.mu_bits, cfg.kmeans_iters,
                                  weights=importance.reshape(-1, cfg.mu_group))
            codes, scale = quantize_codebook(c)
            assign = torch.argmin((mu.reshape(-1, cfg.mu_group, 1) - (codes.float() * scale)[:, None, :]).abs(),
                                  -1)  # to the stored (8-bit) centroids
            install_vq_vector(module, p, cfg.mu_bits, cfg.mu_group, assign.reshape(-1), codes, scale)
            self.done.append(f"{self.prefix}{index}.{full}")
        return None


def mu_targets(model) -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    """The architecture's element-wise multipliers: (token-shift mixes {module: parameters}, tapped multipliers
    {"module.parameter": tap module}), from its adapter."""
    adapter = get_adapter(model)
    mixes, taps = getattr(adapter, "token_shift_mixes", None), getattr(adapter, "multiplier_taps", None) or {}
    if not mixes and not taps:
        raise NotImplementedError(f"hfq_rwkvquant: {model.config.model_type!r} declares no element-wise multipliers "
                                  f"in its adapter; set mu_codebooks=False or add them (RwkvAdapter.token_shift_mixes "
                                  f"/ multiplier_taps)")
    return dict(mixes or {}), dict(taps)


class RWKVQuantHfQuantizer(HfqQuantizer):
    def solve(self, model, samples, sample_weights=None):
        cfg = self.quantization_config
        if sample_weights is not None or cfg.sample_weights is not None:
            raise ValueError("hfq_rwkvquant does not weight calibration samples; drop sample_weights")
        prefix = get_adapter(model).blocks + "."
        per_block, outside = targets_by_block(model, quantization_targets(model, cfg))
        if outside:
            raise ValueError(f"hfq_rwkvquant quantizes the decoder blocks' linears; {sorted(outside)[:3]} sit outside "
                             f"them (set quantize_lm_head=False or add them to modules_to_not_convert)")
        self.choices, mu_done = {}, []
        passes = [MuCodebooks(cfg, prefix, *mu_targets(model), mu_done)] if cfg.mu_codebooks else []
        passes.append(BlockStatistics(model, per_block, RWKVQuantSolver(cfg, prefix, self.choices),
                                      want=("hessian",), order="lockstep"))
        run_blocks(model, samples, passes, device=cfg.device, batch_size=cfg.batch_size, desc="hfq_rwkvquant")
        cfg.vq_modules = sorted(n for n, c in self.choices.items() if c["choice"] == "vq")
        cfg.mu_params = mu_done
        self.bits_per_weight = quantized_bytes(model)
        n_vq = len(cfg.vq_modules)
        logger.info(f"hfq_rwkvquant: {n_vq} of {len(self.choices)} matrices vector-quantized, {len(mu_done)} mixes "
                    f"codebook-quantized, {self.bits_per_weight['bits_per_weight']:.3f} bits per weight")

    def prepare_skeleton(self, model):
        """The checkpoint's VQ linears and codebook mixes, empty, before the tensors load into them."""
        cfg = self.quantization_config
        for name in cfg.vq_modules or ():
            linear = model.get_submodule(name)
            model.set_submodule(name, VQLinear(linear.in_features, linear.out_features, linear.bias is not None,
                                               cfg.bits, cfg.vq_rows_per_group, cfg.vq_columns_per_group,
                                               dtype=linear.weight.dtype, device=linear.weight.device))
        for full in cfg.mu_params or ():
            module_name, param = full.rsplit(".", 1)
            module = model.get_submodule(module_name)
            if not parametrize.is_parametrized(module, param):
                install_vq_vector(module, param, cfg.mu_bits, cfg.mu_group)


register_method(RWKVQuantConfig, RWKVQuantHfQuantizer)
