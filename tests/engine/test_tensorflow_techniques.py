"""The seven TensorFlow techniques on the digits demo CNN (~360k parameters, trained once per
module), one fine-tuning epoch each (hybrid: its stages scaled from it): every `.tflite` runs
in LiteRT, its accuracy is re-measured from the file, and sizes / parameters / MACs move the
way each technique claims."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from optimization.backends.tensorflow import BACKEND, count_params_macs
from optimization.base import TECHNIQUES, ExperimentStopped, TechniqueConfig
from optimization.catalog import TECHNIQUE_SPECS
from optimization.datasets import load_digits_preset, split
from optimization.techniques import get_technique

PLAUSIBLE_ACCURACY = 0.85  # after one fine-tuning epoch; the trained model reaches >= 0.95


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return load_digits_preset(tmp_path_factory.mktemp("preset"), "NHWC")


@pytest.fixture(scope="module")
def demo(tmp_path_factory, digits):
    folder = tmp_path_factory.mktemp("demo")
    model = BACKEND.load(BACKEND.train_demo_model(digits, folder / "digits_cnn.keras"))
    baseline = BACKEND.export_deploy(model, folder / "baseline.tflite")
    return model, baseline


# one fine-tuning epoch for the techniques that train (the others take no epochs)
FAST = {name: {"epochs": 1} for name in TECHNIQUE_SPECS if TECHNIQUE_SPECS[name].fine_tunes}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits, demo):
    """Each technique runs once; tests read its result."""
    model, _ = demo
    done = {}

    def run(name, **options):
        key = (name, tuple(sorted(options.items())))
        if key not in done:
            config = TechniqueConfig(output_dir=tmp_path_factory.mktemp(name),
                                     options={**FAST.get(name, {}), **options})
            result = get_technique("tensorflow", name).optimize(model, config, digits, ignore_progress)
            done[key] = (result, litert_accuracy(result.artifacts["deploy"], digits))
        return done[key]

    return run


def ignore_progress(fraction, message, metrics):
    assert 0.0 <= fraction <= 1.0


def litert_accuracy(deploy_path: Path, dataset) -> float:
    return float((BACKEND.predict(deploy_path, dataset.x_test).argmax(axis=1) == dataset.y_test).mean())


def size_ratio(result, baseline: Path) -> float:
    return result.artifacts["deploy"].stat().st_size / baseline.stat().st_size


@pytest.mark.slow
def test_every_technique_writes_a_tflite_and_a_keras_file(runs):
    for name in ("ptq_int8", "ptq_int4", "prune_structured"):
        result, _ = runs(name)
        assert result.artifacts["deploy"].name == f"{name}.tflite"
        assert result.artifacts["native"].name == f"{name}.keras"
        assert result.artifacts["native"].stat().st_size > 0


def test_ptq_int8_is_under_30_percent_of_fp32_and_keeps_accuracy(runs, demo, digits):
    result, accuracy = runs("ptq_int8")
    assert size_ratio(result, demo[1]) <= 0.30
    assert accuracy >= litert_accuracy(demo[1], digits) - 0.02


def weight_scale_counts(tflite_path: Path) -> set[int]:
    """How many scales each quantized conv / dense weight carries (1: per tensor)."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(tflite_path.read_bytes(), 0)
    subgraph = model.subgraphs[0]
    return {len(subgraph.tensors[op.inputs[1]].quantization.scale) for op in subgraph.operators
            if model.operatorCodes[op.opcodeIndex].builtinCode in (
                schema.BuiltinOperator.CONV_2D, schema.BuiltinOperator.FULLY_CONNECTED)}


@pytest.mark.slow
def test_ptq_int8_per_tensor_stores_one_scale_per_weight_and_is_smaller(runs):
    per_channel, _ = runs("ptq_int8", weight_granularity="per_channel")
    per_tensor, accuracy = runs("ptq_int8", weight_granularity="per_tensor")
    assert weight_scale_counts(per_tensor.artifacts["deploy"]) == {1}
    assert max(weight_scale_counts(per_channel.artifacts["deploy"])) > 1
    assert per_tensor.artifacts["deploy"].stat().st_size < per_channel.artifacts["deploy"].stat().st_size
    assert per_tensor.details["weight_granularity"] == "per_tensor"
    assert accuracy >= PLAUSIBLE_ACCURACY


