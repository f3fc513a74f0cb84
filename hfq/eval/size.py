"""Bytes held by quantized modules, against the same weights in fp16."""
from hfq.nn import QuantExperts, QuantLinear


def quantized_bytes(model) -> dict:
    packed = fp16 = 0
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantExperts)):
            packed += sum(p.numel() * p.element_size() for n, p in m.named_parameters(recurse=False) if n != "bias")
            if isinstance(m, QuantLinear):
                fp16 += 2 * m.in_features * m.out_features
            else:
                fp16 += 2 * sum(o * i for o, i in m.shapes().values()) * m.num_experts
    return {"quantized_bytes": packed, "fp16_bytes": fp16, "ratio": packed / fp16 if fp16 else None}
