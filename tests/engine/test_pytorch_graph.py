"""Uploaded torch.export programs of architectures outside the zoo, exported for a fixed batch:
loading generalises the batch and turns aten ops into real nn layers (optimization/backends/pytorch_graph.py)."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from optimization.backends import pytorch as backend
from optimization.techniques.pytorch._common import prune_channels


class Fire(nn.Module):
    def __init__(self, cin, squeeze, expand):
        super().__init__()
        self.squeeze = nn.Sequential(nn.Conv2d(cin, squeeze, 1), nn.ReLU())
        self.e1 = nn.Sequential(nn.Conv2d(squeeze, expand, 1), nn.ReLU())
        self.e3 = nn.Sequential(nn.Conv2d(squeeze, expand, 3, padding=1), nn.ReLU())

    def forward(self, x):
        s = self.squeeze(x)
        return torch.cat([self.e1(s), self.e3(s)], dim=1)


class FireNet(nn.Module):
    """Concatenation, a residual add, batch norm, and a flatten spelled as x.view(x.size(0), -1),
    which a batch-1 export bakes into aten.view(x, [1, 512])."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.fire = Fire(16, 8, 8)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = self.stem(x)
        x = self.pool(x + self.fire(x))
        return self.fc(x.view(x.size(0), -1))


