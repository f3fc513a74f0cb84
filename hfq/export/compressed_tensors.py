"""An hfq checkpoint as a compressed-tensors folder: transformers (and vLLM) load it with their built-in
compressed-tensors support, in a process that has no hfq.

The integers and scales are copied, never re-quantized: hfq's symmetric signed integers are compressed-tensors' int
values (`pack_to_int32` of the installed compressed-tensors writes its own packing), so every dequantized weight is
the same. Formats: `pack-quantized` for weight-only linears (2-8 bits), `int-quantized` for W8A8 (int8 weights,
dynamic per-token int8 activations). W8A8 logits differ slightly from hfq's: compressed-tensors scales an
activation row by absmax / 127.5, hfq by absmax / 127 (QuaRot / SmoothQuant's convention).

Fused MoE experts are written per expert under the original checkpoint names (transformers' reverse weight
conversion, as save_pretrained does), which transformers' compressed-tensors route and vLLM read.

What compressed-tensors cannot express is refused, naming it: asymmetric weights (see `_weights`), online rotations
(R3 / R4 Hadamards), KV-cache quantization, static activation scales, experts with quantized activations, quantized
convolutions / attention (vision models) and custom-code models.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from hfq.nn import QuantExperts, QuantLinear
from hfq.quant import QuantArgs, unpack

from .common import ExportError, first_refusal


def _weights(a: QuantArgs) -> dict:
    if a.granularity not in ("channel", "group"):
        raise ExportError(f"{a.granularity} weight scales: compressed-tensors export takes channel or group scales")
    if not a.symmetric:  # measured with compressed-tensors 0.20 / transformers 5.24
        raise ExportError("asymmetric weights: transformers' compressed-tensors loader builds unpacked zero points but "
                          "reads packed ones (a size mismatch at load), so they are not exported; quantize with "
                          "sym=True")
    return {"num_bits": a.bits, "type": "int", "symmetric": a.symmetric, "strategy": a.granularity,
            "group_size": a.group_size, "dynamic": False, "observer": None}


def _activations(a: QuantArgs | None) -> dict | None:
    if a is None:
        return None
    if not a.dynamic or a.granularity != "token" or a.bits != 8 or not a.symmetric:
        raise ExportError(f"activations quantized as {a} (static or not 8-bit symmetric per token): "
                          f"compressed-tensors export takes weight-only or dynamic per-token int8 (W8A8) linears")
    return {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True, "observer": None}


def refusal(model: nn.Module) -> str | None:
    """Why `model` cannot be written as compressed-tensors (None: it can)."""
    from hfq.transforms.online import CONFIG_KEY

    if getattr(model.config, "auto_map", None):
        return "a custom-code model (config.auto_map): only transformers' own architectures load without hfq"
    if getattr(model.config, CONFIG_KEY, None):
        return (f"online rotations / KV quantization (config.{CONFIG_KEY}) run at inference and "
                "compressed-tensors has no place for them; quantize without them (e.g. "
                "OSTQuantConfig(online_down=False, online_qk=False, kv_bits=None)) to export")

    def check(m):
        if isinstance(m, QuantExperts) and m.act_args is not None:
            return "fused experts with quantized activations (exported: weight-only experts)"
        try:
            _weights(m.weight_args), _activations(m.act_args)
        except ExportError as e:
            return str(e)
        return None

    return first_refusal(model, (QuantLinear, QuantExperts), check,
                         "compressed-tensors (it quantizes nn.Linear modules only)")


def _scheme_key(m) -> str:
    return json.dumps([_weights(m.weight_args), _activations(m.act_args)], sort_keys=True)


def _integers(model: nn.Module):
    """(integers, scales, scheme of each, keys they replace) under the model's own parameter names: a QuantLinear's
    [out, in] under `name.weight`, fused experts' [E, out, in] under `name.gate_up_proj` / `name.down_proj`."""
    ints, scales, schemes, replaced = {}, {}, {}, set()
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            parts = {"weight": (m.int_weight(), m.weight_scale)}
        elif isinstance(m, QuantExperts):
            a = m.weight_args
            parts = {f"{p}_proj": (torch.stack([unpack(getattr(m, f"{p}_proj")[e], a.bits, a.qmin, shape[1])
                                                for e in range(m.num_experts)]), getattr(m, f"{p}_scale"))
                     for p, shape in m.shapes().items()}
        else:
            continue
        for key, (q, scale) in parts.items():
            ints[f"{name}.{key}"], scales[f"{name}.{key}"] = q.to(torch.int8), scale.detach()
            schemes[f"{name}.{key}"] = _scheme_key(m)
        replaced |= {f"{name}.{k}" for k in m.state_dict() if not (isinstance(m, QuantLinear) and k == "bias")}
    return ints, scales, schemes, replaced


