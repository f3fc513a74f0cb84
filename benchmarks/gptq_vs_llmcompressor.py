"""hfq GPTQ vs llm-compressor GPTQ on the real SmolLM2-135M, same calibration windows, same evaluator.

    python benchmarks/gptq_vs_llmcompressor.py [--n-samples 32] [--seq-len 512] [--max-windows 20] [--quiet]
        -> prints a table, writes benchmarks/results/gptq_vs_llmcompressor.json

- Calibration: `hfq.calibration.from_dataset("wikitext2", ...)` windows (32 x 512 tokens; offline these come from
  the WikiText-2 test text AFTER its first 40960 tokens, the evaluation windows), saved once as token ids and
  given to both tools as `input_ids`.
- Setting: W4, group 64, symmetric, act-order with static groups (llm-compressor `actorder="static"`, hfq
  `act_order=True`: both tools' best setting; without it both land near RTN), damp 0.01, block 128, lm_head
  (tied) not quantized. hfq runs three times: its default (true-sequential in one lockstep forward per block,
  chunks of 2 samples), the two-pass order of llm-compressor (`true_sequential=False`, chunks of 8), and the
  default with `autocast_dtype="bfloat16"` calibration forwards.
- llm-compressor runs in its own venv (`.venv-llmc`, created here when missing: torch==2.13.0 from the local
  CPU wheel first so pip cannot pull a CUDA build, then `llmcompressor`, which pins an older transformers).
- Every quantization runs in its own process: wall seconds of the quantize call itself and the process's peak
  RSS (`resource.getrusage`), next to the RSS right after imports and after loading the FP32 model. "The FP
  model in memory" is the peak RSS of a process that loads the FP32 model and runs one 512-token forward
  (transformers maps the checkpoint lazily, so a model that has not run yet is mostly not resident).
- All checkpoints are then scored in one process by hfq's evaluator (WikiText-2 test, seq 512, windows 0-19);
  llm-compressor's compressed-tensors checkpoint loads in transformers through `pip install compressed-tensors`.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEER_VENV = ROOT / ".venv-llmc"
# checkpoints + calibration ids: outside the repository
WORK = Path(os.environ.get("HFQ_CACHE", Path.home() / ".cache" / "hfq")) / "bench" / "gptq_vs_llmcompressor"
GROUP = 64


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def report(**row):
    print("RESULT " + json.dumps(row), flush=True)


# ---------------------------------------------------------------- workers (one process each)
def worker_fp(args):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    base = current_rss_mb()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    loaded = current_rss_mb()
    with torch.no_grad():  # one 512-token forward: the weights are read in (mmapped checkpoints load lazily)
        model(torch.load(WORK / "calibration_ids.pt")[:1])
    report(rss_after_imports_mb=base, rss_after_load_mb=loaded, peak_rss_mb=rss_mb(),
           fp_bytes_mb=sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20)


def worker_hfq(args):
    import torch
    from transformers import AutoModelForCausalLM

    import hfq
    from hfq.progress import set_quiet

    set_quiet(args.quiet)
    torch.set_num_threads(args.threads)
    base = current_rss_mb()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    loaded = current_rss_mb()
    if args.worker == "rtn":
        config, calibration = hfq.RTNConfig(bits=4, group_size=GROUP, sym=True), None
    else:
        ids = torch.load(WORK / "calibration_ids.pt")
        config = hfq.GPTQConfig(bits=4, group_size=GROUP, sym=True, act_order=True, damp=0.01, block_size=128,
                                n_samples=ids.shape[0], seq_len=ids.shape[1], **json.loads(args.extra))
        calibration = ids
    start = time.perf_counter()
    hfq.quantize(model, config, calibration=calibration)
    seconds = time.perf_counter() - start
    peak = rss_mb()
    model.save_pretrained(WORK / args.name)
    report(seconds=seconds, peak_rss_mb=peak, rss_after_imports_mb=base, rss_after_load_mb=loaded)


def worker_llmc(args):
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    base = current_rss_mb()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    loaded = current_rss_mb()
    ids = torch.load(WORK / "calibration_ids.pt")
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=GROUP,
                               actorder="static")
    recipe = GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                          ignore=["lm_head"], dampening_frac=0.01, block_size=128, actorder="static")
    start = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=data, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
    seconds = time.perf_counter() - start
    peak = rss_mb()
    model.save_pretrained(WORK / "llmc", save_compressed=True)
    tokenizer.save_pretrained(WORK / "llmc")
    report(seconds=seconds, peak_rss_mb=peak, rss_after_imports_mb=base, rss_after_load_mb=loaded)


def worker_eval(args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hfq  # noqa: F401  (registers hfq checkpoints)
    from hfq.data.text import load_text
    from hfq.eval.perplexity import perplexity

    torch.set_num_threads(args.threads)
    text = load_text("wikitext2")
    tok = AutoTokenizer.from_pretrained(args.model)
    out = {}
    for name in json.loads(args.extra):
        path = args.model if name == "fp" else str(WORK / name)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        out[name] = perplexity(model, tok, text, args.seq_len_eval, 0, args.max_windows, quiet=True)["ppl"]
        del model
    report(ppl=out)


WORKERS = {"fp": worker_fp, "rtn": worker_hfq, "hfq_gptq": worker_hfq, "llmc": worker_llmc, "eval": worker_eval}
RUNS = [("rtn", "rtn", "{}"), ("llmc", "llmc", "{}"), ("hfq_gptq", "hfq_gptq", "{}"),
        ("hfq_gptq_two_pass", "hfq_gptq", '{"true_sequential": false, "batch_size": 8}'),
        ("hfq_gptq_bf16", "hfq_gptq", '{"autocast_dtype": "bfloat16"}')]  # (row, worker, extra)
HFQ_GPTQ_ROWS = [row for row, worker, _ in RUNS if worker == "hfq_gptq"]


# ---------------------------------------------------------------- driver
def ensure_peer_venv() -> Path:
    py = PEER_VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        pip = [str(py), "-m", "pip", "install", "-q"]
        subprocess.run(pip + ["torch==2.13.0"], check=True)  # first, so llmcompressor finds torch satisfied
        subprocess.run(pip + ["llmcompressor"], check=True)
    cuda = subprocess.run([str(py), "-c", "import torch; print(torch.version.cuda)"], capture_output=True,
                          text=True, check=True).stdout.strip()
    if cuda != "None":
        raise RuntimeError(f"{PEER_VENV} holds a CUDA torch ({cuda}); delete it and install torch==2.13.0 (CPU) first")
    return py


def run_worker(python: str, name: str, args, extra: str = "{}", row: str | None = None) -> dict:
    cmd = [python, __file__, "--worker", name, "--name", row or name, "--model", args.model, "--threads",
           str(args.threads), "--max-windows", str(args.max_windows), "--seq-len-eval", str(args.seq_len_eval),
           "--extra", extra] + (["--quiet"] if args.quiet else [])
    env = dict(os.environ, HFQ_DATA_DIR=os.environ.get("HFQ_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    return run_reporting(cmd, env, f"worker {name}")


def run_reporting(cmd: list[str], env: dict, what: str) -> dict:
    """Run a worker process and return the JSON of its last `report` line (its output tails on failure)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise RuntimeError(f"{what} failed ({proc.returncode})")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=sorted(WORKERS))
    ap.add_argument("--name", default=None, help="row name (checkpoint folder) of a worker run")
    ap.add_argument("--model", default=None)
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seq-len-eval", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=20)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--extra", default="{}", help="worker-specific JSON (GPTQConfig fields for hfq_gptq)")
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "gptq_vs_llmcompressor.json"))
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    if args.worker:
        return WORKERS[args.worker](args)

    import torch

    from hfq.calibration import from_dataset
    from hfq.eval.provenance import run_info, write_json
    from hfq.models import resolve

    info = run_info(args.threads)  # at the start: the commit whose code runs
    os.environ.setdefault("HFQ_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    args.model = resolve("smollm2-135m")
    WORK.mkdir(parents=True, exist_ok=True)
    ids = from_dataset("wikitext2", args.model, n_samples=args.n_samples, seq_len=args.seq_len, seed=0)
    torch.save(ids, WORK / "calibration_ids.pt")
    peer = str(ensure_peer_venv())
    if importlib.util.find_spec("compressed_tensors") is None:  # to load the peer's checkpoint for scoring
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "compressed-tensors>=0.15.0"], check=True)
    rows = {"fp": run_worker(sys.executable, "fp", args)}
    for row, worker, extra in RUNS:
        rows[row] = run_worker(peer if worker == "llmc" else sys.executable, worker, args, extra, row)
        print(row, rows[row], flush=True)
    ppl = run_worker(sys.executable, "eval", args, json.dumps(list(rows)))["ppl"]
    for name in rows:
        rows[name]["ppl"] = ppl[name]
    fp_mb = rows["fp"]["fp_bytes_mb"]
    labels = {"fp": "FP32", "rtn": "hfq RTN W4 g64", "llmc": "llm-compressor GPTQ W4 g64",
              "hfq_gptq": "hfq GPTQ W4 g64", "hfq_gptq_two_pass": "hfq GPTQ W4 g64, two-pass",
              "hfq_gptq_bf16": "hfq GPTQ W4 g64, bf16 fwd"}
    print(f"\nSmolLM2-135M, WikiText-2 seq {args.seq_len_eval} windows 0-{args.max_windows - 1}; calibration "
          f"{args.n_samples} x {args.seq_len} tokens; {args.threads} threads; FP32 weights {fp_mb:.0f} MB")
    print(f"{'method':<30}{'PPL':>8}{'quant s':>10}{'peak RSS MB':>13}{'RSS after load':>16}{'peak-import MB':>16}")
    for name, r in rows.items():
        sec = f"{r['seconds']:.1f}" if "seconds" in r else "-"
        print(f"{labels[name]:<30}{r['ppl']:>8.2f}{sec:>10}{r['peak_rss_mb']:>13.0f}{r['rss_after_load_mb']:>16.0f}"
              f"{r['peak_rss_mb'] - r['rss_after_imports_mb']:>16.0f}")
    ratio = {k: rows[k]["seconds"] / rows["llmc"]["seconds"] for k in HFQ_GPTQ_ROWS}
    memory = {k: rows[k]["peak_rss_mb"] / rows["fp"]["peak_rss_mb"] for k in ("llmc", *HFQ_GPTQ_ROWS)}
    print("hfq / llm-compressor quantization time: " + ", ".join(f"{labels[k]} {v:.2f}x" for k, v in ratio.items()))
    print("peak RSS / FP-model process peak RSS: " + ", ".join(f"{labels[k]} {v:.2f}x" for k, v in memory.items()))
    result = {"model": "smollm2-135m", "n_samples": args.n_samples, "seq_len": args.seq_len,
              "eval": {"seq_len": args.seq_len_eval, "windows": f"0-{args.max_windows - 1}"},
              "setting": {"bits": 4, "group_size": GROUP, "sym": True, "act_order": "static", "damp": 0.01,
                          "block_size": 128},
              "fp32_weights_mb": fp_mb, "time_ratio_hfq_over_llmc": ratio, "peak_rss_over_fp_process": memory,
              **info,
              "rows": {labels[k]: v for k, v in rows.items()}}
    write_json(args.output, result)


if __name__ == "__main__":
    main()
