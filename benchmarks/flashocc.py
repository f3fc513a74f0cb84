"""FlashOcc and Panoptic-FlashOcc on the synthetic occupancy set: a small model of each trained from a fixed seed on
CPU, then FP, W8A8 and W4A8 (`hfq.PTQConfig`: per-channel symmetric weights, static per-tensor int8 activations, min/max
over 32 train samples, BatchNorm folded; saved and reloaded) scored on the val scenes: Occ3D mIoU on the camera mask,
RayIoU (1 / 2 / 4 m), RayPQ (panoptic), CPU frames per second; plus two trivial baselines (one constant class
everywhere; the most frequent class of each voxel position over the training labels).

    python benchmarks/flashocc.py                      # trains both models first when runs/flashocc-*/model are missing
    python benchmarks/flashocc.py --train-only panoptic --train-minutes 15   # one model (to train two side by side)

The data: the synthetic nuScenes-format scenes of recipes/petr-tiny-synthetic.py (generated when missing) with
occupancy labels on a 100 x 100 x 8 grid of 0.8 m (Occ3D's range at half its resolution; written when missing).
"""
import argparse
import copy
import json
import logging
import math
import os
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from hfq.eval.provenance import run_info, write_json  # noqa: E402

logger = logging.getLogger("flashocc")
VOXEL = 0.8
MODELS = ("plain", "panoptic")


def model_config(panoptic):
    """A small FlashOcc: plain 5-stage CNN + FPN at stride 16 on 96 x 176 input, LSS with 44 depth bins (M0's 1 m
    step), 32 BEV channels on a 100 x 100 grid of 0.8 m, BEV ResNet 32 / 64 / 128, FPN-LSS 64, channel-to-height head
    with 8 z slices; panoptic adds the centre branch (heatmap + offset + height) and, as the official panoptic
    configs, trains without the camera mask and with the official class-balance weights (FlashOcc: masked, none)."""
    from hfq.modeling.flashocc import FlashOccConfig

    return FlashOccConfig(
        backbone_type="simple", simple_channels=[16, 32, 64, 96, 128], neck_channels=64, input_size=(96, 176),
        depth_bins=(1.0, 45.0, 1.0), grid_x=(-40.0, 40.0, VOXEL), grid_y=(-40.0, 40.0, VOXEL), bev_channels=32,
        bev_backbone_channels=(32, 64, 128), bev_neck_channels=64, occ_head_channels=64, num_occ_z=8,
        panoptic=panoptic, center_share_channels=32, center_head_channels=32, use_mask=not panoptic,
        class_balance=panoptic)


def ensure_data(data):
    from hfq.data.synthetic_nuscenes import CLASSES, generate_synthetic_nuscenes
    from hfq.data.synthetic_occupancy import occupancy_path, write_occupancy
    from hfq.eval.occupancy import OccupancyGrid

    if not os.path.isfile(os.path.join(data, "v1.0-synthetic", "splits.json")):
        generate_synthetic_nuscenes(data, num_scenes={"synthetic_train": 300, "synthetic_val": 24}, samples_per_scene=4,
                                    image_size=(225, 400), classes=list(CLASSES), objects_per_scene=(10, 14),
                                    class_cycle=True, object_range=(5.0, 20.0), seed=0)
    from hfq.data.synthetic_nuscenes import NuScenesTables

    db = NuScenesTables(data)
    for split in ("synthetic_val", "synthetic_train"):
        if not all(os.path.isfile(occupancy_path(data, t)) for t in db.split_samples(split)):
            write_occupancy(data, split=split, grid=OccupancyGrid(voxel_size=VOXEL))