def compressed_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """(tensors, {scheme key: module names}) in compressed-tensors' layout, under the checkpoint's names:
    transformers' own `revert_weight_conversion` (what save_pretrained applies) maps the model's names and fused
    expert tensors back to the per-expert layout of the original checkpoints, which is applied to the integers and
    to the scales alike (so each expert's gate / up / down rows keep their scales)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from transformers.core_model_loading import revert_weight_conversion

    ints, scales, schemes, replaced = _integers(model)
    rest, seen = {}, set()
    for k, v in model.state_dict().items():
        if k in replaced:
            continue
        if v.data_ptr() in seen and getattr(model.config, "tie_word_embeddings", False):
            continue  # the tied output embedding: transformers re-ties it from the config
        seen.add(v.data_ptr())
        rest[k] = v
    state = revert_weight_conversion(model, {**rest, **ints})
    groups: dict[str, list[str]] = {}
    for key in sorted(set(schemes.values())):  # one reversion per scheme says which checkpoint weights carry it
        mine = revert_weight_conversion(model, {k: v for k, v in scales.items() if schemes[k] == key})
        weights, acts = json.loads(key)
        for name, scale in mine.items():
            base = name[: -len(".weight")]
            q = state.pop(name)
            if acts is None:  # pack-quantized
                state[f"{base}.weight_packed"] = pack_to_int32(q.contiguous(), weights["num_bits"])
                state[f"{base}.weight_shape"] = torch.tensor(list(q.shape))
            else:  # int-quantized
                state[f"{base}.weight"] = q
            state[f"{base}.weight_scale"] = scale
            groups.setdefault(key, []).append(base)
    return state, groups


def quantization_config(model: nn.Module, groups: dict[str, list[str]]) -> dict:
    """The config.json `quantization_config` compressed-tensors reads: one config group per scheme, targeting its
    modules by exact name (`re:^name$`), so nothing else is quantized."""
    config_groups, formats = {}, set()
    for i, (key, names) in enumerate(groups.items()):
        weights, acts = json.loads(key)
        fmt = "pack-quantized" if acts is None else "int-quantized"
        formats.add(fmt)
        config_groups[f"group_{i}"] = {"targets": [f"re:^{n.replace('.', '[.]')}$" for n in names],
                                       "weights": weights, "input_activations": acts, "output_activations": None,
                                       "format": fmt}
    ignore = []  # groups target exact names: nothing else is quantized
    import compressed_tensors

    return {"quant_method": "compressed-tensors", "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "config_groups": config_groups, "ignore": ignore, "quantization_status": "compressed",
            "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {},
            "version": compressed_tensors.__version__}


def export(model: nn.Module, output: str | Path, tokenizer=None) -> Path:
    """Write an hfq-quantized model as a compressed-tensors folder (with `tokenizer`, when given); raise
    ExportError, naming the module and the reason, for what the format cannot express."""
    from safetensors.torch import save_file

    why = refusal(model)
    if why:
        raise ExportError(f"cannot export to compressed-tensors: {why}")
    state, groups = compressed_state_dict(model)
    if not groups:
        raise ExportError("the model has no hfq-quantized linear layers; nothing to export")
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(model, groups)
    output = Path(output)
    tmp = output.with_name(output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if output.exists():
        shutil.rmtree(output)
    tmp.rename(output)  # never a half-written folder under the requested name
    return output
