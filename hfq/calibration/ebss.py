"""Expert-balanced self-sampling (EBSS, MoEQuant §3.1): the MoE model writes its own calibration text by beam search
under a cost that keeps the text likely AND spreads the tokens evenly over the experts.

For a beam c of length L and a next-token candidate v:
    cost(c + v) = -(sum log p(c) + log p(v | c)) / (L + 1) + sigma(c + v) / tau
sigma = the spread of expert usage: per MoE layer, the sample standard deviation over experts of the usage fractions
(tokens routed to e / all routed tokens), averaged over the MoE layers (the paper prints one std over "all experts";
per-layer averaging is our reading, so one crowded layer cannot hide behind balanced ones). The w lowest-cost
candidates survive each step; a sample is the best beam at seq_len. As the authors answered (MoEQuant issue #1) the
first `prefix` tokens are sampled normally (the first uniformly over the vocabulary) and scoring starts after them.

Candidates per beam are the `top_k` most likely next tokens (the full-vocabulary expansion of the pseudo-code is
infeasible); all w x top_k candidates run as ONE forward on the beams' KV cache, each beam's candidates as query
tokens at the same position under a tree mask (each sees the beam's prefix and itself), which yields their routing
(to score sigma); the chosen tokens then run once more to extend the cache and give the next step's logits.
Measured on a 7M-parameter byte-level Mixtral at 512 tokens: repeating the cache per candidate instead cost ~6 min
per sample. Routing is read where the model calls its experts
(`ArchAdapter.expert_inputs`), so every router (softmax / sigmoid, correction bias, group-limited top-k) counts as
the model really routes.

Degenerate samples (a loop: fewer than `min_distinct` distinct 4-grams per 4-gram) and exact duplicates are
regenerated from the next first token, at most `retries` times each, and counted.
"""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from hfq.offload import execution_device
from hfq.progress import is_quiet

from .data import cache_kwarg, decode_step, register_sampler, vocab_size

logger = logging.get_logger(__name__)

DEFAULTS = dict(tau=1.2, width=4, top_k=64, prefix=3, min_distinct=0.3, retries=3)


def moe_experts(model) -> list[torch.nn.Module]:
    """The model's fused-experts modules, in block order (what `expert_inputs` reads)."""
    from hfq.nn.experts import QuantExperts, is_fused_experts

    found = [m for m in model.modules() if is_fused_experts(m) or isinstance(m, QuantExperts)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no fused MoE experts: expert-balanced sampling and expert "
                         f"coverage need an MoE model (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, ...)")
    return found


@contextmanager
def record_routing(model):
    """Yields a list that receives, per forward, one [tokens, n_layers, n_experts] count tensor: how many of each
    token's top-k slots went to each expert, per MoE layer (tokens flattened in batch-major order)."""
    from hfq.arch import get_adapter

    adapter = get_adapter(model)
    experts = moe_experts(model)
    n_exp = [_num_experts(m) for m in experts]
    if len(set(n_exp)) != 1:
        raise NotImplementedError(f"MoE layers with different expert counts {sorted(set(n_exp))}")
    calls: dict[int, torch.Tensor] = {}
    out: list[torch.Tensor] = []

    def hook(i):
        def fn(module, args, kwargs):
            _, index, _ = adapter.expert_inputs(args, kwargs)
            index = index.reshape(-1, index.shape[-1])
            counts = torch.zeros(index.shape[0], n_exp[0], dtype=torch.int32, device=index.device)
            valid = (index >= 0) & (index < n_exp[0])  # some kernels pad with an out-of-range expert id
            counts.scatter_add_(1, index.clamp(0, n_exp[0] - 1), valid.to(torch.int32))
            calls[i] = counts.cpu()
            if len(calls) == len(experts):
                out.append(torch.stack([calls[j] for j in range(len(experts))], 1))
                calls.clear()
        return fn

    handles = [m.register_forward_pre_hook(hook(i), with_kwargs=True) for i, m in enumerate(experts)]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def _num_experts(module) -> int:
    return getattr(module, "num_experts", None) or module.gate_up_proj.shape[0]