def train(kind, data, out_dir, minutes, seed, lr, batch_size):
    """Train one model for `minutes` of wall clock (cosine schedule on the elapsed fraction) and save it."""
    from hfq.data.synthetic_occupancy import SyntheticOccupancyDataset, collate_occupancy, model_inputs
    from hfq.modeling.flashocc import FlashOccForOccupancy

    info = run_info(torch.get_num_threads())  # at the start: the commit whose code trains
    torch.manual_seed(seed)
    config = model_config(kind == "panoptic")
    model = FlashOccForOccupancy(config)
    ds = SyntheticOccupancyDataset(data, "synthetic_train", model.get_image_processor(),
                                   center_class_names=config.center_class_names)
    cache = [ds[i] for i in tqdm(range(len(ds)), desc="load train split")]
    for item in cache:
        item["pixel_values"] = item["pixel_values"].half()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    model.train()
    t0, step, losses, order, pos = time.time(), 0, [], rng.permutation(len(cache)), 0
    while (time.time() - t0) < minutes * 60:
        progress = (time.time() - t0) / (minutes * 60)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 200) * (0.001 + 0.999 * 0.5 * (1 + math.cos(math.pi * progress)))
        if pos + batch_size > len(order):
            order, pos = rng.permutation(len(cache)), 0
        batch = collate_occupancy([cache[i] for i in order[pos:pos + batch_size]])
        pos += batch_size
        inputs = model_inputs(batch)
        inputs["pixel_values"] = inputs["pixel_values"].float()
        out = model(**inputs, labels=batch["voxel_semantics"], mask_camera=batch["mask_camera"],
                    center_labels=batch["center_labels"] if config.panoptic else None)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 35.0)
        opt.step()
        losses.append(out.loss.item())
        step += 1
        if step % 100 == 0:
            logger.info("%s step %d loss %.4f (%.0fs)", kind, step, np.mean(losses[-100:]), time.time() - t0)
    model.eval().save_pretrained(os.path.join(out_dir, "model"))
    record = {"kind": kind, "train_steps": step, "batch_size": batch_size, "lr": lr, "seed": seed,
              "train_seconds": round(time.time() - t0, 1), "final_loss": float(np.mean(losses[-100:])),
              "num_parameters": sum(p.numel() for p in model.parameters()), "train_samples": len(cache)}
    write_json(os.path.join(out_dir, "train.json"), {**record, **info})
    return record


def trivial_baselines(data):
    """mIoU / RayIoU of two predictors that look at no image: the most frequent class of the camera-visible training
    voxels everywhere, and per voxel position the most frequent training class there."""
    from hfq.data.synthetic_nuscenes import NuScenesTables
    from hfq.data.synthetic_occupancy import lidar_origin, load_occupancy
    from hfq.eval.occupancy import NUM_CLASSES, OccupancyGrid, evaluate_occupancy

    db = NuScenesTables(data)
    counts, per_voxel = np.zeros(NUM_CLASSES, np.int64), None
    for t in tqdm(db.split_samples("synthetic_train"), desc="training label statistics"):
        occ = load_occupancy(data, t)
        sem = occ["semantics"].astype(np.int64)
        counts += np.bincount(sem[occ["mask_camera"]], minlength=NUM_CLASSES)
        onehot = np.eye(NUM_CLASSES, dtype=np.int32)[sem]
        per_voxel = onehot if per_voxel is None else per_voxel + onehot
    constant = int(counts.argmax())
    prior = per_voxel.argmax(-1).astype(np.uint8)
    val = db.split_samples("synthetic_val")
    gts = [load_occupancy(data, t) for t in val]
    origins = [lidar_origin(db, t) for t in val]
    grid = OccupancyGrid(voxel_size=VOXEL)
    out = {}
    for name, pred in (("constant", np.full(grid.shape, constant, np.uint8)), ("per_voxel_prior", prior)):
        m = evaluate_occupancy([pred] * len(gts), [g["semantics"] for g in gts], [g["mask_camera"] for g in gts],
                               grid=grid, sample_origins=origins)
        out[name] = {k: m[k] for k in ("mIoU", "RayIoU", "RayIoU@1", "RayIoU@2", "RayIoU@4")}
    out["constant"]["class"] = constant
    out["camera_visible_class_fractions"] = (counts / counts.sum()).round(5).tolist()
    return out


