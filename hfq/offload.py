"""Quantizing a model whose float weights do not fit in memory, through accelerate's own offloading.

A model loaded with `device_map` entries "disk" (or "cpu" on a GPU machine) carries accelerate `AlignDevicesHook`s:
an offloaded module's tensors sit on the meta device and are read from their file (or RAM copy) for the length of one
forward. The block runner uses three steps per block:
- `onload(block, device)`: the block's tensors become real, resident tensors (the hooks stop re-reading them), so a
  method can read and change `weight` across several forwards;
- the method's passes run and pack the block (packed modules replace float ones);
- `offload(block, prefix, folder)`: the block's tensors, packed ones included, are written to one safetensors shard
  in `folder`, accelerate's index is pointed at it, and every tensor goes back to meta (packed modules get a hook
  of their own). The float weights are released; `save_pretrained` later reads the shards through the hooks.
Only offloaded blocks are handled this way; blocks that live in memory are left as they are.
"""
from __future__ import annotations

import gc
from pathlib import Path

import torch
import torch.nn as nn


def _hooks(module) -> list:
    from accelerate.hooks import SequentialHook

    h = getattr(module, "_hf_hook", None)
    if h is None:
        return []
    return list(h.hooks) if isinstance(h, SequentialHook) else [h]


def _offload_hooks(module) -> list:
    return [h for m in module.modules() for h in _hooks(m) if getattr(h, "offload", False)]


def is_offloaded(module: nn.Module) -> bool:
    """Whether any tensor of `module` is kept off memory by an accelerate hook (weights read per forward)."""
    return bool(_offload_hooks(module))


def execution_device(model: nn.Module) -> torch.device:
    """Where the model computes: the hooks' execution device when it is dispatched, else where its parameters are."""
    for m in model.modules():
        for h in _hooks(m):
            if getattr(h, "execution_device", None) is not None:
                return torch.device(h.execution_device)
    return next(p.device for p in model.parameters() if p.device.type != "meta")


def _tensors(module, hook):
    from accelerate.utils.modeling import named_module_tensors

    return named_module_tensors(module, include_buffers=hook.offload_buffers, recurse=hook.place_submodules,
                                remove_non_persistent=True)


def onload(block: nn.Module, device) -> None:
    """Make the offloaded tensors of `block` real tensors on `device` and keep them there (hooks stop offloading)."""
    from accelerate.utils import set_module_tensor_to_device

    for m in block.modules():
        for h in _hooks(m):
            if getattr(h, "offload", False):
                for name, _ in _tensors(m, h):
                    set_module_tensor_to_device(m, name, device, value=h.weights_map[name])
                h.offload = False
                h.hfq_onloaded = True


def _loader(block: nn.Module):
    """accelerate's OffloadedWeightsLoader behind the block's hooks (one per dispatched model)."""
    for m in block.modules():
        for h in _hooks(m):
            if getattr(h, "hfq_onloaded", False) or getattr(h, "offload", False):
                return h.weights_map.dataset, h
    return None, None


def offload(block: nn.Module, prefix: str, folder: str | Path | None = None) -> None:
    """Write every tensor of the onloaded `block` (state-dict names prefixed by `prefix`) to one safetensors shard in
    `folder` (default: the model's offload_folder), point accelerate's index at it and put the tensors back on meta:
    nothing of the block stays resident. Modules created since `onload` (packed ones) get an offloading hook like
    those they replaced."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    from accelerate.utils import PrefixedDataset, set_module_tensor_to_device
    from safetensors.torch import save_file

    loader, template = _loader(block)
    if loader is None:
        return
    if folder is None:
        folder = loader.save_folder
        if folder is None:
            import tempfile

            folder = loader.save_folder = tempfile.mkdtemp(prefix="hfq-offload-")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shard = folder / f"hfq-{prefix.rstrip('.').replace('.', '-')}.safetensors"
    state = {prefix + k: v.detach().contiguous() for k, v in block.state_dict().items()}
    tmp = shard.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(shard)  # never a half-written shard under the name the index points at
    for k, v in state.items():
        loader.index[k] = {"safetensors_file": str(shard), "weight_name": k, "dtype": str(v.dtype).split(".")[-1]}
        if getattr(loader, "state_dict", None) is not None:
            loader.state_dict.pop(k, None)  # a RAM copy would win over the index
        if k not in loader.all_keys:
            loader.all_keys.append(k)
    del state
    covered = set()
    for name, m in block.named_modules():
        for h in _hooks(m):
            if getattr(h, "hfq_onloaded", False):
                for t, _ in _tensors(m, h):
                    set_module_tensor_to_device(m, t, "meta")
                h.offload, h.hfq_onloaded = True, False
                covered.update(f"{name}.{t}".lstrip(".") for t, _ in _tensors(m, h))
    for name, m in block.named_modules():
        own = [n for n, _ in m.named_parameters(recurse=False)] + [n for n, _ in m.named_buffers(recurse=False)]
        if own and not _hooks(m) and not all(f"{name}.{n}".lstrip(".") in covered for n in own):
            hook = AlignDevicesHook(execution_device=template.execution_device, offload=True,
                                    weights_map=PrefixedDataset(loader, f"{prefix}{name}."), place_submodules=True,
                                    offload_buffers=True, skip_keys=template.skip_keys)
            add_hook_to_module(m, hook)  # its init_hook moves the tensors to meta
            covered.update(f"{name}.{n}".lstrip(".") for n, _ in m.named_parameters())
            covered.update(f"{name}.{n}".lstrip(".") for n, _ in m.named_buffers())
    gc.collect()


def read_tensor(root: nn.Module, name: str) -> torch.Tensor:
    """The value of tensor `name` (a full state-dict name under `root`) without onloading anything: the resident
    tensor, or the one accelerate's hook of the nearest offloaded ancestor reads from disk."""
    path, _, leaf = name.rpartition(".")
    t = getattr(root.get_submodule(path), leaf)
    if t.device.type != "meta":
        return t
    parts = path.split(".") if path else []
    for k in range(len(parts), -1, -1):
        owner = ".".join(parts[:k])
        for h in _hooks(root.get_submodule(owner)):
            if getattr(h, "offload", False):
                return h.weights_map[name[len(owner) + 1:] if owner else name]
    raise RuntimeError(f"{name} is on the meta device and no accelerate hook holds its value")


def changed_in_place(root: nn.Module, names: list[str], fn, device=None) -> None:
    """Run fn() that changes the modules `names` (paths under `root`) in place; those that are offloaded are
    onloaded first and written back to the offload folder afterwards (one shard each), so their new values are
    what later forwards and save_pretrained read. Nothing is written back when fn raises."""
    device = device if device is not None else execution_device(root)
    modules = {n: root.get_submodule(n) for n in names}
    offloaded = [n for n, m in modules.items() if is_offloaded(m)]
    for n in offloaded:
        onload(modules[n], device)
    fn()
    for n in offloaded:
        offload(modules[n], f"{n}.")


def for_each_block(model: nn.Module, fn) -> None:
    """fn(index, block) on every decoder block; an offloaded block is onloaded before and written back packed after
    (for methods that need no calibration forward, e.g. RTN)."""
    from hfq.arch import get_adapter

    adapter = get_adapter(model)
    device = execution_device(model)
    for i, block in enumerate(adapter.get_blocks(model)):
        changed_in_place(model, [f"{adapter.blocks}.{i}"], lambda i=i, block=block: fn(i, block), device)
