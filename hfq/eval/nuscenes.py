"""nuScenes detection metrics through the official devkit (`nuscenes.eval.detection.evaluate.DetectionEval`).

The model side is duck-typed so this core module imports nothing from `hfq.modeling`: the model must take
`(pixel_values, lidar2img)`, offer `post_process(outputs, lidar2ego, ego2global, sample_tokens)` returning
nuScenes result dicts, and `get_image_processor()` (PETR models in hfq.modeling.petr do).
"""
import contextlib
import io
import json
import logging
import os
import tempfile

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

TP_METRICS = {"mATE": "trans_err", "mASE": "scale_err", "mAOE": "orient_err", "mAVE": "vel_err", "mAAE": "attr_err"}


def _resolve_split(data_dir, version, split):
    path = os.path.join(data_dir, version, "splits.json")
    if not os.path.isfile(path):
        raise ValueError(f"{path} not found; evaluate_detection needs a custom split file (devkit >= 1.2.0).")
    with open(path) as fh:
        names = json.load(fh)
    for cand in (split, f"synthetic_{split}"):
        if cand in names:
            return cand
    raise ValueError(f"split {split!r} not in {path} (has {sorted(names)}).")


@torch.no_grad()
def predict_nuscenes(model, data_dir, split, version="v1.0-synthetic", batch_size=4, device="cpu"):
    """Run the model over a split; returns the devkit results dict {sample_token: [boxes]}."""
    from hfq.data.synthetic_nuscenes import SyntheticNuScenesDataset, collate

    model.eval().to(device)
    ds = SyntheticNuScenesDataset(data_dir, split, model.get_image_processor(), model.config.class_names, version)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=collate)
    results = {}
    for batch in tqdm(loader, desc=f"predict {split}"):
        out = model(pixel_values=batch["pixel_values"].to(device), lidar2img=batch["lidar2img"].to(device))
        dets = model.post_process(out, batch["lidar2ego"], batch["ego2global"], batch["sample_token"])
        for token, boxes in zip(batch["sample_token"], dets):
            results[token] = boxes
    return results


def run_detection_eval(results, data_dir, split, version="v1.0-synthetic", output_dir=None):
    """DetectionEval (config detection_cvpr_2019) on a results dict; returns the flattened summary."""
    try:
        from nuscenes import NuScenes
        from nuscenes.eval.common.config import config_factory
        from nuscenes.eval.detection.evaluate import DetectionEval
    except ImportError as e:
        raise ImportError("nuscenes-devkit is needed: pip install --no-deps nuscenes-devkit==1.2.0 pyquaternion "
                          "opencv-python-headless && pip install matplotlib Pillow scikit-learn cachetools "
                          f"({e})") from e
    output_dir = output_dir or tempfile.mkdtemp(prefix="hfq_nuscenes_eval_")
    os.makedirs(output_dir, exist_ok=True)
    res_path = os.path.join(output_dir, "results_nusc.json")
    meta = {"use_camera": True, "use_lidar": False, "use_radar": False, "use_map": False, "use_external": False}
    with open(res_path, "w") as fh:
        json.dump({"meta": meta, "results": results}, fh)
    nusc = NuScenes(version=version, dataroot=data_dir, verbose=False)
    ev = DetectionEval(nusc, config_factory("detection_cvpr_2019"), res_path, eval_set=split,
                       output_dir=output_dir, verbose=False)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # the devkit prints its tables; keep them in the log instead
        summary = ev.main(plot_examples=0, render_curves=False)
    logger.info("DetectionEval:\n%s", log.getvalue())
    metrics = {"mAP": summary["mean_ap"], "NDS": summary["nd_score"]}
    metrics.update({k: summary["tp_errors"][v] for k, v in TP_METRICS.items()})
    metrics["per_class_AP"] = summary["mean_dist_aps"]
    metrics["output_dir"] = output_dir
    return metrics


def evaluate_detection(model_or_path, data_dir, split="val", version="v1.0-synthetic", batch_size=4,
                       device="cpu", output_dir=None):
    """mAP, NDS and the TP errors (mATE, mASE, mAOE, mAVE, mAAE) of a camera 3D detector on a
    nuScenes-format split. `model_or_path`: a model or a directory saved with save_pretrained (custom code,
    loaded with trust_remote_code=True). Classes absent from the split count as AP 0 (devkit rule)."""
    if isinstance(model_or_path, (str, os.PathLike)):
        from transformers import AutoModel

        model = AutoModel.from_pretrained(model_or_path, trust_remote_code=True)
    else:
        model = model_or_path
    for attr in ("post_process", "get_image_processor"):
        if not hasattr(model, attr):
            raise TypeError(f"{type(model).__name__} has no {attr}(); pass a PETR-style model from hfq.modeling.")
    split = _resolve_split(data_dir, version, split)
    results = predict_nuscenes(model, data_dir, split, version, batch_size, device)
    return run_detection_eval(results, data_dir, split, version, output_dir)
