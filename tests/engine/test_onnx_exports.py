"""ONNX files as torch.onnx.export writes them by default — legacy exporter with Constant,
Shape/Gather/Concat/Reshape nodes and a dynamic batch axis, and the dynamo exporter — are
analysed and run through the post-training techniques; every result re-runs in onnxruntime."""
from __future__ import annotations

import importlib

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from optimization.backends import pytorch as backend  # noqa: E402
from optimization.base import TechniqueConfig  # noqa: E402
from optimization.datasets import load_digits_preset  # noqa: E402
from optimization.evaluator import accuracy  # noqa: E402
from optimization.graph import load_graph  # noqa: E402


class ViewCNN(torch.nn.Module):
    """Flattens with x.view(x.size(0), -1), which the legacy exporter writes as
    Shape → Gather → Unsqueeze → Concat → Reshape with Constant nodes."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(16)
        self.fc = torch.nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = torch.nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc(x.view(x.size(0), -1))


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return load_digits_preset(tmp_path_factory.mktemp("preset"), "NCHW")


@pytest.fixture(scope="module")
def trained(digits):
    torch.manual_seed(0)
    net = ViewCNN()
    backend.train(net, digits, 4, 3e-3, lambda *args: None, (0.0, 1.0), seed=0)
    return net.eval()


def export(net, path, exporter: str, opset: int):
    sample = torch.zeros(1, 1, 8, 8)
    if exporter == "dynamo":
        # external_data=False: one self-contained file, as the upload asks (torch's default
        # for the dynamo exporter writes the weights to a second file).
        torch.onnx.export(net, (sample,), str(path), dynamo=True, opset_version=opset, external_data=False,
                          dynamic_shapes={"x": {0: torch.export.Dim("batch", max=1024)}})
    else:
        torch.onnx.export(net, (sample,), str(path), dynamo=False, opset_version=opset,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


EXPORTS = [("legacy", 13), ("legacy", 17), ("dynamo", 18)]


@pytest.fixture(scope="module", params=EXPORTS, ids=[f"{e}-opset{o}" for e, o in EXPORTS])
def exported(request, trained, tmp_path_factory):
    exporter, opset = request.param
    path = export(trained, tmp_path_factory.mktemp("onnx") / f"{exporter}{opset}.onnx", exporter, opset)
    return exporter, path


def test_legacy_exports_really_have_constant_nodes_and_a_dynamic_batch(exported):
    exporter, path = exported
    model = onnx.load(str(path))

    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 0  # symbolic
    if exporter == "legacy":
        assert {"Constant", "Shape", "Reshape"} <= {node.op_type for node in model.graph.node}


def test_the_graph_of_an_export_counts_the_same_params_and_macs_as_pytorch(exported, trained):
    _, path = exported
    graph = load_graph(path)
    params, macs = backend.count_params_macs(trained, (1, 8, 8))

    assert graph.input_shape == [1, 1, 8, 8]
    assert graph.params == pytest.approx(params, rel=0.02)
    assert graph.macs == pytest.approx(macs, rel=0.1)


@pytest.mark.parametrize("name", ["ptq_int8", "ptq_int4"])
def test_post_training_techniques_run_on_the_export_within_a_point(exported, digits, name, tmp_path):
    _, path = exported
    model = backend.BACKEND.load(path)
    fp32 = accuracy(backend.BACKEND, path, digits.x_test, digits.y_test)

    technique = importlib.import_module(f"optimization.techniques.pytorch.{name}").Technique()
    result = technique.optimize(model, TechniqueConfig(output_dir=tmp_path), digits, lambda *args: None)

    optimized = accuracy(backend.BACKEND, result.artifacts["deploy"], digits.x_test, digits.y_test)
    assert fp32 > 0.8
    assert optimized >= fp32 - 0.01
    assert np.isfinite(optimized)


def test_the_upload_check_accepts_each_export(exported):
    from optimization.safety.onnx_check import check_onnx_file

    _, path = exported
    check_onnx_file(path, "model.onnx")


def test_the_upload_check_refuses_a_dynamo_export_with_its_weights_in_a_second_file(trained, tmp_path):
    from optimization.base import UnsafeModelError
    from optimization.safety.onnx_check import check_onnx_file

    path = tmp_path / "model.onnx"
    torch.onnx.export(trained, (torch.zeros(1, 1, 8, 8),), str(path), dynamo=True)  # torch's default
    assert (tmp_path / "model.onnx.data").exists()

    with pytest.raises(UnsafeModelError, match="external_data=False"):
        check_onnx_file(path, "model.onnx")


@pytest.mark.slow
def test_a_zip_of_a_default_dynamo_export_and_its_data_file_trains_and_deploys_as_one_file(trained, digits, tmp_path):
    """torch.onnx.export's default writes model.onnx.data beside model.onnx; zipped together
    they load, convert for training (QAT here), and the deploy file is self-contained. The
    extracted folder goes with the loaded model."""
    import gc
    import zipfile

    from optimization.techniques.pytorch import qat

    folder = tmp_path / "export"
    folder.mkdir()
    torch.onnx.export(trained, (torch.zeros(2, 1, 8, 8),), str(folder / "model.onnx"), dynamo=True,
                      dynamic_shapes={"x": {0: torch.export.Dim("batch", max=1024)}})
    assert (folder / "model.onnx.data").exists()
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for file in folder.iterdir():
            zipped.write(file, f"export/{file.name}")
    fp32 = backend.evaluate(trained, digits.x_test, digits.y_test)

    model = backend.BACKEND.load(archive)
    extracted = model.source_path.parent
    result = qat.Technique().optimize(model, TechniqueConfig(output_dir=tmp_path / "qat", options={"epochs": 1}),
                                      digits, lambda *args: None)
    deploy = tmp_path / "alone" / "qat.onnx"
    deploy.parent.mkdir()
    deploy.write_bytes(result.artifacts["deploy"].read_bytes())  # nothing beside it

    assert model.preparation["pytorch_form"]["converted"]
    assert accuracy(backend.BACKEND, deploy, digits.x_test, digits.y_test) >= fp32 - 0.02
    del model, result
    gc.collect()
    assert not extracted.exists()


def test_a_zip_whose_onnx_reads_its_data_from_outside_the_archive_is_refused_by_the_engine(trained, tmp_path):
    import zipfile

    from optimization.base import UnsafeModelError

    folder = tmp_path / "export"
    folder.mkdir()
    torch.onnx.export(trained, (torch.zeros(2, 1, 8, 8),), str(folder / "model.onnx"), dynamo=True)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../../model.onnx.data"
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("model.onnx", model.SerializeToString())
        zipped.write(folder / "model.onnx.data", "model.onnx.data")

    with pytest.raises(UnsafeModelError, match="not one of the files beside the model"):
        backend.BACKEND.load(archive)


def test_a_legacy_export_keeping_weights_as_inputs_quantizes_to_a_file_fed_by_the_image_alone(trained, digits,
                                                                                               tmp_path):
    import onnxruntime as ort

    from optimization.techniques.pytorch import ptq_int4

    path = tmp_path / "weights_as_inputs.onnx"
    torch.onnx.export(trained, (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False, opset_version=13,
                      keep_initializers_as_inputs=True, input_names=["input"],
                      dynamic_axes={"input": {0: "batch"}})
    assert len(onnx.load(str(path)).graph.input) > 1  # every weight is an input too

    result = ptq_int4.Technique().optimize(backend.BACKEND.load(path), TechniqueConfig(output_dir=tmp_path),
                                           digits, lambda *args: None)

    session = ort.InferenceSession(str(result.artifacts["deploy"]), providers=["CPUExecutionProvider"])
    assert [value.name for value in session.get_inputs()] == ["input"]
    assert accuracy(backend.BACKEND, result.artifacts["deploy"], digits.x_test, digits.y_test) > 0.8


class LayerScaleBlock(torch.nn.Module):
    """A ConvNeXt block in miniature: depthwise conv, channels-last LayerNorm, GELU MLP and a
    per-channel layer scale, which the legacy exporter writes as a bare initializer."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.stem = torch.nn.Conv2d(1, width, 2, stride=2)
        self.dw = torch.nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.norm = torch.nn.LayerNorm(width)
        self.up, self.down = torch.nn.Conv2d(width, 2 * width, 1), torch.nn.Conv2d(2 * width, width, 1)
        self.gamma = torch.nn.Parameter(torch.full((width, 1, 1), 0.5))
        self.head = torch.nn.Linear(width, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.norm(self.dw(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = x + self.gamma * self.down(torch.nn.functional.gelu(self.up(y)))
        return self.head(x.mean((2, 3)))


def converted_and_half_pruned(network_class, path, exporter, opset):
    """A `network_class` network (1x8x8 input, seeded) exported, converted back by onnx2torch and cut
    to half its channels."""
    from optimization.backends.onnx_to_torch import convert
    from optimization.techniques.pytorch._common import prune_channels

    torch.manual_seed(0)
    module, note = convert(export(network_class().eval(), path, exporter, opset), (1, 8, 8))
    assert note["converted"], note
    return module, prune_channels(module, (1, 8, 8), 0.5, round_to=None)[0]


def test_channels_come_out_of_a_converted_legacy_export_with_a_layer_scale(tmp_path):
    """The layer scale comes back as a parameter, so Torch-Pruning narrows it with its channels."""
    module, pruned = converted_and_half_pruned(LayerScaleBlock, tmp_path / "block.onnx", "legacy", 17)

    assert pruned(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    assert sum(p.numel() for p in pruned.parameters()) < 0.6 * sum(p.numel() for p in module.parameters())
    assert any(p.shape == (16, 1, 1) for p in pruned.parameters())  # the layer scale, halved


class GhostSlice(torch.nn.Module):
    """GhostNet's module: half the channels from a cheap depthwise conv, concatenated and cut
    back to the output width with a slice, which the legacy exporter writes with constant bounds."""

    def __init__(self):
        super().__init__()
        self.primary, self.cheap = torch.nn.Conv2d(1, 6, 3, padding=1), torch.nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.head = torch.nn.Linear(10, 10)

    def forward(self, x):
        x = self.primary(x)
        x = torch.cat([x, self.cheap(x)], dim=1)[:, :10]
        return self.head(x.mean((2, 3)))


def loaded_legacy_export(network_class, path, op_type):
    """A `network_class` network (seeded) exported by the legacy exporter, which writes `op_type`,
    and loaded by the app's loader (onnx2torch for the training techniques)."""
    torch.manual_seed(0)
    export(network_class().eval(), path, "legacy", 17)
    assert op_type in {node.op_type for node in onnx.load(str(path)).graph.node}
    return backend.BACKEND.load(path)


def test_a_legacy_export_slicing_channels_converts_to_a_module_torch_export_traces(tmp_path):
    model = loaded_legacy_export(GhostSlice, tmp_path / "ghost.onnx", "Slice")

    assert model.trainable, model.preparation
    backend.export_program(model.module, (1, 8, 8))  # what the training techniques do with it


class BatchIndexed(torch.nn.Module):
    """Indexes its rows with torch.arange(batch): the exporters write ONNX Range up to a size
    read from a Shape node (the dynamo exporter writes as_strided this way)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Linear(4, 10)

    def forward(self, x):
        logits = self.fc(self.conv(x).mean((2, 3)))
        return logits[torch.arange(x.shape[0])]


def test_a_range_up_to_the_batch_size_converts_to_a_module_torch_export_traces(tmp_path):
    model = loaded_legacy_export(BatchIndexed, tmp_path / "range.onnx", "Range")

    assert model.trainable, model.preparation
    program = backend.export_program(model.module, (1, 8, 8))
    assert program.module()(torch.zeros(5, 1, 8, 8)).shape == (5, 10)


class ConstantFlatten(torch.nn.Module):
    """Flattens with x.reshape(-1, C*H*W), which the exporters write as a Reshape to a constant
    (-1, 512): pruning the conv must narrow the classifier's input, not fold channels into the batch."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(torch.nn.functional.max_pool2d(torch.relu(self.conv(x)), 2).reshape(-1, 32 * 4 * 4))


def test_channels_come_out_of_a_converted_export_that_flattens_to_a_constant_width(tmp_path):
    _, pruned = converted_and_half_pruned(ConstantFlatten, tmp_path / "flatten.onnx", "dynamo", 18)

    assert pruned(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    assert [m.out_channels for m in pruned.modules() if isinstance(m, torch.nn.Conv2d)] == [16]