@pytest.mark.parametrize("name, chosen", [("ptq_int8", "weight_granularity"),
                                          ("ptq_int4", "eight_bit_weight_granularity")])
def test_auto_granularity_follows_its_rule_on_the_training_split(runs, name, chosen):
    result, _ = runs(name)
    choice = result.details["granularity_choice"]
    per_tensor = choice["per_tensor_saving"] >= 0.05 and choice["per_tensor_drop_pts_on_train"] <= 0.5
    assert result.details[chosen] == ("per_tensor" if per_tensor else "per_channel")
    assert result.artifacts["deploy"].stat().st_size == choice[result.details[chosen]]["size_bytes"]
    assert sorted(p.name for p in result.artifacts["deploy"].parent.glob("*.tflite")) == [f"{name}.tflite"]


def test_ptq_int4_is_under_20_percent_of_fp32_and_names_the_layers_kept_wider(runs, demo):
    result, accuracy = runs("ptq_int4")
    assert size_ratio(result, demo[1]) <= 0.20
    assert accuracy >= PLAUSIBLE_ACCURACY
    assert {layer["op"] for layer in result.details["kept_wider"]} == {"CONV_2D"}
    assert all(layer["weight_bits"] == 4 for layer in result.details["layers"]
               if layer["op"] == "FULLY_CONNECTED")


def test_ptq_int4_default_runs_in_one_xnnpack_partition_with_4_bit_dense_weights(runs):
    from optimization.backends.tensorflow import tflite_weights, xnnpack_partitions

    result, _ = runs("ptq_int4")
    int8_result, _ = runs("ptq_int8")
    deploy = result.artifacts["deploy"]
    assert result.details["scheme"] == "w4a8"
    assert result.details["activations"].startswith("int8, calibrated on")
    assert xnnpack_partitions(deploy) == {"partitions": 1, "ops_left_to_builtin_kernels": {}}  # nothing left to the built-in kernels
    assert result.details["xnnpack"] == {"partitions": 1, "ops_left_to_builtin_kernels": {}}
    biggest_dense = max((w for w in tflite_weights(deploy) if w["op"] == "FULLY_CONNECTED"),
                        key=lambda w: w["data"].size)
    assert biggest_dense["weight_bits"] == 4
    assert deploy.stat().st_size < int8_result.artifacts["deploy"].stat().st_size


def test_ptq_int4_weight_granularity_sets_the_scales_of_its_8_bit_layers(runs):
    """w4a8 keeps convolutions 8-bit; their scales follow the option as PTQ INT8's do (the 4-bit
    dense weights stay one scale per tensor)."""
    per_channel, _ = runs("ptq_int4", weight_granularity="per_channel")
    per_tensor, accuracy = runs("ptq_int4", weight_granularity="per_tensor")
    assert weight_scale_counts(per_tensor.artifacts["deploy"]) == {1}
    assert max(weight_scale_counts(per_channel.artifacts["deploy"])) > 1
    assert per_channel.details["eight_bit_weight_granularity"] == "per_channel"
    assert accuracy >= PLAUSIBLE_ACCURACY


def op_names(tflite_path: Path) -> list[str]:
    from ai_edge_litert import schema_py_generated as schema

    names = {code: name for name, code in vars(schema.BuiltinOperator).items()
             if not name.startswith("_")}
    model = schema.ModelT.InitFromPackedBuf(tflite_path.read_bytes(), 0)
    return [names[model.operatorCodes[op.opcodeIndex].builtinCode]
            for op in model.subgraphs[0].operators]


