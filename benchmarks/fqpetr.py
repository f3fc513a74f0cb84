"""FQ-PETR on the synthetic nuScenes benchmark: PETR trained with the standard 3D PE and with QFPE (same recipe and
schedule), each evaluated FP and under every W8A8 scheme of the same machinery, by the devkit's DetectionEval on the
val scenes; plus the position-embedding / image-feature range gap at every decoder layer's key input, the lookup
table error table (DULUT 32+32 vs one 256-entry table), and CPU latency. Every quantized row is saved and reloaded
before evaluation (the checkpoint a user gets).

    python benchmarks/fqpetr.py            # trains both models first when runs/fqpetr-{petr,qfpe}/model are missing

Rows (hfq.FQPETRConfig unless said; all W8A8 per-tensor symmetric weights, static per-tensor activations, min/max):
  ptq          hfq.PTQConfig: every conv / linear / attention matmul / PE add in int8, softmax and non-linears float
  rtn_int8     + the softmax input quantized as raw int8 logits (static per tensor): the plain fully-int8 baseline
  smoothquant  rtn_int8 + SmoothQuant-style smoothing (alpha 0.5, SmoothQuant's default, not tuned) of every linear
  qans         + QANS softmax input instead (beta per layer), non-linears float
  dulut        raw int8 softmax input + every non-linear (exp, sigmoid, inverse sigmoid) through DULUT 32+32
  fqpetr       QANS + DULUT (FQ-PETR)
  fqpetr_256   QANS + one 256-entry linear table per non-linear (the table baseline, end to end)
  fqpetr_sq    FQ-PETR + SmoothQuant-style smoothing (the paper's best PETR row is "SQ* + QANS")
"""
import argparse
import copy
import json
import logging
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
from petr_int8 import position_add_ranges  # noqa: E402

from hfq.eval.provenance import run_info, write_json  # noqa: E402

logger = logging.getLogger("fqpetr")
AIDS = "aids: SMCA projection prior, 2-D auxiliary head, query denoising (recipes/petr-tiny-synthetic.py defaults)"
SCHEMES = {
    "ptq": ("PTQConfig", {}),
    "rtn_int8": ("FQPETRConfig", {"softmax_input": "raw", "lut": None}),
    "smoothquant": ("FQPETRConfig", {"softmax_input": "raw", "lut": None, "smooth_alpha": 0.5}),
    "qans": ("FQPETRConfig", {"softmax_input": "qans", "lut": None}),
    "dulut": ("FQPETRConfig", {"softmax_input": "raw", "lut": "dulut"}),
    "fqpetr": ("FQPETRConfig", {}),
    "fqpetr_256": ("FQPETRConfig", {"lut": "single"}),
    "fqpetr_sq": ("FQPETRConfig", {"smooth_alpha": 0.5}),
}
# canonical input ranges for the function-level table (exp: QANS beta = 20, the note's lossless value)
CANONICAL = {"exp": (-20.0, 0.0), "sigmoid": (-8.0, 8.0), "inverse_sigmoid": (0.0, 1.0), "gelu": (-8.0, 8.0),
             "silu": (-8.0, 8.0)}


def summary(m):
    return {k: float(m[k]) for k in ("mAP", "NDS", "mATE", "mASE", "mAOE", "mAVE", "mAAE")}


def latency(model, batch, repeats):
    """Median seconds of one forward over `batch` (after one warm-up)."""
    from hfq.eval.speed import median_seconds

    return median_seconds(lambda: model(**batch), repeats)


@torch.no_grad()
def decoder_latency(model, batch, repeats):
    """Median seconds spent inside the decoder (the transformer: the part the PE / softmax issues are about)."""
    spent = []
    dec = model.model.decoder
    pre = dec.register_forward_pre_hook(lambda m, a: spent.append(-time.perf_counter()))
    post = dec.register_forward_hook(lambda m, a, o: spent.append(time.perf_counter()))
    try:
        model(**batch)
        spent.clear()
        for _ in range(repeats):
            model(**batch)
    finally:
        pre.remove()
        post.remove()
    return statistics.median([spent[i] + spent[i + 1] for i in range(0, len(spent), 2)])


@torch.no_grad()
def official_layout_gap(data):
    """PE vs image-feature range at the first decoder layer's key input of the official PETR layout (R50 + CPFPN,
    256-d, 64 depth bins, position encoder 192-1024-256) with random-initialised weights, on one synthetic sample
    at 256 x 704: the gap the inverse-sigmoid input (+-11.5) produces through an untrained position encoder."""
    from hfq.data.synthetic_nuscenes import calibration_batches
    from hfq.modeling.petr import PetrConfig, PetrForObjectDetection3D

    out = {}
    for pe in ("petr", "qfpe"):
        torch.manual_seed(0)
        model = PetrForObjectDetection3D(PetrConfig(pe_type=pe, input_size=(256, 704))).eval()
        batch = calibration_batches(model, data, "synthetic_train", 1, 1)
        r = position_add_ranges(model, batch)["model.decoder.layers.0.key_pos_add"]
        out[pe] = {"feature_absmax": r["feature"]["absmax"], "pe_absmax": r["pe"]["absmax"],
                   "absmax_ratio_pe_over_feature": r["pe"]["absmax"] / r["feature"]["absmax"]}
    return out


