"""Knowledge distillation into a smaller student: the teacher keeping `student_width` of its
channels (Torch-Pruning, as channel pruning cuts them: the largest by L2 magnitude, so the shapes
stay compatible), starting from the teacher's weights on those channels (`student_init`
"teacher", the usual practice) or from random ones ("random"), trained on the teacher's softened
outputs (KL at temperature T, times T^2) mixed with the hard labels (weight `alpha` on the soft
part). The same student, from the same start, is also trained on the labels alone for the same
epochs, so the gain from distillation is visible in the details."""
from __future__ import annotations

import copy

import torch
from torch.nn import functional as F

from optimization.backends import pytorch as backend
from optimization.techniques.pytorch._common import (
    EXPORT_SECONDS,
    PyTorchTechnique,
    channels_kept,
    prune_channels,
    require_trainable,
)


def reinitialise(module) -> None:
    for layer in module.modules():
        if layer is not module and hasattr(layer, "reset_parameters"):
            layer.reset_parameters()


def distillation_loss(teacher, temperature: float, alpha: float):
    def loss(logits, targets, inputs):
        with torch.no_grad():
            soft_targets = F.softmax(teacher(inputs) / temperature, dim=-1)
        soft = F.kl_div(F.log_softmax(logits / temperature, dim=-1), soft_targets,
                        reduction="batchmean") * temperature ** 2
        return alpha * soft + (1 - alpha) * F.cross_entropy(logits, targets)
    return loss


class Technique(PyTorchTechnique):
    name = "distillation"

    def estimate_time(self, model_info, config) -> float:
        options = self.options(config)
        # the student twice (with and without the teacher) plus the teacher's forward passes,
        # a third of a training step each
        return (2 * self.pruned_training_seconds(model_info, options["epochs"], 1 - options["student_width"])
                + self.training_seconds(model_info, options["epochs"] / 3) + 2 * EXPORT_SECONDS)

    def optimize(self, model, config, dataset, progress):
        require_trainable(model, self.name)
        options = self.options(config)
        teacher = model.module
        backend.set_eval(teacher)
        student, channel_multiple = prune_channels(model.module, model.input_shape, 1 - options["student_width"],
                                                   options["channel_multiple"])
        from_teacher = options["student_init"] == "teacher"
        if not from_teacher:
            backend.set_seed(config.seed)
            reinitialise(student)
        accuracy_at_start = backend.evaluate(student, dataset.x_calib, dataset.y_calib)
        baseline_student = copy.deepcopy(student)
        epochs, lr = options["epochs"], options["learning_rate"]
        # cosine decay, as channel pruning's recovery: a student cut from the teacher settles better
        backend.train(student, dataset, epochs, lr, progress, (0.0, 0.55), seed=config.seed, cosine=True,
                      loss_fn=distillation_loss(teacher, options["temperature"], options["alpha"]),
                      message="distilling")
        backend.train(baseline_student, dataset, epochs, lr, progress, (0.55, 0.9), seed=config.seed, cosine=True,
                      message="training the same student without the teacher")
        distilled = backend.evaluate(student, dataset.x_test, dataset.y_test)
        alone = backend.evaluate(baseline_student, dataset.x_test, dataset.y_test)
        progress(0.92, "exporting the student", {"accuracy": distilled, "accuracy_without_teacher": alone})
        teacher_params, teacher_macs = backend.count_params_macs(teacher, model.input_shape)
        details = {
            "student": f"the teacher keeping {options['student_width']:.0%} of its channels, "
                       + ("starting from the teacher's weights on the channels kept (largest L2 magnitude)"
                          if from_teacher else "re-initialised (random weights)"),
            "student_init": options["student_init"],
            "calibration_accuracy_before_training": round(accuracy_at_start, 4),
            "learning_rate_schedule": "cosine decay to zero",
            "channel_multiple": channel_multiple,
            "temperature": options["temperature"], "alpha": options["alpha"],
            "student_test_accuracy_with_teacher": round(distilled, 4),
            "student_test_accuracy_without_teacher": round(alone, 4),
            "gain_from_distillation_points": round(100 * (distilled - alone), 2),
            "teacher_params": teacher_params, "teacher_macs": teacher_macs,
            "architecture_unchanged": False,
        }
        result = self.result(config, model, student, details)
        result.record(precision="fp32", channels_kept=channels_kept(teacher, student), epochs=2 * epochs)
        progress(1.0, "student written", {"params": result.params})
        return result