@pytest.fixture(scope="module")
def pointwise_cnn(tmp_path_factory):
    """A float .tflite with a 3x3 conv, a pointwise conv (with bias and ReLU), a strided 1x1
    conv, a big and a small dense layer; and random inputs for it."""
    from optimization.backends.tensorflow import convert_to_tflite, keras

    keras.utils.set_random_seed(0)
    layers = keras.layers
    model = keras.Sequential([
        keras.Input((6, 6, 3)), layers.Conv2D(8, 3, padding="same", activation="relu"),
        layers.Conv2D(16, 1, activation="relu"), layers.Conv2D(8, 1, strides=2),
        layers.Flatten(), layers.Dense(64, activation="relu"), layers.Dense(10)])
    x = np.random.default_rng(0).random((32, 6, 6, 3), dtype=np.float32)
    return convert_to_tflite(model, tmp_path_factory.mktemp("pointwise") / "fp32.tflite"), x


def test_pointwise_conv_rewrite_as_fully_connected_is_exact(pointwise_cnn, tmp_path):
    from optimization.backends.tensorflow import pointwise_convs_as_fully_connected, write_bytes

    float_path, x = pointwise_cnn
    content, rewritten = pointwise_convs_as_fully_connected(float_path.read_bytes())
    rewritten_path = write_bytes(content, tmp_path / "rewritten.tflite")
    assert rewritten == 1
    before, after = op_names(float_path), op_names(rewritten_path)
    assert before[:3] == ["CONV_2D", "CONV_2D", "CONV_2D"]
    # only the 1x1 stride-1 conv changed; the 3x3 and the strided 1x1 stay convolutions
    assert after == [before[0], "FULLY_CONNECTED", *before[2:]]
    np.testing.assert_allclose(BACKEND.predict(rewritten_path, x), BACKEND.predict(float_path, x),
                               atol=1e-5)