@torch.no_grad()
def int8_linear_latency(fp, q, batch, repeats):
    """Seconds per forward spent in the linear layers the quantized model runs int8 x int8 (`torch._int_mm`: its
    static per-tensor scales), against the same layers in fp32 (F.linear), each fed the input it sees on `batch`
    (median of `repeats`). The rest of the quantized model runs the reference (dequantize / fake-quantize)
    simulation, whose time says nothing about int8 deployment."""
    import torch.nn.functional as F

    from hfq.nn import QuantLinear
    from hfq.nn.linear import kernel_problem

    inputs, hooks = {}, []

    def keep(name, x):
        inputs.setdefault(name, x.detach().clone())

    for n, m in q.named_modules():
        if isinstance(m, QuantLinear) and kernel_problem("int_mm", m.weight_args, m.act_args) is None:
            hooks.append(m.register_forward_pre_hook(lambda mod, a, n=n: keep(n, a[0])))
    q(**batch)
    for h in hooks:
        h.remove()
    layers = {n: (q.get_submodule(n), fp.get_submodule(n)) for n in inputs}

    def total(run):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            for n, x in inputs.items():
                run(n, x)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    int8 = total(lambda n, x: layers[n][0](x))
    fp32 = total(lambda n, x: F.linear(x, layers[n][1].weight, layers[n][1].bias))
    return {"layers": len(inputs), "int8_s": int8, "fp32_s": fp32, "speedup": fp32 / int8}