def candidate_forward(model, cache, cand: torch.Tensor, past: int):
    """One forward of candidates `cand` [beams, k] for the next position after `past` cached tokens: a beam's k
    candidates run as k query tokens at the same position, each seeing the beam's cache and itself only (a tree
    mask), so the cache is not copied per candidate. The k new entries are appended to `cache` (crop them after)."""
    device, dtype = execution_device(model), model.dtype
    beams, k = cand.shape
    mask = torch.full((beams, 1, k, past + k), torch.finfo(dtype).min, dtype=dtype)
    mask[..., :past] = 0
    mask[..., past:].diagonal(dim1=-2, dim2=-1).fill_(0)
    return model(input_ids=cand.to(device), attention_mask=mask.to(device),
                 position_ids=torch.full((beams, k), past, device=device), use_cache=True,
                 **{cache_kwarg(model): cache})


def usage_spread(counts: torch.Tensor) -> torch.Tensor:
    """counts [..., n_layers, n_experts] -> sigma [...]: per layer the std (ddof 1) of the usage fractions, averaged
    over layers."""
    c = counts.float()
    frac = c / c.sum(-1, keepdim=True).clamp_min(1)
    return frac.std(-1, unbiased=True).mean(-1)


def _degenerate(ids: list[int], min_distinct: float) -> bool:
    grams = [tuple(ids[i:i + 4]) for i in range(len(ids) - 3)]
    return bool(grams) and len(set(grams)) / len(grams) < min_distinct


