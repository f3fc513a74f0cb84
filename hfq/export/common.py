"""What every export shares: its error, and the walk that finds the first module a format cannot write."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn


class ExportError(ValueError):
    """The model holds something the target format cannot express."""


def first_refusal(model: nn.Module, kinds: tuple[type, ...], check: Callable[[nn.Module], str | None],
                  fmt: str) -> str | None:
    """Why `model` cannot be written (None: it can), module by module: `check(module)` says it for the quantized
    modules of `kinds` (their own submodules, e.g. input quantizers, are theirs to check); any other hfq module, and
    a plain module carrying an online rotation or KV quantizer, is refused."""
    owner = None
    for name, m in model.named_modules():  # depth first: a module's submodules come right after it
        if owner is not None and name.startswith(owner + "."):
            continue
        if isinstance(m, kinds):
            owner = name
            why = check(m)
            if why:
                return f"{name}: {why}"
        elif type(m).__module__.startswith("hfq."):
            return f"{name} is an hfq {type(m).__name__}, which {fmt} cannot express"
        elif getattr(m, "online_rotation", None) is not None or getattr(m, "kv_quant", None) is not None:
            return f"{name} carries an online rotation or KV quantizer"
    return None
