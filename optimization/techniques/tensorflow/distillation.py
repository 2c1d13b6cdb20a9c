"""Knowledge distillation into a narrowed copy of the teacher (fewer filters in every layer
whose channels can shrink; see prune_structured's surgery), starting from the teacher's weights
on the filters kept (`student_init` "teacher") or from random ones ("random"), trained on the
teacher's soft targets at temperature T plus the hard labels. The same student, from the same
start, is also trained alone for the same epochs, so the gain from distillation is measured,
not assumed."""
from __future__ import annotations

from pathlib import Path

from optimization.base import BaseOptimization, OptimizedResult, TechniqueConfig
from optimization.techniques.tensorflow._common import channels_kept, make_distiller, narrowed_student


class Technique(BaseOptimization):
    name = "distillation"
    framework = "tensorflow"

    def estimate_time(self, model_info: dict, config: TechniqueConfig) -> float:
        from optimization.backends.tensorflow import conversion_seconds, training_seconds
        from optimization.techniques.tensorflow._common import narrowed_step_cost

        options = self.options(config)
        # distilled run (student + teacher forward) and the student alone
        return sum(training_seconds(model_info, options["epochs"],
                                    step=narrowed_step_cost(options["student_width"], distill))
                   for distill in (True, False)) + conversion_seconds(model_info)

    def optimize(self, model, config, dataset, progress) -> OptimizedResult:
        from optimization.backends.tensorflow import (
            convert_to_tflite, count_params_macs, evaluate_accuracy, fit, keras, technique_result)

        options = self.options(config)
        epochs, width = int(options["epochs"]), float(options["student_width"])
        training = dict(learning_rate=float(options["learning_rate"]),
                        batch_size=int(options["batch_size"]), seed=config.seed)
        teacher = model.module

        init = options["student_init"]
        student, surgery = narrowed_student(teacher, width, config.seed, init)
        distiller = make_distiller(student, teacher, float(options["temperature"]),
                                   float(options["alpha"]))
        distiller.compile(optimizer=keras.optimizers.Adam(training["learning_rate"]))
        fit(distiller, dataset.x_train, dataset.y_train, epochs, progress, span=(0.0, 0.55),
            message="distilling", compile_model=False, **training)

        alone, _ = narrowed_student(teacher, width, config.seed, init)
        fit(alone, dataset.x_train, dataset.y_train, epochs, progress, span=(0.55, 0.9),
            message="training the student alone (for comparison)", **training)

        progress(0.9, "converting the distilled student to .tflite", {})
        deploy = convert_to_tflite(student, Path(config.output_dir) / f"{self.name}.tflite")
        teacher_params, teacher_macs = count_params_macs(teacher)
        details = {
            "student": f"the teacher keeping {width:.0%} of its filters, "
                       + ("starting from the teacher's weights on the filters kept (largest L1 norm)"
                          if init == "teacher" else "re-initialised (random weights)"),
            "student_width": width,
            "student_init": init,
            "temperature": float(options["temperature"]),
            "alpha_soft": float(options["alpha"]),
            "teacher_params": teacher_params,
            "teacher_macs": teacher_macs,
            "teacher_accuracy": evaluate_accuracy(teacher, dataset.x_test, dataset.y_test),
            "student_distilled_accuracy": evaluate_accuracy(student, dataset.x_test, dataset.y_test),
            "student_alone_accuracy": evaluate_accuracy(alone, dataset.x_test, dataset.y_test),
            "accuracy_note": "Keras accuracies on the test split; the deployed number is re-measured",
            **surgery,
        }
        return technique_result(self.name, config, student, deploy, details,
                                preparation=model.preparation).record(
            precision="fp32", channels_kept=channels_kept(surgery), epochs=2 * epochs)


