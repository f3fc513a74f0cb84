"""Block-by-block calibration: capture what the first decoder block receives, then walk the blocks.

For each block: move it to the compute device, run the passes (`pass(block, block_index, inputs)`, which may
swap modules inside the block), then run the block over its inputs (unless the last pass returned its outputs)
to get the next block's inputs — from the quantized block (default) or from the block as it was before the
passes (`propagate="fp"`). Only one block and
the calibration activations live on the device; hidden states are replaced in place so there is one copy.
Works for anything whose blocks are called as `block(hidden_states, **kwargs)` and return the hidden states
(or a tuple starting with them): dense Llama-likes, fused-expert MoE, Mamba.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
from dataclasses import dataclass, field
from typing import Callable

import greenlet
import torch
import torch.nn as nn
from tqdm.auto import tqdm
from transformers.utils import logging

from hfq import offload
from hfq.arch import get_adapter
from hfq.progress import is_quiet

logger = logging.get_logger(__name__)

BlockPass = Callable[[nn.Module, int, "BlockInputs"], None]


class _Captured(Exception):
    """Raised by the capture hook so nothing after the embeddings runs."""


@dataclass
class BlockInputs:
    """The calibration inputs of the current block, as batch chunks: `hidden[k]` [b, seq, h] and
    `kwargs[k]` (attention mask, position embeddings/ids, cache position, ...)."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)
    autocast_dtype: torch.dtype | None = None

    def __len__(self):
        return len(self.hidden)

    @property
    def n_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)

    def autocast(self):
        """torch.autocast in `autocast_dtype` (off when None): matmuls in e.g. bfloat16, which CPUs with AMX or
        AVX512-BF16 run several times faster than float32; statistics are still accumulated in float32."""
        return torch.autocast(self.hidden[0].device.type, dtype=self.autocast_dtype,
                              enabled=self.autocast_dtype is not None)

    def call(self, block: nn.Module, k: int) -> torch.Tensor:
        """Block output for chunk k, in the caller's grad and autocast modes."""
        return first_output(block(self.hidden[k], **self.kwargs[k]))

    @torch.no_grad()
    def run(self, block: nn.Module, k: int) -> torch.Tensor:
        """Block output for chunk k, without grad, under `autocast()`."""
        with self.autocast():
            return self.call(block, k)

    def forward(self, block: nn.Module, stop: BaseException | type | None = None) -> list[torch.Tensor]:
        """Run the block over every chunk. `stop`: an exception type a hook may raise to end a chunk early
        (then nothing is returned for it)."""
        outs = []
        for k in range(len(self)):
            try:
                outs.append(self.run(block, k))
            except stop or ():  # type: ignore[misc]
                pass
        return outs

    def advance(self, block: nn.Module) -> None:
        """Replace each chunk's hidden states by the block's output, chunk by chunk (never two full copies)."""
        for k in range(len(self)):
            self.hidden[k] = self.run(block, k).to(self.hidden[k].dtype)


@torch.no_grad()
def lockstep(inputs: BlockInputs, block: nn.Module, modules: dict[str, nn.Module],
             on_reach: Callable[[str, list[tuple]], None]) -> list[torch.Tensor]:
    """Run `block` over every chunk in ONE forward, pausing all chunks before the first call of each module in
    `modules`: once every chunk waits at the same module, `on_reach(name, calls)` runs with each chunk's
    (args, kwargs) of that call (e.g. to solve the module's weights from all its calibration inputs), then the
    chunks go on. Returns the block's outputs per chunk, computed with whatever `on_reach` changed.

    This is how a block is calibrated stage by stage (true-sequential GPTQ) without running it once per stage.
    Each chunk runs as a greenlet (a coroutine on this thread): OS threads would each bring an OpenMP team, and
    libgomp then stops spinning between parallel regions, which measured ~1.5x slower on CPU. The price is memory:
    at each pause every chunk's activations are alive together, as if the whole calibration set were one batch.
    Every chunk must call the modules in the same order."""
    n = len(inputs)
    main = greenlet.getcurrent()
    chunks = [greenlet.greenlet(functools.partial(inputs.call, block, k)) for k in range(n)]
    index = {g: k for k, g in enumerate(chunks)}
    _CHUNK_OF.update(index)
    reached: list[set] = [set() for _ in range(n)]

    def hook(name):
        def pre_hook(module, args, kwargs):
            k = index.get(greenlet.getcurrent())
            if k is None or name in reached[k]:  # not a chunk, or a second call: run as usual
                return
            reached[k].add(name)
            main.switch((name, args, kwargs))  # pause here until every chunk got here too
        return pre_hook

    handles = [m.register_forward_pre_hook(hook(name), with_kwargs=True) for name, m in modules.items()]
    outs: list = [None] * n
    device = inputs.hidden[0].device.type
    try:
        with inputs.autocast():
            live = list(range(n))
            while live:
                paused = {}
                for k in live:  # one chunk at a time, each up to its next pause or its end
                    got = chunks[k].switch()
                    if chunks[k].dead:
                        outs[k] = got
                    else:
                        paused[k] = got
                if not paused:
                    break
                names = {name for name, _, _ in paused.values()}
                if len(names) > 1 or len(paused) < n:
                    raise RuntimeError(f"calibration chunks took different paths through the block (paused at "
                                       f"{sorted(names)}, {n - len(paused)} finished): lockstep calibration needs "
                                       f"every chunk to call the same modules in the same order; use the two-pass "
                                       f"mode (e.g. true_sequential=False)")
                live = sorted(paused)
                with torch.autocast(device, enabled=False):  # solvers run in full precision
                    on_reach(names.pop(), [paused[k][1:] for k in live])
    finally:
        for g in chunks:
            if not g.dead:
                g.throw()  # GreenletExit: unwinds the paused forward
        for h in handles:
            h.remove()
        for g in chunks:
            _CHUNK_OF.pop(g, None)
    return outs


