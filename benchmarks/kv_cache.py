"""KV cache in integers (`hfq.HfqQuantizedCache`) on SmolLM2-135M: bytes per token against a float16 cache, and
WikiText-2 perplexity through the cache against the simulated KV quantizer of the same settings (same windows).

    python benchmarks/kv_cache.py --bits 4 8

Rows per setting: "simulated" (`hfq.transforms.set_kv_quant`: K / V fake-quantized where attention reads them, the
cache itself float) and "cache" (each window's prefill goes through an `HfqQuantizedCache`, which stores the codes);
plus the float model. Bytes per token = the cache's stored bytes after a window / its tokens; float16's = layers x 2 x
KV heads x head_dim x 2 bytes.
"""
import argparse
import logging
import math
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from hfq.eval.provenance import run_info, write_json  # noqa: E402

logger = logging.getLogger("kv_cache")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/kv_cache.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    info = run_info(args.threads)

    from hfq.data.text import load_text
    from hfq.eval.perplexity import token_windows
    from hfq.kv_cache import HfqQuantizedCache
    from hfq.models import load_model
    from hfq.transforms import set_kv_quant
    from hfq.transforms.online import kv_quant_args

    model, tok = load_model(args.model)
    ids = tok(load_text("wikitext2"), return_tensors="pt", add_special_tokens=False).input_ids[0]
    windows = token_windows(ids, args.seq_len, 0, args.max_windows)
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    fp16_per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 2

    def ppl(cache_fn=None):
        nll, count, per_token = 0.0, 0, None
        with torch.no_grad():
            for w in windows:
                x = w.unsqueeze(0)
                cache = cache_fn() if cache_fn else None
                kw = {"past_key_values": cache, "use_cache": True} if cache is not None else {}
                logits = model(input_ids=x, **kw).logits.float()
                nll += torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum").item()
                count += x.numel() - 1
                if cache is not None:
                    per_token = cache.nbytes() / x.numel()
        return math.exp(nll / count), per_token

    rows = {"fp": {"ppl": ppl()[0], "bytes_per_token_fp16": fp16_per_token}}
    for bits in args.bits:
        symmetric = bits == 8  # KV4 asymmetric (the papers'), KV8 symmetric
        set_kv_quant(model, kv_quant_args(bits, symmetric))
        sim = ppl()[0]
        set_kv_quant(model, None)
        real, per_token = ppl(lambda: HfqQuantizedCache(model, bits=bits, symmetric=symmetric))
        rows[f"kv{bits}"] = {"symmetric": symmetric, "ppl_simulated": sim, "ppl_cache": real,
                             "bytes_per_token": per_token, "ratio_to_fp16": per_token / fp16_per_token}
        logger.info("kv%d %s", bits, rows[f"kv{bits}"])
    write_json(args.out, {**info, "settings": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows})
    print(rows)


if __name__ == "__main__":
    main()
