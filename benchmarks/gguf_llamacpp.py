"""hfq's GGUF export run by llama.cpp itself: SmolLM2-135M quantized by hfq (GPTQ and RTN, 4-bit symmetric groups
of 32) and written as Q4_0, against llama.cpp's own Q4_0 quantization of the same float model, all scored by
llama.cpp on the same token windows.

    python benchmarks/gguf_llamacpp.py [--n-samples 32] [--seq-len 512] [--windows 20] [--threads N] [--quiet]
        -> prints a table, writes benchmarks/results/gguf_llamacpp.json

- The float model: SmolLM2-135M-Instruct as `hfq.models.resolve("smollm2-135m")` gives it (the wheel's Q4_1 GGUF
  dequantized to float32), written by `hfq export --format gguf` as an all-F32 GGUF.
- llama.cpp Q4_0: `llama_model_quantize` (llama-cpp-python's binding of llama.cpp's quantizer) on that F32 file.
- hfq rows: `hfq.GPTQConfig(bits=4, group_size=32)` (hfq defaults: act-order with static groups, damp 0.01;
  calibration `n_samples` x `seq_len` WikiText-2 test tokens after token 40960, seed 0) and `hfq.RTNConfig(bits=4,
  group_size=32)` (also with sym_scale="half", max|w| -> 7.5: all 16 levels, as llama.cpp's Q4_0 rounding), exported
  as Q4_0 (the same integers, float16 block scales).
- Perplexity: WikiText-2 test windows 0..windows-1 of 512 tokens (ids from the model's tokenizer, no BOS), the
  logits of every position from llama.cpp (`logits_all=True`), in a separate venv (.venv-llamacpp, made here:
  `pip install llama-cpp-python` compiles llama.cpp, ~10 min). The hfq GPTQ model is also scored by hfq's
  evaluator in transformers, on the same windows, as the reference the file should reproduce.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "runs" / "gguf_llamacpp"
VENV = ROOT / ".venv-llamacpp"


def ensure_venv() -> Path:
    py = VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    if subprocess.run([str(py), "-c", "import llama_cpp"], capture_output=True).returncode:
        subprocess.run([str(py), "-m", "pip", "install", "-q", "numpy", "llama-cpp-python"], check=True)
    return py


def worker(args):
    """In .venv-llamacpp: quantize (llama.cpp Q4_0) or score GGUF files on the saved token windows."""
    import llama_cpp
    import numpy as np

    jobs = json.loads(args.worker)
    out = {}
    for job in jobs:
        if job["op"] == "quantize":
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
            params.nthread = args.threads
            start = time.perf_counter()
            rc = llama_cpp.llama_model_quantize(job["src"].encode(), job["dst"].encode(), params)
            if rc:
                raise RuntimeError(f"llama_model_quantize returned {rc}")
            out[job["name"]] = {"quantize_s": round(time.perf_counter() - start, 2)}
            continue
        windows = np.load(job["windows"])
        llm = llama_cpp.Llama(model_path=job["path"], n_ctx=windows.shape[1], n_batch=windows.shape[1],
                              logits_all=True, n_threads=args.threads, verbose=False)
        nll, count = 0.0, 0
        start = time.perf_counter()
        for w in windows:
            llm.reset()
            llm.eval(w.tolist())
            logits = np.asarray(llm.scores[: len(w)], dtype=np.float64)[:-1]
            logits -= logits.max(-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            nll -= logp[np.arange(len(w) - 1), w[1:]].sum()
            count += len(w) - 1
        out[job["name"]] = {"ppl": math.exp(nll / count), "tokens": count,
                            "eval_s": round(time.perf_counter() - start, 1)}
    print("RESULT " + json.dumps(out), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "gguf_llamacpp.json"))
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    os.environ.setdefault("HFQ_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hfq
    from hfq.data.text import load_text
    from hfq.eval.perplexity import perplexity, token_windows
    from hfq.eval.provenance import run_info, write_json
    from hfq.export import export_gguf
    from hfq.models import resolve
    from hfq.progress import set_quiet

    set_quiet(args.quiet)
    torch.set_num_threads(args.threads)
    info = run_info(args.threads)
    py = ensure_venv()
    WORK.mkdir(parents=True, exist_ok=True)
    path = resolve("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path)
    text = load_text("wikitext2")
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    windows = torch.stack(token_windows(ids, 512, 0, args.windows)).numpy()
    np.save(WORK / "windows.npy", windows)
    result = {"eval": {"dataset": "wikitext2 test", "seq_len": 512, "windows": f"0-{args.windows - 1}"},
              "calibration": {"n_samples": args.n_samples, "seq_len": args.seq_len, "seed": 0}, "rows": {}}

    def load(cfg=None):
        return AutoModelForCausalLM.from_pretrained(path, **({"quantization_config": cfg} if cfg else {})).eval()

    fp = load()
    result["rows"]["FP32 (transformers)"] = {"ppl": perplexity(fp, tok, text, 512, 0, args.windows, quiet=True)["ppl"],
                                             **info}
    export_gguf(fp, WORK / "fp32.gguf", tokenizer=tok)
    del fp
    files = {"FP32 GGUF (llama.cpp)": WORK / "fp32.gguf", "llama.cpp Q4_0 (llama.cpp)": WORK / "llamacpp-q4_0.gguf"}
    configs = {"hfq GPTQ W4 g32 -> Q4_0": hfq.GPTQConfig(bits=4, group_size=32, n_samples=args.n_samples,
                                                        seq_len=args.seq_len, dataset="wikitext2"),
               "hfq RTN W4 g32 -> Q4_0": hfq.RTNConfig(bits=4, group_size=32),
               "hfq RTN W4 g32 sym_scale=half -> Q4_0": hfq.RTNConfig(bits=4, group_size=32, sym_scale="half")}
    for name, cfg in configs.items():
        start = time.perf_counter()
        model = load(cfg)
        seconds = time.perf_counter() - start
        if "GPTQ" in name:
            result["rows"][name.split(" ->")[0] + " (hfq, transformers)"] = {
                "ppl": perplexity(model, tok, text, 512, 0, args.windows, quiet=True)["ppl"],
                "quantize_s": round(seconds, 1), **info}
        file = WORK / (name.split(" ->")[0].replace(" ", "-").replace("=", "-").lower() + ".gguf")
        export_gguf(model, file, tokenizer=tok)
        files[name + " (llama.cpp)"] = file
        del model
    jobs = [{"op": "quantize", "name": "llama.cpp Q4_0 quantize", "src": str(WORK / "fp32.gguf"),
             "dst": str(WORK / "llamacpp-q4_0.gguf")}]
    jobs += [{"op": "ppl", "name": n, "path": str(f), "windows": str(WORK / "windows.npy")} for n, f in files.items()]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gptq_vs_llmcompressor import run_reporting

    rows = run_reporting([str(py), __file__, "--worker", json.dumps(jobs), "--threads", str(args.threads)],
                         dict(os.environ), "llama.cpp worker")
    for n, row in rows.items():
        size = files.get(n)
        result["rows"][n] = {**row, **({"file_mb": round(size.stat().st_size / 2**20, 1)} if size else {}), **info}
    write_json(args.output, result)
    for n, row in result["rows"].items():
        print(f"{n:<40} " + (f"PPL {row['ppl']:.3f}" if "ppl" in row else json.dumps(
            {k: v for k, v in row.items() if k in ('quantize_s',)})))


if __name__ == "__main__":
    main()
