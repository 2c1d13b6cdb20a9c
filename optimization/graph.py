"""A small framework-neutral op graph read from deploy files (.onnx, .tflite).

The analyzer and the estimator work on this list of ops, never on a framework object, so
both stay pure and cheap. Each `Op` is one kernel as the runtime would run it: a Conv
followed by BatchNorm and Relu/Clip is one fused conv, quantize/dequantize pairs around a
quantized op are folded into that op, reshape-like ops are kept (they cost a dispatch).

Only `onnx` (ONNX files) and the flatbuffer schema shipped with LiteRT (TFLite files) are
imported, and only inside the reader that needs them.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

KERNEL_CLASSES = ("conv", "depthwise", "conv1x1", "fc", "elementwise", "pool", "other")
PRECISION_BITS = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4}
WEIGHTED_CLASSES = ("conv", "depthwise", "conv1x1", "fc")


@dataclass
class Op:
    name: str
    op_type: str  # the file's own operator name (Conv, CONV_2D, QLinearConv, ...)
    kind: str  # one of KERNEL_CLASSES
    inputs: list[str]  # activation tensors read (constants excluded)
    outputs: list[str]
    output_shape: list[int]
    activation_bytes: int  # bytes of the output tensor(s)
    params: int = 0
    macs: int = 0
    weight_bytes: int = 0  # at storage width
    precision: str = "fp32"  # compute precision of this kernel
    weight_bits: int = 32
    fused: list[str] = field(default_factory=list)  # op types folded into this kernel
    kernel: tuple[int, ...] = ()  # spatial kernel size of convolutions
    strides: tuple[int, ...] = ()

    @property
    def winograd_eligible(self) -> bool:
        """A dense 3x3 stride-1 convolution, which some runtimes compute with Winograd transforms."""
        return self.kind == "conv" and self.kernel == (3, 3) and all(s == 1 for s in self.strides)

    def as_layer(self) -> dict:
        return {
            "name": self.name,
            "type": self.kind,
            "op_type": self.op_type,
            "params": self.params,
            "macs": self.macs,
            "output_shape": self.output_shape,
            "activation_bytes": self.activation_bytes,
            "weight_bytes": self.weight_bytes,
            "precision": self.precision,
            "fused": self.fused,
        }


@dataclass
class Graph:
    ops: list[Op]
    tensor_bytes: dict[str, int]  # every activation tensor, including graph inputs
    tensor_elements: dict[str, int]
    inputs: list[str]
    outputs: list[str]
    input_shape: list[int]
    source_format: str  # "onnx" / "tflite"

    @property
    def runtime(self) -> str:
        return "tflite" if self.source_format == "tflite" else "onnxruntime"

    @property
    def params(self) -> int:
        return sum(op.params for op in self.ops)

    @property
    def macs(self) -> int:
        return sum(op.macs for op in self.ops)

    @property
    def weight_bytes(self) -> int:
        return sum(op.weight_bytes for op in self.ops)

    @property
    def precision(self) -> str:
        """The precision that carries most of the MACs (fp32 for a graph without MACs)."""
        by_macs = Counter()
        for op in self.ops:
            if op.kind in WEIGHTED_CLASSES:
                by_macs[op.precision] += max(op.macs, 1)
        return by_macs.most_common(1)[0][0] if by_macs else "fp32"


def load_graph(path: str | Path) -> Graph:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return read_onnx(path)
    if suffix == ".tflite":
        return read_tflite(path)
    raise ValueError(f"cannot read {path.name}: the graph reader takes .onnx or .tflite files")


def _prod(shape) -> int:
    return int(math.prod(max(int(d), 1) for d in shape)) if shape else 1


def _conv_kind(kernel_hw: tuple[int, int], groups: int, in_channels: int) -> str:
    if groups > 1 and groups == in_channels:
        return "depthwise"
    if kernel_hw == (1, 1) and groups == 1:
        return "conv1x1"
    return "conv"


# ---------------------------------------------------------------- ONNX

_ONNX_ELEMENTWISE = {
    "Add", "Sub", "Mul", "Div", "Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
    "LeakyRelu", "PRelu", "Elu", "Selu", "Gelu", "Erf", "Sqrt", "Pow", "Exp", "Neg", "Abs", "Max",
    "Min", "BatchNormalization", "Cast", "Where", "Equal", "Softplus", "Mish",
}
_ONNX_POOL = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "QLinearAveragePool",
              "QLinearGlobalAveragePool"}
# Folded into the producing conv/fc when it is that kernel's only consumer.
_ONNX_FUSABLE = {"BatchNormalization", "Relu", "Clip", "LeakyRelu", "HardSigmoid", "Sigmoid", "Tanh"}
_ONNX_ALIASES = {"Identity", "Dropout"}
_ONNX_DTYPE_BITS = {1: 32, 2: 8, 3: 8, 6: 32, 7: 64, 9: 8, 10: 16, 11: 64, 16: 16, 21: 4, 22: 4}


def read_onnx(path: Path) -> Graph:
    import onnx

    model = _infer_shapes(_batch_of_one(onnx.load(str(path), load_external_data=False)))
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    constants = dict(initializers)
    for node in graph.node:  # Constant nodes are weights too (some exporters emit them)
        if node.op_type == "Constant" and node.attribute and node.attribute[0].t.dims:
            constants[node.output[0]] = node.attribute[0].t

    shapes: dict[str, list[int]] = {}
    dtypes: dict[str, int] = {}
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        tensor_type = value.type.tensor_type
        dims = [d.dim_value if d.dim_value > 0 else 1 for d in tensor_type.shape.dim]
        shapes[value.name] = dims
        dtypes[value.name] = tensor_type.elem_type

    def elements(init) -> int:
        return _prod(init.dims)

    # DequantizeLinear of a constant = a quantized weight: remember its storage width.
    quantized_weight: dict[str, tuple[str, int]] = {}
    folded_at_load: set[str] = set()  # low-bit storage that onnxruntime turns into float weights
    alias: dict[str, str] = {}
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in constants:
            init = constants[node.input[0]]
            quantized_weight[node.output[0]] = (node.input[0], _ONNX_DTYPE_BITS.get(init.data_type, 8))
        elif node.op_type == "Cast" and node.input[0] in constants:
            # Mul(Cast(int4 weight), Cast(scale)) -> Reshape: a quantized weight onnxruntime folds at load
            init = constants[node.input[0]]
            if _ONNX_DTYPE_BITS.get(init.data_type, 32) <= 8:
                quantized_weight[node.output[0]] = (node.input[0], _ONNX_DTYPE_BITS[init.data_type])
                folded_at_load.add(node.output[0])
            else:
                constants[node.output[0]] = init
        elif (node.op_type in ("Mul", "Reshape") and node.input[0] in quantized_weight
              and all(name in constants for name in node.input[1:])):
            quantized_weight[node.output[0]] = quantized_weight[node.input[0]]
            if node.input[0] in folded_at_load:
                folded_at_load.add(node.output[0])
        elif node.op_type in ("QuantizeLinear", "DequantizeLinear") or node.op_type in _ONNX_ALIASES:
            alias[node.output[0]] = node.input[0]

    def resolve(name: str) -> str:
        while name in alias:
            name = alias[name]
        return name

    # (de)quantize keeps the shape: fill in what shape inference could not (e.g. int4 QDQ)
    for _ in range(2):
        for out, source in alias.items():
            if out in shapes and source not in shapes:
                shapes[source] = shapes[out]
            elif source in shapes and out not in shapes:
                shapes[out] = shapes[source]

    quantized_activations = {
        resolve(n.output[0]) for n in graph.node if n.op_type == "QuantizeLinear"
    } | {resolve(n.input[0]) for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] not in constants}

    def act_bits(name: str) -> int:
        base = resolve(name)
        if base in quantized_activations:
            return 8
        return _ONNX_DTYPE_BITS.get(dtypes.get(base, 1), 32)

    def tensor_bytes_of(name: str) -> int:
        return _prod(shapes.get(name, [])) * act_bits(name) // 8

    consumers: Counter = Counter()
    for node in graph.node:
        for name in node.input:
            consumers[resolve(name)] += 1
    graph_outputs = {o.name for o in graph.output}

    ops: list[Op] = []
    by_output: dict[str, Op] = {}
    skip_types = {"Constant", "QuantizeLinear", "DequantizeLinear", *_ONNX_ALIASES}
    for index, node in enumerate(graph.node):
        if node.op_type in skip_types or node.output[0] in quantized_weight or node.output[0] in constants:
            continue
        act_inputs = [resolve(n) for n in node.input if n and resolve(n) not in constants and n not in quantized_weight]
        # Fold an activation/BN into its producer when that producer is a conv/fc used only here.
        if node.op_type in _ONNX_FUSABLE and act_inputs:
            producer = by_output.get(act_inputs[0])
            if (producer is not None and producer.kind in WEIGHTED_CLASSES
                    and consumers[act_inputs[0]] == 1 and act_inputs[0] not in graph_outputs):
                producer.fused.append(node.op_type)
                if node.op_type == "BatchNormalization":
                    producer.params += sum(elements(constants[n]) for n in node.input[1:3] if n in constants)
                out = node.output[0]
                producer.outputs = [out]
                producer.output_shape = shapes.get(out, producer.output_shape)
                producer.activation_bytes = tensor_bytes_of(out)
                del by_output[act_inputs[0]]
                by_output[out] = producer
                continue
        op = _onnx_op(node, index, constants, quantized_weight, shapes, act_inputs, elements, tensor_bytes_of)
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and any(
                name in folded_at_load for name in node.input):
            op.precision = "fp32"  # stored at weight_bits, computed by the float kernel
        ops.append(op)
        for out in op.outputs:
            by_output[out] = op

    graph_inputs = [i.name for i in graph.input if i.name not in constants]
    names = {name for op in ops for name in op.inputs + op.outputs} | set(graph_inputs)
    tensor_bytes = {name: tensor_bytes_of(name) for name in names}
    tensor_elements = {name: _prod(shapes.get(name, [])) for name in names}
    input_shape = shapes.get(graph_inputs[0], []) if graph_inputs else []
    return Graph(ops=ops, tensor_bytes=tensor_bytes, tensor_elements=tensor_elements, inputs=graph_inputs,
                 outputs=[resolve(o.name) for o in graph.output], input_shape=input_shape,
                 source_format="onnx")


def _batch_of_one(model):
    """Fix every symbolic input dimension (a dynamic batch, mostly) to 1, so shape inference
    can carry concrete sizes through Shape → Gather → Concat → Reshape chains: counts are per
    sample. The loaded proto is the analyser's own copy; the file is not changed."""
    initializers = {init.name for init in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_value <= 0:
                dim.dim_value = 1  # setting the value clears dim_param (a oneof)
    return model


def _infer_shapes(model):
    """ONNX shape inference, carried through the onnxruntime contrib operators of a QOperator
    model (QLinearAdd, QGemm, ...), which it does not know and stops at: each such output whose
    inputs have shapes gets its own (the float operator's rule), and inference runs again. A model
    inference cannot finish keeps the shapes it declares."""
    from onnx import helper, shape_inference

    for _ in range(len(model.graph.node) + 1):
        try:
            model = shape_inference.infer_shapes(model, data_prop=True)
        except Exception:
            return model
        graph = model.graph
        known = {v.name: v.type.tensor_type for v in [*graph.input, *graph.value_info, *graph.output]
                 if v.type.tensor_type.HasField("shape")}
        shapes = {name: [d.dim_value for d in t.shape.dim] for name, t in known.items()}
        shapes |= {init.name: list(init.dims) for init in graph.initializer}
        added = []
        for node in graph.node:
            # Only contrib operators need this; a standard node may have no input at all (Constant).
            if node.domain != "com.microsoft" or not node.input or node.output[0] in known:
                continue
            data = node.input[2 if node.op_type == "QLinearConcat" else 0]  # the first activation input
            if data not in known:
                continue
            shape = _contrib_output_shape(node, shapes)
            if shape is not None:
                added.append(helper.make_tensor_value_info(node.output[0], known[data].elem_type, shape))
        if not added:
            return model
        graph.value_info.extend(added)
    return model


def _contrib_output_shape(node, shapes: dict[str, list[int]]) -> list[int] | None:
    attrs = {a.name: a for a in node.attribute}
    if any(name and name not in shapes for name in node.input):
        return None
    first = shapes[node.input[2 if node.op_type == "QLinearConcat" else 0]]
    if node.op_type in ("QLinearAdd", "QLinearMul"):
        return _broadcast(first, shapes[node.input[3]])
    if node.op_type in ("QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax"):
        return first
    if node.op_type == "QLinearGlobalAveragePool":
        channels_last = "channels_last" in attrs and attrs["channels_last"].i
        return ([first[0], *[1] * (len(first) - 2), first[-1]] if channels_last
                else [*first[:2], *[1] * (len(first) - 2)])
    if node.op_type == "QLinearAveragePool":
        return _pool_output_shape(first, attrs)
    if node.op_type == "QLinearConcat":  # inputs: y_scale, y_zero_point, then (x, scale, zero point) each
        axis = attrs["axis"].i % len(first)
        parts = [shapes[name] for name in node.input[2::3]]
        return [sum(part[axis] for part in parts) if i == axis else size for i, size in enumerate(parts[0])]
    if node.op_type == "QGemm":  # A, a_scale, a_zero_point, B, ...
        trans_a = "transA" in attrs and attrs["transA"].i
        trans_b = "transB" in attrs and attrs["transB"].i
        b = shapes[node.input[3]]
        return [first[1] if trans_a else first[0], b[0] if trans_b else b[1]]
    if node.op_type == "MatMulNBits":  # A [..., K] times the packed [K, N] weight
        return [*first[:-1], attrs["N"].i]
    return None


def _pool_output_shape(shape: list[int], attrs: dict) -> list[int]:
    """A pooling window's output shape (ONNX AveragePool's rule), NCHW or channels-last."""
    channels_last = "channels_last" in attrs and attrs["channels_last"].i
    spatial = shape[1:-1] if channels_last else shape[2:]
    kernel = list(attrs["kernel_shape"].ints)
    strides = list(attrs["strides"].ints) if "strides" in attrs else [1] * len(kernel)
    pads = list(attrs["pads"].ints) if "pads" in attrs else [0] * 2 * len(kernel)
    auto_pad = attrs["auto_pad"].s.decode() if "auto_pad" in attrs else "NOTSET"
    ceil_mode = "ceil_mode" in attrs and attrs["ceil_mode"].i
    out = []
    for i, (size, k, stride) in enumerate(zip(spatial, kernel, strides)):
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out.append(-(-size // stride))
        elif auto_pad == "VALID":
            out.append(-(-(size - k + 1) // stride))
        else:
            span = size + pads[i] + pads[i + len(kernel)] - k
            out.append((-(-span // stride) if ceil_mode else span // stride) + 1)
    return [shape[0], *out, shape[-1]] if channels_last else [*shape[:2], *out]


def _broadcast(a: list[int], b: list[int]) -> list[int]:
    """Numpy-style broadcast of two shapes (right-aligned; a dimension of 1 stretches)."""
    width = max(len(a), len(b))
    a, b = [1] * (width - len(a)) + a, [1] * (width - len(b)) + b
    return [y if x == 1 else x for x, y in zip(a, b)]


def _onnx_op(node, index, constants, quantized_weight, shapes, act_inputs, elements, tensor_bytes_of) -> Op:
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    outputs = [o for o in node.output if o]
    out_shape = shapes.get(outputs[0], []) if outputs else []
    name = node.name or f"{node.op_type}_{index}"
    op = Op(name=name, op_type=node.op_type, kind="other", inputs=act_inputs, outputs=outputs,
            output_shape=out_shape, activation_bytes=sum(tensor_bytes_of(o) for o in outputs))

    weights: list[tuple[str, int]] = []  # (tensor, bits)
    for position, tensor in enumerate(node.input):
        if tensor in quantized_weight:
            weights.append(quantized_weight[tensor])
        elif tensor in constants and _is_weight_input(node.op_type, position):
            weights.append((tensor, _ONNX_DTYPE_BITS.get(constants[tensor].data_type, 32)))

    op_type = node.op_type
    if op_type in ("Conv", "QLinearConv", "ConvInteger", "ConvTranspose"):
        weight_name = node.input[3] if op_type == "QLinearConv" else node.input[1]
        weight_name = quantized_weight.get(weight_name, (weight_name, 0))[0]
        w_dims = list(constants[weight_name].dims) if weight_name in constants else shapes.get(weight_name, [])
        groups = int(attrs.get("group", 1))
        kernel = tuple(w_dims[2:4]) if len(w_dims) >= 4 else (1, 1)
        in_channels = (w_dims[1] * groups) if len(w_dims) > 1 else 1
        op.kind = _conv_kind(kernel, groups, in_channels)
        op.kernel, op.strides = tuple(int(k) for k in kernel), tuple(int(s) for s in attrs.get("strides", (1, 1)))
        op.macs = _prod(out_shape) * _prod(w_dims[1:]) if w_dims else 0
    elif op_type in ("Gemm", "QGemm", "MatMul", "QLinearMatMul", "MatMulInteger", "MatMulNBits", "FusedMatMul"):
        op.kind = "fc"
        if op_type == "MatMulNBits":
            k, n, bits = int(attrs["K"]), int(attrs["N"]), int(attrs.get("bits", 4))
            weights = [(node.input[1], bits)]
            bias = node.input[5] if len(node.input) > 5 and node.input[5] in constants else None
            op.params = k * n + (elements(constants[bias]) if bias else 0)
            op.weight_bytes = k * n * bits // 8 + (elements(constants[bias]) * 4 if bias else 0)
            op.macs = _prod(out_shape) * k
            op.precision, op.weight_bits = ("int4" if bits <= 4 else "int8"), bits
            return op
        a_shape = shapes.get(act_inputs[0], []) if act_inputs else []
        k = a_shape[-1] if a_shape else 0
        if op_type == "Gemm" and attrs.get("transA", 0) and len(a_shape) >= 2:
            k = a_shape[-2]
        if not k and op_type in ("Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in constants:
            # Shape inference could not follow the input (e.g. a Reshape fed by shape ops it
            # does not propagate): the weight's reduction axis is the input's last one.
            b_dims = list(constants[node.input[1]].dims)
            if len(b_dims) >= 2:
                k = b_dims[-1] if op_type == "Gemm" and attrs.get("transB", 0) else b_dims[-2]
        op.macs = _prod(out_shape) * k
    elif op_type in _ONNX_POOL:
        op.kind = "pool"
    elif op_type in _ONNX_ELEMENTWISE or op_type.startswith("QLinear"):
        op.kind = "elementwise"
    if op_type.startswith("QLinear") and op.kind not in WEIGHTED_CLASSES:
        op.precision = "int8"  # integer in and out, like the QDQ kernel it stands for

    seen = set()
    for tensor, bits in weights:
        if tensor in seen or tensor not in constants:
            continue
        seen.add(tensor)
        count = elements(constants[tensor])
        op.params += count
        op.weight_bytes += math.ceil(count * bits / 8)
    if op.kind in WEIGHTED_CLASSES:
        weight_bits = min((bits for _, bits in weights), default=32)
        op.weight_bits = weight_bits
        if op_type.startswith("QLinear") or op_type == "QGemm" or op_type.endswith("Integer"):
            op.precision = "int8"
        elif weight_bits <= 4:
            op.precision = "int4"
        elif weight_bits <= 8:
            op.precision = "int8"
        elif weight_bits == 16:
            op.precision = "fp16"
    return op


def _is_weight_input(op_type: str, position: int) -> bool:
    """Which constant inputs are trainable weights (scales, zero points and shapes are not)."""
    if op_type == "QLinearConv" or op_type == "QLinearMatMul":
        return position in (3, 8)
    if op_type == "QGemm":
        return position in (3, 6)
    if op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul", "ConvInteger", "MatMulInteger", "FusedMatMul"):
        return position in (1, 2)
    if op_type == "BatchNormalization":
        return position in (1, 2)
    if op_type == "PRelu":
        return position == 1
    return False


# ---------------------------------------------------------------- TFLite

_TFLITE_CONV = {"CONV_2D", "TRANSPOSE_CONV", "CONV_3D"}
_TFLITE_FC = {"FULLY_CONNECTED", "BATCH_MATMUL"}
_TFLITE_POOL = {"AVERAGE_POOL_2D", "MAX_POOL_2D", "MEAN", "L2_POOL_2D", "REDUCE_MAX", "SUM"}
_TFLITE_ELEMENTWISE = {
    "ADD", "SUB", "MUL", "DIV", "RELU", "RELU6", "RELU_N1_TO_1", "LOGISTIC", "TANH", "HARD_SWISH",
    "LEAKY_RELU", "PRELU", "ELU", "GELU", "SQRT", "RSQRT", "EXP", "MAXIMUM", "MINIMUM", "SQUARED_DIFFERENCE",
    "ABS", "NEG", "POW", "QUANTIZE", "DEQUANTIZE", "CAST",
}
_TFLITE_LOW_BITS = {"INT8": "int8", "UINT8": "int8", "INT4": "int4", "UINT4": "int4", "INT16": "int8"}
_TFLITE_TYPE_BITS = {"FLOAT32": 32, "FLOAT16": 16, "INT32": 32, "UINT8": 8, "INT64": 64, "INT16": 16,
                     "INT8": 8, "FLOAT64": 64, "INT4": 4, "UINT4": 4, "BOOL": 8, "BFLOAT16": 16}


def read_tflite(path: Path) -> Graph:
    from ai_edge_litert import schema_py_generated as schema

    builtin_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    type_names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    model = schema.ModelT.InitFromPackedBuf(path.read_bytes(), 0)
    subgraph = model.subgraphs[0]
    tensors = subgraph.tensors

    def is_constant(index: int) -> bool:
        buffer = model.buffers[tensors[index].buffer] if tensors[index].buffer < len(model.buffers) else None
        return buffer is not None and (
            (buffer.data is not None and len(buffer.data) > 0) or (buffer.size or 0) > 0)

    def shape(index: int) -> list[int]:
        return [max(int(d), 1) for d in (tensors[index].shape if tensors[index].shape is not None else [])]

    def type_name(index: int) -> str:
        return type_names.get(tensors[index].type, "FLOAT32")

    def nbytes(index: int) -> int:
        return math.ceil(_prod(shape(index)) * _TFLITE_TYPE_BITS.get(type_name(index), 32) / 8)

    def tensor_name(index: int) -> str:
        name = tensors[index].name
        return name.decode() if isinstance(name, bytes) else str(name)

    # DEQUANTIZE of a constant (fp16 or int8 stored weights) feeds the kernel as a weight.
    dequantized_weight: dict[int, int] = {}
    for operator in subgraph.operators:
        code = model.operatorCodes[operator.opcodeIndex]
        if builtin_names.get(max(code.builtinCode, code.deprecatedBuiltinCode)) == "DEQUANTIZE":
            if is_constant(operator.inputs[0]):
                dequantized_weight[operator.outputs[0]] = operator.inputs[0]

    ops: list[Op] = []
    for index, operator in enumerate(subgraph.operators):
        code = model.operatorCodes[operator.opcodeIndex]
        op_type = builtin_names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "CUSTOM")
        inputs = [i for i in operator.inputs if i >= 0]
        if op_type == "DEQUANTIZE" and inputs and inputs[0] in dequantized_weight.values():
            continue
        weight_ids = [dequantized_weight.get(i, i) for i in inputs
                      if i in dequantized_weight or is_constant(i)]
        act_ids = [i for i in inputs if i not in dequantized_weight and not is_constant(i)]
        outputs = list(operator.outputs)
        out_shape = shape(outputs[0]) if outputs else []
        op = Op(name=tensor_name(outputs[0]) if outputs else f"{op_type}_{index}", op_type=op_type, kind="other",
                inputs=[tensor_name(i) for i in act_ids], outputs=[tensor_name(o) for o in outputs],
                output_shape=out_shape, activation_bytes=sum(nbytes(o) for o in outputs))
        options = operator.builtinOptions
        activation = getattr(options, "fusedActivationFunction", 0) if options is not None else 0
        if activation:
            names = {v: k for k, v in vars(schema.ActivationFunctionType).items() if not k.startswith("_")}
            op.fused.append(names.get(activation, str(activation)))

        if op_type in _TFLITE_CONV or op_type == "DEPTHWISE_CONV_2D":
            weight = next((w for w in weight_ids if len(shape(w)) == 4), None)
            w_shape = shape(weight) if weight is not None else [1, 1, 1, 1]
            op.kernel = (w_shape[1], w_shape[2])
            op.strides = (getattr(options, "strideH", 1), getattr(options, "strideW", 1))
            if op_type == "DEPTHWISE_CONV_2D":
                op.kind = "depthwise"
                op.macs = _prod(out_shape) * w_shape[1] * w_shape[2]
            else:
                op.kind = _conv_kind((w_shape[1], w_shape[2]), 1, w_shape[3])
                op.macs = _prod(out_shape) * w_shape[1] * w_shape[2] * w_shape[3]
        elif op_type in _TFLITE_FC:
            op.kind = "fc"
            if weight_ids:
                k = shape(weight_ids[0])[-1]
            else:  # BATCH_MATMUL of two activations: the shared dimension is the first input's last
                k = shape(act_ids[0])[-1] if act_ids else 0
            op.macs = _prod(out_shape) * k
        elif op_type in _TFLITE_POOL:
            op.kind = "pool"
        elif op_type in _TFLITE_ELEMENTWISE:
            op.kind = "elementwise"

        seen = set()
        for weight in weight_ids if op.kind in WEIGHTED_CLASSES or op_type == "PRELU" else []:
            if weight in seen:
                continue
            seen.add(weight)
            op.params += _prod(shape(weight))
            op.weight_bytes += nbytes(weight)
        if op.kind in WEIGHTED_CLASSES:
            main_weight = max(weight_ids, key=lambda w: _prod(shape(w)), default=None)
            weight_type = type_name(main_weight) if main_weight is not None else "FLOAT32"
            op.weight_bits = _TFLITE_TYPE_BITS.get(weight_type, 32)
            input_type = type_name(act_ids[0]) if act_ids else "FLOAT32"
            # full-integer kernels read int8 activations; int8/int4 weights on float input are
            # the hybrid (dynamic-range) kernels, which still multiply in integer
            op.precision = _TFLITE_LOW_BITS.get(weight_type) or _TFLITE_LOW_BITS.get(input_type) or (
                "fp16" if weight_type == "FLOAT16" else "fp32")
        ops.append(op)

    variable = [i for i in range(len(tensors)) if not is_constant(i)]
    tensor_bytes = {tensor_name(i): nbytes(i) for i in variable}
    tensor_elements = {tensor_name(i): _prod(shape(i)) for i in variable}
    inputs = [tensor_name(i) for i in subgraph.inputs]
    return Graph(ops=ops, tensor_bytes=tensor_bytes, tensor_elements=tensor_elements, inputs=inputs,
                 outputs=[tensor_name(i) for i in subgraph.outputs],
                 input_shape=shape(subgraph.inputs[0]) if len(subgraph.inputs) else [],
                 source_format="tflite")


def peak_activation_bytes(graph: Graph, bytes_per_tensor: dict[str, int] | None = None) -> int:
    """Peak bytes of activations alive at once when ops run in file order.

    A tensor is alive from the op that writes it (graph inputs: from the start) until the
    last op that reads it; graph outputs stay alive to the end. This is the lower bound an
    arena planner such as TFLite's reaches; runtimes that do not reuse buffers use more.
    """
    sizes = bytes_per_tensor or graph.tensor_bytes
    last_use: dict[str, int] = {}
    for position, op in enumerate(graph.ops):
        for name in op.inputs:
            last_use[name] = position
    end = len(graph.ops)
    for name in graph.outputs:
        last_use[name] = end
    alive = {name: sizes.get(name, 0) for name in graph.inputs}
    peak = sum(alive.values())
    for position, op in enumerate(graph.ops):
        for name in op.outputs:
            alive[name] = sizes.get(name, 0)
        peak = max(peak, sum(alive.values()))
        for name in list(alive):
            if last_use.get(name, -1) <= position:
                del alive[name]
    return peak


FRAMEWORK_SUFFIXES = {".pt2": "pytorch", ".pt": "pytorch", ".pth": "pytorch",
                      ".keras": "tensorflow", ".h5": "tensorflow", ".zip": "tensorflow"}


def load_model_graph(path: str | Path) -> Graph:
    """Like load_graph, and framework-native files (.pt2, .pt, .keras, .h5, SavedModel .zip)
    are first exported to their deploy format by the framework backend (the same export the
    experiments use), in a temporary folder."""
    import tempfile

    path = Path(path)
    framework = FRAMEWORK_SUFFIXES.get(path.suffix.lower())
    if framework is None:
        return load_graph(path)
    if not path.exists():
        raise FileNotFoundError(f"model file not found: {path}")
    from optimization.backends import get_backend

    backend = get_backend(framework)
    with tempfile.TemporaryDirectory(prefix="edgeopt-graph-") as workdir:
        deploy = backend.export_deploy(backend.load(path), Path(workdir) / f"model{backend.deploy_suffix}")
        return load_graph(deploy)
