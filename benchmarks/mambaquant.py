"""MambaQuant vs Hadamard-only (QuaRot-style) vs RTN on a tiny Mamba and a tiny Mamba2 trained here, W8A8 and W4A8
(the paper's settings) and W8A4 (not in the paper: a stress test of the activation transforms).

    python benchmarks/mambaquant.py [--archs mamba,mamba2] [--schemes w8a8,w4a8,w8a4] [--seeds 0,1,2]
        [--methods rtn,hadamard,smooth,klt,mambaquant] [--n-samples 16] [--seq-len 512] [--eval-on test|validation]
        [--threads N] [--resume] [--quiet]
        -> prints a table, writes benchmarks/results/mambaquant.json (rewritten after every row)
    python benchmarks/mambaquant.py --model PATH [--output FILE] ...   # a released checkpoint instead of the tiny
        models (e.g. state-spaces/mamba-130m-hf, downloaded; its own tokenizer; token-level windows)

- Models (byte-level: vocabulary 256, one token per UTF-8 byte; 4 layers, hidden 256, tied embeddings as the
  released Mamba checkpoints): Mamba (state 16, expand 2, dt rank 16) and Mamba2 (16 heads of 32, state 32,
  1 group). Trained here from seed 0 with AdamW (lr 2e-3, warm-up 100 steps, cosine) on batches of 4 x 512 bytes of
  WikiText-2 test text after byte 40960 (evaluation and validation bytes come before it); Mamba for 600 steps,
  Mamba2 for 1500 (about the same CPU time). Cached in the git-ignored runs/mambaquant/. Training aid, not part of
  any method: Mamba is trained through transformers' `use_mambapy=True` path (the `mambapy` package's parallel
  scan; `pip install mambapy`), since its sequential slow path takes ~80 s per step here. Evaluation and
  quantization never use it.
- Perplexity: bytes 0..10239 (windows 0-19 of 512 bytes); lower is better. `--eval-on validation`: windows 20-39.
- Every quantized row uses the same quantizers (the official MambaQuant LLM setting): every linear incl. lm_head
  and conv1d, weights per output channel asymmetric min-max round-to-nearest (W8 or W4), their inputs dynamic per
  tensor asymmetric (A8, or A4 in the stress test), the scan output matmul (h . C) per token asymmetric at the same
  activation bits; the recurrence stays float. The W8A4 column is there because, in an exploration on validation
  windows 20-23 of the tiny Mamba2 (not written to JSON), W8A8 round-to-nearest was already within 0.01% of FP.
  rtn: no transform. hadamard: the QuaRot-style baseline (random Hadamard R1 on the residual stream, R5 on the dt
  path, online Hadamards R2 before out_proj and R4 on the state). smooth: S2, S4, S5, S7 only. klt: KLT-enhanced
  rotations only (R = K H). mambaquant: KLT-enhanced rotations + smoothing (the paper's method). Calibration:
  `n_samples` x `seq_len` WikiText-2 windows after byte 40960 drawn with the seed (the official code: 8 x 2048).
- Seeds: seed s = calibration draw s and Hadamard signs s (rtn has neither). The trained model is the same for every
  seed. `summary`: mean and sample std over seeds.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from tiny_lm import TRAIN_START, ByteTokenizer, train_cached, windows

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "mambaquant"
TRAIN_STEPS = {"mamba": 600, "mamba2": 1500}
METHODS = ("rtn", "hadamard", "smooth", "klt", "mambaquant")
VARIANTS = {"rtn": dict(rotation=None, smooth=False), "hadamard": dict(rotation="hadamard", smooth=False),
            "smooth": dict(rotation=None, smooth=True), "klt": dict(rotation="klt_hadamard", smooth=False),
            "mambaquant": dict(rotation="klt_hadamard", smooth=True)}


def model_config(arch: str):
    common = dict(vocab_size=256, hidden_size=256, num_hidden_layers=4, tie_word_embeddings=True, bos_token_id=None,
                  eos_token_id=None, pad_token_id=None)
    if arch == "mamba":
        from transformers import MambaConfig

        return MambaConfig(**common, state_size=16, expand=2, conv_kernel=4, time_step_rank=16)
    if arch == "mamba2":
        from transformers import Mamba2Config

        return Mamba2Config(**common, state_size=32, expand=2, head_dim=32, num_heads=16, n_groups=1, chunk_size=64)
    raise SystemExit(f"unknown architecture {arch!r}; known: mamba, mamba2")


def train_model(arch: str, text_ids: torch.Tensor, quiet: bool) -> Path:
    """The tiny LM, trained once and cached."""
    from transformers import AutoModelForCausalLM

    steps = TRAIN_STEPS[arch]
    path = RUNS / f"{arch}-steps{steps}-4x512-seed0"
    if (path / "config.json").is_file():
        return path
    cfg = model_config(arch)
    if arch == "mamba":
        try:
            import mambapy  # noqa: F401
        except ImportError:
            raise SystemExit("training the tiny Mamba needs the mambapy package (transformers' parallel-scan "
                             "training path; its slow path takes ~80 s per step here): pip install mambapy") from None
        cfg.use_mambapy = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    data = text_ids[TRAIN_START:]
    info = {"parameters": sum(p.numel() for p in model.parameters()),
            "training_aid": "mambapy parallel scan (transformers use_mambapy=True)" if arch == "mamba" else None}
    return train_cached(path, model, lambda g: torch.stack(windows(data, 4, g)), steps, 2e-3, quiet, f"train {arch}",
                        finalize=lambda m: setattr(m.config, "use_mambapy", False), info=info)


def parse_scheme(scheme: str) -> tuple[int, int]:
    """"w4a8" -> (4, 8)."""
    w, _, a = scheme.lower().lstrip("w").partition("a")
    return int(w), int(a)


def build_config(method: str, scheme: str, seed: int, args, tokenizer):
    import hfq

    bits, act_bits = parse_scheme(scheme)
    return hfq.MambaQuantConfig(bits=bits, act_bits=act_bits, state_act_bits=act_bits, seed=seed,
                                n_samples=args.n_samples, seq_len=args.seq_len, dataset="wikitext2",
                                tokenizer=tokenizer, **VARIANTS[method])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="mamba,mamba2")
    ap.add_argument("--model", help="a Mamba / FalconMamba / Mamba2 checkpoint folder to benchmark instead of the "
                                    "tiny models trained here (scored with its own tokenizer)")
    ap.add_argument("--schemes", default="w8a8,w4a8,w8a4")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-on", default="test", choices=["test", "validation"],
                    help="test: bytes 0-10239 (the reported figures); validation: windows 20-39 (bytes 10240-20479), "
                         "for choosing hyper-parameters")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "mambaquant.json"))
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --output (same settings)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()

    os.environ.setdefault("HFQ_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    from transformers import AutoModelForCausalLM

    import hfq
    from hfq.data.text import load_text
    from hfq.eval.perplexity import perplexity
    from hfq.eval.provenance import run_info, seed_summary, write_json
    from hfq.progress import set_quiet

    set_quiet(args.quiet)
    torch.set_num_threads(args.threads)
    info = run_info(torch.get_num_threads())
    archs, seeds = args.archs.split(","), [int(s) for s in args.seeds.split(",")]
    schemes, methods = args.schemes.split(","), args.methods.split(",")
    for sc in schemes:
        parse_scheme(sc)
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; known: {METHODS}")
    if args.model:
        from transformers import AutoConfig, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model)
        archs = [AutoConfig.from_pretrained(args.model).model_type]
    else:
        tok = ByteTokenizer()
    text = load_text("wikitext2")
    text_ids = tok(text).input_ids[0]
    first = 0 if args.eval_on == "test" else 20
    settings = {"calibration": {"n_samples": args.n_samples, "seq_len": args.seq_len},
                "train_steps": None if args.model else TRAIN_STEPS, "model": args.model,
                "eval": {"dataset": "wikitext2 test", "unit": "token" if args.model else "byte", "seq_len": 512,
                         "windows": f"{first}-{first + 19}"}}
    out = Path(args.output)
    result = {**settings, "rows": {}, "models": {}}
    if args.resume and out.is_file():
        old = json.loads(out.read_text())
        if any(old.get(k) != v for k, v in settings.items()):
            raise SystemExit(f"{out} was written with other settings; drop --resume or pass the same flags")
        result.update(rows=old["rows"], models=old.get("models", {}))

    def evaluate(model) -> float:
        return perplexity(model, tok, text, 512, first, 20, quiet=True)["ppl"]

    for arch in archs:
        if args.model:
            path = Path(args.model)
            result["models"][arch] = {"path": args.model}
        else:
            path = train_model(arch, text_ids, args.quiet)
            result["models"][arch] = json.loads((path / "training.json").read_text())

        def load():
            return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

        if f"{arch} FP32" not in result["rows"]:
            result["rows"][f"{arch} FP32"] = {"ppl": evaluate(load()), **info}
            write_json(out, result)
            print(f"{arch} FP32 {result['rows'][f'{arch} FP32']['ppl']:.4f}", flush=True)
        for seed in seeds:
            for scheme in schemes:
                for method in methods:
                    name = f"{arch} {method} {scheme} seed{seed}"
                    if name in result["rows"] or (method == "rtn" and seed != seeds[0]):
                        continue  # rtn has no seed
                    model = load()
                    start = time.perf_counter()
                    hfq.quantize(model, build_config(method, scheme, seed, args, tok))
                    row = {"ppl": evaluate(model), "quantize_s": round(time.perf_counter() - start, 1)}
                    result["rows"][name] = {**row, **info}
                    print(f"{name} {row['ppl']:.4f} ({row['quantize_s']} s)", flush=True)
                    write_json(out, result)
    result["summary"] = seed_summary(result["rows"])
    write_json(out, result)
    print_table(result, archs, schemes)


def print_table(result, archs, schemes):
    unit = result["eval"].get("unit", "byte")
    print(f"\n{unit}-level PPL, windows {result['eval']['windows']} of 512 {unit}s (mean +- std over seeds)")
    for arch in archs:
        fp = result["rows"][f"{arch} FP32"]["ppl"]
        print(f"{arch}: FP32 {fp:.4f}")
        for method in METHODS:
            cells = [f"{sc.upper()} {r['mean']:.4f} +- {r['std']:.4f} (n={r['n']}, {r['mean'] / fp:.3f}x FP)"
                     for sc in schemes if (r := result["summary"].get(f"{arch} {method} {sc}"))]
            if cells:
                print(f"  {method:<12}" + "   ".join(cells))


if __name__ == "__main__":
    main()
