"""PTQAT vs PTQ and QAT of every layer, side by side in one run: SmolLM2-135M at W4A8 (causal-LM loss on WikiText-2
calibration-range tokens, perplexity on windows 0-19) and the tiny synthetic-nuScenes PETR at W4A8 (its detection
loss on the training split, devkit NDS on the val split).

    python benchmarks/ptqat.py --part llm --seeds 0 1 2
    python benchmarks/ptqat.py --part petr --seeds 0 1 2
    python benchmarks/ptqat.py --part llm --validate --lrs 1e-5 3e-5 1e-4 --rows qat_all   # choose the lr

Every quantized row is `peft.get_peft_model(model, hfq.PTQATConfig(...))` (the same PTQ: symmetric per-channel W4
min/max, A8 — per-token dynamic for the LLM, static per-tensor LSQ steps for PETR), trained `--steps` AdamW steps with
the task loss, then `merge_and_unload()` (packed hfq model) and scored:
  ptq             ratio 0: no layer trains (the PTQ starting point every other row shares)
  qat_all         ratio 1: every layer learns its weights and LSQ steps
  ptqat_smallest  ratio 0.5, the layers with the smallest FP-vs-quantized output discrepancy (the paper's choice)
  ptqat_largest / ptqat_random   the selection ablation
plus fp (the float model, untrained) and, for the LLM, fp_finetuned (its Linear weights trained the same way, seed 0:
how much of a row's gain is adaptation to WikiText rather than recovered quantization error). Seeds change the
training order (and the random selection); calibration is fixed. With --validate the LLM is scored on validation
windows (tokens 10,240-40,959) instead, to choose --lr.
What stays float: the output embedding; in PETR also nn.MultiheadAttention (PTQAT wraps Linear / Conv2d only).
"""
import argparse
import logging
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from hfq.eval.provenance import run_info, seed_summary, write_json  # noqa: E402

logger = logging.getLogger("ptqat")
ROWS = {"ptq": (0.0, "smallest"), "qat_all": (1.0, "smallest"), "ptqat_smallest": (0.5, "smallest"),
        "ptqat_largest": (0.5, "largest"), "ptqat_random": (0.5, "random")}


