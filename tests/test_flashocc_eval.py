"""FlashOcc on the synthetic occupancy data: the dataset, `hfq eval occupancy`, and W4A8 / W8A8 save / reload."""
import copy
import json

import pytest
import torch
from test_flashocc import tiny_config

import hfq
from hfq.data.synthetic_nuscenes import CLASSES, generate_synthetic_nuscenes
from hfq.data.synthetic_occupancy import SyntheticOccupancyDataset, collate_occupancy, model_inputs, write_occupancy
from hfq.eval.occupancy import OccupancyGrid, evaluate_model
from hfq.modeling.flashocc import FlashOccForOccupancy


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors, one intra-op thread


@pytest.fixture(scope="module")
def occ_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic_occ"))
    generate_synthetic_nuscenes(root, num_scenes={"synthetic_train": 1, "synthetic_val": 1}, samples_per_scene=2,
                                image_size=(90, 160), classes=list(CLASSES), objects_per_scene=(10, 10),
                                class_cycle=True, seed=3)
    write_occupancy(root, grid=OccupancyGrid(voxel_size=0.8))
    return root


def test_dataset_feeds_the_model_and_refuses_missing_labels(occ_root, tmp_path):
    """Catches a dataset whose geometry / labels do not fit the model (shapes, camera count, centre targets of the
    configured classes) and a split without occupancy labels being used silently (must name write_occupancy)."""
    model = FlashOccForOccupancy(tiny_config(panoptic=True))
    ds = SyntheticOccupancyDataset(occ_root, "synthetic_train", model.get_image_processor(),
                                   center_class_names=model.config.center_class_names)
    batch = collate_occupancy([ds[0], ds[1]])
    assert batch["pixel_values"].shape[:2] == (2, 6) and batch["voxel_semantics"].shape == (2, 100, 100, 8)
    centres = batch["center_labels"][0]
    assert len(centres["class_labels"]) == 10 and centres["boxes"].shape == (10, 5)  # every class once (cycle)
    out = model(**model_inputs(batch), labels=batch["voxel_semantics"], mask_camera=batch["mask_camera"],
                center_labels=batch["center_labels"])
    assert torch.isfinite(out.loss)
    import shutil
    bare = tmp_path / "bare"
    shutil.copytree(occ_root, bare, ignore=shutil.ignore_patterns("occupancy"))
    with pytest.raises(FileNotFoundError, match="write_occupancy"):
        SyntheticOccupancyDataset(str(bare), "synthetic_val", model.get_image_processor())


def test_eval_cli_matches_the_library_and_a_grid_mismatch_is_refused(occ_root, tmp_path, capsys):
    """Catches `hfq eval occupancy` reporting other numbers than hfq.eval.occupancy.evaluate_model on a saved
    custom-code model, RayPQ missing for a panoptic model, and labels of another grid being scored silently."""
    from hfq.cli import main

    torch.manual_seed(0)
    FlashOccForOccupancy(tiny_config(panoptic=True)).eval().save_pretrained(tmp_path / "m")
    lib = evaluate_model(str(tmp_path / "m"), occ_root)
    main(["eval", "occupancy", str(tmp_path / "m"), "--data", occ_root, "--json", "--quiet"])
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cli["samples"] == lib["samples"] == 2 and "RayPQ" in lib
    for k in ("mIoU", "RayIoU", "RayPQ"):
        assert cli[k] == pytest.approx(lib[k], nan_ok=True)
    wrong = FlashOccForOccupancy(tiny_config(grid_x=(-40.0, 40.0, 1.6), grid_y=(-40.0, 40.0, 1.6), num_occ_z=4))
    with pytest.raises(ValueError, match="grid"):
        evaluate_model(wrong, occ_root)


