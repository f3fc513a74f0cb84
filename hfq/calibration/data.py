"""Calibration samples: token windows of shape [n_samples, seq_len] (or a list of 1-D id tensors).

Sources (`get_calibration` dispatches on what it is given):
- a `datasets` text dataset by name, or a local text file (`from_dataset`): random windows of `seq_len` tokens;
- a list of strings or of token-id lists / tensors (`from_samples`);
- the model itself (`from_model`): sampled text through a pluggable sampler (`SAMPLERS`; plain sampling now,
  an expert-balanced sampler registers itself later with `register_sampler`).

Calibration never overlaps evaluation. Evaluation (`hfq.eval.perplexity`) reads non-overlapping windows from the
START of a test text: windows 0-19 cover tokens [0, 20*seq_len), at most [0, 40960) for seq_len <= 2048.
- "wikitext2": the train split when it can be had (`$HFQ_DATA_DIR/wikitext-2-raw/wiki.train.raw`, else the Hub
  through `datasets` when no local test file exists); windows start anywhere in it.
  Offline, with only the test file present (this project's machines), windows are drawn from the TEST text in the
  token range [HOLDOUT_TOKENS, n_tokens) = [40960, ~290k) — after every evaluation window; this is logged.
- a local file or another text: same rule, tokens [0, HOLDOUT_TOKENS) are held out, because the same file may be
  used for evaluation. Pass `holdout_tokens=0` to use the whole text.
- Hub datasets other than wikitext2: the "train" split, whole range.

Hyper-parameters are chosen on the VALIDATION range, never on the evaluation windows: at seq_len 512, windows
20-79 of the test text (`VALIDATION_WINDOWS`, tokens [10240, 40960)), between the evaluation windows 0-19 and the
calibration range. `validation_range(seq_len)` gives (first_window, n_windows) for `hfq.eval.perplexity`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch
from transformers.utils import logging

from hfq.offload import execution_device

logger = logging.get_logger(__name__)

HOLDOUT_TOKENS = 20 * 2048  # evaluation windows 0-19 at seq_len <= 2048 live in tokens [0, 40960)
EVAL_WINDOWS = 20  # windows 0-19 of the test text are the evaluation range
VALIDATION_TOKENS = (20 * 512, HOLDOUT_TOKENS)  # [10240, 40960): after the evaluation windows at seq_len 512


def validation_range(seq_len: int = 512) -> tuple[int, int]:
    """(first_window, n_windows) of the validation range for `hfq.eval.perplexity` at `seq_len`: the windows inside
    tokens [10240, 40960), which overlap neither the evaluation windows 0-19 at that seq_len nor calibration."""
    if EVAL_WINDOWS * seq_len > VALIDATION_TOKENS[0]:
        raise ValueError(f"at seq_len {seq_len} the evaluation windows 0-19 reach token {EVAL_WINDOWS * seq_len}, "
                         f"past the validation range's start {VALIDATION_TOKENS[0]}; validate at seq_len <= 512")
    first = VALIDATION_TOKENS[0] // seq_len
    return first, VALIDATION_TOKENS[1] // seq_len - first
WIKITEXT2_TRAIN = "wikitext-2-raw/wiki.train.raw"


def random_windows(ids: torch.Tensor, n_samples: int, seq_len: int, seed: int = 0, start: int = 0,
                   end: int | None = None) -> torch.Tensor:
    """`n_samples` windows [n, seq_len] with random starts (fixed `seed`) inside tokens [start, end)."""
    end = ids.numel() if end is None else min(end, ids.numel())
    room = end - start - seq_len
    if room < 0:
        raise ValueError(f"calibration needs windows of {seq_len} tokens in tokens [{start}, {end}) but that range "
                         f"holds {max(end - start, 0)}; use a shorter seq_len, a longer text, or a smaller holdout")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, room + 1, (n_samples,), generator=g) + start
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]


def _load_tokenizer(tokenizer):
    if tokenizer is None:
        raise ValueError("text calibration data needs a tokenizer: pass tokenizer= (a name, a folder or an object)")
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer))
    return tokenizer


def dataset_text(name_or_path: str) -> tuple[str, int]:
    """(text, holdout): the text to draw from and how many leading tokens are reserved for evaluation."""
    from hfq.data.text import KNOWN_TEXTS, load_text

    if Path(name_or_path).is_file():
        return load_text(name_or_path), HOLDOUT_TOKENS
    if name_or_path in KNOWN_TEXTS:
        data_dir = os.environ.get("HFQ_DATA_DIR")
        local_test = data_dir and (Path(data_dir) / KNOWN_TEXTS[name_or_path][0]).is_file()
        train = data_dir and name_or_path == "wikitext2" and Path(data_dir, WIKITEXT2_TRAIN).is_file()
        if train:
            return load_text(str(Path(data_dir, WIKITEXT2_TRAIN))), 0
        if local_test:
            logger.info(f"calibration: {name_or_path} train split not available offline; drawing from the TEST text "
                        f"after its first {HOLDOUT_TOKENS} tokens (the evaluation windows)")
            return load_text(name_or_path), HOLDOUT_TOKENS
        return load_text(name_or_path, split="train"), 0
    return load_text(name_or_path, split="train"), 0


def from_dataset(name_or_path: str, tokenizer, n_samples: int = 128, seq_len: int = 2048, seed: int = 0,
                 holdout_tokens: int | None = None) -> torch.Tensor:
    """Random token windows [n_samples, seq_len] of a dataset or local text file (ranges: module docstring)."""
    text, holdout = dataset_text(name_or_path)
    ids = _tokenize(_load_tokenizer(tokenizer), text)
    start = holdout if holdout_tokens is None else holdout_tokens
    return random_windows(ids, n_samples, seq_len, seed, start=start)


def from_samples(samples, tokenizer=None, seq_len: int | None = None) -> list[torch.Tensor]:
    """Strings (tokenized, truncated to seq_len) or token-id lists/tensors (used as they are) -> 1-D id tensors."""
    if isinstance(samples, torch.Tensor):
        samples = list(samples) if samples.dim() == 2 else [samples]
    out = []
    tok = None
    for s in samples:
        if isinstance(s, dict):
            s = s["input_ids"]
        if isinstance(s, str):
            tok = tok or _load_tokenizer(tokenizer)
            t = _tokenize(tok, s)
            t = t[:seq_len] if seq_len else t
        else:
            t = torch.as_tensor(s, dtype=torch.long).reshape(-1)
        if t.numel() == 0:
            raise ValueError("a calibration sample is empty; drop empty strings/lists from the calibration data")
        out.append(t)
    if not out:
        raise ValueError("calibration data is empty; pass at least one sample")
    return out


# name -> sampler(model, n_samples, seq_len, generator) -> LongTensor [n_samples, seq_len]
SAMPLERS: dict[str, Callable] = {}


def register_sampler(name: str, fn: Callable) -> Callable:
    """Plug in a self-sampling strategy (e.g. expert-balanced sampling for MoE) under `name`."""
    SAMPLERS[name] = fn
    return fn


def cache_kwarg(model) -> str:
    """The name under which the model's forward takes a KV cache: transformers renamed `past_key_values` to `cache`
    (5.24 deprecates the old name)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def decode_step(model, input_ids: torch.Tensor, cache=None):
    """One cached forward: (output, its KV cache)."""
    kwargs = {} if cache is None else {cache_kwarg(model): cache}
    out = model(input_ids=input_ids, use_cache=True, **kwargs)
    return out, getattr(out, "cache", None) or out.past_key_values