def train(model, batches, steps, lr, seed, forward):
    """`steps` AdamW steps over `batches` (a list, shuffled epoch after epoch with `seed`); returns seconds."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return 0.0
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    rng = np.random.default_rng(seed)
    order = []
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        if not order:
            order = list(rng.permutation(len(batches)))
        loss = forward(model, batches[order.pop()])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 10 == 0:
            logger.info("step %d loss %.4f", step, loss.item())
    model.eval()
    return time.perf_counter() - start


def ptqat_row(model, name, seed, calibration, args, extra):
    import peft

    import hfq

    ratio, selection = ROWS[name]
    config = hfq.PTQATConfig(bits=4, act_bits=8, ratio=ratio, selection=selection, seed=seed, dataset=calibration,
                             metric=args.metric, discrepancy=args.discrepancy, **extra)
    model = peft.get_peft_model(model, config)
    trainable, total = model.get_nb_trainable_parameters()
    return model, {"trainable_layers": len(config.selected_layers), "layers": len(config.discrepancies),
                   "trainable_params": trainable, "selected_layers": config.selected_layers}


def run_llm(args, rows):
    from hfq.calibration.data import VALIDATION_TOKENS, from_dataset
    from hfq.data.text import load_text
    from hfq.eval.perplexity import perplexity
    from hfq.models import load_model

    text = load_text("wikitext2")
    _, tok = load_model(args.model)
    calibration = from_dataset("wikitext2", tok, n_samples=args.calib_samples, seq_len=args.seq_len, seed=0)
    windows = from_dataset("wikitext2", tok, n_samples=args.steps * args.batch_size, seq_len=args.seq_len, seed=1)
    batches = list(windows.split(args.batch_size))
    first, n_eval = (VALIDATION_TOKENS[0] // 512, args.val_windows) if args.validate else (0, 20)

    def score(model):
        with torch.no_grad():
            return perplexity(model, tok, text, 512, first, n_eval, quiet=True)["ppl"]

    def forward(model, batch):
        return model(input_ids=batch, labels=batch).loss

    if "fp" in args.rows:
        model, _ = load_model(args.model)
        rows["llm fp"] = {"ppl": score(model)}
        logger.info("llm fp %s", rows["llm fp"])
    if "fp_finetuned" in args.rows:  # the float model's Linear weights trained the same way: the domain-adaptation part
        model, _ = load_model(args.model)
        model.requires_grad_(False)
        head = model.get_output_embeddings()
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m is not head:
                m.weight.requires_grad_(True)
        seconds = train(model, batches, args.steps, args.lrs[0], 0, forward)
        rows["llm fp_finetuned seed0"] = {"ppl": score(model), "train_seconds": round(seconds, 1), "lr": args.lrs[0]}
        logger.info("llm fp_finetuned %s", rows["llm fp_finetuned seed0"])
    for name in [r for r in args.rows if r in ROWS]:
        for lr in args.lrs:
            for seed in ([0] if name == "ptq" else args.seeds):
                model, _ = load_model(args.model)
                model, row = ptqat_row(model, name, seed, calibration, args,
                                       {"act_dynamic": True, "task_type": "CAUSAL_LM", "seq_len": args.seq_len,
                                        "n_samples": args.calib_samples})
                seconds = train(model, batches, args.steps, lr, seed, forward) if ROWS[name][0] > 0 else 0.0
                merged = model.merge_and_unload()
                key = (f"llm {name}" + (f" lr{lr:g}" if len(args.lrs) > 1 else "")
                       + ("" if name == "ptq" else f" seed{seed}"))
                rows[key] = {"ppl": score(merged), "train_seconds": round(seconds, 1), "lr": lr, **row}
                logger.info("%s ppl %.3f (%d / %d layers trained, %.0f s)", key, rows[key]["ppl"],
                            row["trainable_layers"], row["layers"], seconds)
                yield


def run_petr(args, rows):
    from transformers import AutoModel

    from hfq.data.synthetic_nuscenes import SyntheticNuScenesDataset, calibration_batches, collate
    from hfq.eval.nuscenes import predict_nuscenes, run_detection_eval

    data = args.petr_data

    def load():
        return AutoModel.from_pretrained(args.petr_model, trust_remote_code=True).eval()

    def score(model, tag):
        import contextlib
        import io
        results = predict_nuscenes(model, data, "synthetic_val", batch_size=8)
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            m = run_detection_eval(results, data, "synthetic_val", output_dir=os.path.join(args.work, tag))
        return {"NDS": float(m["NDS"]), "mAP": float(m["mAP"])}

    model = load()
    calibration = calibration_batches(model, data, "synthetic_train", args.petr_calib_samples, 2)
    ds = SyntheticNuScenesDataset(data, "synthetic_train", model.get_image_processor(), model.config.class_names)
    rng = np.random.default_rng(12345)
    picks = rng.permutation(len(ds))[:args.petr_train_samples]
    items = [ds[int(i)] for i in picks]
    batches = [collate(items[i:i + args.batch_size]) for i in range(0, len(items), args.batch_size)]

    def forward(model, batch):
        return model(pixel_values=batch["pixel_values"], lidar2img=batch["lidar2img"], labels=batch["labels"]).loss

    if "fp" in args.rows:
        rows["petr fp"] = score(model, "fp")
        logger.info("petr fp %s", rows["petr fp"])
    for name in [r for r in args.rows if r in ROWS]:
        for seed in ([0] if name == "ptq" else args.seeds):
            model, row = ptqat_row(load(), name, seed, calibration, args, {})
            seconds = train(model, batches, args.petr_steps, args.petr_lr, seed, forward) if ROWS[name][0] > 0 else 0.0
            merged = model.merge_and_unload()
            key = f"petr {name}" + ("" if name == "ptq" else f" seed{seed}")
            rows[key] = {**score(merged, key.replace(" ", "_")), "train_seconds": round(seconds, 1),
                         "lr": args.petr_lr, **row}
            logger.info("%s NDS %.4f mAP %.4f (%d / %d layers trained, %.0f s)", key, rows[key]["NDS"],
                        rows[key]["mAP"], row["trainable_layers"], row["layers"], seconds)
            yield


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("llm", "petr"), required=True)
    p.add_argument("--rows", nargs="+", default=["fp", "fp_finetuned", *ROWS])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--metric", default="mse")
    p.add_argument("--discrepancy", default="isolation")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seq-len", type=int, default=256, help="LLM training / calibration window")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-5], help="LLM learning rate(s), chosen on --validate")
    p.add_argument("--validate", action="store_true", help="LLM: score validation windows, not 0-19")
    p.add_argument("--val-windows", type=int, default=20)
    p.add_argument("--petr-model", default=os.path.join(ROOT, "runs/petr-tiny-synthetic/model"))
    p.add_argument("--petr-data", default=os.path.join(ROOT, "runs/petr-tiny-synthetic/data"))
    p.add_argument("--petr-calib-samples", type=int, default=8)
    p.add_argument("--petr-train-samples", type=int, default=400)
    p.add_argument("--petr-steps", type=int, default=200)
    p.add_argument("--petr-lr", type=float, default=1e-4)
    p.add_argument("--work", default=os.path.join(ROOT, "runs/ptqat"))
    p.add_argument("--out", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.quiet:
        from hfq.progress import set_quiet
        set_quiet(True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    info = run_info(args.threads)
    suffix = "_val" if args.validate else ""
    out = args.out or os.path.join(ROOT, f"benchmarks/results/ptqat_{args.part}{suffix}.json")
    rows: dict = {}
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "work", "quiet")}
    key = "ppl" if args.part == "llm" else "NDS"
    for _ in (run_llm if args.part == "llm" else run_petr)(args, rows):
        write_json(out, {**info, "settings": settings, "rows": rows, "summary": seed_summary(rows, key)})
    write_json(out, {**info, "settings": settings, "rows": rows, "summary": seed_summary(rows, key)})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