def test_ptq_int4_w4a8_puts_big_dense_weights_in_4_bits_small_ones_and_convs_in_8(
        pointwise_cnn, tmp_path):
    from optimization.backends.tensorflow import (
        pointwise_convs_as_fully_connected, tflite_weights, write_bytes)
    from optimization.techniques.tensorflow.ptq_int4 import SMALL_LAYER_WEIGHTS, quantize_w4a8

    float_path, x = pointwise_cnn
    content, _ = pointwise_convs_as_fully_connected(float_path.read_bytes())
    files, samples = quantize_w4a8(content, x)
    path = write_bytes(files["per_tensor"], tmp_path / "w4a8.tflite")
    assert samples == len(x)
    float_sizes = [w["data"].size // 4 for w in tflite_weights(float_path)]  # float32 bytes
    bits = [(w["op"], w["weight_bits"], size >= SMALL_LAYER_WEIGHTS)
            for w, size in zip(tflite_weights(path), float_sizes)]
    assert bits == [("CONV_2D", 8, False), ("FULLY_CONNECTED", 8, False), ("CONV_2D", 8, False),
                    ("FULLY_CONNECTED", 4, True), ("FULLY_CONNECTED", 8, False)]
    outputs = BACKEND.predict(path, x)
    reference = BACKEND.predict(float_path, x)
    assert np.corrcoef(outputs.ravel(), reference.ravel())[0, 1] > 0.95  # int8 in, float out


def test_w4a8_activation_ranges_cover_every_calibration_sample_not_only_the_last(pointwise_cnn):
    """Large inputs first, small ones after: a moving average of each sample's range (the
    quantizer's own calibration) would shrink the range to the small ones and clip the large."""
    from optimization.backends.tensorflow import pointwise_convs_as_fully_connected, write_bytes
    from optimization.techniques.tensorflow.ptq_int4 import quantize_w4a8

    float_path, x = pointwise_cnn
    large, small = 10 * x[:16], 0.1 * x[16:]
    content, _ = pointwise_convs_as_fully_connected(float_path.read_bytes())
    files, _ = quantize_w4a8(content, np.concatenate([large, small]))
    quantized = write_bytes(files["per_tensor"], float_path.parent / "w4a8_ranges.tflite")
    reference = BACKEND.predict(float_path, large)
    error = np.abs(BACKEND.predict(quantized, large) - reference).max() / np.abs(reference).max()
    assert error < 0.1, error


@pytest.mark.slow
@pytest.mark.parametrize("name", TECHNIQUES)
def test_every_technique_fills_the_result_fields_the_catalog_promises(name, runs):
    result, _ = runs(name)
    assert set(TECHNIQUE_SPECS[name].reports) <= set(result.vocabulary())
    if result.bits_per_layer is not None:
        assert set(result.float_layers) == {layer for layer, bits in result.bits_per_layer.items() if bits == 32}
        assert min(result.bits_per_layer.values()) == {"int8": 8, "int4": 4}[result.precision]


@pytest.mark.slow
def test_unstructured_pruning_reaches_its_sparsity_but_only_the_compressed_file_shrinks(runs, demo):
    result, accuracy = runs("prune_unstructured", target_sparsity=0.5)
    assert result.sparsity == pytest.approx(0.5, abs=0.02)
    assert accuracy >= PLAUSIBLE_ACCURACY
    assert size_ratio(result, demo[1]) == pytest.approx(1.0, abs=0.02)
    assert result.compressed_size_bytes < 0.7 * result.details["dense_size_bytes"]


def test_unstructured_pruning_chooses_its_sparsity_by_model_size_and_says_why(runs, demo):
    from optimization.catalog import pruning_by_size

    params = count_params_macs(demo[0].module)[0]
    result, accuracy = runs("prune_unstructured")  # epochs given (1), target_sparsity not
    choice = result.details["size_choice"]
    assert choice["params"] == params
    assert choice["target_sparsity"] == pruning_by_size(params)["target_sparsity"] < 0.5
    assert "epochs" not in choice  # given, so not chosen
    assert f"{params:,} parameters" in choice["reason"]
    assert result.sparsity == pytest.approx(choice["target_sparsity"], abs=0.02)
    assert result.details["learning_rate_schedule"] == "cosine"
    assert accuracy >= PLAUSIBLE_ACCURACY
    given, _ = runs("prune_unstructured", target_sparsity=0.5)
    assert "size_choice" not in given.details


def test_unstructured_pruning_keeps_layers_with_few_weights_dense(runs, demo):
    from optimization.backends.tensorflow import keras
    from optimization.techniques.tensorflow._common import MIN_PRUNED_LAYER_WEIGHTS

    result, _ = runs("prune_unstructured", target_sparsity=0.5)
    small = [layer.name for layer in demo[0].module.layers
             if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))
             and layer.kernel.shape.num_elements() < MIN_PRUNED_LAYER_WEIGHTS]
    assert small  # the first 3x3 conv over one channel: 288 weights
    assert result.details["small_layers_kept_dense"]["layers"] == small
    pruned_model = BACKEND.load(result.artifacts["native"]).module
    for name in small:
        assert np.count_nonzero(pruned_model.get_layer(name).kernel.numpy()) == \
            demo[0].module.get_layer(name).kernel.shape.num_elements()


@pytest.mark.slow
def test_structured_pruning_leaves_fewer_params_macs_and_bytes(runs, demo):
    result, accuracy = runs("prune_structured", pruning_ratio=0.5)
    params, macs = count_params_macs(demo[0].module)
    assert result.params < 0.5 * params and result.macs < 0.5 * macs
    assert size_ratio(result, demo[1]) < 0.5
    assert accuracy >= PLAUSIBLE_ACCURACY


@pytest.mark.slow
def test_structured_fine_tuning_distils_from_the_unpruned_model_or_uses_labels_alone(runs):
    distilled, distilled_accuracy = runs("prune_structured", pruning_ratio=0.5)
    alone, alone_accuracy = runs("prune_structured", pruning_ratio=0.5, distill=False)
    assert distilled.details["distilled_from_original"] is True
    assert alone.details["distilled_from_original"] is False
    assert distilled.details["learning_rate_schedule"] == "cosine"
    assert distilled.params == alone.params
    assert min(distilled_accuracy, alone_accuracy) >= PLAUSIBLE_ACCURACY


def test_distilled_student_is_smaller_and_is_compared_with_the_student_alone(runs, demo, digits):
    result, accuracy = runs("distillation")
    params, macs = count_params_macs(demo[0].module)
    assert result.params < params and result.macs < macs
    assert 0.0 < result.details["student_alone_accuracy"] <= 1.0
    # one epoch from the teacher's own filters keeps the teacher's accuracy within a few points
    assert result.details["student_init"] == "teacher"
    assert accuracy >= litert_accuracy(demo[1], digits) - 0.03


