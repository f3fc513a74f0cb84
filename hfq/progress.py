"""One switch for progress bars (`--quiet`, or HFQ_QUIET=1)."""
import os

_QUIET = [os.environ.get("HFQ_QUIET", "") not in ("", "0")]


def is_quiet() -> bool:
    return _QUIET[0]


def set_quiet(quiet: bool = True) -> None:
    _QUIET[0] = quiet
    from transformers.utils import logging

    (logging.disable_progress_bar if quiet else logging.enable_progress_bar)()
