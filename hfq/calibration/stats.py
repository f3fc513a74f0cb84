"""Calibration statistics of the inputs of a block's layers, for any method that needs them.

`BlockStatistics` is a `run_blocks` pass. For every group of target layers that read the same input tensor (q/k/v,
gate/up: found by input identity while the block runs) it accumulates what the method asks for, token-weighted:
- "hessian": H = 2/N sum w x x^T (`hfq.solvers.Hessian`; GPTQ);
- "moments": the same second moment plus sum w x, for the mean and covariance (KLT rotations);
- "absmax" / "absmean": per-channel max |x| and weighted mean |x| (smoothing scales).
Fused MoE experts get one `InputStats` per expert and part ("gate_up", "down") from the tokens routed to it, weighted
by the routing weight when `expert_affinity` (AGQ); an expert no token was routed to gets the statistics of all the
tokens entering the layer (`fallback`); how the experts are called comes from the arch adapter. With
`expert_affinity`, the layers of a gated shared expert (`ArchAdapter.gated_shared_experts`) weight each token by
its sigmoid gate.

The statistics go to a `solver` (see `GroupSolver`) in one of two orders:
- "lockstep": ONE block forward over all calibration chunks (`hfq.calibration.lockstep`): before each target runs,
  every chunk has reached it, so its statistics include what the solver already changed upstream in the block
  (true-sequential), and the block's outputs feed the next block;
- "two_pass": one forward collects every group's statistics from the block as it is, the solver runs on all of
  them, and the runner's second forward feeds the next block (streams chunk by chunk: least activation memory).
"""
from __future__ import annotations

import weakref
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from hfq.arch import get_adapter
from hfq.solvers import Hessian

from .runner import BlockInputs, current_chunk, lockstep

STATS = ("hessian", "moments", "absmax", "absmean")


