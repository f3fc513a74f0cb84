"""What the tiny-LM benchmarks share (moequant.py, mambaquant.py, rwkvquant.py): the byte-level tokenizer and the
training loop of their models."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import torch

TRAIN_START = 40960  # bytes before this are the evaluation windows (0..10239) and the validation range


class ByteTokenizer:
    """One token per UTF-8 byte (vocabulary 256): the call convention hfq's evaluator and calibration use."""

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        return SimpleNamespace(input_ids=torch.tensor([list(text.encode("utf-8"))], dtype=torch.long))


def windows(data: torch.Tensor, n: int, g: torch.Generator) -> list[torch.Tensor]:
    """n random training windows of 512 tokens."""
    starts = torch.randint(0, data.numel() - 513, (n,), generator=g)
    return [data[s:s + 512] for s in starts.tolist()]


def train_cached(path: Path, model, sample, steps: int, lr: float, quiet: bool, desc: str, finalize=None,
                 info: dict | None = None) -> Path:
    """Train `model` once and save it to `path` (written under a temporary name, renamed when complete).

    AdamW (betas 0.9 / 0.95, weight decay 0.1), linear warm-up over 100 steps then cosine to 0, gradient norm clipped
    at 1; each step's batch is `sample(generator)` (generator seeded 0). finalize(model) runs before saving (e.g. to
    switch off a training-only option); `training.json` records steps, final loss, seconds and `info`."""
    from tqdm.auto import tqdm

    if (path / "config.json").is_file():
        return path
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    model.train()
    for _ in tqdm(range(steps), desc=desc, disable=quiet):
        x = sample(g)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    if finalize is not None:
        finalize(model)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    (tmp / "training.json").write_text(json.dumps({"steps": steps, "final_loss": float(loss.detach()),
                                                   "seconds": round(time.perf_counter() - start, 1),
                                                   **(info or {})}))
    tmp.rename(path)
    return path
