"""An ONNX upload as a PyTorch module, so the training techniques can run on it: onnx2torch
converts the graph (each ONNX node an nn.Module in a torch.fx graph: Conv, Gemm and
BatchNormalization become nn.Conv2d / nn.Linear / nn.BatchNorm2d holding the weights), and the
conversion is kept only when its outputs match onnxruntime's on the same inputs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

# A converted model must give onnxruntime's logits to this tolerance (relative to their scale).
TOLERANCE = 1e-4
CHECK_SAMPLES = 8
# The batch-norm momentum torch's own layers use; onnx2torch sets the ONNX file's (0.9 = a
# running mean that almost never moves in training).
BATCH_NORM_MOMENTUM = 0.1


def import_torchvision() -> None:
    """Import torchvision's Python side (onnx2torch and timm need it). Its compiled operators are
    built for one torch release; where they do not load, the schemas torchvision registers fake
    kernels for at import are declared here first (no kernel: calling them raises)."""
    for name in ("nms", "qnms"):
        if not hasattr(torch.ops.torchvision, name):
            _TORCHVISION_SCHEMAS.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401


_TORCHVISION_SCHEMAS = torch.library.Library("torchvision", "FRAGMENT")


def convert(path: Path, input_shape: tuple) -> tuple[torch.nn.Module | None, dict]:
    """(module, note) when onnx2torch converts the file and the module's outputs match
    onnxruntime's on random inputs of `input_shape` (batch of CHECK_SAMPLES); (None, why not)
    otherwise. The note says what was checked, for LoadedModel.preparation."""
    from optimization.backends.pytorch import ort_session

    try:
        import_torchvision()
        from onnx2torch import convert as onnx2torch_convert

        import onnx

        module = onnx2torch_convert(prepared_for_onnx2torch(onnx.load(str(path))))
    except Exception as error:  # an operator onnx2torch lacks, or a layout it cannot express
        return None, {"converted": False, "reason": f"onnx2torch could not convert it: {_first_line(error)}"}
    for layer in module.modules():
        if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
            layer.momentum = BATCH_NORM_MOMENTUM
    _constant_shape_ops_as_calls(module, input_shape)
    _per_channel_constants_as_parameters(module)
    module.eval()
    samples = np.random.default_rng(0).standard_normal((CHECK_SAMPLES, *input_shape)).astype(np.float32)
    session = ort_session(path)
    try:
        expected = session.run(None, {session.get_inputs()[0].name: samples})[0]
        with torch.no_grad():
            got = module(torch.from_numpy(samples))
        got = (got[0] if isinstance(got, (tuple, list)) else got).numpy()
    except Exception as error:
        return None, {"converted": False, "reason": f"the converted model does not run: {_first_line(error)}"}
    scale = max(1.0, float(np.abs(expected).max()))
    difference = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
    if difference > TOLERANCE * scale:
        return None, {"converted": False,
                      "reason": f"onnx2torch's module differs from onnxruntime by {difference:.3g} on the logits"}
    return module, {"converted": True, "converter": "onnx2torch",
                    "checked": f"logits of {CHECK_SAMPLES} random inputs within {TOLERANCE:g} (relative) of "
                               f"onnxruntime's; largest difference {difference:.2g}"}


# onnx2torch 1.5 knows the standard operators up to opset 17.
CONVERTER_OPSET = 17


def prepared_for_onnx2torch(model):
    """The same computation in the form onnx2torch reads: each Identity of a weight (the legacy
    exporter's way to share equal initializers) becomes a copy of that weight; Reshape's
    `allowzero` is dropped where its shape cannot hold a 0 (both forms are the same then); Gelu
    (opset 20) is written out with Erf or Tanh; then onnx's version converter takes the graph
    down to CONVERTER_OPSET (ReduceMean's axes input back to an attribute, and the like)."""
    import onnx
    from onnx import helper, numpy_helper, version_converter

    graph = model.graph
    constants = {init.name: init for init in graph.initializer}
    constants |= {node.output[0]: node.attribute[0].t for node in graph.node
                  if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value"}
    nodes = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in constants:
            weight = onnx.TensorProto()
            weight.CopyFrom(constants[node.input[0]])
            weight.name = node.output[0]
            graph.initializer.append(weight)
            continue
        if node.op_type == "Reshape":
            shape = constants.get(node.input[1])
            if shape is None or 0 not in numpy_helper.to_array(shape):
                kept = [a for a in node.attribute if a.name != "allowzero"]
                del node.attribute[:]
                node.attribute.extend(kept)
        if node.op_type == "Gelu":
            nodes.extend(_gelu_written_out(node, graph, helper, numpy_helper))
            continue
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), CONVERTER_OPSET)
    return version_converter.convert_version(model, CONVERTER_OPSET) if opset > CONVERTER_OPSET else model


def _gelu_written_out(node, graph, helper, numpy_helper) -> list:
    """Gelu as opset-13 nodes: x/2 * (1 + erf(x/sqrt 2)), or with approximate="tanh"
    x/2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))."""
    approximate = next((a.s.decode() for a in node.attribute if a.name == "approximate"), "none")
    x, y, prefix = node.input[0], node.output[0], f"{node.name or node.output[0]}_gelu"

    def constant(name: str, value: float) -> str:
        graph.initializer.append(numpy_helper.from_array(np.array(value, np.float32), f"{prefix}_{name}"))
        return f"{prefix}_{name}"

    half, one = constant("half", 0.5), constant("one", 1.0)
    if approximate == "tanh":
        nodes = [helper.make_node("Mul", [x, x], [f"{prefix}_x2"]),
                 helper.make_node("Mul", [f"{prefix}_x2", x], [f"{prefix}_x3"]),
                 helper.make_node("Mul", [f"{prefix}_x3", constant("c", 0.044715)], [f"{prefix}_cx3"]),
                 helper.make_node("Add", [x, f"{prefix}_cx3"], [f"{prefix}_inner"]),
                 helper.make_node("Mul", [f"{prefix}_inner", constant("k", float(np.sqrt(2 / np.pi)))],
                                  [f"{prefix}_scaled"]),
                 helper.make_node("Tanh", [f"{prefix}_scaled"], [f"{prefix}_curve"])]
    else:
        nodes = [helper.make_node("Mul", [x, constant("inv_sqrt2", float(1 / np.sqrt(2)))], [f"{prefix}_scaled"]),
                 helper.make_node("Erf", [f"{prefix}_scaled"], [f"{prefix}_curve"])]
    return nodes + [helper.make_node("Add", [f"{prefix}_curve", one], [f"{prefix}_plus_one"]),
                    helper.make_node("Mul", [x, half], [f"{prefix}_half_x"]),
                    helper.make_node("Mul", [f"{prefix}_half_x", f"{prefix}_plus_one"], [y])]


def _constant_shape_ops_as_calls(module: torch.fx.GraphModule, input_shape: tuple) -> None:
    """onnx2torch's Reshape module tests its shape tensor for zeros at run time, which
    torch.export cannot trace (a data-dependent branch); where the shape is a constant without a
    zero, call torch.reshape with it as a tuple instead, or torch.flatten(x, 1) where it is
    (-1, features of one sample): the classifier's input then follows a pruned layer's width
    instead of folding the lost channels into the batch. Its Slice module reads its starts, ends,
    axes and steps with `.numpy()` on every call, which torch.export refuses; where they are
    constants (with positive steps), index with Python slices instead. Its Range module reads
    all three bounds with `.item()`, which leaves torch.export unable to size the result; where
    the start and a positive step are constants, only the limit (e.g. the batch size, from a
    Shape node) is read (range_to)."""
    from onnx2torch.node_converters.range import OnnxRange
    from onnx2torch.node_converters.reshape import OnnxReshape
    from onnx2torch.node_converters.slice import OnnxSlice

    from torch.fx.passes.shape_prop import ShapeProp

    graph = module.graph
    ShapeProp(module).propagate(torch.zeros(2, *input_shape))  # each node's output shape, in its meta
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        layer = module.get_submodule(node.target)
        if isinstance(layer, OnnxReshape):
            source, shape = node.args
            value = _constant(module, shape)
            if value is None or value.ndim != 1 or bool((value == 0).any()):
                continue
            call = (torch.reshape, (source, tuple(int(size) for size in value)))
            if _flattens_each_sample(source, value.tolist()):
                call = (torch.flatten, (source, 1))
        elif isinstance(layer, OnnxSlice):
            source, *bounds = node.args  # starts, ends, then optional axes and steps (None when absent)
            values = [None if bound is None else _constant(module, bound) for bound in bounds]
            given = [value for value, bound in zip(values, bounds) if bound is not None]
            if None in values[:2] or any(value is None or value.ndim != 1 for value in given):
                continue
            starts, ends, axes, steps = _slice_bounds(values)
            if any(step <= 0 for step in steps):
                continue
            call = (constant_slice, (source, tuple(starts), tuple(ends), tuple(axes), tuple(steps)))
        elif isinstance(layer, OnnxRange):
            start, limit, delta = node.args
            start, delta = _constant(module, start), _constant(module, delta)
            if (start is None or delta is None or start.numel() != 1 or delta.numel() != 1
                    or start.is_floating_point() or delta.is_floating_point() or int(delta) <= 0):
                continue
            call = (range_to, (limit, int(start), int(delta)))
        else:
            continue
        with graph.inserting_before(node):
            replacement = graph.call_function(*call)
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    module.delete_all_unused_submodules()
    module.recompile()


def _flattens_each_sample(source, shape: list[int]) -> bool:
    """Whether reshaping `source` to `shape` is (-1, all of one sample's values)."""
    meta = source.meta.get("tensor_meta") if isinstance(source, torch.fx.Node) else None
    return (meta is not None and len(meta.shape) > 2 and len(shape) == 2 and shape[0] == -1
            and shape[1] == int(np.prod(meta.shape[1:])))


def _slice_bounds(values: list) -> tuple[list[int], list[int], list[int], list[int]]:
    """ONNX Slice's starts, ends and optional axes (default 0..n-1) and steps (default 1)."""
    starts, ends = ([int(v) for v in value] for value in values[:2])
    axes = [int(v) for v in values[2]] if len(values) > 2 and values[2] is not None else list(range(len(starts)))
    steps = [int(v) for v in values[3]] if len(values) > 3 and values[3] is not None else [1] * len(starts)
    return starts, ends, axes, steps


def constant_slice(x: torch.Tensor, starts: tuple, ends: tuple, axes: tuple, steps: tuple) -> torch.Tensor:
    """ONNX Slice with constant bounds and positive steps (Python slicing clamps as ONNX does)."""
    index = [slice(None)] * x.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps):
        index[axis] = slice(start, end, step)
    return x[tuple(index)]


