"""Tiny PETR on synthetic nuScenes, CPU only: generate data -> train -> save_pretrained -> reload (custom
code, trust_remote_code) -> devkit DetectionEval on the separately generated val scenes -> JSON.

    python recipes/petr-tiny-synthetic.py --out runs/petr-tiny-synthetic --minutes 15

Training stops at --max-steps or after --minutes of wall clock (whichever first); the cosine schedule
follows whichever budget is closer to exhausted, so a busy machine still gets a full schedule.
"""
import argparse
import json
import logging
import math
import os
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from hfq.data.synthetic_nuscenes import DEFAULT_CLASSES, SyntheticNuScenesDataset, collate, generate_synthetic_nuscenes
from hfq.eval.nuscenes import evaluate_detection
from hfq.modeling.petr import NUSCENES_CLASSES, PetrConfig, PetrForObjectDetection3D

logger = logging.getLogger("petr-tiny-synthetic")


def tiny_config(input_size=(96, 192)):
    """Low resolution, 5-stage plain CNN + CPFPN (stride 16), 128-d, 3 layers, 150 queries, 64 LID bins,
    10 query-denoising groups. Ranges shrunk to the synthetic scenes (objects within ~30 m): anchors
    over +-32 m instead of +-51.2 m, PE range +-40 m."""
    return PetrConfig(
        backbone_type="simple", simple_channels=[16, 32, 64, 96, 128], use_neck=True, neck_channels=96,
        embed_dims=128, num_queries=150, num_decoder_layers=3, num_heads=4, ffn_dims=512, dropout=0.0,
        depth_num=64, input_size=input_size, class_names=NUSCENES_CLASSES, max_num=100, dn_groups=10,
        pc_range=(-32.0, -32.0, -5.0, 32.0, 32.0, 3.0), position_range=(-40.0, -40.0, -10.0, 40.0, 40.0, 10.0),
        post_center_range=(-40.0, -40.0, -10.0, 40.0, 40.0, 10.0),
        image_mean=(103.53, 116.28, 123.675), image_std=(57.375, 57.12, 58.395),
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/petr-tiny-synthetic")
    p.add_argument("--data", default=None, help="dataset root (default: <out>/data)")
    p.add_argument("--train-scenes", type=int, default=80)
    p.add_argument("--val-scenes", type=int, default=16)
    p.add_argument("--samples-per-scene", type=int, default=6)
    p.add_argument("--minutes", type=float, default=15.0, help="wall-clock training budget")
    p.add_argument("--max-steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="1 is fastest on a shared 2-core box (2 threads spin under contention)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    data = args.data or os.path.join(args.out, "data")
    t0 = time.time()
    if not os.path.isfile(os.path.join(data, "v1.0-synthetic", "splits.json")):
        generate_synthetic_nuscenes(data, num_scenes={"synthetic_train": args.train_scenes,
                                                      "synthetic_val": args.val_scenes},
                                    samples_per_scene=args.samples_per_scene, classes=DEFAULT_CLASSES, seed=args.seed)
    t_data = time.time() - t0

    config = tiny_config()
    model = PetrForObjectDetection3D(config)
    ds = SyntheticNuScenesDataset(data, "synthetic_train", model.get_image_processor(), config.class_names)
    cache = [ds[i] for i in tqdm(range(len(ds)), desc="load train split")]  # images are small: keep in RAM
    for item in cache:
        item["pixel_values"] = item["pixel_values"].half()
    logger.info("train samples %d, boxes/sample %.1f", len(cache),
                np.mean([len(c["labels"]["class_labels"]) for c in cache]))

    # one learning rate: the official x0.1 for the backbone is for ImageNet-pretrained weights, ours start random
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    rng = np.random.default_rng(args.seed)
    budget = args.minutes * 60
    model.train()
    t_start = time.time()
    step, order, pos, losses = 0, rng.permutation(len(cache)), 0, []
    bar = tqdm(total=args.max_steps, desc="train")
    while True:
        progress = max(step / args.max_steps, (time.time() - t_start) / budget)
        if progress >= 1.0:
            break
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * progress))
        for g in opt.param_groups:
            g["lr"] = lr
        if pos + args.batch_size > len(order):
            order, pos = rng.permutation(len(cache)), 0
        batch = collate([cache[i] for i in order[pos:pos + args.batch_size]])
        pos += args.batch_size
        out = model(pixel_values=batch["pixel_values"].float(), lidar2img=batch["lidar2img"], labels=batch["labels"])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 35.0)
        opt.step()
        losses.append(out.loss.item())
        step += 1
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}", lr=f"{lr:.2e}")
            logger.info("step %d loss %.4f lr %.2e elapsed %.0fs", step, np.mean(losses[-50:]), lr,
                        time.time() - t_start)
    bar.close()
    t_train = time.time() - t_start

    model_dir = os.path.join(args.out, "model")
    model.save_pretrained(model_dir)
    t1 = time.time()
    metrics = evaluate_detection(model_dir, data, split="val", output_dir=os.path.join(args.out, "eval_val"))
    t_eval = time.time() - t1
    result = {
        "task": "tiny PETR, synthetic nuScenes (CPU)", "split": "synthetic_val",
        "mAP": metrics["mAP"], "NDS": metrics["NDS"],
        **{k: metrics[k] for k in ("mATE", "mASE", "mAOE", "mAVE", "mAAE")},
        "per_class_AP": {k: float(v) for k, v in metrics["per_class_AP"].items()},
        "classes_in_data": list(DEFAULT_CLASSES),
        "train_steps": step, "batch_size": args.batch_size, "train_samples": len(cache),
        "val_scenes": args.val_scenes, "final_loss": float(np.mean(losses[-50:])),
        "seconds": {"data": round(t_data, 1), "train": round(t_train, 1), "eval": round(t_eval, 1),
                    "total": round(time.time() - t0, 1)},
        "threads": args.threads, "torch": torch.__version__, "args": vars(args),
        "num_parameters": sum(p_.numel() for p_ in model.parameters()),
    }
    with open(os.path.join(args.out, "result.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    logger.info("result: %s", json.dumps({k: result[k] for k in ("mAP", "NDS", "mATE", "mASE", "mAOE", "mAVE",
                                                                   "mAAE", "train_steps", "seconds")}))


if __name__ == "__main__":
    main()