def token_weights(weight, n_tokens: int, device) -> torch.Tensor | None:
    """Per-sample [b] or per-token [b, s] weights of a chunk -> one weight per flattened token of an input with
    n_tokens rows (a layer may see [b, s, h] or the tokens flattened, as MoE experts do)."""
    if weight is None:
        return None
    w = torch.as_tensor(weight, dtype=torch.float32, device=device)
    if w.numel() == n_tokens:
        return w.reshape(-1)
    if w.dim() == 1 and n_tokens % w.shape[0] == 0:
        return w.repeat_interleave(n_tokens // w.shape[0])
    raise ValueError(f"calibration sample weights of shape {tuple(w.shape)} match neither the chunk's samples nor "
                     f"its {n_tokens} tokens; give one weight per sample [n] or per token [n, seq_len]")


class InputStats:
    """Running statistics of one input (all its tokens, last dim = channels) in float32 / float64."""

    def __init__(self, columns: int, device, want: tuple[str, ...] = ("hessian",)):
        unknown = set(want) - set(STATS)
        if unknown:
            raise ValueError(f"unknown statistics {sorted(unknown)}; known: {STATS}")
        self.columns, self.want = columns, tuple(want)
        self.second = Hessian(columns, device) if {"hessian", "moments"} & set(want) else None
        self.first = torch.zeros(columns, dtype=torch.float64, device=device) if "moments" in want else None
        self.max_abs = torch.zeros(columns, device=device) if "absmax" in want else None
        self.sum_abs = torch.zeros(columns, dtype=torch.float64, device=device) if "absmean" in want else None
        self.weight = 0.0
        self.fallback = False  # an expert's statistics taken from all the layer's tokens (none was routed to it)

    def add(self, x: torch.Tensor, weight=None) -> None:
        """x [..., columns]; weight: per sample or per token (see `token_weights`), None = 1 per token."""
        x = x.detach().reshape(-1, x.shape[-1])
        w = token_weights(weight, x.shape[0], x.device)
        if w is not None:
            if (w < 0).any():
                raise ValueError("calibration sample weights must be >= 0")
            keep = w > 0
            x, w = x[keep], w[keep]
        if not x.shape[0]:
            return
        self.weight += float(w.sum()) if w is not None else x.shape[0]
        if self.second is not None:
            self.second.add(x, w)
        xf = x.float()
        if self.first is not None:
            self.first += (xf if w is None else xf * w[:, None]).sum(0, dtype=torch.float64)
        if self.max_abs is not None:
            self.max_abs = torch.maximum(self.max_abs, xf.abs().amax(0))
        if self.sum_abs is not None:
            self.sum_abs += (xf.abs() if w is None else xf.abs() * w[:, None]).sum(0, dtype=torch.float64)

    @property
    def empty(self) -> bool:
        return self.weight == 0

    def hessian(self) -> torch.Tensor:
        return self.second.matrix()

    def mean(self) -> torch.Tensor:
        return self.first / max(self.weight, 1e-12)

    def covariance(self) -> torch.Tensor:
        """Weighted covariance (float64) of the channels."""
        second = self.second.matrix().double() / 2  # H = 2 E[x x^T]
        mean = self.mean()
        return second - torch.outer(mean, mean)

    def absmax(self) -> torch.Tensor:
        return self.max_abs

    def absmean(self) -> torch.Tensor:
        return (self.sum_abs / max(self.weight, 1e-12)).float()


class GroupSolver(Protocol):
    """What a method does with the statistics (GPTQ: solve, write the dequantized weights, pack at the end)."""

    def solve(self, block_index: int, names: list[str], modules: list[nn.Module], stats: InputStats) -> list:
        """Layers reading one input: one result per module (not yet applied)."""

    def commit(self, block_index: int, name: str, module: nn.Module, result) -> None:
        """Apply a result once the layer's input is confirmed (the block forward goes on with it)."""

    def solve_experts(self, block_index: int, name: str, module: nn.Module, part: str,
                      stats: list[InputStats]) -> None:
        """One part ("gate_up" / "down") of fused experts, one InputStats per expert."""


class _StageDone(Exception):
    """Raised once every target of the block has been reached: the rest of the block need not run."""


def _check_called(targets: dict, called) -> None:
    never = [n for n in targets if n not in called]
    if never:
        raise ValueError(f"layers {never} were never called by their block; add them to modules_to_not_convert")


class BlockStatistics:
    """`run_blocks` pass: statistics of the inputs of `targets[block index]` ({local name: nn.Linear or fused
    experts}) handed to `solver`, in `order` ("lockstep" or "two_pass"). sample_weights: [n_samples] or
    [n_samples, seq_len] for the calibration samples, in order."""

    def __init__(self, model, targets: dict[int, dict[str, nn.Module]], solver: GroupSolver,
                 want: tuple[str, ...] = ("hessian",), order: str = "lockstep", sample_weights=None,
                 expert_affinity: bool = False):
        if order not in ("lockstep", "two_pass"):
            raise ValueError(f"order must be 'lockstep' or 'two_pass', got {order!r}")
        self.adapter = get_adapter(model)
        self.targets, self.solver, self.want, self.order = targets, solver, tuple(want), order
        self.sample_weights, self.expert_affinity = sample_weights, expert_affinity
        self._siblings: dict[str, list[str]] = {}  # layer -> later layers of its block that read the same input
        self._gates: dict[str, dict[int, torch.Tensor]] = {}  # gated shared expert -> chunk -> sigmoid(gate(x))
        self._chunk = 0  # the running chunk in two-pass order

    def _gate_hooks(self, block) -> list:
        """With expert_affinity: pre-hooks on the block's gated shared experts (`ArchAdapter.gated_shared_experts`)
        that keep, per chunk, each token's sigmoid(gate(x)), the factor the model multiplies the shared expert's
        output by. The gate's weight is read directly: calling the module would count as its calibration call."""
        self._gates = {}
        handles = []
        for shared, gate in self.adapter.gated_shared_experts if self.expert_affinity else ():
            try:
                shared_mod, gate_mod = block.get_submodule(shared), block.get_submodule(gate)
            except AttributeError:
                continue  # a dense layer of an MoE model
            self._gates[shared] = {}

            def hook(module, args, kwargs, prefix=shared, g=gate_mod):
                x = args[0] if args else next(iter(kwargs.values()))
                k = current_chunk()
                value = torch.sigmoid(F.linear(x.float(), g.weight.float(), None if g.bias is None else g.bias.float()))
                self._gates[prefix][self._chunk if k is None else k] = value.reshape(-1)
            handles.append(shared_mod.register_forward_pre_hook(hook, with_kwargs=True))
        return handles

    def _gating(self, name: str | None) -> str | None:
        return next((p for p in self._gates if name and name.startswith(p + ".")), None)

    def _layer_weight(self, name: str, w, k: int):
        """Token weights of layer `name` in chunk k: the calibration weight w, times the shared-expert gate for the
        layers of a gated shared expert."""
        prefix = self._gating(name)
        if prefix is None:
            return w
        g = self._gates[prefix][k]
        return g if w is None else token_weights(w, g.numel(), g.device) * g

    def _chunk_weights(self, inputs: BlockInputs) -> list:
        if self.sample_weights is None:
            return [None] * len(inputs)
        out, start = [], 0
        for h in inputs.hidden:
            out.append(self.sample_weights[start:start + h.shape[0]])
            start += h.shape[0]
        return out

    def _stats(self, columns, device) -> InputStats:
        return InputStats(columns, device, self.want)

    def _expert_stats(self, module, part: str, calls) -> list[InputStats]:
        """Per-expert statistics of `part` from the experts' calls [((args, kwargs), chunk weight), ...]."""
        E = module.gate_up_proj.shape[0]
        cols = module.gate_up_proj.shape[2] if part == "gate_up" else module.down_proj.shape[2]
        out = None
        for (args, kwargs), w in calls:
            x, top_k_index, top_k_weights = self.adapter.expert_inputs(args, kwargs)
            x = x.reshape(-1, x.shape[-1])
            out = out or [self._stats(cols, x.device) for _ in range(E)]
            tok_w = token_weights(w, x.shape[0], x.device)
            for e in range(E):
                hit = top_k_index == e
                tokens = hit.any(-1).nonzero().squeeze(-1)
                if tokens.numel() == 0:
                    continue
                xe = x[tokens]
                we = (top_k_weights * hit).sum(-1)[tokens].float() if self.expert_affinity else None
                if tok_w is not None:
                    we = tok_w[tokens] if we is None else we * tok_w[tokens]
                if part == "down":  # the experts' intermediate activations, from the (maybe already solved) gate_up
                    xe = self.adapter.expert_intermediate(module, e, xe)
                out[e].add(xe, we)
        for e in [e for e, st in enumerate(out or []) if st.empty]:
            # no routed token: the statistics of every token entering the layer, as if all were routed to e
            for (args, kwargs), w in calls:
                x = self.adapter.expert_inputs(args, kwargs)[0]
                x = x.reshape(-1, x.shape[-1])
                out[e].add(self.adapter.expert_intermediate(module, e, x) if part == "down" else x,
                           token_weights(w, x.shape[0], x.device))
            out[e].fallback = True
        return out

    def _solve_experts(self, index, name, module, calls, sequential: bool) -> None:
        """sequential (lockstep): the down part's inputs come from the already solved gate_up; otherwise both parts'
        statistics are taken from the experts as they were."""
        if sequential:
            for part in ("gate_up", "down"):
                self.solver.solve_experts(index, name, module, part, self._expert_stats(module, part, calls))
            return
        stats = {part: self._expert_stats(module, part, calls) for part in ("gate_up", "down")}
        for part, s in stats.items():
            self.solver.solve_experts(index, name, module, part, s)

    # ------------------------------------------------------------------ lockstep
    def _lockstep(self, block, index, targets, inputs) -> list[torch.Tensor]:
        """Each layer's statistics from every chunk's input at the moment it is reached. Layers reading the same
        input share them and are solved together when the first of them is reached (which layers share an input
        is learnt from the blocks before, and each prediction is checked by input identity when the layer is
        reached: a result is applied only then)."""
        weights = self._chunk_weights(inputs)
        last = {"inputs": [], "stats": None, "lead": None}
        ahead: dict[str, object] = {}  # results of siblings solved with the layer that first read their input
        done = set()

        def on_reach(name, calls):
            module = targets[name]
            done.add(name)
            if not isinstance(module, nn.Linear):
                return self._solve_experts(index, name, module, list(zip(calls, weights)), sequential=True)
            xs = [args[0] if args else next(iter(kwargs.values())) for args, kwargs in calls]
            same = len(xs) == len(last["inputs"]) and all(r() is x for r, x in zip(last["inputs"], xs))
            if same and self._gating(name) == self._gating(last["lead"]):  # same input, same token weights
                if name in ahead:
                    return self.solver.commit(index, name, module, ahead.pop(name))
                self._siblings.setdefault(last["lead"], []).append(name)  # learnt for the next blocks
            else:
                stats = self._stats(xs[0].shape[-1], xs[0].device)
                for k, (x, w) in enumerate(zip(xs, weights)):
                    stats.add(x, self._layer_weight(name, w, k))
                last.update(inputs=[weakref.ref(x) for x in xs], stats=stats, lead=name)
                ahead.clear()
            group = [name] + [n for n in self._siblings.get(name, ()) if n in targets and n not in done]
            results = self.solver.solve(index, group, [targets[n] for n in group], last["stats"])
            self.solver.commit(index, name, module, results[0])
            ahead.update(zip(group[1:], results[1:]))

        outs = lockstep(inputs, block, targets, on_reach)
        _check_called(targets, done)
        return outs

    # ------------------------------------------------------------------ two-pass
    def _two_pass(self, block, index, targets, inputs) -> None:
        """Every group's statistics from one forward of the block as it is, then the solver on each group."""
        weights = self._chunk_weights(inputs)
        stats: dict[str, InputStats] = {}
        shared: dict[str, str] = {}  # layer -> the first layer that read the same input
        expert_calls: dict[str, list] = {n: [] for n, m in targets.items() if not isinstance(m, nn.Linear)}
        pending, state = set(), {"x": None, "lead": None, "w": None}

        def hook(name):
            def fn(module, args, kwargs):
                if name in expert_calls:
                    expert_calls[name].append(((args, kwargs), state["w"]))
                else:
                    x = args[0] if args else next(iter(kwargs.values()))
                    # a new input (or other token weights): new statistics, owned by the first layer reading it
                    if state["x"] is not x or self._gating(name) != self._gating(state["lead"]):
                        state["x"], state["lead"] = x, name
                        stats.setdefault(name, self._stats(x.shape[-1], x.device)).add(
                            x, self._layer_weight(name, state["w"], self._chunk))
                    else:
                        shared[name] = state["lead"]
                pending.discard(name)
                if not pending:
                    raise _StageDone
            return fn

        handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in targets.items()]
        called = set()
        try:
            for k in range(len(inputs)):
                pending.update(targets)
                state.update(x=None, lead=None, w=weights[k])
                self._chunk = k
                try:
                    inputs.run(block, k)
                except _StageDone:
                    pass
                called.update(set(targets) - pending)
        finally:
            for h in handles:
                h.remove()
        _check_called(targets, called)
        groups: dict[str, list[str]] = {}
        for n in targets:
            if n not in expert_calls:
                groups.setdefault(shared.get(n, n), []).append(n)
        for lead, names in groups.items():
            mods = [targets[n] for n in names]
            for n, m, r in zip(names, mods, self.solver.solve(index, names, mods, stats[lead])):
                self.solver.commit(index, n, m, r)
        for name, calls in expert_calls.items():
            self._solve_experts(index, name, targets[name], calls, sequential=False)

    @torch.no_grad()
    def __call__(self, block: nn.Module, index: int, inputs: BlockInputs):
        targets = self.targets.get(index, {})
        if not targets:
            return None
        handles = self._gate_hooks(block)
        try:
            if self.order == "lockstep":
                return self._lockstep(block, index, targets, inputs)
            return self._two_pass(block, index, targets, inputs)
        finally:
            for h in handles:
                h.remove()

    def finish(self, block: nn.Module, index: int) -> None:
        if hasattr(self.solver, "finish"):
            self.solver.finish(block, index, self.targets.pop(index, {}))
