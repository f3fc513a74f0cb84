"""`make demo`: quantize the embedded SmolLM2-135M, save it packed, reload it, and compare with full precision."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from .data.text import load_text
from .eval.perplexity import perplexity
from .eval.size import quantized_bytes
from .models import load_model, resolve
from .recipe import build_config

DEMO_MODEL = "smollm2-135m"
DEMO_CONFIG = dict(bits=4, group_size=64)  # RTN W4 g64 (576 = 9 x 64); the default until a better method lands


def _folder_bytes(path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def run_demo(output: str | None = None, max_windows: int = 20, quiet: bool = False) -> list[dict]:
    text = load_text("wikitext2")
    fp_path = resolve(DEMO_MODEL)
    rows = []
    fp, tokenizer = load_model(fp_path)
    rows.append({"model": "FP32", **perplexity(fp, tokenizer, text, 512, 0, max_windows, quiet),
                 "checkpoint_MB": _folder_bytes(fp_path) / 2**20})
    del fp

    with tempfile.TemporaryDirectory() as tmp:
        out = output or tmp
        start = time.perf_counter()
        model, _ = load_model(fp_path, build_config("rtn", DEMO_CONFIG))
        seconds = time.perf_counter() - start
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        sizes = quantized_bytes(model)
        del model
        reloaded, _ = load_model(out)  # packed integers, no re-quantization
        rows.append({"model": "RTN W4 g64 (saved+reloaded)", **perplexity(reloaded, tokenizer, text, 512, 0, max_windows,
                                                                          quiet),
                     "checkpoint_MB": _folder_bytes(out) / 2**20, "quantize_s": seconds,
                     "linears_vs_fp16": sizes["ratio"]})

    print(f"\nSmolLM2-135M, WikiText-2 test, seq 512, windows 0-{max_windows - 1}")
    print(f"{'model':<30}{'PPL':>9}{'checkpoint MB':>15}{'quantized linears / fp16':>26}")
    for r in rows:
        ratio = f"{r['linears_vs_fp16']:.3f}" if "linears_vs_fp16" in r else "-"
        print(f"{r['model']:<30}{r['ppl']:>9.2f}{r['checkpoint_MB']:>15.1f}{ratio:>26}")
    return rows
