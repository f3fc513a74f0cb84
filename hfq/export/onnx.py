"""ONNX export of hfq's quantized vision models as integer operators that ONNX Runtime runs on CPU, and a runner.

Each packed layer is written as what hfq's PyTorch integer model computes, so the graph reproduces it (up to float
summation order):
- its input quantizer: QuantizeLinear(x, s_x, zero point 128, uint8) — hfq's symmetric int8 codes q shifted by
  128 (round half to even and saturation included: the same integers);
- the product: ConvInteger / MatMulInteger(x_q, int8 weight initializer, 128, 0) -> exact int32 accumulators;
- the output: Cast to float, times s_x * s_w (per output channel), plus the bias;
- CFWS's split convolution (`QuantCFWSConv2d`): one QuantizeLinear, two ConvIntegers (coarse 1x1 on its grid, fine
  3x3 on its own) summed after their scales.
Why not QuantizeLinear / DequantizeLinear pairs around float operators (ORT fuses those into QLinearConv only when
the convolution's output is requantized right away): hfq's layers feed a ReLU, a residual add or a second branch
in float first, where ORT would keep a dequantized float convolution. Float layers export as themselves.

The exporter is torch.onnx.export (TorchScript route, `dynamo=False`: the dynamo route rejects a dynamic batch
here), opset 17, a dynamic batch axis. optimum's exporter (optimum-onnx 0.1.0) would be the natural home, but it
pins transformers < 4.58 and fails to import under transformers 5 (`_CAN_RECORD_REGISTRY` / `OutputRecorder`
moved, `get_parameter_dtype`, `_get_non_default_generation_parameters`; huggingface/optimum-onnx#114, #141): the
per-model `OnnxSpec` below has the shape of its `OnnxConfig` (inputs and outputs with dynamic axes, dummy inputs).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import ExportError

OPSET = 17
_FLOAT = 1  # onnx.TensorProto.FLOAT


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{module} is needed for ONNX export / inference: pip install 'hfq[onnx]' (onnx, "
                          f"onnxruntime)") from e


def _const(g, t: torch.Tensor):
    return g.op("Constant", value_t=t)


def _rescale(g, acc, scale):
    return g.op("Mul", g.op("Cast", acc, to_i=_FLOAT), scale)


def _codes(xq, zero):
    """The integers behind uint8 codes with their zero point, as float."""
    return xq.float() - zero.float()


class _Quantize(torch.autograd.Function):
    """x -> uint8 codes with zero point `zero` (hfq's clamp(round(x / s) + z, 0, 255)). hfq's symmetric int8 codes
    are q + 128; an input that is never negative (after a ReLU) may take zero point 0, so ORT can fold the ReLU into
    the producing QLinearConv (such a code saturates at 255 instead of 127: the same integers up to 127.5 x scale)."""

    @staticmethod
    def forward(ctx, x, scale, zero):
        return torch.clamp(torch.round(x / scale) + zero.float(), 0, 255).to(torch.uint8)

    @staticmethod
    def symbolic(g, x, scale, zero):
        return g.op("QuantizeLinear", x, scale, zero)


class _Dequantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xq, scale, zero):
        return _codes(xq, zero) * scale

    @staticmethod
    def symbolic(g, xq, scale, zero):
        return g.op("DequantizeLinear", xq, scale, zero)


class _ConvInteger(torch.autograd.Function):
    """uint8 codes * weights stored as uint8 (q + 128, zero point 128) -> exact int32 accumulators -> float, times
    `scale` [1, C, 1, 1]. uint8 weights: ORT's ConvInteger runs u8 x u8 6x faster than u8 x s8 here (one 96-channel
    3x3 layer at 28 x 28, 2 threads: 0.27 vs 1.65 ms; a float Conv 0.28 ms)."""

    @staticmethod
    def forward(ctx, xq, x_zero, w, scale, stride, padding, dilation, groups):
        return F.conv2d(_codes(xq, x_zero), w.float() - 128, None, stride, padding, dilation, groups) * scale

    @staticmethod
    def symbolic(g, xq, x_zero, w, scale, stride, padding, dilation, groups):
        acc = g.op("ConvInteger", xq, w, x_zero, _const(g, torch.tensor(128, dtype=torch.uint8)),
                   strides_i=list(stride), pads_i=list(padding) * 2, dilations_i=list(dilation), group_i=groups)
        return _rescale(g, acc, scale)


class _QDQConv(torch.autograd.Function):
    """DequantizeLinear(codes), DequantizeLinear(int8 weight, per channel), DequantizeLinear(int32 bias) -> Conv: the
    pattern ONNX Runtime fuses with the next QuantizeLinear into one QLinearConv (int8 in, int8 out)."""

    @staticmethod
    def forward(ctx, xq, x_scale, x_zero, w, w_scale, bias_q, bias_scale, stride, padding, dilation, groups):
        return F.conv2d(_codes(xq, x_zero) * x_scale, w.float() * w_scale.reshape(-1, 1, 1, 1),
                        bias_q.float() * bias_scale, stride, padding, dilation, groups)

    @staticmethod
    def symbolic(g, xq, x_scale, x_zero, w, w_scale, bias_q, bias_scale, stride, padding, dilation, groups):
        channels = w.type().sizes()[0]
        zeros = lambda dtype: _const(g, torch.zeros(channels, dtype=dtype))  # noqa: E731
        x = g.op("DequantizeLinear", xq, x_scale, x_zero)
        wd = g.op("DequantizeLinear", w, w_scale, zeros(torch.int8), axis_i=0)
        bd = g.op("DequantizeLinear", bias_q, bias_scale, zeros(torch.int32), axis_i=0)
        return g.op("Conv", x, wd, bd, strides_i=list(stride), pads_i=list(padding) * 2, dilations_i=list(dilation),
                    group_i=groups)


class _MatMulInteger(torch.autograd.Function):
    """Codes x codes (each with its zero point: uint8 activations, int8 weights) -> exact int32 -> float, times
    `scale`."""

    @staticmethod
    def forward(ctx, aq, bq, a_zero, b_zero, scale):
        return (_codes(aq, a_zero) @ _codes(bq, b_zero)) * scale

    @staticmethod
    def symbolic(g, aq, bq, a_zero, b_zero, scale):
        return _rescale(g, g.op("MatMulInteger", aq, bq, a_zero, b_zero), scale)


def _input_scale(module, name: str) -> torch.Tensor:
    iq = module.input_quant
    a = iq.args if iq is not None else None
    if a is None or a.dynamic or a.bits != 8 or not a.symmetric or a.granularity != "tensor" or iq.smooth is not None:
        raise ExportError(f"{name}: the ONNX export takes static symmetric 8-bit per-tensor activation scales (what "
                          f"hfq_ptq / hfq_cfws / hfq_fqpetr calibrate); this layer has "
                          f"{iq.extra_repr() if iq is not None else 'no activation quantizer (weight-only)'}")
    if not iq.calibrated():
        raise ExportError(f"{name}: its activation scale was never calibrated")
    return iq.scale.detach().float().reshape(())


def _input_zero(unsigned: bool) -> torch.Tensor:
    """A layer input's uint8 zero point: 128 (hfq's symmetric int8 codes shifted), or 0 for ReLU folding."""
    return torch.tensor(0 if unsigned else 128, dtype=torch.uint8)


def _operand(iq, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, uint8 zero point) of an activation x activation operand's quantizer: static per-tensor 8-bit;
    symmetric codes are q + 128 (zero point 128), asymmetric ones hfq's own codes and zero point."""
    a = iq.args
    if a.dynamic or a.bits != 8 or a.granularity != "tensor" or iq.smooth is not None:
        raise ExportError(f"{name}: the ONNX export takes static 8-bit per-tensor operand scales; this operand has "
                          f"{iq.extra_repr()}")
    if not iq.calibrated():
        raise ExportError(f"{name}: its activation scale was never calibrated")
    zero = _input_zero(False) if a.symmetric else iq.zero.detach().reshape(()).to(torch.uint8)
    return iq.scale.detach().float().reshape(()), zero


