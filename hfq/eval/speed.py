"""CPU forward latency: prefill (one forward over a prompt), decode (one token at a time, batch 1, KV cache), and the
median time of any call (`median_seconds`, e.g. a vision model's forward on one batch)."""
from __future__ import annotations

import statistics
import time

import torch


@torch.no_grad()
def median_seconds(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of `fn()` over `repeats` calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def prefill_seconds(model, seq_len: int = 512, repeats: int = 3, vocab: int = 1000) -> float:
    ids = torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids[:, :16])  # warm-up (kernel caches, allocator)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def decode_seconds_per_token(model, context: int = 64, steps: int = 32, vocab: int = 1000) -> float:
    ids = torch.randint(0, vocab, (1, context), generator=torch.Generator().manual_seed(0))
    from hfq.calibration.data import decode_step

    out, past = decode_step(model, ids)
    token = out.logits[:, -1:].argmax(-1)
    for _ in range(3):  # warm-up steps
        out, past = decode_step(model, token, past)
        token = out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(steps):
        out, past = decode_step(model, token, past)
        token = out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - start) / steps
