"""Perplexity on non-overlapping windows of a tokenized corpus (the GPTQ/OSTQuant protocol)."""
from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm


def token_windows(ids: torch.Tensor, seq_len: int, first_window: int = 0, max_windows: int | None = None):
    """Window k covers tokens [k*seq_len, (k+1)*seq_len). Calibration must use other ranges."""
    n = ids.numel() // seq_len
    last = n if max_windows is None else min(n, first_window + max_windows)
    if first_window >= last:
        raise ValueError(f"no evaluation window: the text has {n} windows of {seq_len} tokens, first={first_window}")
    return [ids[k * seq_len:(k + 1) * seq_len] for k in range(first_window, last)]


@torch.no_grad()
def perplexity(model, tokenizer, text: str, seq_len: int = 512, first_window: int = 0,
               max_windows: int | None = None, quiet: bool = False) -> dict:
    start = time.perf_counter()
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    # the first resident parameter (accelerate hooks move inputs on to where an offloaded model computes)
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    nll, count = 0.0, 0
    windows = token_windows(ids, seq_len, first_window, max_windows)
    for window in tqdm(windows, desc="perplexity", disable=quiet):
        x = window.unsqueeze(0).to(device)
        logits = model(input_ids=x).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
        nll += loss.item()
        count += x.numel() - 1
    return {"ppl": math.exp(nll / count), "tokens": count, "seconds": time.perf_counter() - start}