class BatchMixing(nn.Module):
    """Sums over the batch: no rewrite makes its per-sample outputs independent of the batch."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 4)

    def forward(self, x):
        return self.fc(x.sum(0, keepdim=True).flatten(1))


def _upload(net: nn.Module, path, side: int = 8):
    torch.manual_seed(0)
    net.eval()
    torch.export.save(torch.export.export(net, (torch.zeros(1, 3, side, side),)), path)
    return backend.BACKEND.load(path)


@pytest.fixture(scope="module")
def firenet(tmp_path_factory):
    torch.manual_seed(0)
    net = FireNet()
    with torch.no_grad():  # non-trivial batch-norm statistics, so a wrong mode would show
        net.stem[1].running_mean.uniform_(-0.5, 0.5)
        net.stem[1].running_var.uniform_(0.5, 2.0)
    return net, _upload(net, tmp_path_factory.mktemp("pt2") / "firenet.pt2")


def test_a_fixed_batch_export_runs_any_batch_with_the_per_sample_outputs(firenet):
    net, model = firenet
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        batched = model.module(x)
        per_sample = torch.cat([net(x[i:i + 1]) for i in range(5)])
    assert backend.fixed_batch(model.module) is None
    assert "rewritten to take any batch" in model.preparation["batch"]
    assert torch.allclose(batched, per_sample, atol=1e-5)


def test_aten_ops_become_real_layers_that_train(firenet):
    _, model = firenet
    layers = {type(m) for m in model.module.modules()}
    assert {nn.Conv2d, nn.BatchNorm2d, nn.Linear} <= layers
    assert model.preparation["modules"] == {"Conv2d": 4, "BatchNorm2d": 1, "Linear": 1}
    assert set(model.module.state_dict()) == set(FireNet().state_dict())  # same names as the user's model
    assert all(p.requires_grad for p in model.module.parameters())
    module = copy.deepcopy(model.module)
    module.train()
    assert module.get_submodule("stem.1").training
    module(torch.randn(4, 3, 8, 8)).sum().backward()
    assert module.get_submodule("stem.0").weight.grad is not None


def test_torch_pruning_removes_channels_through_the_concatenation_and_residual(firenet):
    _, model = firenet
    before = sum(p.numel() for p in model.module.parameters())
    pruned, multiple = prune_channels(model.module, model.input_shape, 0.5)
    assert sum(p.numel() for p in pruned.parameters()) < before
    # its 8- and 16-channel layers cannot keep multiples of 16 and still lose channels
    assert multiple is None
    assert pruned(torch.randn(3, 3, 8, 8)).shape == (3, 10)


def test_the_onnx_export_takes_batches_larger_than_the_upload(firenet, tmp_path):
    net, model = firenet
    x = np.random.default_rng(0).standard_normal((7, 3, 8, 8)).astype(np.float32)
    deploy = backend.BACKEND.export_deploy(model, tmp_path / "firenet.onnx")
    session = backend.ort_session(deploy)
    logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        assert np.allclose(logits, net(torch.from_numpy(x)).numpy(), atol=1e-4)


def test_a_graph_that_mixes_the_batch_stays_fixed_and_is_fed_that_batch(tmp_path):
    net = BatchMixing()
    model = _upload(net, tmp_path / "mixing.pt2")
    assert backend.fixed_batch(model.module) == 1
    assert "fixed at 1" in model.preparation["batch"]
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = torch.cat([net(torch.from_numpy(x[i:i + 1])) for i in range(3)]).numpy()
    assert np.allclose(backend.predict_torch(model.module, x), expected, atol=1e-5)
    deploy = backend.BACKEND.export_deploy(model, tmp_path / "mixing.onnx")
    assert np.allclose(backend.BACKEND.predict(deploy, x), expected, atol=1e-4)


@pytest.mark.parametrize("limits", [(1, 1024), (3, 24)], ids=["max-1024", "min-3-max-24"])
def test_a_dynamic_batch_export_trains_predicts_and_reexports_within_its_batch_range(limits, tmp_path):
    torch.manual_seed(0)
    net = FireNet().eval()
    batch = torch.export.Dim("batch", min=limits[0], max=limits[1])
    path = tmp_path / "dynamic.pt2"
    torch.export.save(torch.export.export(net, (torch.randn(4, 3, 8, 8),), dynamic_shapes=({0: batch},)), path)
    model = backend.BACKEND.load(path)
    x = np.random.default_rng(0).standard_normal((301, 3, 8, 8)).astype(np.float32)

    assert backend.batch_range(model.module) == limits
    assert backend.batch_range(copy.deepcopy(model.module)) == limits  # techniques work on copies
    assert f"batches {limits[0]} to {limits[1]}" in model.preparation["batch"]
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    assert np.allclose(backend.predict_torch(model.module, x), expected, atol=1e-5)  # last chunk padded
    dataset = type("Data", (), {"x_train": x, "y_train": np.arange(301) % 10})
    seen = []
    model.module.register_forward_pre_hook(lambda module, inputs: seen.append(len(inputs[0])))
    backend.train(model.module, dataset, 1, 1e-3, lambda *_: None)
    assert seen and all(limits[0] <= size <= limits[1] for size in seen)
    deploy = backend.BACKEND.export_deploy(model, tmp_path / "deploy.onnx")
    assert backend.BACKEND.predict(deploy, x[:5]).shape == (5, 10)
    assert backend.BACKEND.latency_ms(deploy, x[0]) > 0


class ChannelsLastNormBlock(nn.Module):
    """ConvNeXt's block as timm writes it: depthwise conv, LayerNorm over channels last, GELU
    MLP, and a layer scale reshaped to (1, C, 1, 1)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 2, stride=2)
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.norm = nn.LayerNorm(width)
        self.up, self.down = nn.Conv2d(width, 2 * width, 1), nn.Conv2d(2 * width, width, 1)
        self.gamma = nn.Parameter(torch.full((width,), 0.5))
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.norm(self.dw(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = x + self.down(nn.functional.gelu(self.up(y))).mul(self.gamma.reshape(1, -1, 1, 1))
        return self.head(x.mean((2, 3)))


def test_layer_norms_become_modules_whose_channels_torch_pruning_removes(tmp_path):
    net = ChannelsLastNormBlock().eval()
    model = _upload(net, tmp_path / "block.pt2")
    sample = torch.randn(3, 3, 8, 8)

    assert model.preparation["modules"]["LayerNorm"] == 1
    assert torch.allclose(model.module(sample), net(sample), atol=1e-5)
    pruned, _ = prune_channels(model.module, model.input_shape, 0.5, round_to=None)
    assert pruned.get_submodule("norm").normalized_shape == (16,)
    assert pruned(sample).shape == (3, 10)


class ChannelIndexed(nn.Module):
    """Picks its channels with fixed indices (a Gather), which a narrower conv no longer has."""

    def __init__(self):
        super().__init__()
        self.conv, self.mix = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 32, 1)
        self.fc = nn.Linear(32, 10)
        self.register_buffer("order", torch.arange(32).flip(0))

    def forward(self, x):
        return self.fc(self.mix(self.conv(x)[:, self.order]).mean((2, 3)))


def test_a_graph_pruning_cannot_follow_is_not_applicable_with_the_reason():
    from optimization.base import TechniqueNotApplicable

    with pytest.raises(TechniqueNotApplicable, match="IndexError"):
        prune_channels(ChannelIndexed().eval(), (3, 8, 8), 0.5, round_to=None)