def frames_per_second(model, batch, repeats):
    from hfq.eval.speed import median_seconds

    return 1.0 / median_seconds(lambda: model(**batch), repeats)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=os.path.join(ROOT, "runs"))
    p.add_argument("--data", default=None, help="default: <runs>/petr-tiny-synthetic/data")
    p.add_argument("--train-minutes", type=float, default=15.0)
    p.add_argument("--train-only", choices=MODELS, default=None, help="train this model and stop")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--fps-repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/flashocc.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    info = run_info(args.threads)
    data = args.data or os.path.join(args.runs, "petr-tiny-synthetic/data")
    ensure_data(data)
    kinds = [args.train_only] if args.train_only else MODELS
    for kind in kinds:
        run_dir = os.path.join(args.runs, f"flashocc-{kind}")
        if not os.path.isfile(os.path.join(run_dir, "model", "config.json")):
            logger.info("training %s (%.0f min)", kind, args.train_minutes)
            train(kind, data, run_dir, args.train_minutes, args.seed, args.lr, args.batch_size)
    if args.train_only:
        return

    from transformers import AutoModel

    import hfq
    from hfq.data.synthetic_nuscenes import NuScenesTables
    from hfq.data.synthetic_occupancy import SyntheticOccupancyDataset, collate_occupancy, model_inputs
    from hfq.eval.occupancy import evaluate_model

    result = {"task": "FlashOcc / Panoptic-FlashOcc trained on synthetic nuScenes-format occupancy (100 x 100 x 8 "
                      "voxels of 0.8 m), val scenes, CPU", "data": os.path.relpath(data, ROOT),
              "baselines": trivial_baselines(data), "models": {}}
    keys = ("mIoU", "RayIoU", "RayIoU@1", "RayIoU@2", "RayIoU@4", "RayPQ", "samples")
    n_train = len(NuScenesTables(data).split_samples("synthetic_train"))
    for kind in MODELS:
        run_dir = os.path.join(args.runs, f"flashocc-{kind}")
        with open(os.path.join(run_dir, "train.json")) as fh:
            trained = json.load(fh)
        fp = AutoModel.from_pretrained(os.path.join(run_dir, "model"), trust_remote_code=True).eval()
        ds = SyntheticOccupancyDataset(data, "synthetic_train", fp.get_image_processor())
        idx = np.linspace(0, n_train - 1, args.calib_samples).round().astype(int)
        calib = [model_inputs(collate_occupancy([ds[int(i)]])) for i in idx]
        entry = {"training": trained, "config": model_config(kind == "panoptic").to_dict(), "rows": {}}
        for name, cfg in (("fp32", None), ("w8a8", hfq.PTQConfig(weight_granularity="channel")),
                          ("w4a8", hfq.PTQConfig(bits=4, weight_granularity="channel"))):
            model = fp
            t = time.time()
            if cfg is not None:
                q = hfq.quantize(copy.deepcopy(fp), cfg, calibration=calib)
                qdir = os.path.join(run_dir, name)
                q.save_pretrained(qdir)
                model = AutoModel.from_pretrained(qdir, trust_remote_code=True).eval()
            t_q = time.time() - t
            m = evaluate_model(model, data)
            row = {k: m[k] for k in keys if k in m}
            row["per_class_IoU"] = m["per_class"]["IoU"]
            row["fps"] = frames_per_second(model, calib[0], args.fps_repeats)
            if cfg is not None:
                row.update(config=cfg.to_dict(), quantize_seconds=round(t_q, 1),
                           mIoU_ratio_to_fp=row["mIoU"] / max(entry["rows"]["fp32"]["mIoU"], 1e-12))
            entry["rows"][name] = row
            logger.info("%s %s %s", kind, name, json.dumps({k: row.get(k) for k in keys + ("fps",)}))
        result["models"][kind] = entry
    result["calibration"] = {"split": "synthetic_train", "samples": args.calib_samples, "batch_size": 1}
    result.update(info)
    write_json(args.out, result)
    print(json.dumps({"baselines": {k: v.get("mIoU") for k, v in result["baselines"].items() if isinstance(v, dict)},
                      **{kind: {n: {k: r.get(k) for k in ("mIoU", "RayIoU", "RayPQ", "fps")}
                                for n, r in e["rows"].items()} for kind, e in result["models"].items()}}, indent=1))


if __name__ == "__main__":
    main()
