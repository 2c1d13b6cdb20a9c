"""ModelAnalyzer: per-layer params, MACs, shapes and memory of a model, and its bottlenecks.

Works on the deploy file (.onnx / .tflite) through optimization.graph; .pt2 / .keras and the
other framework files are exported to their deploy format first by the framework backend, so
what is analysed is what would run on the device.
"""
from __future__ import annotations

from pathlib import Path

from optimization.graph import WEIGHTED_CLASSES, Graph, load_model_graph, peak_activation_bytes

TOP_LAYERS = 3
# Quantizing a layer this small saves under 3 KB of weights, yet adds a quantize/dequantize
# pair and is where accuracy usually drops first (first conv on RGB input, tiny heads).
SMALL_LAYER_PARAMS = 1024


def analyze(path_or_graph) -> dict:
    graph = path_or_graph if isinstance(path_or_graph, Graph) else load_model_graph(Path(path_or_graph))
    return {
        "params": graph.params,
        "macs": graph.macs,
        "input_shape": graph.input_shape,
        "format": graph.source_format,
        "runtime": graph.runtime,
        "precision": graph.precision,
        "weight_bytes": graph.weight_bytes,
        "peak_activation_bytes": peak_activation_bytes(graph),
        "layers": [op.as_layer() for op in graph.ops],
        "bottlenecks": bottlenecks(graph),
        # weighted layers whose output shape stayed unknown: their MACs are missing from "macs"
        "layers_without_macs": [op.name for op in graph.ops if op.kind in WEIGHTED_CLASSES and not op.macs],
    }


def bottlenecks(graph: Graph) -> list[dict]:
    from optimization.estimator import load_profiles  # data only; no heavy import

    found = []
    total_macs, total_params = max(graph.macs, 1), max(graph.params, 1)
    for op in sorted((op for op in graph.ops if op.macs), key=lambda o: -o.macs)[:TOP_LAYERS]:
        found.append({"kind": "most_macs", "layer": op.name, "type": op.kind, "macs": op.macs,
                      "share": round(op.macs / total_macs, 3),
                      "reason": f"{op.macs / total_macs:.0%} of the model's multiply-accumulates"})
    for op in sorted((op for op in graph.ops if op.params), key=lambda o: -o.params)[:TOP_LAYERS]:
        found.append({"kind": "most_params", "layer": op.name, "type": op.kind, "params": op.params,
                      "share": round(op.params / total_params, 3),
                      "reason": f"{op.params / total_params:.0%} of the model's parameters"})

    runtime = load_profiles()["runtimes"][graph.runtime]
    unsupported = set(runtime["ops_without_int8_kernel"])
    for op in graph.ops:
        if op.op_type in unsupported:
            found.append({"kind": "no_int8_kernel", "layer": op.name, "type": op.kind, "op_type": op.op_type,
                          "runtime": graph.runtime,
                          "reason": f"{runtime['name']} has no INT8 kernel for {op.op_type}: after INT8 "
                                    "quantization it runs in float between a dequantize and a quantize"})
    for op in graph.ops:
        if op.kind in WEIGHTED_CLASSES and 0 < op.params < SMALL_LAYER_PARAMS:
            found.append({"kind": "too_small_to_quantize", "layer": op.name, "type": op.kind, "params": op.params,
                          "reason": f"{op.params} parameters: INT8 would save {op.params * 3 / 1024:.1f} KB "
                                    "but add a quantize/dequantize pair; keep it in float"})
    return found
