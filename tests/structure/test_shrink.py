"""cm.shrink: structure removed in one call, with a registry of structure methods."""

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import chita_minimal as cm
from chita_minimal.structure import channels
from chita_minimal.structure.methods import StructureMethod, register


class DepthwiseResidualNet(nn.Module):
    """A user CNN: a stem, a depthwise-separable block, a residual block, a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.pw = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.res = nn.Sequential(nn.Conv2d(32, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU(),
                                 nn.Conv2d(24, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.pw(self.dw(self.stem(x)))
        x = torch.relu(x + self.res(x))
        return self.head(x.mean((2, 3)))


def net_and_data(seed=0):
    torch.manual_seed(seed)
    net = DepthwiseResidualNet().eval()
    for m in net.modules():  # non-trivial BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    data = TensorDataset(torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,)))
    return net, data


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_one_call_with_a_dataloader_and_the_default_method():
    net, data = net_and_data()
    before = state(net)
    report = cm.shrink(net, DataLoader(data, batch_size=8), 0.4)
    assert report.method == "l1"
    assert 0 < report.achieved <= 0.4
    small = report.model
    x = torch.randn(2, 3, 8, 8)
    assert small(x).shape == net(x).shape
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in net.parameters())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # the model given is untouched


@pytest.mark.parametrize("method,options", [("l1", {}), ("taylor", dict(n_grads=8)), ("sosp", dict(n_grads=8)),
                                            ("spectral", dict(n_grads=8)), ("group-chita", dict(n_grads=16, max_iter=10)),
                                            ("ispasp", dict(n_samples=16, iterations=3))])
@pytest.mark.parametrize("budget", ["flops", "params"])
def test_methods_meet_the_budget_on_a_depthwise_residual_cnn(method, options, budget):
    net, data = net_and_data()
    report = cm.shrink(net, data, 0.3, method, budget=budget, **options)
    shape = (3, 8, 8)
    measure = channels.flops if budget == "flops" else channels.weight_count
    achieved = 1 - measure(report.model, shape) / measure(net, shape)
    assert report.achieved == pytest.approx(achieved)
    assert 0 < achieved <= 0.3
    assert report.model(torch.randn(1, *shape)).shape == (1, 10)


@pytest.mark.parametrize("method,options", [("l1", {}), ("sosp", dict(n_grads=8)), ("spectral", dict(n_grads=8)),
                                            ("ispasp", dict(n_samples=16, iterations=3))])
def test_residual_streams_are_removed_consistently(method, options):
    net, data = net_and_data()
    report = cm.shrink(net, data, 0.5, method, residual=True, **options)
    assert any("residual" in name for name in report.keep)
    assert report.model(torch.randn(1, 3, 8, 8)).shape == (1, 10)


@pytest.mark.parametrize("method,options", [("sosp", dict(n_grads=8)), ("spectral", dict(n_grads=4, iterations=3)),
                                            ("ispasp", dict(n_samples=16, iterations=2))])
def test_the_package_model_families_on_mlpnet(method, options):
    torch.manual_seed(0)
    net = cm.models.MLPNet().eval()
    data = TensorDataset(torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,)))
    report = cm.shrink(net, data, 0.5, method, **options)
    assert 0 < report.achieved <= 0.5
    assert report.model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_a_new_method_is_one_class():
    @register
    @dataclass
    class Last(StructureMethod):
        name = "test-last-channels"
        summary = "drop the last channels first (a test)"
        needs_data = False

        def scores(self, model, data, run):
            return {g: torch.arange(c, 0, -1, dtype=torch.float64) for g, c in run.widths(model).items()}

    net, _ = net_and_data()
    report = cm.shrink(net, None, 0.3, "test-last-channels", input_shape=(3, 8, 8))
    for keep in report.keep.values():
        kept = keep.nonzero().squeeze(1)
        assert torch.equal(kept, torch.arange(len(kept)))  # a prefix kept: the last channels went first
    assert "test-last-channels" in cm.structure.methods.available()


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(method="nope"), ValueError, "unknown structure method 'nope'; valid methods: l1"),
    (dict(method="taylor", lr=0.1), TypeError, "no option 'lr'; its options: n_grads, batch_size"),
    (dict(budget="latency"), ValueError, "budget must be 'flops' or 'params', got 'latency'"),
    (dict(fraction=1.5), ValueError, "fraction must lie in"),
    (dict(method="taylor", data=None), ValueError, "needs calibration data"),
    (dict(method="taylor", n_grads=0), ValueError, "n_grads must be >= 1"),
])
def test_bad_input_gets_a_clear_error_and_the_model_is_untouched(kwargs, error, match):
    net, data = net_and_data()
    before = state(net)
    call = dict(data=data, fraction=0.3)
    call.update(kwargs)
    with pytest.raises(error, match=match):
        cm.shrink(net, **call)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


@pytest.mark.parametrize("method,options", [("l1", {}), ("taylor", dict(n_grads=4)), ("sosp", dict(n_grads=4)),
                                            ("spectral", dict(n_grads=4))])
def test_mobilenet_budget_met_and_function_kept_when_the_removed_channels_are_zero(method, options):
    """On MobileNetV1 (depthwise groups: a pointwise and a depthwise producer per channel) every score method meets
    the budget, and the small model computes what the dense one computes with the removed channels zeroed."""
    from conftest import randomise_bn
    from test_graph import _zero_removed

    from chita_minimal.structure.graph import channel_groups
    from chita_minimal.utils import seed_everything

    seed_everything(0)
    model = randomise_bn(cm.models.mobilenet_v1(10)).eval()
    data = TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    x = torch.randn(2, 3, 32, 32)
    report = cm.shrink(model, data, 0.3, method, example_inputs=x[:1], **options)
    assert 0 < report.achieved <= 0.3
    zeroed = copy.deepcopy(model)
    groups = channel_groups(model, x[:1])
    _zero_removed(zeroed, groups, {g: (~k).nonzero().squeeze(1).tolist() for g, k in report.keep.items()})
    with torch.no_grad():
        assert torch.allclose(report.model(x), zeroed(x), atol=1e-5)


def test_resnet50_with_streams_in_one_call():
    torch.manual_seed(0)
    model = cm.models.ResNet50(10).eval()
    report = cm.shrink(model, None, 0.3, "l1", residual=True, example_inputs=torch.zeros(1, 3, 32, 32))
    assert 0 < report.achieved <= 0.3
    assert any(name.endswith("residual") for name, k in report.keep.items() if not k.all())
    assert report.model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_heads_of_a_transformer_encoder_in_one_call():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=4, dim_feedforward=32, batch_first=True)
    net = nn.Sequential(nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False), nn.Linear(16, 3)).eval()
    x = torch.randn(1, 5, 16)
    report = cm.shrink(net, None, 0.5, "heads", example_inputs=x)
    assert sum(int((~k).sum()) for k in report.keep.values()) == 4  # half of the 2 × 4 heads
    assert 0 < report.achieved <= 0.5
    assert report.model(torch.randn(2, 5, 16)).shape == (2, 5, 3)
