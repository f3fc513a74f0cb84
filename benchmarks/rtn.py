"""RTN on the real SmolLM2-135M: perplexity, quantization time, packed size, and CPU latency of every kernel path.

    python benchmarks/rtn.py [--max-windows 20] [--settings W8A16,W4A16] [--resume] [--quiet]
        -> prints a table, writes benchmarks/results/rtn.json

Perplexity is computed once per setting, with the reference (exact simulation) kernel; the latency columns time the
reference path and kernel="auto" (torch's CPU kernels, `hfq.nn.linear`). The full speed comparison (bf16, every
format, llama.cpp, bytes per token, RSS) is benchmarks/cpu_speed.py.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

import hfq
from hfq.models import load_model
from hfq.data.text import load_text
from hfq.eval.perplexity import perplexity
from hfq.eval.size import quantized_bytes
from hfq.eval.speed import decode_seconds_per_token, prefill_seconds
from hfq.models import resolve
from hfq.progress import set_quiet

# name -> (RTN fields, kernels to time; perplexity with the first)
SETTINGS = {
    "FP32": (None, ["fp32"]),
    "W8A8 (per-channel W, per-token A)": (dict(bits=8, group_size=None, act_bits=8), ["reference", "auto"]),
    "W4A8 (per-channel W, per-token A)": (dict(bits=4, group_size=None, act_bits=8), ["reference", "auto"]),
    "W8A16 (per-channel)": (dict(bits=8, group_size=None), ["reference", "auto"]),
    "W4A16 g64": (dict(bits=4, group_size=64), ["reference", "auto"]),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--max-windows", type=int, default=20)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--output", default=str(Path(__file__).parent / "results" / "rtn.json"))
    ap.add_argument("--settings", default="", help="comma list of setting-name prefixes to run (default: all)")
    ap.add_argument("--resume", action="store_true", help="with --settings: keep the other settings' rows already in --output")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    set_quiet(args.quiet)
    os.environ.setdefault("HFQ_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))  # as CI
    torch.manual_seed(0)
    text = load_text("wikitext2")
    path = resolve("smollm2-135m")
    wanted = [w for w in args.settings.split(",") if w]
    old = json.loads(Path(args.output).read_text())["rows"] if args.resume and Path(args.output).is_file() else []
    done = {r["setting"]: r for r in old}
    rows = []
    for name, (fields, kernels) in SETTINGS.items():
        if wanted and name != "FP32" and not any(name.startswith(w) for w in wanted):  # FP32 always re-runs:
            if name in done:                                    # the speed ratios only hold within one run
                rows.append(done[name])
            continue
        start = time.perf_counter()
        model, tok = load_model(path, hfq.RTNConfig(**fields) if fields else None)
        quant_s = time.perf_counter() - start
        row = {"setting": name, "load_and_quantize_s": quant_s}
        row.update({k: v for k, v in quantized_bytes(model).items()} if fields else {})
        for kernel in kernels:
            if kernel != "fp32":
                hfq.nn.set_kernel(model, kernel)
            if kernel == kernels[0]:  # perplexity once per setting
                row["ppl"] = perplexity(model, tok, text, 512, 0, args.max_windows, quiet=args.quiet)["ppl"]
            row[f"prefill{args.prefill_len}_s[{kernel}]"] = prefill_seconds(model, args.prefill_len)
            row[f"decode_ms_per_token[{kernel}]"] = 1000 * decode_seconds_per_token(model, steps=args.decode_steps)
        rows.append(row)
        print(json.dumps(row))
        del model

    fp = next(r for r in rows if r["setting"] == "FP32")
    print(f"\nSmolLM2-135M RTN, WikiText-2 seq 512 windows 0-{args.max_windows - 1}, {torch.get_num_threads()} threads")
    print(f"{'setting':<36}{'kernel':<18}{'PPL':>8}{'lin/fp16':>10}{'prefill s':>11}{'vs fp32':>9}{'decode ms':>11}{'vs fp32':>9}")
    for r in rows:
        for kernel in [k[len("decode_ms_per_token["):-1] for k in r if k.startswith("decode_ms_per_token[")]:
            pre, dec = r[f"prefill{args.prefill_len}_s[{kernel}]"], r[f"decode_ms_per_token[{kernel}]"]
            ratio = f"{r['ratio']:.3f}" if r.get("ratio") else "-"
            print(f"{r['setting']:<36}{kernel:<18}{r['ppl']:>8.2f}{ratio:>10}{pre:>11.3f}"
                  f"{fp[f'prefill{args.prefill_len}_s[fp32]'] / pre:>8.2f}x{dec:>11.2f}"
                  f"{fp['decode_ms_per_token[fp32]'] / dec:>8.2f}x")
    result = {"model": "smollm2-135m", "max_windows": args.max_windows, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "rows": rows}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.output).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(args.output)


if __name__ == "__main__":
    main()