def range_to(limit: torch.Tensor, start: int, step: int) -> torch.Tensor:
    """ONNX Range from constant `start` and positive `step` to a computed `limit` (empty below
    the start, as ONNX gives): torch.export sizes it by max(limit, start), never negative."""
    return torch.arange(start, torch.sym_max(limit.item(), start), step)


def _constant(module: torch.fx.GraphModule, node) -> torch.Tensor | None:
    """The value of a graph input that is a constant: an initializer or an ONNX Constant node."""
    from onnx2torch.node_converters.constant import OnnxConstant

    if not isinstance(node, torch.fx.Node):
        return None
    if node.op == "get_attr":
        return _attribute(module, node.target)
    if node.op == "call_module" and isinstance(module.get_submodule(node.target), OnnxConstant):
        value = module.get_submodule(node.target).value
        return value if isinstance(value, torch.Tensor) else None
    return None


def _per_channel_constants_as_parameters(module: torch.fx.GraphModule) -> None:
    """onnx2torch keeps every initializer as a buffer. The ones an Add/Sub/Mul/Div applies per
    channel (ConvNeXt's layer scale, a bias the exporter split from its layer) were parameters
    in the model exported: as parameters again they are trained, and Torch-Pruning removes their
    entries along with the channels they scale (it prunes an unwrapped parameter along its one
    dimension longer than 1) instead of leaving a full-width tensor the narrowed layers no
    longer broadcast with."""
    from onnx2torch.node_converters.binary_math_operations import OnnxBinaryMathOperation

    for node in module.graph.nodes:
        if node.op != "get_attr" or not node.users:
            continue
        owner_name, _, name = node.target.rpartition(".")
        owner = module.get_submodule(owner_name)
        value = getattr(owner, name)
        if (not isinstance(value, torch.Tensor) or isinstance(value, torch.nn.Parameter)
                or not value.is_floating_point() or sum(size > 1 for size in value.shape) != 1):
            continue
        if all(user.op == "call_module" and isinstance(module.get_submodule(user.target), OnnxBinaryMathOperation)
               for user in node.users):
            delattr(owner, name)
            owner.register_parameter(name, torch.nn.Parameter(value.clone()))


def _attribute(module: torch.nn.Module, target: str) -> torch.Tensor:
    owner, _, name = target.rpartition(".")
    return getattr(module.get_submodule(owner), name)


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__