@pytest.mark.slow
def test_student_from_random_weights_is_still_available_and_said_so(runs):
    result, accuracy = runs("distillation", student_init="random")
    assert "random" in result.details["student"]
    assert accuracy >= 0.7  # a student trained from scratch for one epoch


def test_qat_gives_an_int8_file_at_least_as_accurate_as_ptq(runs, demo):
    result, accuracy = runs("qat")
    _, ptq_accuracy = runs("ptq_int8")
    assert size_ratio(result, demo[1]) <= 0.30
    assert accuracy >= ptq_accuracy - 0.02


def test_qat_file_is_as_small_as_ptq_int8_per_tensor(runs, demo):
    """Per-tensor weight scales by default: at least 3.5x smaller than FP32, within 2% of
    PTQ's per-tensor file (the same INT8 graph; only the learned weights differ)."""
    result, _ = runs("qat")
    ptq, _ = runs("ptq_int8", weight_granularity="per_tensor")
    assert result.details["weight_granularity"] == "per_tensor"
    assert weight_scale_counts(result.artifacts["deploy"]) == {1}
    assert size_ratio(result, demo[1]) <= 1 / 3.5
    assert result.artifacts["deploy"].stat().st_size <= 1.02 * ptq.artifacts["deploy"].stat().st_size


@pytest.mark.slow
def test_qat_starts_from_the_calibrated_ranges_of_ptq(runs):
    """Before any fine-tuning step the QAT file already matches PTQ: tfmot's own start, ranges
    of [-6, 6] and an input range of [0, 0], gives chance accuracy there."""
    result, accuracy = runs("qat", epochs=0)
    _, ptq_accuracy = runs("ptq_int8")
    assert accuracy >= ptq_accuracy - 0.02
    assert result.details["activation_ranges"].startswith("calibrated on")


def test_hybrid_is_smaller_than_int8_alone_and_keeps_sparsity_through_int8(runs, demo):
    result, accuracy = runs("hybrid")  # epochs 1: structured stage 3 epochs, PQAT 1
    int8_result, _ = runs("ptq_int8")
    assert result.artifacts["deploy"].stat().st_size < 0.5 * int8_result.artifacts["deploy"].stat().st_size
    assert result.details["structured"]["epochs"] == 3
    assert result.sparsity >= 0.4  # in the INT8 file
    assert result.compressed_size_bytes < result.artifacts["deploy"].stat().st_size
    assert accuracy >= PLAUSIBLE_ACCURACY


@pytest.mark.parametrize("name", TECHNIQUES)
def test_estimated_time_grows_with_the_number_of_layers(name):
    technique, config = get_technique("tensorflow", name), TechniqueConfig(output_dir=None)
    shallow = {"params": 360_000, "macs": 2.6e6, "train_samples": 1_000, "calib_samples": 128, "layers": 8}
    deep = {**shallow, "layers": 65}
    assert 0 < technique.estimate_time(shallow, config) < technique.estimate_time(deep, config)


def test_a_stop_request_ends_fine_tuning_at_the_next_batch(demo, digits, tmp_path):
    batches_seen = []

    def stop_during_training(fraction, message, metrics):
        if "epoch" in message:
            batches_seen.append(fraction)
            raise ExperimentStopped()

    config = TechniqueConfig(output_dir=tmp_path, options={"epochs": 5})
    with pytest.raises(ExperimentStopped):
        get_technique("tensorflow", "qat").optimize(demo[0], config, digits, stop_during_training)
    assert len(batches_seen) == 1
    assert not (tmp_path / "qat.tflite").exists()


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory):
    from optimization.zoo.keras import mobilenet_v2_small

    path = tmp_path_factory.mktemp("mobilenet") / "mobilenet.keras"
    mobilenet_v2_small().save(path)
    return BACKEND.load(path)


