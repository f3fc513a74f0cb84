"""An hfq-quantized Llama-family model as one GGUF file that llama.cpp and transformers' GGUF loader read.

The integers are written as they are, never re-quantized: symmetric 4-bit group-32 linears become Q4_0 blocks
(fp16 scale d, 32 nibbles u = q + 8, w = d (u - 8)), asymmetric 4-bit group-32 ones Q4_1 (d = scale, m = -scale *
zero, w = d u + m), symmetric 8-bit group-32 ones Q8_0 (d, 32 int8). GGUF stores block scales in float16, so the
dequantized weights are q times the float16-rounded scale (identical when the model's scales are already float16).
Every other tensor is written in its own float dtype (F32 / F16 / BF16). Q and K rows are permuted as llama.cpp's
converter does (its rotary layout); transformers' loader undoes it.

Refused, naming the layer: other bit widths, group sizes or per-channel scales (no GGUF block type holds them;
quantize with group_size=32), activation quantization, online rotations, architectures other than Llama.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from hfq.nn import QuantLinear

from .common import ExportError, first_refusal

ARCHS = {"llama": "llama"}  # transformers model_type -> llama.cpp architecture


def _block_type(m: QuantLinear):
    from gguf import GGMLQuantizationType as T

    a = m.weight_args
    if m.act_args is not None:
        return None, "activation quantization (GGUF holds weights only)"
    if a.granularity != "group" or a.group_size != 32:
        what = f"{a.granularity} scales" + (f" of group {a.group_size}" if a.group_size else "")
        return None, f"{what} (GGUF blocks hold 32 weights; quantize with group_size=32)"
    if a.bits == 4:
        return (T.Q4_0 if a.symmetric else T.Q4_1), None
    if a.bits == 8 and a.symmetric:
        return T.Q8_0, None
    return None, f"{a.bits}-bit {'symmetric' if a.symmetric else 'asymmetric'} weights (GGUF: Q4_0, Q4_1, Q8_0)"


def refusal(model: nn.Module) -> str | None:
    """Why `model` cannot be written as GGUF (None: it can)."""
    from hfq.transforms.online import CONFIG_KEY

    if model.config.model_type not in ARCHS:
        return f"model_type {model.config.model_type!r} (GGUF export supports {sorted(ARCHS)})"
    if getattr(model.config, CONFIG_KEY, None):
        return f"online rotations / KV quantization (config.{CONFIG_KEY}) that llama.cpp cannot run"
    return first_refusal(model, (QuantLinear,), lambda m: _block_type(m)[1], "GGUF")


def _permute_rows(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's Q/K row order: per head, the two rotary halves interleaved."""
    return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _blocks(m: QuantLinear, kind, n_head: int | None) -> np.ndarray:
    """The layer's GGUF blocks as bytes [rows, n_blocks * block bytes]."""
    from gguf import GGMLQuantizationType as T

    q = m.int_weight().to(torch.int16)  # [rows, cols]: signed (symmetric) or unsigned (asymmetric)
    scale = m.weight_scale.detach().float()
    zero = m._zero().expand_as(scale) if kind == T.Q4_1 else None
    if n_head is not None:
        q, scale = _permute_rows(q, n_head), _permute_rows(scale, n_head)
        zero = None if zero is None else _permute_rows(zero, n_head)
    rows, cols = q.shape
    q = q.reshape(rows, cols // 32, 32)
    d = scale.to(torch.float16).numpy().view(np.uint8).reshape(rows, -1, 2)
    if kind == T.Q8_0:
        return np.concatenate([d, q.to(torch.int8).numpy().view(np.uint8)], -1).reshape(rows, -1)
    u = (q + 8 if kind == T.Q4_0 else q).to(torch.uint8)  # 0..15
    qs = (u[..., :16] | (u[..., 16:] << 4)).numpy()
    parts = [d]
    if kind == T.Q4_1:
        parts.append((-scale * zero).to(torch.float16).numpy().view(np.uint8).reshape(rows, -1, 2))
    return np.concatenate(parts + [qs], -1).reshape(rows, -1)


def _tokenizer(writer, folder: Path | None) -> bool:
    """Write a BPE (GPT-2 style) tokenizer.json's vocabulary, merges and special tokens; False when there is none."""
    import json

    from gguf import SpecialVocab
    from gguf.vocab import BpeVocab

    if folder is None or not (folder / "tokenizer.json").is_file():
        return False
    if json.loads((folder / "tokenizer.json").read_text())["model"]["type"] != "BPE":
        return False
    vocab = BpeVocab(folder)
    tokens, _, types = zip(*vocab.all_tokens())
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    SpecialVocab(folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer)
    return True


def export(model: nn.Module, output: str | Path, tokenizer=None) -> Path:
    """Write an hfq-quantized Llama model as one GGUF file (`output`); a BPE `tokenizer` travels in its
    metadata (llama.cpp needs it to run; transformers loads the weights without it). A float model is written in
    its float dtype (input for llama.cpp's own quantizer)."""
    import tempfile

    import gguf

    why = refusal(model)
    if why:
        raise ExportError(f"cannot export to GGUF: {why}")
    cfg = model.config
    arch = ARCHS[cfg.model_type]
    n_blocks = cfg.num_hidden_layers
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)
    output = Path(output)
    tmp = output.with_name(output.name + ".tmp")
    output.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(tmp), arch)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_name(getattr(cfg, "_name_or_path", "") or "hfq-export")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(n_blocks)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"] if getattr(cfg, "rope_parameters", None)
                                    else cfg.rope_theta))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    kinds = [_block_type(m)[0] for m in quantized.values()]
    if kinds:  # the file type names the most common block type
        kind = max(set(kinds), key=kinds.count)
        writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{kind.name}"))
    else:  # a float model (e.g. for llama.cpp's own quantizer)
        floats = {torch.float16: gguf.LlamaFileType.MOSTLY_F16, torch.bfloat16: gguf.LlamaFileType.MOSTLY_BF16}
        writer.add_file_type(floats.get(model.dtype, gguf.LlamaFileType.ALL_F32))
    if tokenizer is not None:
        with tempfile.TemporaryDirectory() as d:
            tokenizer.save_pretrained(d)
            _tokenizer(writer, Path(d))
    heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
    owners = {f"{n}.{k}": n for n, m in quantized.items() for k in m.state_dict()}  # a packed layer's own tensors
    for key, tensor in model.state_dict().items():
        owner = owners.get(key)
        if owner is not None and key != f"{owner}.weight":
            if key == f"{owner}.bias":
                raise ExportError(f"cannot export to GGUF: {owner} has a bias (llama has none)")
            continue
        if key.startswith("lm_head.") and getattr(cfg, "tie_word_embeddings", False):
            continue  # llama.cpp ties a missing output.weight to token_embd
        gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ExportError(f"cannot export to GGUF: no llama.cpp name for tensor {key!r}")
        n_head = heads.get(key.rsplit(".", 2)[-2]) if key.endswith(("q_proj.weight", "k_proj.weight")) else None
        if owner is not None:
            m = quantized[owner]
            kind, _ = _block_type(m)
            writer.add_tensor(gname, _blocks(m, kind, n_head), raw_dtype=kind)
        else:
            t = tensor.detach()
            if n_head is not None:
                t = _permute_rows(t, n_head)
            if t.dtype == torch.bfloat16:
                writer.add_tensor(gname, t.view(torch.int16).numpy(), raw_shape=tuple(t.shape),
                                  raw_dtype=gguf.GGMLQuantizationType.BF16)
            else:
                writer.add_tensor(gname, t.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(output)  # never a half-written file under the requested name
    return output
