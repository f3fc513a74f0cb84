"""ONNX export of quantized vision models (`hfq.export.onnx`), run by ONNX Runtime."""
import copy

import pytest
import torch

import hfq
from hfq.export import ExportError
from hfq.export.onnx import OnnxRuntimeModel, export, operator_counts
from test_repvgg import images, randomize_batchnorm, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _repvgg():
    from hfq.modeling.repvgg import RepVGGForImageClassification

    torch.manual_seed(0)
    model = randomize_batchnorm(RepVGGForImageClassification(tiny_config())).eval()
    return model.reparameterize()


def _quantized(config):
    model = _repvgg()
    return hfq.quantize(model, config, calibration=[{"pixel_values": images(model.config, batch=4, seed=1)}])


CALIBRATION = dict(batch=4, seed=1)  # inside the calibrated ranges: no code reaches the saturation point


@pytest.mark.parametrize("name, config, exact, tol", [
    ("float", None, False, 1e-4),
    ("ptq_w8a8", hfq.PTQConfig(weight_granularity="channel"), True, 1e-4),
    ("ptq_w8a8", hfq.PTQConfig(weight_granularity="channel"), False, 5e-2),
    ("cfws", hfq.CFWSConfig(act_observer="minmax"), True, 1e-4),
    ("cfws", hfq.CFWSConfig(act_observer="minmax"), False, 5e-2),
])
def test_onnx_runtime_reproduces_the_pytorch_integer_model(name, config, exact, tol, tmp_path):
    """Catches an exported graph whose integers differ from hfq's (zero point, rounding, a scale or bias folded
    wrongly, CFWS's coarse and fine parts misassigned, padding of the 1x1 centre conv) or whose batch axis is fixed:
    ORT's logits on a batch of 4 (exported with 1) must equal the PyTorch model's (exact simulation) up to float
    summation order with exact=True (ConvInteger / MatMulInteger everywhere; CFWS always), and within 5% of the
    largest logit otherwise (QLinearConv's fixed-point requantization moves some codes by one, and post-ReLU codes
    saturate at 255 instead of 127; a wrong zero point or scale is off by far more)."""
    model = _repvgg() if config is None else hfq.nn.set_kernel(_quantized(config), "reference")
    x = images(model.config, **CALIBRATION)
    with torch.no_grad():
        want = model(x).logits
    export(model, tmp_path, exact=exact)
    got = OnnxRuntimeModel(tmp_path, threads=1)(pixel_values=x).logits
    assert got.shape == want.shape
    assert (got - want).abs().max() <= tol * want.abs().max(), (got - want).abs().max() / want.abs().max()
    if config is not None:  # the export swaps layers for tracing only: the model itself is unchanged
        with torch.no_grad():
            assert torch.equal(model(x).logits, want)


@pytest.mark.parametrize("config, fused, integer", [(hfq.PTQConfig(weight_granularity="channel"), -1, 1),
                                                    (hfq.CFWSConfig(act_observer="minmax"), 0, 2)])
def test_quantized_layers_run_as_integer_operators_in_onnx_runtime(config, fused, integer, tmp_path):
    """Catches quantized layers that ONNX Runtime runs in float (a dequantized weight feeding a float Conv /
    MatMul / Gemm) and a QDQ pattern ORT does not fuse: after ORT's own optimizations every plain int8 convolution
    whose output is requantized is a QLinearConv (the ReLU folded in), the last one (its output goes to the pooling
    in float) a ConvInteger, every CFWS layer two ConvIntegers, the classifier a MatMulInteger."""
    model = _quantized(config)
    n_layers = len(list(model.blocks()))
    export(model, tmp_path / "q")
    OnnxRuntimeModel(tmp_path / "q", threads=1, optimized_path=str(tmp_path / "opt.onnx"))
    ops = operator_counts(tmp_path / "opt.onnx")
    qlinear = sum(v for k, v in ops.items() if k.endswith("QLinearConv"))
    assert (qlinear, ops.get("ConvInteger", 0)) == ((n_layers + fused) if fused else 0, integer * (
        1 if fused else n_layers)), ops
    assert ops.get("MatMulInteger", 0) == 1, ops
    assert not {"Conv", "FusedConv", "com.microsoft:FusedConv", "MatMul", "Gemm", "DequantizeLinear"} & set(ops), ops


