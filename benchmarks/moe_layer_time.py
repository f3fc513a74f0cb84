"""Quantization time and peak memory per MoE layer at a real model's shapes: hfq (GPTQ, MoEQuant's AGQ) vs
llm-compressor's GPTQ, each in its own process, on the same random-initialised layers and calibration ids.

    python benchmarks/moe_layer_time.py [--layers 1] [--n-samples 8] [--seq-len 512] [--threads N] [--quiet]
        -> prints a table, writes benchmarks/results/moe_layer_time.json

- Shapes: Qwen3-30B-A3B's decoder layer (hidden 2048, 32 query / 4 KV heads of 128, 128 experts of width 768, top-8,
  renormalised), `--layers` of them, vocabulary 1024 (the embedding is not quantized), float32, random weights
  (seed 0; quantization time does not depend on what the weights learned). Calibration: `n_samples` x `seq_len`
  random token ids (seed 0), the same file for every row.
- Rows: hfq GPTQ (W4 per-channel symmetric, damp 0.01, no act-order, min-max scales; experts see their routed tokens),
  hfq MoEQuant's solve (the same GPTQ with routing-weighted expert Hessians: MoEQuantConfig(ebss=False,
  rotate=False)), llm-compressor GPTQ with the same grid, with its default moe_calibrate_all_experts=True (every
  token through every expert) and with False (routed tokens only, as hfq).
- Each row: seconds of the quantize call (per layer: divided by `--layers`), the process's peak RSS.
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
sys.path.insert(0, str(ROOT / "benchmarks"))
from gptq_vs_llmcompressor import ensure_peer_venv, rss_mb, run_reporting  # noqa: E402

WORK = ROOT / "runs" / "moe_layer_time"


def shapes_config(layers: int):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(vocab_size=1024, hidden_size=2048, num_hidden_layers=layers, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, intermediate_size=6144, moe_intermediate_size=768,
                          num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=4096,
                          tie_word_embeddings=False)


def worker(args):
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ids = torch.load(args.calibration)
    if args.worker.startswith("hfq"):
        import hfq
        from hfq.progress import set_quiet

        set_quiet(True)
        common = dict(bits=4, group_size=None, sym=True, act_order=False, damp=0.01, n_samples=ids.shape[0],
                      seq_len=ids.shape[1])
        cfg = hfq.GPTQConfig(**common) if args.worker == "hfq_gptq" else \
            hfq.MoEQuantConfig(**common, ebss=False, rotate=False, mse_clip=False)
        start = time.perf_counter()
        hfq.quantize(model, cfg, calibration=ids)
    else:
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import GPTQModifier
        from tokenizers import Tokenizer, models
        from transformers import PreTrainedTokenizerFast

        data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
        weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="channel")
        recipe = GPTQModifier(config_groups={"g": QuantizationScheme(targets=["Linear"], weights=weights)},
                              ignore=["lm_head", "re:.*mlp.gate$"], dampening_frac=0.01, block_size=128)
        processor = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(
            {f"<{i}>": i for i in range(1024)}, unk_token="<0>")))  # ids are pre-tokenized; a stand-in processor
        start = time.perf_counter()
        oneshot(model=model, processor=processor, dataset=data, recipe=recipe, num_calibration_samples=ids.shape[0],
                max_seq_length=ids.shape[1], shuffle_calibration_samples=False,
                moe_calibrate_all_experts=args.worker == "llmc_all_experts")
    seconds = time.perf_counter() - start
    print("RESULT " + json.dumps({"seconds": round(seconds, 1), "peak_rss_mb": round(rss_mb())}), flush=True)


ROWS = {"hfq_gptq": "hfq GPTQ", "hfq_moequant": "hfq MoEQuant solve (AGQ)",
        "llmc_all_experts": "llm-compressor GPTQ (default: all tokens through all experts)",
        "llmc_routed": "llm-compressor GPTQ (moe_calibrate_all_experts=False)"}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--n-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "moe_layer_time.json"))
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--worker", choices=sorted(ROWS), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--calibration", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    from transformers import AutoModelForCausalLM

    from hfq.eval.provenance import run_info, write_json

    info = run_info(args.threads)
    model_dir = WORK / f"qwen3-30b-a3b-shapes-L{args.layers}"
    if not (model_dir / "config.json").is_file():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(shapes_config(args.layers)).save_pretrained(model_dir)
    calib = WORK / f"ids-{args.n_samples}x{args.seq_len}.pt"
    torch.save(torch.randint(0, 1024, (args.n_samples, args.seq_len), generator=torch.Generator().manual_seed(0)),
               calib)
    result = {"shapes": "Qwen3-30B-A3B decoder layer", "layers": args.layers,
              "calibration": {"n_samples": args.n_samples, "seq_len": args.seq_len, "ids": "random, seed 0"},
              "rows": {}}
    peer = str(ensure_peer_venv())
    for row in args.rows.split(","):
        python = sys.executable if row.startswith("hfq") else peer
        cmd = [python, __file__, "--worker", row, "--model", str(model_dir), "--calibration", str(calib),
               "--threads", str(args.threads)]
        got = run_reporting(cmd, dict(os.environ), ROWS[row])
        result["rows"][ROWS[row]] = {**got, "seconds_per_layer": round(got["seconds"] / args.layers, 1), **info}
        print(f"{ROWS[row]:<66} {got['seconds'] / args.layers:8.1f} s/layer  peak RSS {got['peak_rss_mb']} MB",
              flush=True)
        write_json(args.output, result)


if __name__ == "__main__":
    main()
