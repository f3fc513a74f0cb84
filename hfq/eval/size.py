"""Bytes held by quantized modules (packed integers or codebook indices, codebooks, scales, zero points), against the
same weights in fp16, and the stored bits per quantized weight."""
from hfq.nn import QuantExperts, QuantLinear
from hfq.nn.vq import VQLinear


def quantized_bytes(model) -> dict:
    packed = weights = 0
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantExperts, VQLinear)):
            packed += sum(p.numel() * p.element_size() for n, p in m.named_parameters(recurse=False) if n != "bias")
            if isinstance(m, QuantExperts):
                weights += sum(o * i for o, i in m.shapes().values()) * m.num_experts
            else:
                weights += m.in_features * m.out_features
    fp16 = 2 * weights
    return {"quantized_bytes": packed, "fp16_bytes": fp16, "ratio": packed / fp16 if fp16 else None,
            "weights": weights, "bits_per_weight": 8 * packed / weights if weights else None}