def test_export_refuses_what_it_cannot_write(tmp_path):
    """Catches an export that silently writes float (or wrong) layers for settings it cannot express: weight-only
    or dynamic activation quantization, quantized modules it has no form for (a stray quantizer would trace as a
    float fake-quant simulation), an uncalibrated table; and a folder left half-written."""
    base = _repvgg()
    dynamic = hfq.quantize(copy.deepcopy(base), hfq.RTNConfig(bits=8, group_size=None, act_bits=8), calibration=None)
    with pytest.raises(ExportError, match="static symmetric 8-bit per-tensor"):
        export(dynamic, tmp_path / "a")
    weight_only = hfq.quantize(copy.deepcopy(base), hfq.RTNConfig(bits=8, group_size=None))
    with pytest.raises(ExportError, match="no activation quantizer"):
        export(weight_only, tmp_path / "b")
    assert not (tmp_path / "a" / "model.onnx").exists() and not (tmp_path / "b" / "model.onnx").exists()
    from hfq.nn import ActQuantizer, QuantSoftmax
    from hfq.quant import QuantArgs

    q = _quantized(hfq.PTQConfig(weight_granularity="channel"))
    q.extra_quant = ActQuantizer(QuantArgs(bits=8, granularity="tensor"))  # a quantizer outside the known layers
    with pytest.raises(ExportError, match="extra_quant: ActQuantizer has no ONNX export"):
        export(q, tmp_path / "c")
    del q.extra_quant
    q.softmax = QuantSoftmax("qans")  # FQ-PETR's table softmax, never calibrated
    with pytest.raises(ExportError, match="softmax: QuantSoftmax is not calibrated"):
        export(q, tmp_path / "d")


def test_cli_exports_a_saved_quantized_checkpoint(tmp_path, capsys):
    """Catches `hfq export --format onnx` loading the body without its classifier (RepVGG's AutoModel) or random
    weights instead of the packed checkpoint: the file's logits must be the reloaded model's."""
    import json

    from transformers import AutoModelForImageClassification

    from hfq.cli import main

    q = _quantized(hfq.CFWSConfig(act_observer="minmax"))
    q.save_pretrained(tmp_path / "q")
    main(["export", str(tmp_path / "q"), "--format", "onnx", "--output", str(tmp_path / "onnx")])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["format"] == "onnx"
    back = hfq.nn.set_kernel(AutoModelForImageClassification.from_pretrained(tmp_path / "q", trust_remote_code=True),
                             "reference").eval()
    x = images(back.config, batch=2, seed=3)
    with torch.no_grad():
        want = back(x).logits
    got = OnnxRuntimeModel(tmp_path / "onnx", threads=1)(pixel_values=x).logits
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("quantized, exact, tol, share, depth_net", [
    (False, False, 1e-4, 0, "bevdepth"), (False, False, 1e-4, 0, "lss"), (True, True, 3e-2, 1, "bevdepth"),
    (True, False, 5e-2, 1, "bevdepth")])
def test_flashocc_runs_in_onnx_runtime_with_its_bev_plan(quantized, exact, tol, share, depth_net, tmp_path):
    """Catches a FlashOcc graph that bakes the export's camera rig, batch or camera count into the file (the BEV
    pooling plan must be an input), loses the z-major channel-to-height layout, runs a quantized convolution in
    float (an in-place ReLU hiding the fusable pattern, a conv read by two quantizers marked fusable), a runner that
    feeds camera inputs the graph dropped (the plain LSS depth net reads none), or whose integers differ from hfq's:
    ORT on 2 samples x 2 cameras of another rig (exported with 1 x 1) must give the PyTorch logits: float to 1e-4;
    W8A8 with exact=True within 3% of the largest output (measured: logits 0.7%, centre heatmap 1.0%, with 3-10% of
    the values off by more than 1e-4: ORT's softmax and scatter-add round differently from torch's in the last bit,
    which flips the odd code at a rounding tie of a later quantizer; RepVGG, without them, matches to 1e-4; ORT runs
    ConvInteger with FlashOcc's dilations and groups exactly); QLinearConv within 5%."""
    from test_flashocc import camera_inputs, panoptic_tiny_kwargs
    from test_flashocc import tiny_config as flashocc_config

    from hfq.modeling.flashocc import FlashOccForOccupancy

    torch.manual_seed(0)
    model = FlashOccForOccupancy(flashocc_config(**(panoptic_tiny_kwargs() | {"aspp_mid_channels": 8,
                                                                               "depth_net_type": depth_net}))).eval()
    calib = camera_inputs(B=2, seed=1)
    if quantized:
        model = hfq.nn.set_kernel(hfq.quantize(model, hfq.PTQConfig(), calibration=[calib]), "reference")
    with torch.no_grad():
        want = model(**calib)
    export(model, tmp_path, exact=exact)
    runner = OnnxRuntimeModel(tmp_path, threads=1, optimized_path=str(tmp_path / "opt.onnx"))
    got = runner(**calib)
    if quantized:  # every convolution integer (QLinearConv where its output has one quantized reader)
        ops = operator_counts(tmp_path / "opt.onnx")
        assert not {"Conv", "com.microsoft:FusedConv", "DequantizeLinear", "MatMul", "Gemm"} & set(ops), ops
        assert ops.get("com.microsoft:QLinearConv", 0) == (0 if exact else 24) and ops["ConvInteger"] > 0, ops
    for name in ("logits", "center_heatmap"):
        a, b = getattr(got, name), getattr(want, name)
        err = (a - b).abs() / b.abs().max()
        assert a.shape == b.shape and err.max() <= tol, (name, err.max())
        assert (err > 1e-4).float().mean() <= share, (name, (err > 1e-4).float().mean())
    assert [r["semantics"].shape for r in runner.post_process(got)] == [r["semantics"].shape
                                                                        for r in model.post_process(want)]


