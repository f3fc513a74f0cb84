"""RTN: round-to-nearest with min/max (or percentile/MSE) scales. The baseline every method is measured against."""
from __future__ import annotations

from tqdm.auto import tqdm

from hfq.integration import HfqConfig, HfqQuantizer, quantization_targets, register_method, replace_targets, rtn_module
from hfq.progress import is_quiet


class RTNConfig(HfqConfig):
    """Round-to-nearest. Defaults: 4-bit symmetric weights, group 128, weight-only. W8A8: `bits=8,
    group_size=None, act_bits=8`. See `HfqConfig` for every field."""

    quant_method = "hfq_rtn"


class RTNHfQuantizer(HfqQuantizer):
    def solve(self, model, data=None, sample_weights=None):
        """Needs no data: `data` / `sample_weights` are accepted (a nested solver is handed them) and unused."""
        cfg = self.quantization_config
        targets = quantization_targets(model, cfg)
        bar = tqdm(total=len(targets), desc="hfq_rtn", disable=is_quiet())

        def build(name, module):
            bar.update()
            return rtn_module(name, module, cfg)  # under cfg.scheme_for(name): per-module schemes are saved too

        replace_targets(model, targets, build)
        bar.close()


register_method(RTNConfig, RTNHfQuantizer)
