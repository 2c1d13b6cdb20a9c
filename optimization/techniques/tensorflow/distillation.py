"""Knowledge distillation into a narrowed copy of the teacher (fewer filters in every layer
whose channels can shrink; see prune_structured's surgery), trained on the teacher's soft
targets at temperature T plus the hard labels. The same student is also trained alone for
the same epochs, so the gain from distillation is measured, not assumed."""
from __future__ import annotations

from pathlib import Path

from optimization.base import BaseOptimization, OptimizedResult, TechniqueConfig
from optimization.techniques.tensorflow.prune_structured import channels_kept, shrink_channels


class Technique(BaseOptimization):
    name = "distillation"
    framework = "tensorflow"

    def estimate_time(self, model_info: dict, config: TechniqueConfig) -> float:
        from optimization.backends.tensorflow import conversion_seconds, training_seconds
        from optimization.techniques.tensorflow.prune_structured import narrowed_step_cost

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

        student, surgery = fresh_student(teacher, width, config.seed)
        distiller = make_distiller(student, teacher, float(options["temperature"]),
                                   float(options["alpha"]))
        distiller.compile(optimizer=keras.optimizers.Adam(training["learning_rate"]))
        fit(distiller, dataset.x_train, dataset.y_train, epochs, progress, span=(0.0, 0.55),
            message="distilling", compile_model=False, **training)

        alone, _ = fresh_student(teacher, width, config.seed)
        fit(alone, dataset.x_train, dataset.y_train, epochs, progress, span=(0.55, 0.9),
            message="training the student alone (for comparison)", **training)

        progress(0.9, "converting the distilled student to .tflite", {})
        deploy = convert_to_tflite(student, Path(config.output_dir) / f"{self.name}.tflite")
        teacher_params, teacher_macs = count_params_macs(teacher)
        details = {
            "student_width": width,
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
        return technique_result(self.name, config, student, deploy, details).record(
            precision="fp32", channels_kept=channels_kept(surgery), epochs=2 * epochs)


def fresh_student(teacher, width: float, seed: int):
    """The teacher narrowed to `width`, freshly initialized; trained from scratch on a short
    budget, so its BatchNorm statistics must follow the batches faster."""
    from optimization.backends.tensorflow import follow_batchnorm_faster, keras

    keras.utils.set_random_seed(seed)
    student, surgery = shrink_channels(teacher, width, copy_weights=False)
    return follow_batchnorm_faster(student), surgery


def make_distiller(student, teacher, temperature: float, alpha: float):
    """A Keras model whose train_step mixes the KL divergence to the teacher's softened outputs
    (scaled by T^2, as in Hinton et al.) with cross-entropy on the labels."""
    from optimization.backends.tensorflow import keras, outputs_probabilities, tf

    def logits(model, outputs):
        return tf.math.log(tf.clip_by_value(outputs, 1e-8, 1.0)) if outputs_probabilities(model) \
            else outputs

    class Distiller(keras.Model):
        def __init__(self):
            super().__init__()
            self.student, self.teacher = student, teacher
            self.loss_tracker = keras.metrics.Mean(name="loss")
            self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")

        @property
        def metrics(self):
            return [self.loss_tracker, self.accuracy]

        def call(self, x, training=False):
            return self.student(x, training=training)

        def train_step(self, data):
            x, y = data
            soft_targets = tf.nn.softmax(logits(teacher, self.teacher(x, training=False)) / temperature)
            with tf.GradientTape() as tape:
                student_logits = logits(student, self.student(x, training=True))
                soft = keras.losses.kl_divergence(
                    soft_targets, tf.nn.softmax(student_logits / temperature)) * temperature ** 2
                hard = keras.losses.sparse_categorical_crossentropy(y, student_logits, from_logits=True)
                loss = tf.reduce_mean(alpha * soft + (1 - alpha) * hard)
            variables = self.student.trainable_variables
            self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
            self.loss_tracker.update_state(loss)
            self.accuracy.update_state(y, student_logits)
            return {metric.name: metric.result() for metric in self.metrics}

    return Distiller()
