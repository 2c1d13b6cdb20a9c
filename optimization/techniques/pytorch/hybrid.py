"""Hybrid: remove channels (Torch-Pruning), optionally zero small weights as well, fine-tune,
then static INT8 quantization in onnxruntime (the same code as ptq_int8): fewer weights, each
in one byte, for the smallest file at a bounded accuracy drop."""
from __future__ import annotations

import dataclasses

from optimization.backends import pytorch as backend
from optimization.evaluator import compressed_size
from optimization.techniques.pytorch._common import (
    EXPORT_SECONDS,
    PyTorchTechnique,
    channels_kept,
    file_size,
    int8_options,
    prune_channels,
    quantize_model_int8,
    require_trainable,
)
from optimization.techniques.pytorch.prune_unstructured import keep_zeros, prune_globally, sparsity_of


class Technique(PyTorchTechnique):
    name = "hybrid"

    def estimate_time(self, model_info, config) -> float:
        options = self.options(config)
        return (self.pruned_training_seconds(model_info, options["epochs"], options["pruning_ratio"])
                + self.quantize_seconds(model_info, options) + EXPORT_SECONDS)

    def optimize(self, model, config, dataset, progress):
        require_trainable(model, self.name)
        options = self.options(config)
        int8 = int8_options(options)
        progress(0.02, f"removing {options['pruning_ratio']:.0%} of the channels", {})
        module, channel_multiple = prune_channels(model.module, model.input_shape, options["pruning_ratio"],
                                                  options["channel_multiple"])
        masks = prune_globally(module, options["target_sparsity"]) if options["target_sparsity"] > 0 else {}
        backend.train(module, dataset, options["epochs"], options["learning_rate"], progress, (0.05, 0.8),
                      seed=config.seed, after_step=keep_zeros(masks) if masks else None, cosine=True)
        progress(0.82, "INT8 quantization (calibrating)", {})
        deploy, _ = self.paths(config)
        # no longer the uploaded file: an ONNX upload's own bytes must not stand in for the pruned model
        pruned = dataclasses.replace(model, module=module, architecture=None, source_format="pt2", source_path=None)
        quantization = quantize_model_int8(pruned, deploy, dataset.x_calib, **int8)
        details = {
            "steps": ["structured pruning (Torch-Pruning, L2)"]
                     + (["unstructured magnitude pruning"] if masks else [])
                     + ["fine-tuning (cosine learning-rate decay)", "static INT8 (onnxruntime)"],
            "pruning_ratio": options["pruning_ratio"], "channel_multiple": channel_multiple,
            "bits": 8, "quantization": quantization,
            "native": "pruned FP32 .pt2: the int8 model exists only as ONNX",
            "architecture_unchanged": False,
        }
        details["compression"] = "gzip -9 of the ONNX file"
        result = self.result(config, pruned, module, details, deploy_written=True)
        result.record(precision="int8", channels_kept=channels_kept(model.module, module),
                      sparsity=round(sparsity_of(masks), 4) if masks else 0.0, epochs=options["epochs"],
                      calibration_samples=int(len(dataset.x_calib)),
                      compressed_size_bytes=compressed_size(deploy)).record_weight_bits()
        progress(1.0, "hybrid model written", {"size_bytes": file_size(deploy)})
        return result
