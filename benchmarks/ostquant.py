"""OSTQuant vs QuaRot-style vs GPTQ vs RTN vs llm-compressor's SpinQuant on the real SmolLM2-135M, at W4A16 / W4A8 /
W4A4 / W4A4KV4.

    python benchmarks/ostquant.py [--presets w4a16,w4a8,w4a4,w4a4kv4] [--seeds 0,1,2]
        [--methods rtn,gptq,quarot,quarot_minmax,ostquant,spinquant]
        [--n-samples 128] [--seq-len 2048] [--steps 100] [--train-batch-size 16] [--kl-top-k 1000]
        [--rotation-init auto|hadamard|klt_hadamard|random] [--lr-rotation X] [--max-windows 20]
        [--seq-len-eval 512] [--device cpu|cuda] [--qsur] [--resume]
        -> prints a table, writes benchmarks/results/ostquant.json (rewritten after every row)

- Weights: 4-bit symmetric, one scale per output channel (the paper's setting), lm_head float. Activations:
  dynamic per-token asymmetric (A8 / A4), clip 1.0. KV float, except w4a4kv4: K (after RoPE; after R3 for quarot /
  ostquant, which add the online Q/K Hadamard) and V 4-bit per token and head, asymmetric, where attention reads them.
- rtn: round-to-nearest (MSE clip). gptq: the GPTQ solver exactly as OSTQuant runs it after fusion (damp 0.01,
  no act-order, MSE clip), on the untransformed model. quarot: random Hadamard R1 / per-KV-head R2 fused, online
  Hadamard before down_proj, nothing learned, then that GPTQ. ostquant: the recipe defaults (hadamard init for
  W4A16, weight-KLT x Hadamard for W4A8 / W4A4; `--rotation-init` overrides and names the row ostquant[INIT]),
  `--steps` steps of KL-Top training, then that GPTQ.
- quarot_minmax: quarot with GPTQ on min-max scales (no MSE clip search), the peer's clip rule.
- Seeds: seed s draws calibration windows with seed s and seeds the rotations and the training order; rows are named
  "<method> <preset> seed<s>", and `summary` holds mean / sample std per method and preset.
- OSTQuant rows keep KL-Top per training step and on 2 held-out windows of the validation range (windows 20-21 at
  seq 512, never trained on) every 5 steps, and plot both (benchmarks/results/ostquant_curve_*.png).
- spinquant (the peer, no KV preset; its process also scores the float model, `fp_ppl_in_peer_process`): llm-compressor's SpinQuantModifier (R1, R2, R4; Hadamard blocks of 64 since
  576 is not a power of two; not learned in llm-compressor) + its GPTQ, same weight / activation grid, same
  calibration windows, in `.venv-llmc` and scored there right after quantization by hfq's evaluator file.
- Calibration (training and GPTQ share it): `n_samples` windows of `seq_len` WikiText-2 tokens, offline drawn from
  the test text after its first 40960 tokens (the evaluation windows), see `hfq.calibration.data`.
- Perplexity: WikiText-2 test, non-overlapping windows 0..max_windows-1 of `seq_len_eval` tokens.
Paper scale (100 steps x 16 x 2048 tokens) needs a GPU; on CPU use e.g. --n-samples 32 --seq-len 512 --steps 25
--train-batch-size 2 (about 8 minutes per OSTQuant row on 2 cores).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from gptq_vs_llmcompressor import ensure_peer_venv, report, run_reporting  # the llm-compressor venv and workers

ROOT = Path(__file__).resolve().parent.parent
PRESETS = {"w4a16": (None, None), "w4a8": (8, None), "w4a4": (4, None), "w4a4kv4": (4, 4)}  # act, kv bits
METHODS = ("rtn", "gptq", "quarot", "quarot_minmax", "ostquant", "spinquant")
WORK = Path(os.environ.get("HFQ_CACHE", Path.home() / ".cache" / "hfq")) / "bench" / "ostquant"


def _load_source(relative: str):
    """One hfq module by file path: the peer's venv has no hfq installed (and an older transformers), but the
    evaluator and the text loader import nothing from hfq, so the peer is scored by the same code."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(relative).stem, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def worker_spinquant(args):
    """llm-compressor's SpinQuant (R1, R2, R4 Hadamards, block 64 since 576 is not a power of two; not learned in
    llm-compressor) + GPTQ, in the peer's venv, scored in this process right after quantization: its saved rotated
    checkpoint does not reload correctly in transformers (the online R4 weights come back as unexpected keys)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.modifiers.transform import SpinQuantModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads or torch.get_num_threads())
    act_bits, kv_bits = PRESETS[args.worker_preset]
    if kv_bits is not None:
        raise SystemExit("the spinquant peer has no dynamic per-token KV quantizer; run it at w4a16 / w4a8 / w4a4")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model)
    text = _load_source("hfq/data/text.py").load_text("wikitext2")
    evaluate = _load_source("hfq/eval/perplexity.py").perplexity
    fp_ppl = evaluate(model, tok, text, args.seq_len_eval, args.eval_first, args.max_windows, quiet=True)["ppl"]
    ids = torch.load(WORK / "calibration_ids.pt")
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="channel")
    acts = None if act_bits is None else QuantizationArgs(num_bits=act_bits, type="int", symmetric=False,
                                                          strategy="token", dynamic=True)
    recipe = [SpinQuantModifier(rotations=["R1", "R2", "R4"], transform_type="hadamard", transform_block_size=64),
              GPTQModifier(config_groups={"g": QuantizationScheme(targets=["Linear"], weights=weights,
                                                                  input_activations=acts)},
                           ignore=["lm_head"], dampening_frac=0.01, block_size=128)]
    start = time.perf_counter()
    oneshot(model=model, tokenizer=tok, dataset=data, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
    seconds = time.perf_counter() - start
    ppl = evaluate(model, tok, text, args.seq_len_eval, args.eval_first, args.max_windows, quiet=True)["ppl"]
    report(ppl=ppl, quantize_s=round(seconds, 1), fp_ppl_in_peer_process=fp_ppl)


def run_peer(python: str, preset: str, calib: torch.Tensor, model_path: str, args, eval_first: int) -> dict:
    """The spinquant row: `worker_spinquant` in the peer's venv, on the same calibration windows."""
    WORK.mkdir(parents=True, exist_ok=True)
    torch.save(calib, WORK / "calibration_ids.pt")
    cmd = [python, __file__, "--worker-preset", preset, "--model", model_path, "--max-windows",
           str(args.max_windows), "--seq-len-eval", str(args.seq_len_eval), "--eval-first", str(eval_first)]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    return run_reporting(cmd, dict(os.environ), f"the spinquant peer at {preset}")


