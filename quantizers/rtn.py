"""RTN: round-to-nearest with min/max (or percentile/MSE) scales. The baseline every method is measured against."""
from __future__ import annotations

from tqdm.auto import tqdm

from hfq import offload
from hfq.arch import get_adapter
from hfq.integration import HfqConfig, HfqQuantizer, quantization_targets, register_method, replace_targets, rtn_module
from hfq.progress import is_quiet


class RTNConfig(HfqConfig):
    """Round-to-nearest. Defaults: 4-bit symmetric weights, group 128, weight-only. W8A8: `bits=8,
    group_size=None, act_bits=8`. See `HfqConfig` for every field."""

    quant_method = "hfq_rtn"


class RTNHfQuantizer(HfqQuantizer):
    supports_offload = True

    def solve(self, model, data=None, sample_weights=None):
        """Needs no data: `data` / `sample_weights` are accepted (a nested solver is handed them) and unused. An
        offloaded model (`hfq.offload`) is rounded block by block, each block resident only while it is rounded."""
        cfg = self.quantization_config
        targets = quantization_targets(model, cfg)
        bar = tqdm(total=len(targets), desc="hfq_rtn", disable=is_quiet())

        def build(name, module):
            bar.update()
            return rtn_module(name, module, cfg)  # under cfg.scheme_for(name): per-module schemes are saved too

        if offload.is_offloaded(model):
            prefix = get_adapter(model).blocks + "."
            inside = {n: m for n, m in targets.items() if n.startswith(prefix)}
            offload.for_each_block(model, lambda i, block: replace_targets(
                model, {n: m for n, m in inside.items() if n.startswith(f"{prefix}{i}.")}, build))
            targets = {n: m for n, m in targets.items() if n not in inside}
        replace_targets(model, targets, build)
        bar.close()


register_method(RTNConfig, RTNHfQuantizer)
