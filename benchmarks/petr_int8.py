"""PETR W8A8 PTQ on the synthetic nuScenes benchmark: FP vs `hfq.PTQConfig()` (BatchNorm folded, per-tensor
symmetric int8 weights, static per-tensor int8 activations from a min/max observer on a few training samples, on
every conv / linear, the feature + 3D-PE adds and both attention matmuls: Q-PETR's "standard 8-bit per-tensor PTQ"
baseline), judged by the devkit's DetectionEval; plus the value ranges of image features vs position embeddings
(Q-PETR's magnitude gap), observed on the FP model. The quantized model is saved and reloaded before evaluation, so
the row measures the checkpoint a user gets (int8 weights on disk, integer storage, dequantized float compute).

    python benchmarks/petr_int8.py --model-dir runs/petr-tiny-synthetic/model --data runs/petr-tiny-synthetic/data

Without a saved model at --model-dir, the tiny model is trained first with recipes/petr-tiny-synthetic.py.
"""
import argparse
import copy
import json
import logging
import os
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from hfq.eval.provenance import run_info, write_json

logger = logging.getLogger("petr_int8")


def summary(m):
    keys = ("mAP", "NDS", "mATE", "mASE", "mAOE", "mAVE", "mAAE")
    out = {k: float(m[k]) for k in keys}
    out["per_class_AP"] = {k: float(v) for k, v in m["per_class_AP"].items()}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default=os.path.join(ROOT, "runs/petr-tiny-synthetic/model"))
    p.add_argument("--data", default=None, help="dataset root (default: <model-dir>/../data)")
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--calib-batch-size", type=int, default=2)
    p.add_argument("--train-minutes", type=float, default=18.0, help="only used when the model is missing")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/petr_int8.json"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    info = run_info(args.threads)  # at the start: the commit whose code runs
    run_dir = os.path.dirname(os.path.abspath(args.model_dir))
    data = args.data or os.path.join(run_dir, "data")
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        logger.info("no model at %s: training it with the recipe (%.0f min)", args.model_dir, args.train_minutes)
        subprocess.run([sys.executable, os.path.join(ROOT, "recipes/petr-tiny-synthetic.py"), "--out", run_dir,
                        "--data", data, "--minutes", str(args.train_minutes), "--threads", str(args.threads)],
                       check=True)

    from transformers import AutoModel

    import hfq
    from hfq.data.synthetic_nuscenes import calibration_batches
    from hfq.eval.nuscenes import evaluate_detection

    torch.manual_seed(0)
    fp = AutoModel.from_pretrained(args.model_dir, trust_remote_code=True).eval()
    t0 = time.time()
    m_fp = evaluate_detection(fp, data, split="val", output_dir=os.path.join(run_dir, "eval_fp"))
    t_fp = time.time() - t0

    calib = calibration_batches(fp, data, "synthetic_train", args.calib_samples, args.calib_batch_size)
    stats = position_add_ranges(fp, calib)
    cfg = hfq.PTQConfig()
    t0 = time.time()
    q = hfq.quantize(copy.deepcopy(fp), cfg, calibration=calib)
    t_calib = time.time() - t0
    qdir = os.path.join(run_dir, "w8a8")
    q.save_pretrained(qdir)
    q = AutoModel.from_pretrained(qdir, trust_remote_code=True).eval()
    t0 = time.time()
    m_q = evaluate_detection(q, data, split="val", output_dir=os.path.join(run_dir, "eval_w8a8"))
    t_q = time.time() - t0

    key0 = next(k for k in stats if k.endswith("layers.0.key_pos_add"))
    feat, pe = stats[key0]["feature"], stats[key0]["pe"]
    add = q.get_submodule(key0)
    gap = {"absmax_ratio_pe_over_feature": pe["absmax"] / feat["absmax"],
           "p99.9_ratio_pe_over_feature": pe["abs_p99.9"] / feat["abs_p99.9"],
           "int8_step_feature": float(add.a_quant.scale), "int8_step_pe": float(add.b_quant.scale)}
    fp_s, q_s = summary(m_fp), summary(m_q)
    result = {
        "task": "tiny PETR, synthetic nuScenes val, W8A8 static PTQ (hfq_ptq, saved and reloaded; CPU)",
        "model_dir": os.path.relpath(os.path.abspath(args.model_dir), ROOT),
        "config": cfg.to_dict(),
        "fp": fp_s, "w8a8": q_s,
        "drop": {"mAP": fp_s["mAP"] - q_s["mAP"], "NDS": fp_s["NDS"] - q_s["NDS"],
                 "mAP_relative": (fp_s["mAP"] - q_s["mAP"]) / max(fp_s["mAP"], 1e-12)},
        "ranges": {"image_feature": feat, "position_embedding": pe, "gap": gap,
                   "where": f"{key0}: the two operands of feature + PE (cross-attention keys) of the FP model over "
                            "the calibration batches; image_feature = input_proj output, position_embedding = 3D PE "
                            "+ multiview sine PE; int8 steps from the quantized model's static scales"},
        "ranges_all_adds": stats,
        "calibration": {"split": "synthetic_train", "samples": args.calib_samples,
                        "batch_size": args.calib_batch_size, "observer": cfg.act_observer},
        "seconds": {"eval_fp": round(t_fp, 1), "quantize_and_calibrate": round(t_calib, 1),
                    "eval_w8a8": round(t_q, 1)},
        **info,
    }
    write_json(args.out, result)
    print(json.dumps({"fp": {k: fp_s[k] for k in ("mAP", "NDS")}, "w8a8": {k: q_s[k] for k in ("mAP", "NDS")},
                      "drop": result["drop"], "feature": feat, "pe": pe, "gap": gap}, indent=2))


@torch.no_grad()
def position_add_ranges(model, batches) -> dict:
    """Range of both operands of every position-embedding add (modules marked `hfq_op = "add"`) over `batches`:
    min, max, absmax and percentiles of |x| (from all values)."""
    from hfq.arch import marked_op

    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, []).append([t.detach() for t in a]))
             for n, m in model.named_modules() if marked_op(m) == "add"]
    for b in batches:
        model(pixel_values=b["pixel_values"], lidar2img=b["lidar2img"])
    for h in hooks:
        h.remove()

    def describe(values):
        x = torch.cat([v.flatten() for v in values]).float()
        a = x.abs().numpy()
        return {"min": float(x.min()), "max": float(x.max()), "absmax": float(a.max()),
                "abs_p99.9": float(np.percentile(a, 99.9)), "abs_p99": float(np.percentile(a, 99.0)),
                "abs_mean": float(a.mean())}

    return {n: {"feature" if "key_pos" in n else "query": describe([c[0] for c in calls]),
                "pe": describe([c[1] for c in calls])} for n, calls in seen.items()}


if __name__ == "__main__":
    main()