class _ExportMatMul(nn.Module):
    """QuantMatMul: both operands to uint8 codes, MatMulInteger, rescale (attention's Q.K^T and P.V)."""

    def __init__(self, module, name: str, *unused):
        super().__init__()
        (sa, za), (sb, zb) = _operand(module.a_quant, f"{name}.a_quant"), _operand(module.b_quant, f"{name}.b_quant")
        for key, value in dict(sa=sa, za=za, sb=sb, zb=zb, scale=sa * sb).items():
            self.register_buffer(key, value)

    def forward(self, a, b):
        return _MatMulInteger.apply(_Quantize.apply(a, self.sa, self.za), _Quantize.apply(b, self.sb, self.zb),
                                    self.za, self.zb, self.scale)


class _ExportAdd(nn.Module):
    """QuantAdd: each operand quantized and dequantized (QuantizeLinear / DequantizeLinear), then added."""

    def __init__(self, module, name: str, *unused):
        super().__init__()
        (sa, za), (sb, zb) = _operand(module.a_quant, f"{name}.a_quant"), _operand(module.b_quant, f"{name}.b_quant")
        for key, value in dict(sa=sa, za=za, sb=sb, zb=zb).items():
            self.register_buffer(key, value)

    def forward(self, a, b):
        qa = _Dequantize.apply(_Quantize.apply(a, self.sa, self.za), self.sa, self.za)
        return qa + _Dequantize.apply(_Quantize.apply(b, self.sb, self.zb), self.sb, self.zb)


