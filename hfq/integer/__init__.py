"""Integer-only inference pieces (I-LLM): dyadic scales and integer operators."""
