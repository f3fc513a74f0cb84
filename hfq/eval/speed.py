"""CPU forward latency: prefill (one forward over a prompt), decode (one token at a time, batch 1, KV cache), and the
median time of any call (`median_seconds`, e.g. a vision model's forward on one batch); and what bounds a decode
step: the bytes of weights it reads (`decode_bytes`) over the machine's streaming read bandwidth
(`read_bandwidth`)."""
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


def decode_bytes(model) -> int:
    """Bytes of weights one decode step (one token) reads: each QuantLinear's kernel-layout weights
    (`QuantLinear.kernel_bytes`), each float Linear's weight and bias, one row of each embedding, and every other
    module's own parameters (norms); a tensor shared by two modules (a tied lm_head) is read by each."""
    import torch.nn as nn

    from ..nn import QuantLinear

    total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += m.kernel_bytes(1)
        elif isinstance(m, nn.Embedding):
            total += m.weight.nbytes // m.num_embeddings
        else:
            total += sum(p.nbytes for p in m.parameters(recurse=False))
    return total


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second of a streaming read with torch's threads: the median time of summing a float32 array of
    `gib` GiB (far beyond any cache)."""
    x = torch.ones(int(gib * 2**30) // 4)
    return x.nbytes / median_seconds(x.sum, repeats=repeats)