@torch.no_grad()
def _one_sample(model, seq_len: int, generator: torch.Generator, vocab: int, tau: float, width: int, top_k: int,
                prefix: int) -> list[int]:
    device = execution_device(model)
    ids = torch.randint(0, vocab, (1, 1), generator=generator)
    with record_routing(model) as routes:
        out, cache = decode_step(model, ids.to(device))
        counts = routes.pop().sum(0, keepdim=True)  # [1, layers, experts]
        while ids.shape[1] < min(prefix, seq_len):  # the prefix: plain sampling
            probs = torch.softmax(out.logits[:, -1].float().cpu(), -1)
            nxt = torch.multinomial(probs, 1, generator=generator)
            ids = torch.cat([ids, nxt], 1)
            out, cache = decode_step(model, nxt.to(device), cache)
            counts = counts + routes.pop().sum(0, keepdim=True)
        logits = out.logits[:, -1].float().cpu()
        score = torch.zeros(1, dtype=torch.float64)  # sum log p of the scored tokens, per beam
        scored = 0
        k = min(top_k, logits.shape[-1])
        while ids.shape[1] < seq_len:
            logp = torch.log_softmax(logits, -1)
            cand_logp, cand = logp.topk(k, -1)  # [beams, k]
            past = ids.shape[1]
            candidate_forward(model, cache, cand, past)
            new_counts = counts.repeat_interleave(k, 0) + routes.pop()  # [beams * k, layers, experts]
            new_score = score.repeat_interleave(k) + cand_logp.reshape(-1).double()
            cost = -new_score / (scored + 1) + usage_spread(new_counts).double() / tau
            keep = cost.topk(min(width, cost.numel()), largest=False).indices
            cache.crop(-k)  # drop the candidates' keys / values (a negative count), then append the chosen tokens'
            cache.reorder_cache((keep // k).to(device))
            chosen = cand.reshape(-1, 1)[keep]
            out, cache = decode_step(model, chosen.to(device), cache)
            routes.pop()  # the chosen tokens' routing, already counted
            ids = torch.cat([ids[keep // k], chosen], 1)
            counts, score, scored = new_counts[keep], new_score[keep], scored + 1
            logits = out.logits[:, -1].float().cpu()
    return ids[0].tolist()  # beams stay sorted by cost: the first is the best


def ebss_sampler(model, n_samples: int, seq_len: int, generator: torch.Generator, tau: float = DEFAULTS["tau"],
                 width: int = DEFAULTS["width"], top_k: int = DEFAULTS["top_k"], prefix: int = DEFAULTS["prefix"],
                 min_distinct: float = DEFAULTS["min_distinct"], retries: int = DEFAULTS["retries"],
                 cache_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """[n_samples, seq_len] expert-balanced self-generated token windows (module docstring). Deterministic given the
    generator's seed. cache_dir: samples are appended to `<cache_dir>/ebss-<key>.jsonl` as they finish (one
    {"ids": [...]} per line; key = model weights fingerprint + every argument) and reused by the next call, which
    generates only the missing ones."""
    if not tau > 0:
        raise ValueError(f"ebss tau must be > 0, got {tau!r}")
    for name, v in (("width", width), ("top_k", top_k), ("retries", retries + 1)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"ebss {name} must be a positive integer, got {v!r}")
    moe_experts(model)  # clear error for a dense model before any work
    vocab = vocab_size(model)
    seed = generator.initial_seed()
    args = dict(n=n_samples, seq_len=seq_len, seed=seed, tau=tau, width=width, top_k=top_k, prefix=prefix,
                min_distinct=min_distinct, retries=retries)
    path = _cache_path(model, args, cache_dir)
    rows = _read_cache(path, seq_len)[:n_samples]
    if rows:
        logger.info(f"ebss: {len(rows)} of {n_samples} samples reused from {path}")
    rejected = 0
    seen = {tuple(r) for r in rows}
    bar = tqdm(total=n_samples, initial=len(rows), desc="ebss samples", disable=is_quiet())
    # sample i always starts from generator seed (seed, i, try): reused and fresh samples never depend on each other
    while len(rows) < n_samples:
        i = len(rows)
        for attempt in range(retries + 1):
            g = torch.Generator().manual_seed(seed * 1_000_003 + i * (retries + 1) + attempt)
            ids = _one_sample(model, seq_len, g, vocab, tau, width, top_k, prefix)
            bad = _degenerate(ids, min_distinct) or tuple(ids) in seen
            if not bad or attempt == retries:
                break
            rejected += 1
        if bad:
            logger.warning(f"ebss: sample {i} is still degenerate or a duplicate after {retries} retries; kept")
        rows.append(ids)
        seen.add(tuple(ids))
        if path is not None:
            with open(path, "a") as f:
                f.write(json.dumps({"ids": ids}) + "\n")
        bar.update(1)
    bar.close()
    if rejected:
        logger.info(f"ebss: {rejected} degenerate / duplicate samples regenerated")
    return torch.tensor(rows, dtype=torch.long)


def _cache_path(model, args: dict, cache_dir) -> Path | None:
    if cache_dir is None:
        return None
    emb = model.get_input_embeddings().weight.detach().float().cpu().reshape(-1)
    head = emb[: 1 << 16].numpy().tobytes()
    key = hashlib.sha256(head + json.dumps(args, sort_keys=True).encode() +
                         str(getattr(model, "name_or_path", "")).encode()).hexdigest()[:16]
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    return Path(cache_dir) / f"ebss-{key}.jsonl"


def _read_cache(path: Path | None, seq_len: int) -> list[list[int]]:
    """Complete lines only: a line cut by an interrupted run (the last one) is dropped and regenerated."""
    if path is None or not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            ids = json.loads(line)["ids"]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
        if len(ids) == seq_len:
            rows.append(ids)
    path.write_text("".join(json.dumps({"ids": r}) + "\n" for r in rows))  # rewrite without the cut line
    return rows


@torch.no_grad()
def expert_coverage(model, samples) -> dict:
    """How calibration `samples` ([n, seq] ids or a list of 1-D ids) spread over the experts: per MoE layer the
    min / median / max tokens per expert, the number of experts no token reached and the std (ddof 1) of the usage
    fractions; plus `min_tokens` (over all layers and experts) and `mean_std`."""
    device = execution_device(model)
    total = None
    was_training = model.training
    model.eval()
    try:
        with record_routing(model) as routes:
            for s in samples:  # one at a time: samples may differ in length
                model(input_ids=torch.as_tensor(s).reshape(1, -1).to(device), use_cache=False)
                c = routes.pop().sum(0)
                total = c if total is None else total + c
    finally:
        model.train(was_training)
    layers = []
    for c in total:
        frac = c.float() / c.sum().clamp_min(1)
        layers.append({"min": int(c.min()), "median": float(c.float().median()), "max": int(c.max()),
                       "unused": int((c == 0).sum()), "std": float(frac.std(unbiased=True))})
    return {"layers": layers, "min_tokens": min(x["min"] for x in layers),
            "mean_std": sum(x["std"] for x in layers) / len(layers), "counts": total.tolist()}


register_sampler("ebss", ebss_sampler)