FLOAT_PRODUCTS = {"Conv", "com.microsoft:FusedConv", "MatMul", "Gemm", "com.microsoft:FusedMatMul"}


def _ort_matches(model, inputs, outputs, exact, tol, tmp_path):
    """Export `model`, run the file in ORT on `inputs`, check each output within `tol` of the largest PyTorch value;
    returns the ORT-optimized graph's operator counts."""
    with torch.no_grad():
        want = model(**inputs)
    export(model, tmp_path / "m", exact=exact)
    got = OnnxRuntimeModel(tmp_path / "m", threads=1, optimized_path=str(tmp_path / "opt.onnx"))(**inputs)
    for name in outputs:
        a, b = getattr(got, name), getattr(want, name)
        assert a.shape == b.shape and (a - b).abs().max() <= tol * b.abs().max(), (name, (a - b).abs().max())
    return operator_counts(tmp_path / "opt.onnx")


@pytest.mark.parametrize("quantized, exact, tol", [(False, False, 1e-4), (True, True, 4e-2), (True, False, 5e-2)])
def test_petr_runs_in_onnx_runtime(quantized, exact, tol, tmp_path):
    """Catches a PETR graph that bakes the export's cameras or batch into the file (lidar2img's inverse must be an
    input), drops the padding mask, reorders the (layers, batch, queries) outputs, or quantizes the attention
    products (QuantMatMul: Q.K^T with symmetric codes, P.V with P's unsigned zero point) or the feature + PE adds
    (QuantAdd) otherwise than hfq: ORT on 2 samples x 3 cameras of another rig (exported with 1 x 1) must give the
    PyTorch logits and boxes (float to 1e-4; W8A8 on the calibration batch within 4% / 5% with exact=True /
    through QLinearConv: measured 0.9% / 0.8% on the logits, 1.8% / 2.2% on the boxes, from float-level code flips
    after ORT's LayerNorm and softmax), and no quantized product may run in float."""
    from test_petr import tiny_config as petr_config

    from hfq.modeling.petr import PetrForObjectDetection3D

    torch.manual_seed(0)
    model = PetrForObjectDetection3D(petr_config()).eval()
    g = torch.Generator().manual_seed(4)
    lidar2img = torch.eye(4).repeat(2, 3, 1, 1) * 40 + torch.randn(2, 3, 4, 4, generator=g)
    lidar2img[..., 3, :] = torch.tensor([0.0, 0, 0, 1])
    inputs = {"pixel_values": torch.randn(2, 3, 3, 64, 128, generator=g), "lidar2img": lidar2img}
    if quantized:
        model = hfq.nn.set_kernel(hfq.quantize(model, hfq.PTQConfig(), calibration=[inputs]), "reference")
    ops = _ort_matches(model, inputs, ("logits", "pred_boxes"), exact, tol, tmp_path)
    if quantized:
        assert not FLOAT_PRODUCTS & set(ops), ops
        assert ops.get("MatMulInteger", 0) >= 2 * 2, ops  # Q.K^T and P.V of every attention at least


@pytest.mark.parametrize("exact, tol", [(True, 1e-4), (False, 5e-2)])
def test_fqpetr_tables_and_qans_softmax_run_in_onnx_runtime(exact, tol, tmp_path):
    """Catches FQ-PETR's DULUT tables (QFPE gate, anchor inverse sigmoid, box sigmoid, exp of the softmax) or its QANS
    softmax input (row max, clip to [-beta, 0], 8-bit codes, masked keys) written otherwise than hfq computes them:
    ORT must give the PyTorch FQ-PETR's logits and boxes (exact=True to 1e-4, measured 0; through QLinearConv within
    5%, measured 0.9% / 1.1%), with table lookups as Gather and no quantized product in float."""
    from test_petr import _random_inputs
    from test_petr import tiny_config as petr_config

    from hfq.modeling.petr import PetrForObjectDetection3D

    torch.manual_seed(0)
    model = PetrForObjectDetection3D(petr_config(pe_type="qfpe", with_fpe=True)).eval()
    calib = _random_inputs(2, seed=1)
    q = hfq.nn.set_kernel(hfq.quantize(model, hfq.FQPETRConfig(), calibration=[calib]), "reference").eval()
    ops = _ort_matches(q, calib, ("logits", "pred_boxes"), exact, tol, tmp_path)
    assert ops.get("Gather", 0) + ops.get("GatherElements", 0) >= 2 * 4, ops  # two tables per DULUT, >= 4 DULUTs
    assert not FLOAT_PRODUCTS & set(ops), ops
