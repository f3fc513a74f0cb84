"""CFWS on a RepVGG trained on real images: scikit-learn's bundled digits (1,797 real 8x8 scans, upsampled to 32x32;
a fixed stratified 80 / 20 split, the 360 held-out images scored). Per seed (training init and order) a small RepVGG
is trained with its branches, fused, and quantized W8A8 every way; held-out top-1 mean +- std over the seeds, and the
centre vs neighbour weight statistics of the fused kernels that motivate the split.

    python benchmarks/cfws.py --seeds 0 1 2

Rows (all static per-tensor int8 activations on 32 training images, symmetric int8 weights, saved + reloaded):
  fp_branches / fp_fused   the float model before / after reparameterize()
  rtn_tensor / rtn_channel plain int8 of the fused model, one weight scale per tensor / per output channel, min/max
  kl_channel               per-channel, activation thresholds by TensorRT entropy calibration
  cfws_minmax / cfws_kl / cfws_improved_kl   the coarse & fine split with min/max, KL, or our improved KL
"""
import argparse
import copy
import json
import logging
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from hfq.eval.provenance import run_info, seed_summary, write_json  # noqa: E402

logger = logging.getLogger("cfws")
ROWS = {
    "rtn_tensor": {"split": False, "weight_granularity": "tensor", "act_observer": "minmax"},
    "rtn_channel": {"split": False, "act_observer": "minmax"},
    "kl_channel": {"split": False, "act_observer": "kl"},
    "cfws_minmax": {"act_observer": "minmax"},
    "cfws_kl": {"act_observer": "kl"},
    "cfws_improved_kl": {"act_observer": "kl_improved"},
}


def digits(size=32):
    """(train_x, train_y, test_x, test_y): digits upsampled (bilinear) to size x size, 1 channel, standardised with
    the training mean / std; stratified 80 / 20 split with random_state 0 (the same for every seed)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.tensor(d.target)
    tr, te = train_test_split(np.arange(len(y)), test_size=0.2, stratify=d.target, random_state=0)
    mean, std = x[tr].mean(), x[tr].std()
    x = (x - mean) / std
    return x[tr], y[tr], x[te], y[te]


def model_config():
    """RepVGG-A0's block layout shrunk for 32 x 32 digits: blocks [1, 2, 4, 1], widths 16 / 32 / 64 / 128 (A0's
    multipliers on a base of 32 instead of 64), 1 input channel, 10 classes."""
    from hfq.modeling.repvgg import RepVGGConfig

    return RepVGGConfig(num_blocks=[1, 2, 4, 1], width_multiplier=[0.75, 0.75, 0.75, 2.5],
                        base_channels=[16, 32, 64, 32], in_channels=1, num_labels=10, image_size=32)


def train(seed, x, y, epochs, lr, batch_size):
    from hfq.modeling.repvgg import RepVGGForImageClassification

    torch.manual_seed(seed)
    model = RepVGGForImageClassification(model_config())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(y) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch_size):
            idx = order[i:i + batch_size]
            loss = model(pixel_values=x[idx], labels=y[idx]).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def top1(model, x, y):
    return float((model(pixel_values=x).logits.argmax(-1) == y).float().mean())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--calib-samples", type=int, default=32, help="the official calib_num")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/cfws.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    info = run_info(args.threads)

    from transformers import AutoModelForImageClassification

    import hfq
    from hfq.quant.cfws import centre_neighbour_stats

    xtr, ytr, xte, yte = digits()
    rows, stats = {}, None
    for seed in args.seeds:
        t0 = time.time()
        model = train(seed, xtr, ytr, args.epochs, args.lr, args.batch_size)
        t_train = time.time() - t0
        rows[f"fp_branches seed{seed}"] = {"top1": top1(model, xte, yte), "train_seconds": round(t_train, 1)}
        fused = copy.deepcopy(model).reparameterize()
        rows[f"fp_fused seed{seed}"] = {"top1": top1(fused, xte, yte)}
        if stats is None:
            stats = {n: centre_neighbour_stats(m.weight) for n, m in fused.named_modules()
                     if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)}
        g = torch.Generator().manual_seed(seed)
        calib = [{"pixel_values": xtr[torch.randperm(len(ytr), generator=g)[:args.calib_samples]]}]
        for name, kwargs in ROWS.items():
            cfg = hfq.CFWSConfig(**kwargs)
            q = hfq.quantize(copy.deepcopy(model), cfg, calibration=calib)
            with tempfile.TemporaryDirectory() as d:
                q.save_pretrained(d)
                q = AutoModelForImageClassification.from_pretrained(d, trust_remote_code=True).eval()
            rows[f"{name} seed{seed}"] = {"top1": top1(q, xte, yte), "config": cfg.to_dict()}
        logger.info("seed %d: %s", seed, json.dumps({k.rsplit(" seed", 1)[0]: round(v["top1"], 4)
                                                     for k, v in rows.items() if k.endswith(f"seed{seed}")}))
    summary = seed_summary(rows, "top1")
    result = {"task": "RepVGG (A0 layout, shrunk) on scikit-learn digits upsampled to 32x32, held-out top-1, W8A8",
              "data": {"train": len(ytr), "test": len(yte), "split": "stratified 80/20, random_state 0"},
              "config": model_config().to_dict(), "train": {"epochs": args.epochs, "lr": args.lr,
                                                             "batch_size": args.batch_size, "optimizer": "AdamW + one-cycle"},
              "calibration": {"samples": args.calib_samples, "from": "train split, drawn per seed"},
              "summary": summary, "rows": rows, "fused_weight_stats_seed0": stats, **info}
    write_json(args.out, result)
    print(json.dumps({k: {"mean": round(v["mean"], 4), "std": round(v["std"], 4)} for k, v in summary.items()},
                     indent=1))


if __name__ == "__main__":
    main()
