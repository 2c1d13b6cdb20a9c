"""All seven techniques through the JSON API and a real worker, on models the project did not
write, with an uploaded `.npz` dataset — once per framework."""
from __future__ import annotations

import io

import numpy as np
import pytest

from optimization.base import TECHNIQUES

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

FINE_TUNING = ("prune_unstructured", "prune_structured", "distillation", "qat", "hybrid")
ONE_EPOCH = {"techniques": {name: {"epochs": 1} for name in FINE_TUNING}}


def prototype_dataset(shape_nhwc: tuple[int, int, int], n: int = 600, classes: int = 10, seed: int = 0):
    """Noisy copies of one coarse (4x4-block) random image per class: learnable in a few
    epochs, even by a network that downsamples early."""
    rng = np.random.default_rng(seed)
    height, width, channels = shape_nhwc
    coarse = rng.random((classes, 4, 4, channels)).astype(np.float32)
    prototypes = coarse.repeat(height // 4, axis=1).repeat(width // 4, axis=2)
    y = rng.integers(0, classes, n)
    x = np.clip(prototypes[y] + rng.normal(0, 0.15, (n, *shape_nhwc)), 0, 1).astype(np.float32)
    return x, y


def npz(x_train, y_train, x_test, y_test) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return buffer.getvalue()


def run_all_seven(stack, framework: str, model_name: str, model_bytes: bytes, dataset_bytes: bytes) -> dict:
    status, experiment, _ = stack.request("POST", "/api/experiments/create", {
        "name": f"{framework} external model", "framework": framework, "target_device": "rpi5",
        "dataset": "custom", "goal": "balanced", "constraints": {"max_accuracy_drop": 5.0},
        "config": ONE_EPOCH})
    assert status == 201, experiment
    experiment_id = experiment["id"]
    assert stack.upload(experiment_id, model_name, model_bytes)[0] == 200
    status, body = stack.upload(experiment_id, "data.npz", dataset_bytes, kind="dataset")
    assert status == 200, body
    assert stack.request("POST", f"/api/experiments/{experiment_id}/start")[0] == 202

    finished = stack.wait_until_finished(experiment_id, timeout=2400)  # a hang detector, for a busy box

    assert finished["status"] == "completed", finished
    _, results, _ = stack.request("GET", f"/api/experiments/{experiment_id}/results")
    runs = {run["technique"]: run for run in results["runs"]}
    assert sorted(runs) == sorted(TECHNIQUES)
    for name, run in runs.items():
        assert run["status"] == "completed", (name, run["error"])
        assert run["size_bytes"] > 0 and 0 <= run["accuracy"] <= 1 and run["latency_ms"] > 0
    assert results["baseline"]["accuracy"] > 0.5  # the uploaded model learned the data
    status, recommendation, _ = stack.request("GET", f"/api/experiments/{experiment_id}/recommendation")
    assert status == 200 and recommendation["technique"] in TECHNIQUES
    return {"id": experiment_id, "runs": runs}


class FireNet:
    """A SqueezeNet-style network (squeeze 1x1 → concatenated 1x1/3x3 expand, a residual add),
    defined here, outside the project's zoo, the way a user's own code would define it."""

    @staticmethod
    def build():
        import torch
        from torch import nn

        class Fire(nn.Module):
            def __init__(self, cin, squeeze, expand):
                super().__init__()
                self.squeeze = nn.Sequential(nn.Conv2d(cin, squeeze, 1), nn.ReLU())
                self.e1 = nn.Sequential(nn.Conv2d(squeeze, expand, 1), nn.ReLU())
                self.e3 = nn.Sequential(nn.Conv2d(squeeze, expand, 3, padding=1), nn.ReLU())

            def forward(self, x):
                s = self.squeeze(x)
                return torch.cat([self.e1(s), self.e3(s)], dim=1)

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
                self.fire1 = Fire(32, 16, 16)
                self.fire2 = Fire(32, 16, 16)
                self.head = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 8 * 8, 10))

            def forward(self, x):
                x = self.stem(x)
                x = x + self.fire1(x)
                return self.head(self.fire2(x))

        return Net()


def test_an_uploaded_pt2_of_an_outside_architecture_completes_all_seven(stack, tmp_path):
    import onnxruntime as ort
    import torch

    x, y = prototype_dataset((16, 16, 3))
    x = x.transpose(0, 3, 1, 2)  # the upload is already in the model's layout (NCHW)
    torch.manual_seed(0)
    net = FireNet.build()
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(3):
        for start in range(0, 480, 32):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(x[start:start + 32])),
                                                     torch.from_numpy(y[start:start + 32]))
            loss.backward()
            optimizer.step()
    net.eval()
    path = tmp_path / "firenet.pt2"
    torch.export.save(torch.export.export(net, (torch.zeros(1, 3, 16, 16),)), path)

    outcome = run_all_seven(stack, "pytorch", "firenet.pt2", path.read_bytes(),
                            npz(x[:480], y[:480], x[480:], y[480:]))

    for name in TECHNIQUES:
        status, data, _ = stack.request("GET", f"/api/experiments/{outcome['id']}/download/{name}")
        assert status == 200
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        assert session.run(None, {session.get_inputs()[0].name: x[480:481]})[0].shape == (1, 10)


def test_an_uploaded_keras_applications_model_completes_all_seven(stack, tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    from optimization.backends.tensorflow import keras

    x, y = prototype_dataset((32, 32, 3))
    model = keras.applications.MobileNet(input_shape=(32, 32, 3), alpha=0.25, weights=None, classes=10)
    for layer in model.layers:  # a short training: let batch-norm statistics keep up
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    model.fit(x[:480], y[:480], epochs=5, batch_size=32, verbose=0)
    path = tmp_path / "mobilenet.keras"
    model.save(path)

    outcome = run_all_seven(stack, "tensorflow", "mobilenet.keras", path.read_bytes(),
                            npz(x[:480], y[:480], x[480:], y[480:]))

    for name in TECHNIQUES:
        status, data, headers = stack.request("GET", f"/api/experiments/{outcome['id']}/download/{name}")
        assert status == 200 and ".tflite" in headers["Content-Disposition"]
        interpreter = Interpreter(model_content=data)
        interpreter.allocate_tensors()