@pytest.mark.parametrize("bits", [8, 4])
def test_w8a8_and_w4a8_flashocc_reload_exactly(occ_root, tmp_path, bits):
    """Catches a quantized FlashOcc (per-channel int weights, static per-tensor int8 activations, BatchNorm folded)
    that does not reload into the same outputs, and W4 packing / per-channel scales lost on the way."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    torch.manual_seed(0)
    model = FlashOccForOccupancy(tiny_config(panoptic=True)).eval()
    ds = SyntheticOccupancyDataset(occ_root, "synthetic_train", model.get_image_processor())
    calib = [model_inputs(collate_occupancy([ds[i]])) for i in range(len(ds))]
    cfg = hfq.PTQConfig(bits=bits, weight_granularity="channel")
    q = hfq.quantize(copy.deepcopy(model), cfg, calibration=calib)
    q.save_pretrained(tmp_path / "q")
    sd = load_file(tmp_path / "q" / "model.safetensors")
    head = [k for k in sd if k.endswith("final_conv.weight_scale")]
    assert head and sd[head[0]].shape[0] > 1  # one scale per output channel
    r = AutoModel.from_pretrained(tmp_path / "q", trust_remote_code=True).eval()
    with torch.no_grad():
        a, b = q(**calib[0]), r(**calib[0])
    assert torch.equal(a.logits, b.logits) and torch.equal(a.center_heatmap, b.center_heatmap)


def test_flashocc_quantizes_on_load_from_calibration_batches(occ_root, tmp_path):
    """Catches quantize-on-load of the custom-code FlashOcc checkpoint (`from_pretrained(..., quantization_config=
    PTQConfig(dataset=[batches]))`) leaving layers float or giving other outputs than quantizing the loaded model."""
    from transformers import AutoModel

    from hfq.nn import QuantConv2d

    torch.manual_seed(0)
    model = FlashOccForOccupancy(tiny_config()).eval()
    model.save_pretrained(tmp_path / "fp")
    ds = SyntheticOccupancyDataset(occ_root, "synthetic_train", model.get_image_processor())
    calib = [model_inputs(collate_occupancy([ds[i]])) for i in range(len(ds))]
    cfg = dict(bits=4, weight_granularity="channel")
    on_load = AutoModel.from_pretrained(tmp_path / "fp", trust_remote_code=True,
                                        quantization_config=hfq.PTQConfig(dataset=calib, **cfg)).eval()
    loaded = AutoModel.from_pretrained(tmp_path / "fp", trust_remote_code=True).eval()
    after = hfq.quantize(loaded, hfq.PTQConfig(**cfg), calibration=calib)
    assert not [n for n, m in on_load.named_modules() if type(m) is torch.nn.Conv2d]
    assert any(isinstance(m, QuantConv2d) for m in on_load.modules())
    with torch.no_grad():
        assert torch.equal(on_load(**calib[0]).logits, after(**calib[0]).logits)


def test_eval_cli_scores_the_onnx_export_with_the_same_evaluator(occ_root, tmp_path, capsys):
    """Catches `hfq eval occupancy --backend onnxruntime` scoring anything but the exported file through the same
    evaluator (its post_process, image processor and BEV plan from the camera inputs): a float export must give the
    PyTorch model's metrics, and the CLI the library's."""
    from hfq.cli import main
    from hfq.export.onnx import OnnxRuntimeModel, export

    torch.manual_seed(0)
    model = FlashOccForOccupancy(tiny_config(panoptic=True)).eval()
    want = evaluate_model(model, occ_root)
    export(model, tmp_path / "onnx")
    lib = evaluate_model(OnnxRuntimeModel(tmp_path / "onnx", threads=1), occ_root)
    main(["eval", "occupancy", str(tmp_path / "onnx"), "--data", occ_root, "--backend", "onnxruntime",
          "--threads", "1", "--json", "--quiet"])
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for k in ("mIoU", "RayIoU", "RayPQ"):
        assert cli[k] == pytest.approx(lib[k], nan_ok=True) and lib[k] == pytest.approx(want[k], nan_ok=True), k