def _int8_weight(module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    a = module.weight_args
    if not a.symmetric or a.granularity not in ("channel", "tensor"):
        raise ExportError(f"{name}: the ONNX export takes symmetric per-channel (or per-tensor) weights, got "
                          f"{'asymmetric ' if not a.symmetric else ''}{a.granularity}")
    q = module.int_weight()
    return q.to(torch.int8), module.weight_scale.detach().float().reshape(-1).expand(q.shape[0])


class _ExportConv(nn.Module):
    """A QuantConv2d or QuantCFWSConv2d on one quantized input: "integer" form = ConvInteger(s) summed, rescaled,
    plus the bias (exact; any layer); "qdq" form = DequantizeLinear -> Conv (one part only, its output requantized
    right after, which ORT fuses into QLinearConv; the bias rounded to int32 units of s_x * s_w as QLinearConv)."""

    def __init__(self, module, name: str, form: str = "integer", unsigned: bool = False):
        super().__init__()
        from ..nn import QuantCFWSConv2d

        parts = [module.coarse, module.fine] if isinstance(module, QuantCFWSConv2d) else [module]
        if form == "qdq" and len(parts) != 1:
            raise ExportError(f"{name}: a split (CFWS) convolution has no QDQ form")
        self.form = form
        self.register_buffer("x_scale", _input_scale(module, name))
        self.register_buffer("x_zero", _input_zero(unsigned))
        self.convs, bias = [], torch.zeros(1, parts[0].out_channels, 1, 1)
        for i, p in enumerate(parts):
            q, s = _int8_weight(p, name)
            q = q.reshape(p.out_channels, p.in_channels // p.groups, *p.kernel_size)
            self.register_buffer(f"w{i}", q if form == "qdq" else (q.to(torch.int16) + 128).to(torch.uint8))
            self.register_buffer(f"s{i}", (self.x_scale * s).reshape(1, -1, 1, 1))
            self.register_buffer(f"ws{i}", s.contiguous())
            self.convs.append((tuple(p.stride), tuple(p.padding), tuple(p.dilation), p.groups))
            if p.bias is not None:
                bias = bias + p.bias.detach().float().reshape(1, -1, 1, 1)
        self.register_buffer("bias", bias)
        if form == "qdq":
            unit = self.s0.reshape(-1)
            self.register_buffer("bias_q", torch.round(bias.reshape(-1) / unit).to(torch.int32))
            self.register_buffer("bias_unit", unit.contiguous())

    def forward(self, x):
        xq = _Quantize.apply(x, self.x_scale, self.x_zero)
        if self.form == "qdq":
            return _QDQConv.apply(xq, self.x_scale, self.x_zero, self.w0, self.ws0, self.bias_q, self.bias_unit,
                                  *self.convs[0])
        out = None
        for i, conv in enumerate(self.convs):
            y = _ConvInteger.apply(xq, self.x_zero, getattr(self, f"w{i}"), getattr(self, f"s{i}"), *conv)
            out = y if out is None else out + y
        return out + self.bias


class _ExportLinear(nn.Module):
    def __init__(self, module, name: str, form: str = "integer", unsigned: bool = False):
        super().__init__()
        self.register_buffer("x_scale", _input_scale(module, name))
        self.register_buffer("x_zero", _input_zero(unsigned))
        q, s = _int8_weight(module, name)
        self.register_buffer("w_t", q.t().contiguous())
        self.register_buffer("w_zero", torch.tensor(0, dtype=torch.int8))
        self.register_buffer("scale", self.x_scale * s)
        self.register_buffer("bias", torch.zeros(module.out_features) if module.bias is None else
                             module.bias.detach().float())

    def forward(self, x):
        xq = _Quantize.apply(x, self.x_scale, self.x_zero)
        return _MatMulInteger.apply(xq, self.w_t, self.x_zero, self.w_zero, self.scale) + self.bias


def _layers(model):
    """The packed layers the exporter writes, by name (a CFWS layer once, not its coarse / fine parts). Any other
    quantized module (an activation quantizer outside these layers: QuantMatMul / QuantAdd operands, lookup tables)
    is refused by name: exported as is, it would run as a float fake-quant simulation."""
    from ..nn import (ActQuantizer, LUTFunction, PackedWeight, QuantAdd, QuantCFWSConv2d, QuantConv2d, QuantLinear,
                      QuantMatMul, QuantSoftmax)

    found, tables = {}, []
    for name, m in model.named_modules():
        if any(name.startswith(done + ".") for done in [*found, *tables]):
            continue
        if isinstance(m, (QuantConv2d, QuantCFWSConv2d, QuantLinear, QuantMatMul, QuantAdd)):
            found[name] = m
        elif isinstance(m, (LUTFunction, QuantSoftmax)):
            # FQ-PETR's tables and QANS softmax trace as they compute: the input clamped and rounded to its integer
            # code (Clip / Round), the DULUT's two tables read by Gather at those codes, masked rows as Where
            if not m.calibrated():
                raise ExportError(f"{name}: {type(m).__name__} is not calibrated")
            tables.append(name)
        elif isinstance(m, (PackedWeight, ActQuantizer)) or getattr(m, "calibrates_with_activations", False):
            raise ExportError(f"{name}: {type(m).__name__} has no ONNX export yet (QuantConv2d, QuantCFWSConv2d, "
                              f"QuantLinear, QuantMatMul and QuantAdd do)")
    return found


@torch.no_grad()
def plan_forms(model, inputs: dict) -> dict[str, tuple[str, bool]]:
    """name -> (form, unsigned input) from one forward on `inputs`: a single-part convolution takes the "qdq" form
    when its output, directly or through one nn.ReLU, is read by one quantized layer only (so ORT finds the one
    QuantizeLinear to fuse with), else the exact "integer" form; a layer's input codes are "unsigned" (zero point 0)
    when they are a qdq convolution's ReLU output (ORT folds the ReLU only then), else signed (zero point 128)."""
    from ..nn import QuantConv2d, QuantLinear

    layers = _layers(model)
    seen_in, seen_out, relu, keep, hooks = {}, {}, {}, [], []

    def pre(name):
        def hook(mod, args):
            keep.append(args[0])
            seen_in.setdefault(name, []).append(args[0])
        return hook

    def post(name):
        def hook(mod, args, out):
            keep.append(out)
            seen_out.setdefault(name, []).append(out)
        return hook

    def relu_hook(mod, args, out):
        keep.extend([args[0], out])
        relu[id(args[0])] = out

    for name, m in layers.items():
        hooks += [m.register_forward_pre_hook(pre(name)), m.register_forward_hook(post(name))]
    hooks += [m.register_forward_hook(relu_hook) for m in model.modules() if isinstance(m, nn.ReLU)]
    try:
        model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    consumers: dict[int, set] = {}
    for name, xs in seen_in.items():
        for x in xs:
            consumers.setdefault(id(x), set()).add(name)
    forms, fused_inputs = {}, set()
    for name, m in layers.items():
        forms[name] = "integer"
        if type(m) is QuantConv2d and name in seen_out:
            outs = [relu.get(id(y), y) for y in seen_out[name]]
            readers = {c for y in outs for c in consumers.get(id(y), ())}
            # read by one quantized layer only: ORT fuses a Conv with one QuantizeLinear (two readers' equal
            # scales are separate initializers, which its common-subexpression pass does not merge)
            # (a QuantMatMul / QuantAdd operand quantizer cannot take the ReLU-folding zero point 0: not fused)
            if all(id(y) in consumers for y in outs) and len(readers) == 1 and isinstance(
                    layers[next(iter(readers))], (QuantConv2d, QuantLinear)):
                forms[name] = "qdq"
                fused_inputs.update(id(relu[id(raw)]) for raw in seen_out[name] if id(raw) in relu)  # via a ReLU
                # (an in-place ReLU returns its input object: the test is whether the output went through one)
    # zero point 0 only where ORT must fold a ReLU into the producer's QLinearConv; elsewhere signed codes, which
    # saturate at 127 as hfq's
    return {name: (forms[name], bool(seen_in.get(name)) and all(id(x) in fused_inputs and bool((x >= 0).all())
                                                                 for x in seen_in[name]))
            for name in layers}


def integer_view(model: nn.Module, inputs: dict, exact: bool = False) -> list[tuple[nn.Module, str, nn.Module]]:
    """Swap every packed layer of `model` for its export module (forms from `plan_forms` on `inputs`; every layer
    "integer" when `exact`), in place; returns the swaps to undo (`restore`). Layers this exporter cannot write
    raise an `ExportError` naming them, before anything is swapped."""
    layers, plan = _layers(model), plan_forms(model, inputs)
    if exact:  # signed codes everywhere: they saturate at 127 as hfq's
        plan = {name: ("integer", False) for name in plan}
    kinds = {"QuantLinear": _ExportLinear, "QuantMatMul": _ExportMatMul, "QuantAdd": _ExportAdd}
    new = {name: kinds.get(type(m).__name__, _ExportConv)(m, name, *plan[name]) for name, m in layers.items()}
    swaps = []
    for name, module in new.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        swaps.append((parent, child, getattr(parent, child)))
        setattr(parent, child, module)
    return swaps


def restore(swaps) -> None:
    for parent, child, old in reversed(swaps):
        setattr(parent, child, old)


@dataclass
class OnnxSpec:
    """What optimum's `OnnxConfig` says of a model, plus what its runner needs:
    inputs: graph input name -> dynamic axes; outputs(config) -> output name (an attribute of the model's output)
    -> dynamic axes; dummy(config, batch) -> {input: tensor} for tracing; prepare(config, **model kwargs) ->
    {input: tensor} (the runner's pre-processing of the PyTorch model's keyword arguments); call(model, inputs) ->
    the PyTorch model's output; model_class / config_class: "module:Class" of the PyTorch classes whose
    config-only methods (post_process, get_image_processor) the runner borrows."""

    inputs: dict[str, dict[int, str]]
    outputs: Callable
    dummy: Callable
    model_class: str
    config_class: str
    prepare: Callable | None = None
    call: Callable | None = None

    def run(self, model, inputs):
        return self.call(model, inputs) if self.call else model(**inputs, return_dict=True)

    def feed(self, config, kwargs):
        if self.prepare:
            return self.prepare(config, **kwargs)
        missing = [k for k in self.inputs if k not in kwargs]
        if missing:
            raise TypeError(f"missing model inputs {missing}")
        return {k: kwargs[k] for k in self.inputs}


def _image_dummy(config, batch):
    size = getattr(config, "image_size", 224)
    size = size if isinstance(size, (tuple, list)) else (size, size)
    return {"pixel_values": torch.randn(batch, config.in_channels, *size, generator=torch.Generator().manual_seed(0))}


def _flashocc_prepare(config, pixel_values, intrinsics, sensor2ego, img_aug=None, post_rots=None, post_trans=None,
                      bda=None, ego2global=None, **ignored):
    from ..modeling.flashocc.flashocc_geometry import camera_plan, prepare_cameras

    cams = prepare_cameras(config, pixel_values, intrinsics, sensor2ego, img_aug, post_rots, post_trans, bda,
                           ego2global)
    names = ("sensor2ego", "intrinsics", "post_rots", "post_trans", "bda")
    return {"pixel_values": pixel_values, **dict(zip(names, cams)),
            **dict(zip(("bev_cell", "bev_pixel", "bev_prob"), camera_plan(config, *cams)))}


def _flashocc_dummy(config, batch):
    """One forward-looking camera 1.6 m up (focal length half the image width), random pixels."""
    h, w = config.input_size
    g = torch.Generator().manual_seed(0)
    k = torch.tensor([[w / 2, 0, w / 2], [0, w / 2, h / 2], [0, 0, 1]]).expand(batch, 1, 3, 3)
    s2e = torch.eye(4).repeat(batch, 1, 1, 1)
    s2e[:, 0, :3, :3] = torch.tensor([[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]])
    s2e[:, 0, 2, 3] = 1.6
    return _flashocc_prepare(config, torch.randn(batch, 1, 3, h, w, generator=g), k, s2e)


def _flashocc_call(model, inputs):
    import inspect

    if "bev_plan" not in inspect.signature(model.forward).parameters:
        raise ExportError("this FlashOcc checkpoint's shipped modeling code predates the precomputed BEV pooling plan "
                          "the ONNX graph takes as input: re-save it with the current code "
                          "(hfq.modeling.flashocc.FlashOccForOccupancy.from_pretrained(dir).save_pretrained(dir))")
    plan = (inputs["bev_cell"], inputs["bev_pixel"], inputs["bev_prob"])
    return model(**{k: v for k, v in inputs.items() if not k.startswith("bev_")}, bev_plan=plan)


def _flashocc_outputs(config):
    heads = ["logits"] + (["center_heatmap", "center_offset", "center_height"] if config.panoptic else [])
    return {name: {0: "batch"} for name in heads}


def _petr_prepare(config, pixel_values, lidar2img, pixel_mask=None, **ignored):
    from ..modeling.petr.petr_geometry import img_to_lidar

    if pixel_mask is None:
        pixel_mask = torch.ones(pixel_values.shape[:2] + pixel_values.shape[-2:])
    return {"pixel_values": pixel_values, "lidar2img": lidar2img.float(), "img2lidar": img_to_lidar(lidar2img),
            "pixel_mask": pixel_mask.float()}


def _petr_dummy(config, batch):
    """One camera looking along the LiDAR's x axis (focal length half the image width), random pixels."""
    h, w = config.input_size
    k = torch.tensor([[w / 2, 0, w / 2, 0], [0, w / 2, h / 2, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    lidar_to_cam = torch.tensor([[0.0, -1, 0, 0], [0, 0, -1, 0], [1, 0, 0, 0], [0, 0, 0, 1]])
    lidar2img = (k @ lidar_to_cam).expand(batch, 1, 4, 4)
    pixels = torch.randn(batch, 1, 3, h, w, generator=torch.Generator().manual_seed(0))
    return _petr_prepare(config, pixels, lidar2img)


def _petr_call(model, inputs):
    import inspect

    if getattr(model.config, "memory_len", 0) > 0:
        raise ExportError("StreamPETR's memory queue (memory_len > 0) is not exported yet: export a PETR / PETRv2 "
                          "config")
    if "img2lidar" not in inspect.signature(model.forward).parameters:
        raise ExportError("this PETR checkpoint's shipped modeling code predates the img2lidar input the ONNX graph "
                          "takes: re-save it with the current code "
                          "(hfq.modeling.petr.PetrForObjectDetection3D.from_pretrained(dir).save_pretrained(dir))")
    return model(**inputs)


SPECS = {
    "hfq_repvgg": OnnxSpec(inputs={"pixel_values": {0: "batch"}}, outputs=lambda config: {"logits": {0: "batch"}},
                           dummy=_image_dummy, model_class="hfq.modeling.repvgg:RepVGGForImageClassification",
                           config_class="hfq.modeling.repvgg:RepVGGConfig"),
    # the BEV pooling plan (BEVPoolv2's precomputed ranks) enters as three index inputs: the camera geometry stays
    # outside the graph (it needs 3x3 inverses and changes only with the rig); the runner computes it
    "hfq_flashocc": OnnxSpec(
        inputs={"pixel_values": {0: "batch", 1: "cameras"}, "sensor2ego": {0: "batch", 1: "cameras"},
                "intrinsics": {0: "batch", 1: "cameras"}, "post_rots": {0: "batch", 1: "cameras"},
                "post_trans": {0: "batch", 1: "cameras"}, "bda": {0: "batch"}, "bev_cell": {0: "points"},
                "bev_pixel": {0: "points"}, "bev_prob": {0: "points"}},
        outputs=_flashocc_outputs, dummy=_flashocc_dummy, prepare=_flashocc_prepare, call=_flashocc_call,
        model_class="hfq.modeling.flashocc:FlashOccForOccupancy", config_class="hfq.modeling.flashocc:FlashOccConfig"),
    # lidar2img's inverse enters as an input (ONNX has no matrix inverse); outputs are (layers, batch, queries, ...)
    "hfq_petr": OnnxSpec(
        inputs={"pixel_values": {0: "batch", 1: "cameras"}, "lidar2img": {0: "batch", 1: "cameras"},
                "img2lidar": {0: "batch", 1: "cameras"}, "pixel_mask": {0: "batch", 1: "cameras"}},
        outputs=lambda config: {"logits": {1: "batch"}, "pred_boxes": {1: "batch"}}, dummy=_petr_dummy,
        prepare=_petr_prepare, call=_petr_call, model_class="hfq.modeling.petr:PetrForObjectDetection3D",
        config_class="hfq.modeling.petr:PetrConfig"),
}


def _import(path: str):
    import importlib

    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


class _Outputs(nn.Module):
    """The model as a function of its spec's inputs, returning the spec's outputs as a tuple (what tracing needs)."""

    def __init__(self, model, spec: OnnxSpec):
        super().__init__()
        self.model, self.spec, self.names = model, spec, list(spec.outputs(model.config))

    def forward(self, *args):
        out = self.spec.run(self.model, dict(zip(self.spec.inputs, args)))
        return tuple(getattr(out, a) for a in self.names)


def load_for_export(folder):
    """A saved (custom-code) vision checkpoint with its task head: the auto_map's image classifier when it has one
    (RepVGG), else its AutoModel (PETR, FlashOcc); packed checkpoints reload packed (import hfq first)."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    auto = AutoModelForImageClassification if "AutoModelForImageClassification" in (
        getattr(config, "auto_map", None) or {}) else AutoModel
    return auto.from_pretrained(folder, trust_remote_code=True).eval()


def spec_for(model_type) -> OnnxSpec:
    if model_type not in SPECS:
        raise ExportError(f"no ONNX spec for model_type {model_type!r}; known: {sorted(SPECS)}")
    return SPECS[model_type]


@torch.no_grad()
def export(model, output_dir, opset: int = OPSET, batch: int = 1, exact: bool = False) -> Path:
    """Write `output_dir`/model.onnx (integer operators for hfq's packed layers, float for the rest) and the model's
    config.json (labels, settings); returns the .onnx path. The file appears only once complete.
    exact=False (default): convolutions whose output is requantized right away go as QDQ, which ORT runs as
    QLinearConv (fast; its requantization rounds in its own fixed point: codes may differ by one from hfq's, and
    codes after a ReLU saturate at 255 instead of 127); exact=True: every layer as ConvInteger / MatMulInteger, the
    same integers as hfq's PyTorch model (slower in ORT)."""
    spec = spec_for(getattr(model.config, "model_type", None))
    _require("onnx")  # torch.onnx.export writes through it
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dummy = spec.dummy(model.config, batch)
    model.eval()
    swaps = integer_view(model, dummy, exact)
    path, tmp = out / "model.onnx", out / "model.onnx.tmp"
    try:
        outputs = spec.outputs(model.config)
        torch.onnx.export(_Outputs(model, spec), tuple(dummy[k] for k in spec.inputs), str(tmp), dynamo=False,
                          opset_version=opset, input_names=list(spec.inputs), output_names=list(outputs),
                          dynamic_axes={**spec.inputs, **outputs}, do_constant_folding=True)
    except BaseException:
        tmp.unlink(missing_ok=True)  # no half-written file left behind
        raise
    finally:
        restore(swaps)
    os.replace(tmp, path)
    model.config.to_json_file(out / "config.json")
    (out / "hfq_onnx.json").write_text(json.dumps({"opset": opset, "inputs": list(spec.inputs),
                                                   "outputs": list(outputs),
                                                   "quantized": bool(swaps), "exact": exact}, indent=2))
    return path


class _OnnxOutput:
    """The outputs as attributes (tensors); any other attribute of the PyTorch output reads as None."""

    def __init__(self, values: dict):
        self.__dict__.update(values)

    def __getattr__(self, name):
        return None


class OnnxRuntimeModel:
    """An exported folder run by ONNX Runtime on CPU, called like the PyTorch model (its keyword inputs as tensors ->
    an object with the spec's outputs as tensors), with the PyTorch class's config-only helpers (`post_process`,
    `get_image_processor`): so hfq's evaluators score the file as they score the model. `threads`: intra-op
    threads (default: ORT's); `optimized_path`: where ORT saves the graph it optimized."""

    def __init__(self, folder, threads: int | None = None, optimized_path: str | None = None):
        ort = _require("onnxruntime")
        folder = Path(folder)
        info = json.loads((folder / "hfq_onnx.json").read_text())
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        if optimized_path:
            options.optimized_model_filepath = optimized_path
        self.session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        self.outputs = info["outputs"]
        self._inputs = {i.name for i in self.session.get_inputs()}  # the exporter drops inputs the graph never reads
        self.spec = spec_for(json.loads((folder / "config.json").read_text()).get("model_type"))
        self.config = _import(self.spec.config_class).from_json_file(folder / "config.json")
        self._model_class = _import(self.spec.model_class)

    def __call__(self, **inputs):
        feed = {k: v.detach().cpu() for k, v in self.spec.feed(self.config, inputs).items() if k in self._inputs}
        feed = {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in feed.items()}
        values = self.session.run(self.outputs, feed)
        return _OnnxOutput({k: torch.from_numpy(v) for k, v in zip(self.outputs, values)})

    def post_process(self, outputs, *args, **kwargs):
        return self._model_class.post_process(self, outputs, *args, **kwargs)

    def get_image_processor(self, **kwargs):
        return self._model_class.get_image_processor(self, **kwargs)

    def eval(self):
        return self

    def to(self, device):
        if torch.device(device).type != "cpu":
            raise ValueError("OnnxRuntimeModel runs on the CPU execution provider")
        return self


def operator_counts(optimized_model_path) -> dict[str, int]:
    """(domain:)op_type -> count in an ONNX file (e.g. the graph ORT optimized and saved)."""
    onnx = _require("onnx")
    counts: dict[str, int] = {}
    for node in onnx.load(str(optimized_model_path)).graph.node:
        key = f"{node.domain}:{node.op_type}" if node.domain else node.op_type
        counts[key] = counts.get(key, 0) + 1
    return counts