def build_config(method: str, preset, args, seed: int = 0):
    """The method's config; for rtn / gptq, which have no KV field, the KV quantizer is set after quantizing.
    `seed`: the rotations' and the training order's seed (the calibration draw uses it too, in main)."""
    import hfq

    act_bits, kv_bits = preset
    kv = dict(kv_bits=kv_bits, online_qk=kv_bits is not None)
    common = dict(bits=4, group_size=None, sym=True, act_bits=act_bits, act_sym=False)
    calib = dict(n_samples=args.n_samples, seq_len=args.seq_len, batch_size=args.batch_size, device=args.device,
                 seed=seed)
    if method == "rtn":
        return hfq.RTNConfig(**common, observer="mse")
    if method == "gptq":
        return hfq.GPTQConfig(**common, act_order=False, mse_clip=True, damp=0.01, **calib)
    if method == "quarot":
        return hfq.OSTQuantConfig(**common, **kv, learn=False, rotation_init="hadamard", **calib)
    if method == "quarot_minmax":  # the peer's clip rule: GPTQ with min-max scales instead of the MSE search
        return hfq.OSTQuantConfig(**common, **kv, learn=False, rotation_init="hadamard", **calib,
                                  weight_solver={"quant_method": "hfq_gptq", "act_order": False, "mse_clip": False,
                                                 "damp": 0.01})
    init = args.rotation_init if args.rotation_init != "auto" else "hadamard" if act_bits is None else "klt_hadamard"
    lrs = {k: v for k, v in (("lr_rotation", args.lr_rotation), ("lr_scaling", args.lr_scaling)) if v is not None}
    return hfq.OSTQuantConfig(**common, **kv, learn=True, rotation_init=init,
                              train_steps=args.steps, train_batch_size=args.train_batch_size,
                              kl_top_k=args.kl_top_k, **lrs, **calib)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="w4a16,w4a8,w4a4,w4a4kv4")
    ap.add_argument("--seeds", default="0", help="comma list; seed s = calibration draw s + transform seed s")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=2, help="calibration forward chunk (GPTQ)")
    ap.add_argument("--steps", type=int, default=100, help="OSTQuant training steps")
    ap.add_argument("--train-batch-size", type=int, default=16)
    ap.add_argument("--kl-top-k", type=int, default=1000)
    ap.add_argument("--lr-rotation", type=float, default=None, help="default: the paper's 0.01689753 (a RiemannianAdam "
                    "step length per rotation, tuned for 16 x 2048 tokens per step)")
    ap.add_argument("--lr-scaling", type=float, default=None, help="default: the paper's 0.00178988")
    ap.add_argument("--rotation-init", default="auto", choices=["auto", "hadamard", "klt_hadamard", "random"],
                    help="OSTQuant's initial rotations (auto: the recipes' choice); other than auto, the row is "
                         "named ostquant[INIT]")
    ap.add_argument("--max-windows", type=int, default=20)
    ap.add_argument("--eval-on", default="test", choices=["test", "validation"],
                    help="test: windows 0..max_windows-1 (the reported figures); validation: max_windows windows of "
                         "the validation range after the 2 held-out curve windows (22.. at seq 512), for choosing "
                         "hyper-parameters")
    ap.add_argument("--seq-len-eval", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--qsur", action="store_true", help="also report the mean QSUR of the quantized layers' inputs")
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "ostquant.json"))
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows already in --output (same settings) and run only the missing ones")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--worker-preset", choices=sorted(PRESETS), help=argparse.SUPPRESS)  # the peer's process
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--eval-first", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker_preset:
        return worker_spinquant(args)

    os.environ.setdefault("HFQ_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hfq
    from hfq.calibration import from_dataset, validation_range
    from hfq.eval.provenance import run_info  # not at the top: the peer's venv (worker_spinquant) has no hfq
    from hfq.data.text import load_text
    from hfq.eval.perplexity import perplexity
    from hfq.models import resolve
    from hfq.progress import set_quiet
    from hfq.transforms import kv_quant_args, set_kv_quant

    set_quiet(args.quiet)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = run_info(torch.get_num_threads())  # each row says which command, commit, date and threads made it
    presets = [p for p in args.presets.split(",") if p]
    methods = [m for m in args.methods.split(",") if m]
    for p in presets:
        if p not in PRESETS:
            raise SystemExit(f"unknown preset {p!r}; known: {sorted(PRESETS)}")
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; known: {METHODS}")
    peer = str(ensure_peer_venv()) if "spinquant" in methods else None  # created on first use
    path = resolve("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path)
    text = load_text("wikitext2")
    seeds = [int(x) for x in args.seeds.split(",") if x]
    first, _ = validation_range(args.seq_len_eval)  # 2 windows of the validation range: the held-out curve
    val_ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    held_out = val_ids[first * args.seq_len_eval:(first + 2) * args.seq_len_eval].reshape(2, args.seq_len_eval)
    eval_first = 0 if args.eval_on == "test" else first + 2
    if args.eval_on == "validation" and args.max_windows > validation_range(args.seq_len_eval)[1] - 2:
        raise SystemExit(f"--max-windows {args.max_windows} runs past the validation range at seq {args.seq_len_eval}")
    calibs = {}

    def calibration(seed):  # seed s: calibration draw s and transform / training seed s
        if seed not in calibs:
            calibs[seed] = from_dataset("wikitext2", tok, n_samples=args.n_samples, seq_len=args.seq_len, seed=seed)
        return calibs[seed]
    calib = calibration(seeds[0])

    def load():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(args.device).eval()

    def evaluate(model):
        return perplexity(model, tok, text, args.seq_len_eval, eval_first, args.max_windows, quiet=True)["ppl"]

    def qsur(model):
        from hfq.eval.qsur import model_qsur

        per_layer = model_qsur(model, calib[: min(4, len(calib))].to(args.device))
        return sum(per_layer.values()) / len(per_layer)  # mean per-dimension QSUR of q/o/up/down inputs

    result = {"model": "smollm2-135m", "device": args.device, "torch": torch.__version__, "cpu": platform.processor(),
              "threads": torch.get_num_threads(),
              "calibration": {"n_samples": args.n_samples, "seq_len": args.seq_len, "seeds": "per row"},
              "training": {"steps": args.steps, "batch_size": args.train_batch_size, "kl_top_k": args.kl_top_k},
              "eval": {"dataset": "wikitext2 test", "seq_len": args.seq_len_eval,
                       "windows": f"{eval_first}-{eval_first + args.max_windows - 1}",
                       "range": args.eval_on}, "rows": {}}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.resume and out.is_file():
        old = json.loads(out.read_text())
        same = all(old.get(k) == result[k] for k in ("device", "calibration", "training", "eval"))
        if not same:
            raise SystemExit(f"{out} was written with other settings; drop --resume or pass the same flags")
        result["rows"] = old["rows"]

    def save():
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(out)

    def run_row(method, preset, seed):
        label = method
        if method == "ostquant":  # every non-default choice is in the row's name
            tags = [args.rotation_init] if args.rotation_init != "auto" else []
            tags += [f"{k}={v}" for k, v in (("lr_rotation", args.lr_rotation), ("lr_scaling", args.lr_scaling)) if v]
            label += f"[{','.join(tags)}]" if tags else ""
        name = f"{label} {preset} seed{seed}"
        if name in result["rows"]:
            return
        if method == "spinquant":
            if PRESETS[preset][1] is not None:
                return  # no per-token KV quantizer in the peer
            result["rows"][name] = row = {**run_peer(peer, preset, calibration(seed), path, args, eval_first), **info}
            print(f"{name} {row}", flush=True)
            save()
            return
        model = load()
        config = build_config(method, PRESETS[preset], args, seed)
        if method == "ostquant":
            info_row = {"rotation_init": config.rotation_init, "lr_rotation": config.lr_rotation,
                        "lr_scaling": config.lr_scaling}
            config.held_out = held_out  # validation windows: the KL-Top curve on tokens never trained on
        start = time.perf_counter()
        hfq.quantize(model, config, calibration=calibration(seed))
        if PRESETS[preset][1] is not None and method in ("rtn", "gptq"):
            set_kv_quant(model, kv_quant_args(PRESETS[preset][1]))
        row = {"ppl": evaluate(model), "quantize_s": round(time.perf_counter() - start, 1), **info}
        if method == "ostquant":
            row.update(info_row)
        losses = getattr(model.hf_quantizer, "losses", None)
        if losses:
            k = max(1, min(10, len(losses) // 4))
            row["kl_top_first"] = sum(losses[:k]) / k
            row["kl_top_last"] = sum(losses[-k:]) / k
            row["kl_top_per_step"] = losses
            row["kl_top_held_out"] = model.hf_quantizer.held_out_losses  # [(step, loss)]
            row["curve_png"] = plot_curve(name, losses, row["kl_top_held_out"], Path(args.output).parent)
        if args.qsur and method.startswith(("quarot", "ostquant")):
            row["qsur"] = qsur(model)
        result["rows"][name] = row
        print(f"{name} {row['ppl']:.3f}", flush=True)
        save()

    if "FP32" not in result["rows"]:
        model = load()
        row = {"ppl": evaluate(model), **info}
        if args.qsur:
            row["qsur"] = qsur(model)
        result["rows"]["FP32"] = row
        print(f"FP32 {row}", flush=True)
        save()
        del model
    for preset in presets:
        for seed in seeds:
            for method in methods:
                run_row(method, preset, seed)
    result["summary"] = summarize(result["rows"])
    save()

    print(f"\nSmolLM2-135M, WikiText-2 test PPL (seq {args.seq_len_eval}, windows {result['eval']['windows']}); "
          f"calibration {args.n_samples} x {args.seq_len}; OSTQuant {args.steps} steps x {args.train_batch_size}, "
          f"KL-Top k={args.kl_top_k}; W4 per-channel sym, A per-token asym dynamic; {args.device}")
    print(f"{'method':<26}" + "".join(f"{p:>22}" for p in presets))
    print(f"{'FP32':<26}" + "".join(f"{result['rows']['FP32']['ppl']:>22.2f}" for _ in presets))
    for label in dict.fromkeys(k.split(" ")[0] for k in result["summary"]):
        cells = []
        for p in presets:
            r = result["summary"].get(f"{label} {p}")
            cells.append(f"{r['mean']:.2f} +- {r['std']:.2f} (n={r['n']})" if r else "-")
        print(f"{label:<26}" + "".join(f"{c:>22}" for c in cells))


def plot_curve(name: str, train: list, held_out: list, folder: Path) -> str:
    """PNG of KL-Top per step on the training batches and on the held-out validation windows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(len(train)), train, label="training batch")
    if held_out:
        ax.plot([s for s, _ in held_out], [v for _, v in held_out], "o-", label="held-out (validation windows)")
    ax.set_xlabel("step")
    ax.set_ylabel("KL-Top")
    ax.set_title(name)
    ax.legend()
    path = folder / f"ostquant_curve_{name.replace(' ', '_')}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return os.path.relpath(path, ROOT)


def summarize(rows: dict) -> dict:
    """Mean and sample std (ddof 1; 0 for one seed) of the PPL per method and preset over its seeds."""
    import statistics

    groups = {}
    for name, row in rows.items():
        if " seed" in name:
            groups.setdefault(name.rsplit(" seed", 1)[0], []).append(row["ppl"])
    return {k: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v),
                "ppl": v} for k, v in groups.items()}


if __name__ == "__main__":
    main()
