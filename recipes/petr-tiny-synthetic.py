"""Tiny PETR on synthetic nuScenes, CPU only: generate data -> train -> save_pretrained -> reload (custom
code, trust_remote_code) -> devkit DetectionEval on the separately generated val scenes -> JSON.

    python recipes/petr-tiny-synthetic.py --out runs/petr-tiny-synthetic --minutes 18

Training stops at --max-steps or after --minutes of wall clock (whichever first); the cosine schedule
follows whichever budget is closer to exhausted, so a busy machine still gets a full schedule.
The data: all 10 nuScenes classes (round-robin per scene, so every class is in every split; the devkit's
mAP averages all 10), objects 5-20 m from the ego path, a distinct colour per class.
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

from hfq.data.synthetic_nuscenes import CLASSES, SyntheticNuScenesDataset, collate, generate_synthetic_nuscenes
from hfq.eval.nuscenes import evaluate_detection, predict_nuscenes, run_detection_eval
from hfq.eval.provenance import run_info, write_json
from hfq.modeling.petr import NUSCENES_CLASSES, PetrConfig, PetrForObjectDetection3D

logger = logging.getLogger("petr-tiny-synthetic")


def tiny_config(input_size=(96, 192), channels=(16, 32, 64, 96, 128), queries=150, depth_num=32, dn_groups=10,
                embed_dims=128, layers=3, xy_range=30.0, pe_range=35.0, attn_prior_sigma=1.0, aux_2d_weight=1.0,
                memory_norm=False, content_query_init="zeros", pe_type="petr", num_heads=4, ffn_dims=None):
    """Low resolution, plain CNN + CPFPN over its last two stages (5 stages: output stride 16), 128-d,
    3 decoder layers, 150 queries, 32 LID bins, query denoising. Ranges shrunk to the synthetic scenes
    (objects within ~25 m of the ego): box / anchor range +-30 m instead of +-51.2 m, PE range +-35 m.

    attn_prior_sigma (not official PETR): the SMCA-style projection prior on the cross-attention. Without
    it a from-scratch PETR stays in the collapsed phase (every query outputs the class prior) far longer
    than a CPU budget allows; see PetrModel.projection_prior. aux_2d_weight (training only): the 2-D
    auxiliary head (per-cell class + depth of the covering projected box) that trains the random-init
    backbone quickly. Measured figures with and without these aids (and dn_groups, PETRv2's query denoising):
    benchmarks/results/petr_tiny_synthetic*.json. pe_type="qfpe": Q-PETR's quantization-friendly PE (same schedule)."""
    return PetrConfig(
        attn_prior_sigma=attn_prior_sigma, aux_2d_weight=aux_2d_weight, memory_norm=memory_norm,
        content_query_init=content_query_init, pe_type=pe_type,
        backbone_type="simple", simple_channels=list(channels), use_neck=True, neck_channels=channels[-1],
        embed_dims=embed_dims, num_queries=queries, num_decoder_layers=layers, num_heads=num_heads,
        ffn_dims=ffn_dims or 4 * embed_dims, dropout=0.0, depth_num=depth_num, input_size=input_size,
        class_names=NUSCENES_CLASSES, max_num=100, dn_groups=dn_groups,
        pc_range=(-xy_range, -xy_range, -5.0, xy_range, xy_range, 3.0),
        position_range=(-pe_range, -pe_range, -10.0, pe_range, pe_range, 10.0),
        post_center_range=(-pe_range, -pe_range, -10.0, pe_range, pe_range, 10.0),
        image_mean=(103.53, 116.28, 123.675), image_std=(57.375, 57.12, 58.395),
    )


def evaluate_in_memory(model, data, out_dir):
    """Devkit metrics of the model as it is (no save / reload); used for the periodic checks."""
    was_training = model.training
    results = predict_nuscenes(model, data, "synthetic_val", batch_size=8)
    model.train(was_training)
    import contextlib
    import io
    with contextlib.redirect_stderr(io.StringIO()):
        return run_detection_eval(results, data, "synthetic_val", output_dir=out_dir)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/petr-tiny-synthetic")
    p.add_argument("--data", default=None, help="dataset root (default: <out>/data)")
    p.add_argument("--train-scenes", type=int, default=300)
    p.add_argument("--val-scenes", type=int, default=24)
    p.add_argument("--samples-per-scene", type=int, default=4)
    p.add_argument("--objects", type=int, nargs=2, default=(10, 14), help="objects per scene (min, max)")
    p.add_argument("--object-range", type=float, nargs=2, default=(5.0, 20.0), help="metres from the ego path")
    p.add_argument("--image-size", type=int, nargs=2, default=(225, 400), help="rendered H W")
    p.add_argument("--input-size", type=int, nargs=2, default=(96, 192), help="network input H W")
    p.add_argument("--channels", type=int, nargs="+", default=(16, 32, 64, 96, 128))
    p.add_argument("--queries", type=int, default=150)
    p.add_argument("--depth-num", type=int, default=32)
    p.add_argument("--dn-groups", type=int, default=10)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--embed-dims", type=int, default=128, help="official PETR: 256")
    p.add_argument("--heads", type=int, default=4, help="official PETR: 8")
    p.add_argument("--ffn-dims", type=int, default=None, help="default 4 x embed dims (official PETR: 2048)")
    p.add_argument("--pe-type", default="petr", choices=("petr", "qfpe"), help="qfpe: Q-PETR's position embedding")
    p.add_argument("--attn-prior-sigma", type=float, default=1.0, help="0 = official PETR cross-attention")
    p.add_argument("--aux-2d", type=float, default=1.0, help="weight of the 2-D auxiliary loss (0 = off)")
    p.add_argument("--memory-norm", action="store_true")
    p.add_argument("--content-query-init", default="zeros", choices=("zeros", "query_pos"))
    p.add_argument("--minutes", type=float, default=18.0, help="wall-clock training budget")
    p.add_argument("--max-steps", type=int, default=100000)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=1000, help="devkit eval on val every N steps (0: end only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default=None,
                   help="also write the result JSON here (with command, commit, date), e.g. benchmarks/results/...")
    p.add_argument("--threads", type=int, default=1,
                   help="1 is fastest on a shared 2-core box (2 threads spin under contention)")
    args = p.parse_args()
    info = run_info(args.threads)  # at the start: the commit whose code runs
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    classes = list(CLASSES)
    data = args.data or os.path.join(args.out, "data")
    t0 = time.time()
    if not os.path.isfile(os.path.join(data, "v1.0-synthetic", "splits.json")):
        generate_synthetic_nuscenes(data, num_scenes={"synthetic_train": args.train_scenes,
                                                      "synthetic_val": args.val_scenes},
                                    samples_per_scene=args.samples_per_scene, image_size=tuple(args.image_size),
                                    classes=classes, objects_per_scene=tuple(args.objects), class_cycle=True,
                                    object_range=tuple(args.object_range), seed=args.seed)
    t_data = time.time() - t0

    config = tiny_config(tuple(args.input_size), tuple(args.channels), args.queries, args.depth_num, args.dn_groups,
                         layers=args.layers, xy_range=args.object_range[1] + 10.0,
                         pe_range=args.object_range[1] + 15.0, attn_prior_sigma=args.attn_prior_sigma,
                         aux_2d_weight=args.aux_2d, memory_norm=args.memory_norm,
                         content_query_init=args.content_query_init, pe_type=args.pe_type,
                         embed_dims=args.embed_dims, num_heads=args.heads, ffn_dims=args.ffn_dims)
    model = PetrForObjectDetection3D(config)
    ds = SyntheticNuScenesDataset(data, "synthetic_train", model.get_image_processor(), config.class_names)
    t1 = time.time()
    cache = [ds[i] for i in tqdm(range(len(ds)), desc="load train split")]  # images are small: keep in RAM
    for item in cache:
        item["pixel_values"] = item["pixel_values"].half()
    t_load = time.time() - t1
    logger.info("train samples %d, boxes/sample %.1f", len(cache),
                np.mean([len(c["labels"]["class_labels"]) for c in cache]))

    # one learning rate: the official x0.1 for the backbone is for ImageNet-pretrained weights, ours start random
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    rng = np.random.default_rng(args.seed)
    budget = args.minutes * 60
    model.train()
    t_start = time.time()
    t_eval_total = 0.0
    step, order, pos, losses, history = 0, rng.permutation(len(cache)), 0, [], []
    bar = tqdm(total=args.max_steps, desc="train", mininterval=30)
    while True:
        progress = max(step / args.max_steps, (time.time() - t_start - t_eval_total) / budget)
        if progress >= 1.0:
            break
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.001 + 0.999 * 0.5 * (1 + math.cos(math.pi * progress)))
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
        if step % 100 == 0:
            logger.info("step %d loss %.4f lr %.2e elapsed %.0fs", step, np.mean(losses[-100:]), lr,
                        time.time() - t_start - t_eval_total)
        if args.eval_every and step % args.eval_every == 0:
            te = time.time()
            m = evaluate_in_memory(model, data, os.path.join(args.out, f"eval_step{step}"))
            t_eval_total += time.time() - te
            history.append({"step": step, "train_seconds": round(time.time() - t_start - t_eval_total, 1),
                            **{k: m[k] for k in ("mAP", "NDS", "mATE", "mASE", "mAOE")}})
            logger.info("eval %s", json.dumps(history[-1]))
    bar.close()
    t_train = time.time() - t_start - t_eval_total

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
        "classes_in_data": classes,
        "train_steps": step, "batch_size": args.batch_size, "train_samples": len(cache),
        "val_scenes": args.val_scenes, "final_loss": float(np.mean(losses[-100:])),
        "seconds": {"data_generation": round(t_data, 1), "data_loading": round(t_load, 1),
                    "train": round(t_train, 1), "periodic_eval": round(t_eval_total, 1), "eval": round(t_eval, 1),
                    "total": round(time.time() - t0, 1)},
        "eval_history": history,
        "args": vars(args), **info,
        "num_parameters": sum(p_.numel() for p_ in model.parameters()),
        "config": {k: getattr(config, k) for k in ("input_size", "simple_channels", "embed_dims", "num_queries",
                                                   "num_decoder_layers", "depth_num", "dn_groups", "pc_range",
                                                   "position_range", "attn_prior_sigma", "aux_2d_weight",
                                                   "memory_norm", "content_query_init", "pe_type",
                                                   "num_heads", "ffn_dims")},
    }
    write_json(os.path.join(args.out, "result.json"), result)
    if args.results:
        write_json(args.results, result)
    logger.info("result: %s", json.dumps({k: result[k] for k in ("mAP", "NDS", "mATE", "mASE", "mAOE", "mAVE",
                                                                   "mAAE", "train_steps", "seconds")}))


if __name__ == "__main__":
    main()
