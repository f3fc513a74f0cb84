"""GPTQ on load of a model several times larger than the memory budget, through accelerate's disk offload, against
the same quantization fully in memory.

    python benchmarks/larger_than_memory.py [--budget-gib 1.5] [--max-memory-gib 0.25] [--layers 26]
        [--small-layers 4] [--n-samples 8] [--seq-len 512] [--threads N] [--quiet]
        -> prints a table, writes benchmarks/results/larger_than_memory.json

- Model: random-initialised (seed 0) Llama with TinyLlama-1.1B's shapes (hidden 2048, 32 heads / 4 KV heads,
  intermediate 5632, vocabulary 32000), `--layers` blocks (26: 1.27 B parameters, 4.75 GiB in float32), saved once in
  bfloat16 under the git-ignored runs/ltm/ and loaded as float32. The dtype change matters for the measurement: a
  float32 checkpoint loaded as float32 stays memory-mapped (file-backed pages, not in anonymous RSS) in both runs,
  which would hide what the in-memory run really holds.
- Offloaded run: `from_pretrained(path, quantization_config=GPTQConfig(bits=4, group_size=128, ...),
  device_map="auto", max_memory={"cpu": max_memory}, offload_folder=...)`: accelerate keeps what fits `max_memory` in
  memory and the rest on disk; hfq onloads one block at a time, packs it and writes it back to the offload folder; then
  `save_pretrained` streams the packed model to disk. In-memory run: the same call without device_map.
- The budget is the whole process's: accelerate's `max_memory` bounds only the modules it keeps resident, so it is
  set below the budget to leave room for the Python / torch runtime (~0.25 GiB), one block in float32 and GPTQ's
  workspace (its Hessians and a solve: ~5 x in_features^2 x 4 bytes for the widest layer, 0.6 GiB at 5632). The
  row `within_budget` checks the offloaded run's peak anonymous RSS against `--budget-gib`.
- Each run in its own process: wall seconds of from_pretrained (load + quantize), of save_pretrained, and the peak
  anonymous RSS (RssAnon sampled from /proc every 20 ms: the process's own tensors and heap; pages of the
  memory-mapped checkpoint are file-backed and excluded).
- Calibration: `n_samples` x `seq_len` random token ids (seed 0), the same for both runs. The packed tensors of the two
  saved checkpoints are compared one by one (identical expected).
- A smaller model (`--small-layers`) runs both ways too, for the time overhead of offloading.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "runs" / "ltm"
sys.path.insert(0, str(ROOT / "benchmarks"))
from gptq_vs_llmcompressor import run_reporting  # noqa: E402


def config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                       tie_word_embeddings=False)


def worker(args):
    from transformers import AutoModelForCausalLM

    import hfq
    from hfq.eval.memory import PeakMemory
    from hfq.progress import set_quiet

    set_quiet(args.quiet)
    torch.set_num_threads(args.threads)
    ids = torch.load(args.calibration)
    cfg = hfq.GPTQConfig(bits=4, group_size=128, n_samples=ids.shape[0], seq_len=ids.shape[1], dataset=ids.tolist())
    offloaded = dict(device_map="auto", max_memory={"cpu": f"{args.max_memory_gib}GiB"},
                     offload_folder=str(Path(args.out) / "offload")) if args.worker == "offloaded" else {}
    with PeakMemory() as memory:
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, quantization_config=cfg,
                                                     **offloaded)
        load_quantize_s = time.perf_counter() - start
        start = time.perf_counter()
        model.save_pretrained(Path(args.out) / "packed", max_shard_size="400MB")  # one shard in memory at a time
        save_s = time.perf_counter() - start
    device_map = getattr(model, "hf_device_map", None) or {}
    print("RESULT " + json.dumps({
        "load_quantize_s": round(load_quantize_s, 1), "save_s": round(save_s, 1), **memory.report(),
        "modules_on_disk": sum(v == "disk" for v in device_map.values()),
        "modules_in_memory": sum(v != "disk" for v in device_map.values()) if device_map else "all"}), flush=True)


def same_tensors(a: Path, b: Path) -> dict:
    """Compare two saved checkpoints tensor by tensor (one tensor in memory at a time)."""
    from safetensors import safe_open

    def files(folder):
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            return {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        with safe_open(folder / "model.safetensors", "pt") as f:
            return {k: folder / "model.safetensors" for k in f.keys()}

    fa, fb = files(a), files(b)
    differ = [k for k in sorted(fa) if k not in fb]
    for k in sorted(set(fa) & set(fb)):
        with safe_open(fa[k], "pt") as x, safe_open(fb[k], "pt") as y:
            if not torch.equal(x.get_tensor(k), y.get_tensor(k)):
                differ.append(k)
    return {"tensors": len(fa), "differ": differ[:10], "n_differ": len(differ) + len(set(fb) - set(fa))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-gib", type=float, default=1.5)
    ap.add_argument("--max-memory-gib", type=float, default=0.25)
    ap.add_argument("--layers", type=int, default=26)
    ap.add_argument("--small-layers", type=int, default=4)
    ap.add_argument("--n-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "larger_than_memory.json"))
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--worker", choices=["offloaded", "in_memory"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--calibration", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    import shutil

    from transformers import AutoModelForCausalLM

    from hfq.eval.provenance import run_info, write_json

    info = run_info(args.threads)
    result = {"budget_gib": args.budget_gib, "max_memory_gib": args.max_memory_gib,
              "calibration": {"n_samples": args.n_samples, "seq_len": args.seq_len},
              "gptq": "W4 g128 sym, act-order, true-sequential (hfq defaults)", "rows": {}}
    calib = WORK / f"ids-{args.n_samples}x{args.seq_len}.pt"
    WORK.mkdir(parents=True, exist_ok=True)
    torch.save(torch.randint(0, 32000, (args.n_samples, args.seq_len), generator=torch.Generator().manual_seed(0)),
               calib)
    for layers in (args.layers, args.small_layers):
        path = WORK / f"llama-tinyllama-shapes-L{layers}"
        if not (path / "config.json").is_file():
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config(layers)).to(torch.bfloat16)
            model.save_pretrained(path)
            del model
        size_gib = 2 * sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**30  # bfloat16 on disk
        outs = {}
        for mode in ("offloaded", "in_memory"):
            out = WORK / f"L{layers}-{mode}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, __file__, "--worker", mode, "--model", str(path), "--calibration", str(calib),
                   "--out", str(out), "--max-memory-gib", str(args.max_memory_gib), "--threads", str(args.threads)]
            cmd += ["--quiet"] if args.quiet else []
            row = run_reporting(cmd, dict(os.environ), f"{mode} L{layers}")
            name = f"L{layers} ({size_gib:.2f} GiB fp32) {mode}"
            result["rows"][name] = {**row, "float32_gib": round(size_gib, 2), **info}
            if mode == "offloaded" and "peak_anon_rss_mb" in row:
                result["rows"][name]["within_budget"] = row["peak_anon_rss_mb"] <= args.budget_gib * 1024
            print(f"{name}: {row}", flush=True)
            outs[mode] = out / "packed"
            write_json(args.output, result)
        result["rows"][f"L{layers} packed checkpoints compared"] = same_tensors(outs["offloaded"], outs["in_memory"])
        print(result["rows"][f"L{layers} packed checkpoints compared"], flush=True)
        write_json(args.output, result)


if __name__ == "__main__":
    main()
