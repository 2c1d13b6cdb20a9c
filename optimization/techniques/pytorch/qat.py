"""Quantization-aware training with torchao's PT2E flow: export the model, insert fake-quant
with the X86 quantizer (per-channel int8 weights, uint8 activations, conv+bn folded for QAT),
fine-tune so the weights adapt to int8 rounding, convert to real quantize/dequantize ops, and
export to ONNX QDQ, which onnxruntime runs as int8 kernels."""
from __future__ import annotations

from optimization.backends import pytorch as backend
from optimization.techniques.pytorch._common import (
    EXPORT_SECONDS,
    PyTorchTechnique,
    copy_module,
    file_size,
    require_trainable,
)

# fake-quant observers make each training step about this much slower than plain training
FAKE_QUANT_SLOWDOWN = 3
# prepare_qat_pt2e and convert_pt2e trace the model and their patterns: a fixed cost
PT2E_SECONDS = 1.5


def fold_batch_norm(module):
    """Fold each BatchNorm into the convolution before it (torch.fx, eval statistics). QAT then
    fine-tunes the folded weights the int8 model will use, and torchao's convert_pt2e skips its
    conv-bn refolding, which re-traces ~100 patterns (40-60 s on a busy 2-core machine). A graph
    that cannot be traced this way keeps its batch norms (slower, same result)."""
    from torch.fx.experimental.optimization import fuse

    backend.set_eval(module)
    try:
        return backend.mark_batch_range(fuse(module), backend.batch_range(module))
    except Exception:  # not symbolically traceable: keep the batch norms
        return module


def distinct_source_calls(graph_module):
    """Give each source call in an exported graph its own partition name. torch.export numbers
    the calls of each function separately (`torch.add` and `Tensor.add` can both yield "add_1")
    and torch.fx's get_source_partitions groups nodes by the name alone, so two unrelated adds
    (onnx2torch's Add module and its HardSigmoid's `x.add`) form one partition with two outputs,
    which torchao's X86 quantizer refuses ("Input partition has more than one output node").
    The name is made unique per (name, function); the nodes of one call stay together."""
    for node in graph_module.graph.nodes:
        source = node.meta.get("torch_fn")
        if source is not None:
            name, function = source
            node.meta["torch_fn"] = (f"{name}@{function}", function)
    return graph_module


class Technique(PyTorchTechnique):
    name = "qat"

    def estimate_time(self, model_info, config) -> float:
        epochs = self.options(config)["epochs"]
        return self.training_seconds(model_info, epochs * FAKE_QUANT_SLOWDOWN) + PT2E_SECONDS + 3 * EXPORT_SECONDS

    def optimize(self, model, config, dataset, progress):
        from torchao.quantization.pt2e import allow_exported_model_train_eval
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )

        require_trainable(model, self.name)
        options = self.options(config)
        float_module = fold_batch_norm(copy_module(model))
        params, macs = backend.count_params_macs(float_module, model.input_shape)
        progress(0.02, "inserting fake quantization (torchao PT2E, X86 quantizer)", {})
        quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config(is_qat=True))
        exported = distinct_source_calls(backend.export_program(float_module, model.input_shape).module())
        prepared = prepare_qat_pt2e(exported, quantizer)
        backend.mark_batch_range(prepared, backend.batch_range(float_module))
        allow_exported_model_train_eval(prepared)  # lets train()/eval() switch batch-norm and fake-quant
        metrics = backend.train(prepared, dataset, options["epochs"], options["learning_rate"], progress,
                                (0.05, 0.85), seed=config.seed, message="quantization-aware fine-tuning")
        progress(0.87, "converting to int8 and exporting ONNX QDQ", {})
        backend.set_eval(prepared)
        quantized = backend.mark_batch_range(convert_pt2e(prepared), backend.batch_range(float_module))
        details = {
            "bits": 8, "learning_rate": options["learning_rate"],
            "flow": "torchao PT2E prepare_qat_pt2e -> fine-tune -> convert_pt2e -> torch.onnx (dynamo) QDQ",
            "quantizer": "X86InductorQuantizer: int8 per-channel weights, uint8 activations",
            "batch_norm": "folded into the convolutions before QAT (statistics frozen)",
            "final_train_loss": metrics.get("loss"),
            "native": ".pt2 of the converted int8 (quantize/dequantize) graph",
            "architecture_unchanged": False,
        }
        result = self.result(config, model, quantized, details)
        # the converted graph keeps weights as int8 constants, not parameters: count the float model
        result.params, result.macs = params, macs
        result.record(precision="int8", epochs=options["epochs"]).record_weight_bits()
        progress(1.0, "QAT model written", {"size_bytes": file_size(result.artifacts["deploy"])})
        return result