def table_rows(calibrated):
    """Error of DULUT (32+32) and the 256-entry linear table per function and input range (16-bit input codes;
    output float and rounded to 8 bits over the output range)."""
    from hfq.quant.lut import dulut, fit_dulut, fit_single, linear_lut, table_error

    rows = []
    for where, fn, lo, hi in [("canonical", f, *r) for f, r in CANONICAL.items()] + calibrated:
        idx, val = fit_dulut(fn, lo, hi)
        single = fit_single(fn, lo, hi)
        row = {"function": fn, "range": [lo, hi], "where": where}
        for label, approx in (("dulut_32_32", lambda x: dulut(x, lo, hi, idx, val)),
                              ("single_256", lambda x: linear_lut(x, lo, hi, single))):
            row[label] = {"float_out": table_error(approx, fn, lo, hi, input_bits=16),
                          "int8_out": table_error(approx, fn, lo, hi, input_bits=16, output_bits=8)}
        for out in ("float_out", "int8_out"):
            row[f"dulut_le_256_{out}"] = {k: row["dulut_32_32"][out][k] <= row["single_256"][out][k]
                                          for k in ("max", "mean")}
        rows.append(row)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=os.path.join(os.path.dirname(ROOT), "runs"))
    p.add_argument("--data", default=None, help="dataset root (default: <runs>/petr-tiny-synthetic/data)")
    p.add_argument("--calib-samples", type=int, default=32, help="the paper's 32 calibration images")
    p.add_argument("--train-minutes", type=float, default=32.0, help="only used when a model is missing")
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--act-bits", type=int, default=8, help="activation bits of every row (8 = the paper's W8A8; "
                   "fewer = a stress test)")
    p.add_argument("--models", default="petr,qfpe", help="which trained models: petr (standard PE), qfpe")
    p.add_argument("--latency-repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(ROOT, "results/fqpetr.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    info = run_info(args.threads)
    data = args.data or os.path.join(args.runs, "petr-tiny-synthetic/data")

    from transformers import AutoModel

    import hfq
    from hfq.data.synthetic_nuscenes import calibration_batches
    from hfq.eval.nuscenes import evaluate_detection
    from hfq.nn import LUTFunction, QuantSoftmax

    result = {"task": "tiny PETR (official head sizes: 256-d, 8 heads, FFN 2048, 64 depth bins, position encoder "
                      "192-1024-256; 3 decoder layers, small CNN backbone), synthetic nuScenes val, CPU",
              "data": os.path.relpath(data, os.path.dirname(ROOT)), "calibration": {
                  "split": "synthetic_train", "samples": args.calib_samples, "batch_size": 2}, "models": {}}
    result["act_bits"] = args.act_bits
    for pe in args.models.split(","):
        run_dir = os.path.join(args.runs, f"fqpetr-{pe}")
        model_dir = os.path.join(run_dir, "model")
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            logger.info("training the %s model (%.0f min)", pe, args.train_minutes)
            subprocess.run([sys.executable, os.path.join(os.path.dirname(ROOT), "recipes/petr-tiny-synthetic.py"),
                            "--out", run_dir, "--data", data, "--embed-dims", "256", "--heads", "8", "--ffn-dims",
                            "2048", "--depth-num", "64", "--pe-type", pe, "--minutes", str(args.train_minutes),
                            "--eval-every", "0", "--threads", "1"], check=True)
        torch.manual_seed(0)
        fp = AutoModel.from_pretrained(model_dir, trust_remote_code=True).eval()
        calib = calibration_batches(fp, data, "synthetic_train", args.calib_samples, 2)
        ranges = position_add_ranges(fp, calib[:4])
        keys = {n: r for n, r in ranges.items() if n.endswith("key_pos_add")}
        coords = []
        hook = fp.model.position_encoder[0].register_forward_pre_hook(lambda m, a: coords.append(a[0].abs().max()))
        fp(**calib[0])
        hook.remove()
        with open(os.path.join(run_dir, "result.json")) as fh:  # written by the training recipe
            trained = json.load(fh)
        entry = {"row_name": f"PETR ({'QFPE' if pe == 'qfpe' else 'standard 3D PE'}; {AIDS})",
                 "model_dir": os.path.relpath(model_dir, os.path.dirname(ROOT)),
                 "training": {k: trained.get(k) for k in ("command", "git_commit", "commit", "date", "threads",
                                                          "train_steps", "final_loss", "seconds", "args", "mAP",
                                                          "NDS", "num_parameters") if k in trained},
                 "position_encoder_input_absmax": float(coords[0]),
                 "key_input_ranges": {n: {"feature_absmax": r["feature"]["absmax"], "pe_absmax": r["pe"]["absmax"],
                                          "feature_abs_p99.9": r["feature"]["abs_p99.9"],
                                          "pe_abs_p99.9": r["pe"]["abs_p99.9"],
                                          "absmax_ratio_pe_over_feature": r["pe"]["absmax"] / r["feature"]["absmax"]}
                                      for n, r in keys.items()}}
        t = time.time()
        entry["fp"] = summary(evaluate_detection(fp, data, split="val", output_dir=os.path.join(run_dir, "eval_fp")))
        entry["fp"]["eval_seconds"] = round(time.time() - t, 1)
        bench_batch = calib[0]
        entry["latency_fp32_s"] = {"model": latency(fp, bench_batch, args.latency_repeats),
                                   "decoder": decoder_latency(fp, bench_batch, args.latency_repeats)}
        logger.info("%s FP %s", pe, json.dumps(entry["fp"]))
        entry["rows"] = {}
        for name in args.schemes.split(","):
            cls, kwargs = SCHEMES[name]
            cfg = getattr(hfq, cls)(**kwargs, act_bits=args.act_bits)
            t = time.time()
            q = hfq.quantize(copy.deepcopy(fp), cfg, calibration=calib)
            t_q = time.time() - t
            qdir = os.path.join(run_dir, f"q_{name}_a{args.act_bits}")
            q.save_pretrained(qdir)
            q = AutoModel.from_pretrained(qdir, trust_remote_code=True).eval()
            row = summary(evaluate_detection(q, data, split="val",
                                             output_dir=os.path.join(run_dir, f"eval_{name}_a{args.act_bits}")))
            row.update(config=cfg.to_dict(), quantize_seconds=round(t_q, 1),
                       nds_ratio_to_fp=row["NDS"] / entry["fp"]["NDS"], mAP_ratio_to_fp=row["mAP"] / entry["fp"]["mAP"])
            row["latency_s"] = {"model": latency(q, bench_batch, args.latency_repeats),
                                "decoder": decoder_latency(q, bench_batch, args.latency_repeats)}
            if name == "ptq":
                entry["int8_linear_latency"] = int8_linear_latency(fp, q, bench_batch, 20)
            betas = {n: float(m.clip) for n, m in q.named_modules() if isinstance(m, QuantSoftmax)}
            if betas:
                row["softmax_clip"] = betas
            tables = {n: {"fn": m.fn, "range": m.input_range.tolist()} for n, m in q.named_modules()
                      if isinstance(m, LUTFunction)}
            if tables:
                row["tables"] = tables
            entry["rows"][name] = row
            logger.info("%s %s NDS %.4f mAP %.4f (FP %.4f / %.4f)", pe, name, row["NDS"], row["mAP"],
                        entry["fp"]["NDS"], entry["fp"]["mAP"])
        result["models"][pe] = entry
    calibrated = []
    for pe, entry in result["models"].items():
        for n, t in entry["rows"].get("fqpetr", {}).get("tables", {}).items():
            lo, hi = t["range"]
            if t["fn"] != "exp" or not any(c[1] == "exp" and c[3] == hi and c[2] == lo for c in calibrated):
                calibrated.append((f"{pe}: {n}", t["fn"], lo, hi))
    if args.act_bits == 8:
        result["lut_error_table"] = table_rows(calibrated)
        result["official_layout_random_init_gap"] = official_layout_gap(data)
    result.update(info)
    write_json(args.out, result)
    print(json.dumps({pe: {"fp": {k: e["fp"][k] for k in ("NDS", "mAP")},
                           **{n: {k: round(r[k], 4) for k in ("NDS", "mAP", "nds_ratio_to_fp")}
                              for n, r in e["rows"].items()},
                           "pe_over_feature_absmax": [round(v["absmax_ratio_pe_over_feature"], 2)
                                                      for v in e["key_input_ranges"].values()]}
                      for pe, e in result["models"].items()}, indent=1))


if __name__ == "__main__":
    main()
