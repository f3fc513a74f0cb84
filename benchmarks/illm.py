"""I-LLM on the real SmolLM2-135M: RTN vs SmoothQuant-style vs FSBR (float non-linearities) vs integer-only, at
W8A8 / W6A6 / W4A8 / W4A4, and the integer-only model's CPU speed against fp32 and bf16.

    python benchmarks/illm.py [--presets w8a8,w6a6,w4a8,w4a4] [--seeds 0] [--epochs 2] [--n-samples 32]
        [--seq-len 512] [--eval-on test|validation] [--max-windows 20] [--speed] [--threads N] [--quiet]
        -> prints a table, writes benchmarks/results/illm.json (rewritten after every row)

Every row quantizes with `hfq.ILLMConfig` (the same pipeline, weights per-channel symmetric, activations dynamic
per-token symmetric at every linear input, lm_head W8A8 like the I-LLM rows):
- rtn: no smoothing, no clipping, nothing learned (`smooth_pairs=[]`, lwc=False, epochs=0); float non-linearities.
- smoothquant: SmoothQuant-style alpha = 0.5 at the two norm -> linear pairs, nothing learned; float non-linearities.
- fsbr: FSBR (six smoothing pairs + LWC, `--epochs` passes of block reconstruction); float non-linearities.
- integer: the fsbr row's model switched to integer-only inference (`hfq.integer.llama.to_integer`), scored with
  the torch.compile'd integer kernels (`use_compiled_kernels`; the same integer arithmetic as eager: the first
  evaluation window is also run eagerly and the logits must be identical, recorded as `compiled_equals_eager`).
Seeds: seed s draws the calibration windows with seed s and orders the FSBR steps with it.
Perplexity: WikiText-2 test windows 0..19 of 512 tokens (`--eval-on validation`: windows of the validation range,
for choosing hyper-parameters); calibration after token 40,960.
--speed (--speed-only: nothing else, to illm_speed.json): prefill (512 tokens) and decode (ms / token after 64 tokens of context, batch 1, KV cache) of fp32, bf16
and the W8A8 integer-only model (compiled kernels), one process, one after the other.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PRESETS = {"w8a8": (8, 8), "w6a6": (6, 6), "w4a8": (4, 8), "w4a4": (4, 4)}
METHODS = ("rtn", "smoothquant", "fsbr", "integer")


def config(method: str, preset: str, args, seed: int):
    import hfq

    bits, act = PRESETS[preset]
    common = dict(bits=bits, act_bits=act, n_samples=args.n_samples, seq_len=args.seq_len, batch_size=2, seed=seed,
                  integer_only=False)
    if method == "rtn":
        return hfq.ILLMConfig(**common, smooth_pairs=[], lwc=False, epochs=0)
    if method == "smoothquant":
        return hfq.ILLMConfig(**common, smooth_pairs=["attn_in", "mlp_in"], alpha=0.5, lwc=False, epochs=0)
    return hfq.ILLMConfig(**common, epochs=args.epochs)


def speed_rows(path, calib, args, info) -> dict:
    from transformers import AutoModelForCausalLM

    import hfq
    from hfq.eval.speed import decode_seconds_per_token, prefill_seconds
    from hfq.integer.llama import use_compiled_kernels

    rows = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        rows[name] = {"prefill_512_s": prefill_seconds(model), "decode_ms_per_token":
                      1e3 * decode_seconds_per_token(model), **info}
        print(name, rows[name], flush=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hfq.quantize(model, hfq.ILLMConfig(bits=8, act_bits=8, epochs=0, n_samples=2, seq_len=64, batch_size=2),
                 calibration=calib[:2, :64])
    use_compiled_kernels(True)
    start = time.perf_counter()
    prefill_seconds(model, repeats=1)  # compiles the kernels (and the decode shapes below compile on their first use)
    decode_seconds_per_token(model, steps=4)
    compile_s = time.perf_counter() - start
    rows["integer w8a8 (compiled kernels)"] = {
        "prefill_512_s": prefill_seconds(model), "decode_ms_per_token": 1e3 * decode_seconds_per_token(model),
        "compile_and_warmup_s": round(compile_s, 1), **info}
    use_compiled_kernels(False)
    rows["integer w8a8 (eager)"] = {"prefill_512_s": prefill_seconds(model, repeats=1),
                                    "decode_ms_per_token": 1e3 * decode_seconds_per_token(model, steps=8), **info}
    for k in ("integer w8a8 (compiled kernels)", "integer w8a8 (eager)"):
        print(k, rows[k], flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="w8a8,w6a6,w4a8,w4a4")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--epochs", type=int, default=2, help="FSBR passes over the calibration chunks per block")
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=20)
    ap.add_argument("--eval-on", default="test", choices=["test", "validation"])
    ap.add_argument("--speed", action="store_true", help="also time prefill / decode (fp32, bf16, integer W8A8)")
    ap.add_argument("--speed-only", action="store_true", help="only the speed rows (to benchmarks/results/illm_speed.json)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--output", default=None, help="default benchmarks/results/illm[_validation].json")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()

    os.environ.setdefault("HFQ_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hfq
    from hfq.calibration import from_dataset, validation_range
    from hfq.data.text import load_text
    from hfq.eval.perplexity import perplexity
    from hfq.eval.provenance import run_info, write_json
    from hfq.integer.llama import to_integer, use_compiled_kernels
    from hfq.models import resolve
    from hfq.progress import set_quiet

    set_quiet(args.quiet)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = run_info(torch.get_num_threads())
    presets, methods = args.presets.split(","), args.methods.split(",")
    for p in presets:
        if p not in PRESETS:
            raise SystemExit(f"unknown preset {p!r}; known: {sorted(PRESETS)}")
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; known: {METHODS}")
    if "integer" in methods and "fsbr" not in methods:
        raise SystemExit("the integer row is the fsbr row's model switched to integers: list fsbr too")
    path = resolve("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path)
    text = load_text("wikitext2")
    first = 0 if args.eval_on == "test" else validation_range(512)[0]
    out = Path(args.output or ROOT / "benchmarks" / "results" /
               ("illm.json" if args.eval_on == "test" else "illm_validation.json"))
    result = {"model": "smollm2-135m", "cpu": platform.processor(), "threads": torch.get_num_threads(),
              "calibration": {"n_samples": args.n_samples, "seq_len": args.seq_len, "from_token": 40960},
              "fsbr": {"epochs": args.epochs, "alpha": 0.5, "let_lr": 5e-3, "lwc_lr": 1e-2},
              "eval": {"dataset": "wikitext2 test", "seq_len": 512,
                       "windows": f"{first}-{first + args.max_windows - 1}", "range": args.eval_on},
              "rows": {}}

    def evaluate(model):
        return perplexity(model, tok, text, 512, first, args.max_windows, quiet=True)["ppl"]

    def save():
        write_json(out, result)

    seeds = [int(s) for s in args.seeds.split(",")]
    calibs = {s: from_dataset("wikitext2", tok, n_samples=args.n_samples, seq_len=args.seq_len, seed=s)
              for s in seeds}
    if args.speed_only:
        out = Path(args.output or ROOT / "benchmarks" / "results" / "illm_speed.json")
        write_json(out, {"model": "smollm2-135m", "cpu": platform.processor(), "threads": torch.get_num_threads(),
                         "speed": speed_rows(path, calibs[seeds[0]], args, info)})
        return
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    window = ids[first * 512:(first + 1) * 512][None]  # the integer rows' compiled-vs-eager check
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    result["rows"]["FP32"] = {"ppl": evaluate(model), **info}
    print("FP32", result["rows"]["FP32"]["ppl"], flush=True)
    save()
    for preset in presets:
        for seed in seeds:
            for method in [m for m in methods if m != "integer"]:
                model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
                start = time.perf_counter()
                hfq.quantize(model, config(method, preset, args, seed), calibration=calibs[seed])
                row = {"ppl": evaluate(model), "quantize_s": round(time.perf_counter() - start, 1), **info}
                losses = getattr(model.hf_quantizer, "losses", None)
                if method == "fsbr" and losses:
                    row["fsbr_mse_first_last_per_block"] = [(b[0], b[-1]) for b in losses if b]
                result["rows"][f"{method} {preset} seed{seed}"] = row
                print(f"{method} {preset} seed{seed}", row["ppl"], flush=True)
                save()
                if method == "fsbr" and "integer" in methods:
                    to_integer(model, PRESETS[preset][1])
                    with torch.no_grad():
                        eager = model(window).logits
                        use_compiled_kernels(True)
                        compiled = model(window).logits
                    start = time.perf_counter()
                    row = {"ppl": evaluate(model), "eval_s": round(time.perf_counter() - start, 1),
                           "compiled_equals_eager": bool(torch.equal(eager, compiled)), **info}
                    use_compiled_kernels(False)
                    result["rows"][f"integer {preset} seed{seed}"] = row
                    print(f"integer {preset} seed{seed}", row, flush=True)
                    save()
    summary = {}
    for name, row in result["rows"].items():
        if " seed" in name:
            summary.setdefault(name.split(" seed")[0], []).append(row["ppl"])
    result["summary"] = {k: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                             "n": len(v)} for k, v in summary.items()}
    if args.speed:
        result["speed"] = speed_rows(path, calibs[seeds[0]], args, info)
    save()
    print(f"\nSmolLM2-135M WikiText-2 PPL (seq 512, windows {result['eval']['windows']}); FP32 "
          f"{result['rows']['FP32']['ppl']:.2f}; calibration {args.n_samples} x {args.seq_len}; FSBR {args.epochs} epochs")
    print(f"{'method':<14}" + "".join(f"{p:>22}" for p in presets))
    for method in methods:
        cells = []
        for p in presets:
            r = result["summary"].get(f"{method} {p}")
            cells.append(f"{r['mean']:.2f} +- {r['std']:.2f} (n={r['n']})" if r else "-")
        print(f"{method:<14}" + "".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
