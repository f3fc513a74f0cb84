"""RWKVQuant vs GPTQ-only vs VQ-only vs RTN on a tiny RWKV-4 and a tiny RWKV-7 trained here, ~3.25 bits per weight.

    python benchmarks/rwkvquant.py [--arch rwkv4|rwkv7] --tune   # thresholds of the coarse-to-fine proxy, validation
        -> benchmarks/results/rwkvquant_validation.json (rwkv7: rwkvquant_rwkv7_validation.json)
    python benchmarks/rwkvquant.py [--arch ...] --tau-coarse X --tau-fine Y [--seeds 0,1,2] [--methods ...] [--resume]
        -> benchmarks/results/rwkvquant.json (rwkv7: rwkvquant_rwkv7.json; rewritten after every row)
    python benchmarks/rwkvquant.py --model PATH --output FILE ...   # a released checkpoint (HF folder with its
        tokenizer: RWKV-4, or RWKV-7 converted with hfq.modeling.rwkv7.convert_blinkdl_state_dict); token windows

- Models, byte-level (vocabulary 256), 4 layers, hidden 256, FFN 1024, trained here from seed 0 with AdamW (lr 1e-3,
  warm-up 100 steps, cosine, 600 steps of 4 x 512 bytes of WikiText-2 test text after byte 40960), cached in the
  git-ignored runs/rwkvquant/: RWKV-4 (`RwkvForCausalLM`, rescale_every=0 so every block linear is quantizable) and
  RWKV-7 (`hfq.modeling.rwkv7`, heads of 64, the official low-rank widths for hidden 256, chunked prefill form).
  On RWKV-7 the scalar path and RTN use one scale per output channel (group_size None): its low-rank projections
  have 32 inputs, which groups of 128 cannot split.
- Perplexity: bytes 0..10239 (windows 0-19 of 512 bytes); `--tune` scores windows 20-39 (validation) only.
- Every block linear quantized (embeddings and head float, as the official code); 3-bit, weight-only. Calibration:
  `n_samples` x `seq_len` WikiText-2 windows after byte 40960, drawn with the seed.
  rtn: 3-bit asymmetric, groups of 128, min-max. gptq: RWKVQuant's scalar path everywhere (GPTQ, same grid, damp
  0.01, lockstep order), mu float. vq: the vector path everywhere (GPTVQ, 1-D codebooks of 8 centroids per 8 x 32
  weights, 8-bit codebooks, k-means 100 iterations, M-step), mu float. rwkvquant: the coarse-to-fine proxy with the
  thresholds chosen on validation + mu codebooks (E[x^2] importance). rwkvquant_crest: the proxy the released
  command runs (crest factor <= 8 => scalar) + mu codebooks. rwkvquant_nomu: the proxy without mu codebooks.
  rwkvquant_absmean: mu importance |E[x]| (the released code's statistic) instead of E[x^2].
- Bits per weight (stored, everything included: indices or integers, codebooks, scales, zero points; float32 scales
  on this float32 model) per row; the per-layer choices and proxy values of every proxy row.
- Seeds: calibration draw s (rtn has none; the VQ k-means is deterministic given the data).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
from tiny_lm import TRAIN_START, ByteTokenizer, train_cached, windows

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "rwkvquant"
TRAIN_STEPS = 600
METHODS = ("rtn", "gptq", "vq", "rwkvquant", "rwkvquant_crest", "rwkvquant_nomu", "rwkvquant_absmean")
TUNE_QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)


def model_config(arch: str):
    if arch == "rwkv7":
        from hfq.modeling.rwkv7 import Rwkv7Config

        return Rwkv7Config(vocab_size=256, hidden_size=256, num_hidden_layers=4, head_size=64, intermediate_size=1024,
                           bos_token_id=None, eos_token_id=None, pad_token_id=None)
    from transformers import RwkvConfig

    return RwkvConfig(vocab_size=256, hidden_size=256, num_hidden_layers=4, attention_hidden_size=256,
                      intermediate_size=1024, context_length=512, rescale_every=0, tie_word_embeddings=False,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)


def train_model(arch: str, text_ids: torch.Tensor, quiet: bool) -> Path:
    from transformers import AutoModelForCausalLM

    path = RUNS / f"{arch}-steps{TRAIN_STEPS}-4x512-seed0"
    if (path / "config.json").is_file():
        return path
    torch.manual_seed(0)
    if arch == "rwkv7":
        from hfq.modeling.rwkv7 import Rwkv7ForCausalLM

        model = Rwkv7ForCausalLM(model_config(arch))
    else:
        model = AutoModelForCausalLM.from_config(model_config(arch))
    data = text_ids[TRAIN_START:]
    return train_cached(path, model, lambda g: torch.stack(windows(data, 4, g)), TRAIN_STEPS, 1e-3, quiet,
                        f"train {arch}", info={"parameters": sum(p.numel() for p in model.parameters())})


def build_config(method: str, seed: int, args, tau=None, tokenizer=None):
    import hfq

    group = None if args.arch == "rwkv7" else 128
    if method == "rtn":
        return hfq.RTNConfig(bits=3, group_size=group, sym=False)
    common = dict(bits=3, group_size=group, sym=False, seed=seed, n_samples=args.n_samples, seq_len=args.seq_len,
                  dataset="wikitext2", tokenizer=tokenizer or ByteTokenizer())
    tau_c, tau_f = tau if tau is not None else (args.tau_coarse, args.tau_fine)
    variants = {"gptq": dict(proxy="sq", mu_codebooks=False), "vq": dict(proxy="vq", mu_codebooks=False),
                "rwkvquant": dict(proxy="coarse_fine", tau_coarse=tau_c, tau_fine=tau_f),
                "rwkvquant_crest": dict(proxy="crest", tau_crest=8.0),
                "rwkvquant_nomu": dict(proxy="coarse_fine", tau_coarse=tau_c, tau_fine=tau_f, mu_codebooks=False),
                "rwkvquant_absmean": dict(proxy="coarse_fine", tau_coarse=tau_c, tau_fine=tau_f,
                                          mu_importance="abs_mean")}
    return hfq.RWKVQuantConfig(**common, **variants[method])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="rwkv4", choices=["rwkv4", "rwkv7"])
    ap.add_argument("--model", help="a checkpoint folder (with its tokenizer) instead of the tiny models trained here")
    ap.add_argument("--tune", action="store_true", help="choose the proxy thresholds on validation windows 20-39")
    ap.add_argument("--tau-coarse", type=float)
    ap.add_argument("--tau-fine", type=float)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--output", default=None)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()

    os.environ.setdefault("HFQ_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    from transformers import AutoModelForCausalLM

    import hfq
    from hfq.data.text import load_text
    from hfq.eval.perplexity import perplexity
    from hfq.eval.provenance import run_info, seed_summary, write_json
    from hfq.eval.size import quantized_bytes
    from hfq.progress import set_quiet
    from hfq.quantizers.rwkvquant.proxy import proxy_values

    set_quiet(args.quiet)
    torch.set_num_threads(args.threads)
    info = run_info(torch.get_num_threads())
    text = load_text("wikitext2")
    if args.model:
        from transformers import AutoTokenizer

        if not args.output:
            raise SystemExit("--model needs --output (the tiny models' result files are not for it)")
        tok, path = AutoTokenizer.from_pretrained(args.model), Path(args.model)
        args.arch = "rwkv7" if "rwkv7" in json.loads((path / "config.json").read_text())["model_type"] else "rwkv4"
    else:
        tok = ByteTokenizer()
        path = train_model(args.arch, tok(text).input_ids[0], args.quiet)
    suffix = "" if args.arch == "rwkv4" else f"_{args.arch}"

    def load():
        if args.arch == "rwkv7":  # this checkout's code, not the copy saved beside the weights (maybe older)
            from hfq.modeling.rwkv7 import Rwkv7ForCausalLM

            return Rwkv7ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def run(method, seed, first, tau=None):
        model = load()
        start = time.perf_counter()
        hfq.quantize(model, build_config(method, seed, args, tau, tok))
        seconds = round(time.perf_counter() - start, 1)
        q = model.hf_quantizer
        size = quantized_bytes(model)
        row = {"ppl": perplexity(model, tok, text, 512, first, 20, quiet=True)["ppl"], "quantize_s": seconds,
               "bits_per_weight": size["bits_per_weight"], "weights": size["weights"]}
        choices = getattr(q, "choices", None)
        if choices:
            row["n_vq"] = sum(c["choice"] == "vq" for c in choices.values())
            row["choices"] = {n: c["choice"] for n, c in choices.items()}
        return row

    if args.tune:
        out = Path(args.output or ROOT / "benchmarks" / "results" / f"rwkvquant{suffix}_validation.json")
        model = load()
        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "blocks." in n]
        proxies = {n: proxy_values(model.get_submodule(n).weight) for n in names}
        hce = torch.tensor([p["hce"] for p in proxies.values()])
        fine = torch.tensor([p["fine"] for p in proxies.values()])
        result = {"eval": {"windows": "20-39 (validation)", "seq_len": 512,
                                   "unit": "token" if args.model else "byte"}, "proxies": proxies,
                  "fp": {"ppl": perplexity(model, tok, text, 512, 20, 20, quiet=True)["ppl"]}, "rows": {}}
        for q in TUNE_QUANTILES:  # scalar for the layers at or below the q-quantile of both proxies
            tau = (float(torch.quantile(hce, q)) + 1e-9 if q < 1 else math.inf,
                   float(torch.quantile(fine, q)) + 1e-9 if q < 1 else math.inf)
            row = run("rwkvquant_nomu", 0, 20, tau)
            result["rows"][f"q{q}"] = {"tau_coarse": tau[0], "tau_fine": tau[1], **row, **info}
            print(f"q={q} tau=({tau[0]:.4g}, {tau[1]:.4g}) n_vq={row['n_vq']} ppl {row['ppl']:.4f}", flush=True)
            write_json(out, result)
        best = min(result["rows"].items(), key=lambda kv: kv[1]["ppl"])
        result["best"] = {"quantile": best[0], "tau_coarse": best[1]["tau_coarse"], "tau_fine": best[1]["tau_fine"]}
        write_json(out, result)
        print("best", result["best"])
        return

    if args.tau_coarse is None or args.tau_fine is None:
        raise SystemExit("give --tau-coarse and --tau-fine (from `--tune` on validation windows)")
    out = Path(args.output or ROOT / "benchmarks" / "results" / f"rwkvquant{suffix}.json")
    settings = {"calibration": {"n_samples": args.n_samples, "seq_len": args.seq_len},
                "train_steps": None if args.model else TRAIN_STEPS, **({"model": args.model} if args.model else {}),
                "tau": {"coarse": args.tau_coarse, "fine": args.tau_fine, "crest": 8.0},
                "eval": {"dataset": "wikitext2 test", "unit": "token" if args.model else "byte", "seq_len": 512,
                         "windows": "0-19"}}
    result = {**settings, "rows": {}}
    if args.resume and out.is_file():
        old = json.loads(out.read_text())
        if any(old.get(k) != v for k, v in settings.items()):
            raise SystemExit(f"{out} was written with other settings; drop --resume or pass the same flags")
        result["rows"] = old["rows"]
    result["model"] = {"path": args.model} if args.model else json.loads((path / "training.json").read_text())
    if "FP32" not in result["rows"]:
        result["rows"]["FP32"] = {"ppl": perplexity(load(), tok, text, 512, 0, 20, quiet=True)["ppl"], **info}
        write_json(out, result)
        print(f"FP32 {result['rows']['FP32']['ppl']:.4f}", flush=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    for seed in seeds:
        for method in args.methods.split(","):
            if method not in METHODS:
                raise SystemExit(f"unknown method {method!r}; known: {METHODS}")
            name = f"{method} seed{seed}"
            if name in result["rows"] or (method == "rtn" and seed != seeds[0]):
                continue
            row = run(method, seed, 0)
            result["rows"][name] = {**row, **info}
            print(f"{name} {row['ppl']:.4f} ({row['bits_per_weight']:.3f} bits/weight, {row['quantize_s']} s"
                  + (f", {row['n_vq']} VQ" if "n_vq" in row else "") + ")", flush=True)
            write_json(out, result)
    result["summary"] = seed_summary(result["rows"])
    write_json(out, result)
    fp = result["rows"]["FP32"]["ppl"]
    unit = "token" if args.model else "byte"
    print(f"\n{unit}-level PPL, WikiText-2 test windows 0-19 of 512 {unit}s; FP32 {fp:.4f}")
    for k, s in result["summary"].items():
        print(f"  {k:<18} {s['mean']:.4f} +- {s['std']:.4f} (n={s['n']})")


if __name__ == "__main__":
    main()