_CHUNK_OF: dict = {}  # greenlet -> chunk index, while `lockstep` runs


def current_chunk() -> int | None:
    """The calibration chunk whose forward is running, inside `lockstep` (None elsewhere): lets a hook keep
    per-chunk state although all chunks are paused inside the same block forward."""
    return _CHUNK_OF.get(greenlet.getcurrent())


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


@functools.cache
def bound_heap_growth() -> bool:
    """Give buffers of 4 MiB and more their own memory mappings (glibc `M_MMAP_THRESHOLD`), so they go back
    to the OS when freed. glibc otherwise raises that threshold after the first big free, and the block
    forwards' many 10-30 MB temporaries then fragment a heap that never shrinks: on SmolLM2-135M GPTQ this
    took peak RSS from ~1.17 GB to ~1.66 GB. Process-wide (like MALLOC_MMAP_THRESHOLD_); no-op off glibc."""
    libc = _libc()
    return bool(libc and hasattr(libc, "mallopt") and libc.mallopt(-3, 4 << 20))  # -3 = M_MMAP_THRESHOLD


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS between blocks (glibc `malloc_trim`): the lockstep forwards leave many
    freed 1-4 MiB holes that would otherwise stay resident."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def first_output(out):
    """The hidden states of a block's output (the output itself, or the first item of a tuple / list)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def get_blocks(model: nn.Module) -> nn.ModuleList:
    return get_adapter(model).get_blocks(model)


def _move_outside(model: nn.Module, blocks: nn.Module, device) -> None:
    """Move every parameter/buffer that is not inside `blocks` (embeddings, rotary, final norm, head)."""
    inside = {id(m) for m in blocks.modules()}
    for m in model.modules():
        if id(m) in inside:
            continue
        for p in m.parameters(recurse=False):
            p.data = p.data.to(device)
        for k, b in m._buffers.items():
            if b is not None:
                m._buffers[k] = b.to(device)


def _chunks(samples: list[torch.Tensor], batch_size: int):
    """Consecutive samples of equal length, at most batch_size at a time."""
    i = 0
    while i < len(samples):
        j = i + 1
        while j < len(samples) and j - i < batch_size and samples[j].numel() == samples[i].numel():
            j += 1
        yield torch.stack(samples[i:j])
        i = j


@torch.no_grad()
def capture_inputs(model: nn.Module, samples, device=None, batch_size: int = 8) -> tuple[BlockInputs, list[list[dict]]]:
    """Hidden states entering block 0 and the keyword inputs of EVERY block, per calibration chunk.

    Blocks are skipped (identity) while capturing, so per-layer inputs such as Gemma's sliding-window mask or
    local rotary embeddings are recorded for each block; the last block stops the model before the head."""
    if isinstance(samples, torch.Tensor):
        samples = list(samples) if samples.dim() == 2 else [samples]
    blocks = get_blocks(model)
    dispatched = offload.is_offloaded(model)
    device = torch.device(device) if device is not None else offload.execution_device(model)
    if not dispatched:  # an offloaded model's hooks bring every module's weights to the execution device
        _move_outside(model, blocks, device)
    inputs = BlockInputs()
    per_block: list[list[dict]] = [[] for _ in blocks]

    def make_hook(i):
        def hook(module, args, kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if len(args) > 1:
                raise NotImplementedError(f"{type(module).__name__} takes extra positional inputs; "
                                          f"hfq's runner passes only hidden states positionally")
            if i == 0:
                inputs.hidden.append(hidden)
            per_block[i].append(kwargs)
            if i == len(blocks) - 1:
                raise _Captured
        return hook

    handles = [b.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    passthrough = get_adapter(model).passthrough
    own_forward = [b.__dict__.get("forward") for b in blocks]  # accelerate's hook wrapper, when dispatched
    for b in blocks:  # skip the block's work while capturing
        b.forward = lambda hidden_states, *a, **kw: passthrough(hidden_states, a, kw)
    try:
        for ids in _chunks(samples, batch_size):
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        for h in handles:
            h.remove()
        for b, f in zip(blocks, own_forward):
            if f is None:
                del b.forward
            else:
                b.forward = f
    inputs.kwargs = per_block[0]
    return inputs, per_block


@torch.no_grad()
def run_blocks(model: nn.Module, samples, passes: list[BlockPass], device=None, batch_size: int = 8,
               propagate: str = "quantized", desc: str = "blocks", autocast_dtype: torch.dtype | None = None
               ) -> BlockInputs:
    """Run `passes` block by block; return the last block's outputs (as a BlockInputs).

    device: where each block and the activations go (default: where the model is); each block returns to
    where it was afterwards. propagate: "quantized" feeds the next block the outputs of this block after
    the passes, "fp" the outputs of the block before them. When the last pass returns the block's outputs for
    every chunk (computed with its final weights, e.g. by `lockstep`), they are used instead of running the block
    again. A pass may define `finish(block, index)`, called
    once the block's outputs have been propagated (e.g. to swap in packed modules only after the block ran
    with plain float weights). autocast_dtype: run the block forwards under `torch.autocast` in this dtype."""
    if propagate not in ("quantized", "fp"):
        raise ValueError(f"propagate must be 'quantized' or 'fp', got {propagate!r}")
    was_training = model.training
    model.eval()
    bound_heap_growth()
    blocks = get_blocks(model)
    outside_home = next(p.device for p in model.parameters() if not any(p is q for q in blocks.parameters()))
    inputs, per_block = capture_inputs(model, samples, device, batch_size)
    inputs.autocast_dtype = autocast_dtype
    device = inputs.hidden[0].device
    adapter = get_adapter(model)
    prefix = adapter.blocks
    try:
        for i, block in enumerate(tqdm(blocks, desc=desc, disable=is_quiet())):
            inputs.kwargs = per_block[i]
            offloaded = offload.is_offloaded(block)
            if offloaded:  # its weights become resident for the passes, and go to disk packed afterwards
                offload.onload(block, device)
            home = next(block.parameters()).device
            block.to(device)
            carrying = bool(adapter.carried) and i + 1 < len(blocks)
            entering, outputs = (list(inputs.hidden) if carrying else []), {}
            record = block.register_forward_hook(  # the latest full output per chunk (by its input tensor)
                lambda m, a, kw, o: outputs.__setitem__(id(a[0] if a else kw["hidden_states"]), o),
                with_kwargs=True) if carrying else None
            fp_out = inputs.forward(block) if propagate == "fp" else None
            if record is not None and propagate == "fp":
                record.remove()  # the float outputs are what goes on
                record = None
            out = None
            for p in passes:
                out = p(block, i, inputs)
            if fp_out is not None or out is not None:
                inputs.hidden = [o.to(h.dtype) for o, h in zip(fp_out or out, inputs.hidden)]
            else:
                inputs.advance(block)
            if record is not None:
                record.remove()
            if carrying:
                per_block[i + 1] = [adapter.carry(outputs[id(h)], kw) for h, kw in zip(entering, per_block[i + 1])]
            del entering, outputs
            for p in passes:
                if hasattr(p, "finish"):
                    p.finish(block, i)
            if offloaded:
                offload.offload(block, f"{prefix}.{i}.")
            elif home != device:
                block.to(home)
            _trim_heap()
    finally:
        model.train(was_training)
        if outside_home != device and outside_home.type != "meta":
            _move_outside(model, blocks, outside_home)
    return inputs
