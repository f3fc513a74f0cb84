"""I-LLM: FSBR block reconstruction, then integer-only inference (Hu et al., 2024; llm.md §2).

Lifecycle (config `config.py`, the method's own idea `fsbr.py`; the integer operators and the integer-only forward
live in `hfq.integer`):
1. calibration windows (`dataset`, n_samples x seq_len);
2. transform: a tied output embedding is untied (it is quantized: an integer-only model has no float linear), and
   every MLP's activation becomes `ScaledSiLU` (x sigmoid(x / s), s = 1 until FSBR learns the gate <-> up smoothing);
3. solve: block by block on the outputs of the quantized blocks before it, FSBR learns the smoothing scales and
   clipping, fuses them and rounds every linear to its packed `QuantLinear` (dynamic per-token activations); the
   output embedding is rounded to `lm_head_bits`;
4. attach: `integer_only=True` switches the model to `hfq.integer.llama.to_integer` (float scales compiled once
   into dyadic integer constants).
The checkpoint holds the integers, scales, fused norm weights and ScaledSiLU scales; loading rebuilds the integer
forward from them (never re-running FSBR)."""
from __future__ import annotations

import torch
from transformers.utils import logging

from hfq.arch import get_adapter
from hfq.calibration.runner import first_output, run_blocks
from hfq.integer.llama import to_integer
from hfq.integration import HfqQuantizer, quantization_targets, register_method, replace_targets, rtn_module
from hfq.nn import ScaledSiLU
from hfq.transforms import transform_layout
from hfq.transforms.fuse import scaled_silu, untie_output_embedding

from .config import ILLMConfig
from .fsbr import _names, fsbr_block

logger = logging.get_logger(__name__)


class ILLMHfQuantizer(HfqQuantizer):
    def _install_scaled_silu(self, model, init: float) -> None:
        if "gate_up" not in self.quantization_config.smooth_pairs:
            return
        layout = transform_layout(model)
        for block in get_adapter(model).get_blocks(model):
            mlp = block.get_submodule(layout.mlp)
            if not isinstance(mlp.act_fn, ScaledSiLU):
                scaled_silu(mlp, mlp.get_submodule(layout.up).weight).scale.data.fill_(init)

    def prepare_skeleton(self, model):
        self._install_scaled_silu(model, float("nan"))  # must come from the checkpoint (check_loaded)

    def restore(self, model):
        self._switch(model)

    def _switch(self, model):
        cfg = self.quantization_config
        if cfg.integer_only:
            to_integer(model, cfg.act_bits, cfg.residual_bits, cfg.softmax_clip)

    def transform(self, model, samples):
        transform_layout(model)  # unsupported architectures fail before any work
        if untie_output_embedding(model):
            logger.info("hfq_illm: untied the output embedding (it is quantized; the input embedding stays float)")
        self._install_scaled_silu(model, 1.0)

    def solve(self, model, samples, sample_weights=None):
        cfg = self.quantization_config
        if sample_weights is not None or cfg.sample_weights is not None:
            raise ValueError("hfq_illm's block reconstruction does not weight samples; drop sample_weights")
        targets = quantization_targets(model, cfg)
        prefix = get_adapter(model).blocks + "."
        layout = transform_layout(model)
        n_blocks = len(get_adapter(model).get_blocks(model))
        wanted = {f"{prefix}{i}.{n}" for i in range(n_blocks) for n in _names(layout).values()}
        missing = sorted(wanted - set(targets))
        if missing:
            raise ValueError(f"hfq_illm reconstructs whole blocks and quantizes every linear in them; {missing[:3]} "
                             f"are excluded (modules_to_not_convert) — remove them from the exclusions")
        fp: list[torch.Tensor] = []
        self.losses = []

        @torch.no_grad()
        def fsbr_pass(block, i, inputs):
            if not fp:
                fp.extend(h.clone() for h in inputs.hidden)
            goal = [first_output(block(fp[k], **inputs.kwargs[k])) for k in range(len(inputs))]
            fp[:] = goal  # the float block on float inputs: this block's targets and the next block's float inputs
            self.losses.append(fsbr_block(block, model, inputs, goal, cfg))

        run_blocks(model, samples, [fsbr_pass], device=cfg.device, batch_size=cfg.batch_size, desc="hfq_illm FSBR")
        outside = {n: m for n, m in targets.items() if n not in wanted}
        replace_targets(model, outside, lambda n, m: rtn_module(n, m, cfg))
        if self.losses and self.losses[0]:
            logger.info(f"hfq_illm: FSBR block 0 MSE {self.losses[0][0]:.4g} -> {self.losses[0][-1]:.4g}, last block "
                        f"{self.losses[-1][0]:.4g} -> {self.losses[-1][-1]:.4g}")

    def attach(self, model, samples):
        self._switch(model)


register_method(ILLMConfig, ILLMHfQuantizer)