def vocab_size(model) -> int:
    """Rows of the output embedding (the config's vocab_size when the model has none)."""
    head = model.get_output_embeddings()
    return head.weight.shape[0] if head is not None else model.config.vocab_size


@torch.no_grad()
def plain_sampler(model, n_samples: int, seq_len: int, generator: torch.Generator, temperature: float = 1.0,
                  batch_size: int = 8) -> torch.Tensor:
    """Ancestral sampling from the model's own distribution; the first token is uniform over the vocabulary."""
    device = execution_device(model)
    vocab = vocab_size(model)
    rows = []
    for b in range(0, n_samples, batch_size):
        n = min(batch_size, n_samples - b)
        ids = torch.randint(0, vocab, (n, 1), generator=generator).to(device)
        out, cache = decode_step(model, ids)
        for _ in range(seq_len - 1):
            probs = torch.softmax(out.logits[:, -1].float().cpu() / temperature, -1)
            nxt = torch.multinomial(probs, 1, generator=generator).to(device)
            ids = torch.cat([ids, nxt], 1)
            out, cache = decode_step(model, nxt, cache)
        rows.append(ids.cpu())
    return torch.cat(rows)


register_sampler("plain", plain_sampler)


def from_model(model, n_samples: int = 128, seq_len: int = 512, seed: int = 0, sampler: str = "plain",
               **sampler_kwargs) -> torch.Tensor:
    """Self-generated calibration windows [n_samples, seq_len] (no dataset needed)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; registered: {sorted(SAMPLERS)}")
    was_training = model.training
    model.eval()
    try:
        return SAMPLERS[sampler](model, n_samples, seq_len, torch.Generator().manual_seed(seed), **sampler_kwargs)
    finally:
        model.train(was_training)


def _jsonl_samples(path: Path) -> list:
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        value = next((row[k] for k in ("ids", "input_ids", "text") if k in row), None)
        if value is None:
            raise ValueError(f"{path}:{n}: a calibration .jsonl line needs an 'ids', 'input_ids' or 'text' field")
        out.append(value)
    return out


def get_calibration(data, tokenizer=None, n_samples: int = 128, seq_len: int = 2048, seed: int = 0,
                    model=None, sampler: str = "plain", sampler_kwargs: dict | None = None) -> list[torch.Tensor]:
    """Any supported calibration spec -> list of 1-D token-id tensors.

    data: a dataset name / local path (str), "self" (sample from `model` with `sampler`), a LongTensor [n, seq], a
    list of strings, of token-id lists or of {"input_ids": ...} dicts. A local `.jsonl` file is read as samples, one
    {"ids": [...]} / {"input_ids": [...]} / {"text": ...} per line (e.g. a saved EBSS set)."""
    if data is None:
        raise ValueError("no calibration data: pass dataset='wikitext2' (or a local text file, or a list of token-id "
                         "lists) in the config, or calibration=... to hfq.quantize")
    if isinstance(data, (str, os.PathLike)):
        if str(data) == "self":
            if model is None:
                raise ValueError("dataset='self' samples calibration text from the model; pass the model")
            windows = from_model(model, n_samples, seq_len, seed, sampler=sampler, **(sampler_kwargs or {}))
        else:
            if str(data).endswith(".jsonl") and Path(data).is_file():
                return from_samples(_jsonl_samples(Path(data)), tokenizer, seq_len)[:n_samples]
            windows = from_dataset(str(data), tokenizer, n_samples, seq_len, seed)
        return list(windows)
    if isinstance(data, (list, tuple, torch.Tensor)):
        return from_samples(data, tokenizer, seq_len)
    raise TypeError(f"calibration data must be a dataset name, a path, 'self', a LongTensor or a list of strings / "
                    f"token-id lists, got {type(data).__name__}")
