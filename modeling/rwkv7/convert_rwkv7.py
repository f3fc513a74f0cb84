"""BlinkDL RWKV-7 checkpoints (`.pth`, x070 key names) -> this model's state dict and config.

Read the file with `torch.load(path, map_location="cpu", weights_only=True)` and pass the dict here. The low-rank
matrices BlinkDL stores as [in, out] (att.w1 [C, D], att.w2 [D, C], ...) become `nn.Linear` weights (transposed);
`blocks.0.att.v0/v1/v2` (present in some checkpoints, never used by layer 0) are dropped; a missing `blocks.0.ln0`
(folded into the embedding by some exports) becomes the identity LayerNorm."""
from __future__ import annotations

import torch

from .configuration_rwkv7 import Rwkv7Config

LORA = ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")


def convert_blinkdl_state_dict(sd: dict[str, torch.Tensor], **config_kwargs) -> tuple[Rwkv7Config, dict]:
    """(config, state dict for `Rwkv7ForCausalLM`) from a BlinkDL x070 state dict."""
    if "blocks.0.att.r_k" not in sd:
        raise ValueError("not an RWKV-7 (x070) state dict: no blocks.0.att.r_k (older x070 rc checkpoints with "
                         "time_maa_* names are not supported)")
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    heads, head_size = sd["blocks.0.att.r_k"].shape
    vocab, C = sd["emb.weight"].shape
    config = Rwkv7Config(vocab_size=vocab, hidden_size=C, num_hidden_layers=n_layer, head_size=head_size,
                         intermediate_size=sd["blocks.0.ffn.key.weight"].shape[0],
                         decay_lora=sd["blocks.0.att.w1"].shape[1], aaa_lora=sd["blocks.0.att.a1"].shape[1],
                         mv_lora=sd[f"blocks.{min(1, n_layer - 1)}.att.v1"].shape[1],
                         gate_lora=sd["blocks.0.att.g1"].shape[1], **config_kwargs)
    out = {}
    for key, t in sd.items():
        parts = key.split(".")
        if key.startswith("blocks.0.att.v") and parts[-1] in ("v0", "v1", "v2"):
            continue  # layer 0 never uses the value residual
        if parts[0] in ("emb", "ln_out"):
            out[f"model.{key}"] = t
        elif parts[0] == "head":
            out[key] = t
        elif parts[0] == "blocks":
            if parts[-1] in LORA and len(parts) == 4:
                out[f"model.{key}.weight"] = t.t().contiguous()
            else:
                out[f"model.{key}"] = t
        else:
            raise ValueError(f"unexpected key {key!r} in an RWKV-7 state dict")
    if "model.blocks.0.ln0.weight" not in out:
        out["model.blocks.0.ln0.weight"] = torch.ones(C, dtype=sd["emb.weight"].dtype)
        out["model.blocks.0.ln0.bias"] = torch.zeros(C, dtype=sd["emb.weight"].dtype)
    if "blocks.0.att.v1" not in sd and n_layer == 1:
        raise ValueError("a one-layer RWKV-7 has no value-residual parameters to size mv_lora from")
    return config, out