@pytest.mark.slow
def test_ptq_int8_runs_on_keras_applications_mobilenet_v2(tmp_path, mobilenet):
    rng = np.random.default_rng(0)
    images = rng.random((64, 32, 32, 3), dtype=np.float32)
    dataset = split("noise", images, rng.integers(0, 10, 64), "NHWC", calib_size=32)
    result = get_technique("tensorflow", "ptq_int8").optimize(
        mobilenet, TechniqueConfig(output_dir=tmp_path), dataset, ignore_progress)
    outputs = BACKEND.predict(result.artifacts["deploy"], dataset.x_test)
    assert outputs.shape == (len(dataset.x_test), 10)
    np.testing.assert_allclose(outputs.sum(axis=1), 1.0, atol=0.05)  # the softmax head survived
    # per-channel scales and int32 biases of ~150 small tensors weigh more here than on digits
    float32_weight_bytes = 4 * mobilenet.module.count_params()
    assert result.artifacts["deploy"].stat().st_size <= 0.45 * float32_weight_bytes


@pytest.mark.slow
def test_channel_surgery_on_mobilenet_v2_keeps_residual_channels_whole(mobilenet):
    from optimization.techniques.tensorflow._common import shrink_channels

    model = mobilenet.module
    narrowed, surgery = shrink_channels(model, 0.5, copy_weights=True)
    assert any("merges" in kept["why"] for kept in surgery["kept_whole"])
    assert narrowed.count_params() < model.count_params()
    assert narrowed.predict(np.zeros((2, 32, 32, 3), np.float32), verbose=0).shape == (2, 10)


def test_magnitude_pruning_leaves_the_uploaded_model_untouched(runs, demo):
    model, _ = demo

    result, _ = runs("prune_unstructured")

    assert result.sparsity > 0.3
    as_uploaded = BACKEND.load(model.source_path).module.get_weights()
    for kept, now in zip(as_uploaded, model.module.get_weights()):  # tfmot pruned it in place before
        np.testing.assert_array_equal(kept, now)


@pytest.mark.slow
def test_hybrid_runs_pruning_preserving_qat_on_a_model_with_a_normalization_layer(digits, tmp_path):
    """keras.applications' EfficientNet starts with a Normalization layer, which tfmot's
    pruning-preserving QAT scheme refused (its registry does not know it), so hybrid fell back
    to post-training INT8. Its output is now quantized as the INT8 file computes it (fixed mean
    and variance, no trainable weights), and PQAT fine-tunes the pruned model."""
    from optimization.backends.tensorflow import keras
    from optimization.techniques.tensorflow._common import quantize_aware

    normalization = keras.layers.Normalization(axis=-1)
    normalization.adapt(digits.x_train)
    inputs = keras.Input(digits.x_train.shape[1:])
    features = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(normalization(inputs))
    features = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(features)
    outputs = keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(features))
    network = keras.Model(inputs, outputs)
    network.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    network.fit(digits.x_train, digits.y_train, epochs=5, verbose=0)
    network.save(tmp_path / "normalized.keras")
    model = BACKEND.load(tmp_path / "normalized.keras")

    # the QAT model normalizes as the network does (a cloned Normalization computed with mean 0
    # and variance 1 until its state was refreshed from its weights)
    quantized, _ = quantize_aware(model.module, digits.x_calib)
    assert agreement(quantized, model.module, digits.x_test) >= 0.9

    config = TechniqueConfig(output_dir=tmp_path / "hybrid",
                             options={"epochs": 1, "structured_epochs": 1, "qat_epochs": 1})
    result = get_technique("tensorflow", "hybrid").optimize(model, config, digits, ignore_progress)

    assert result.details["stages"][-1] == "pruning-preserving QAT"
    assert "qat_not_applicable" not in result.details
    assert result.details["layers_not_annotated"] == []
    # the INT8 file is the PQAT model converted: they agree on (nearly) every test digit
    deployed = BACKEND.predict(result.artifacts["deploy"], digits.x_test).argmax(axis=1)
    assert (result.model.predict(digits.x_test, verbose=0).argmax(axis=1) == deployed).mean() >= 0.9


def agreement(model, other, x) -> float:
    return float((model.predict(x, verbose=0).argmax(axis=1) == other.predict(x, verbose=0).argmax(axis=1)).mean())
