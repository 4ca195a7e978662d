"""Tests of chita_minimal.models: architectures, key names, parameter counts, pretrained loading."""

import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from chita_minimal.models import INPUT_SHAPES, MODEL_NAMES, MLPNet, load_pretrained, mobilenet_v1, resnet20, resnet50
from chita_minimal.models import pretrained


def _checkpoint_dir() -> Path:
    if os.environ.get("CHITA_CHECKPOINT_DIR"):
        return Path(os.environ["CHITA_CHECKPOINT_DIR"])
    return pretrained._repo_checkpoint_dir()


def _checkpoint(fname: str) -> Path:
    path = _checkpoint_dir() / fname
    if not path.is_file():
        pytest.skip(f"{fname} not found in {path.parent} (set CHITA_CHECKPOINT_DIR)")
    return path


@pytest.fixture(autouse=True)
def _no_download(monkeypatch):
    monkeypatch.setenv("CHITA_NO_DOWNLOAD", "1")  # tests never touch the network


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- architectures


def test_mlpnet_layout_and_forward():
    m = MLPNet()
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {
        "fc1.weight": (40, 784), "fc2.weight": (20, 40), "fc3.weight": (10, 20)}
    assert _n_params(m) == 32360
    x = torch.randn(3, 1, 28, 28)
    out = m(x)
    assert out.shape == (3, 10)
    # no biases: zero input gives zero logits; ReLU between layers: the map is positively homogeneous
    assert torch.equal(m(torch.zeros(2, 1, 28, 28)), torch.zeros(2, 10))
    torch.testing.assert_close(m(2.0 * x), 2.0 * out)
    torch.testing.assert_close(m(x.flatten(1)), out)  # flattens its input


def test_resnet20_keys_equal_checkpoint_keys():
    ckpt = torch.load(_checkpoint("resnet20_cifar10.pth.tar"), map_location="cpu", weights_only=True)
    expected = {k.removeprefix("module."): tuple(v.shape) for k, v in ckpt["state_dict"].items()}
    got = {k: tuple(v.shape) for k, v in resnet20().state_dict().items()}
    assert got == expected
    assert list(got) == list(expected)  # same order too


def test_resnet20_structure_and_forward():
    m = resnet20()
    assert _n_params(m) == 272474  # the well-known 0.27M
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    assert all(c.bias is None for c in convs) and len(convs) == 21  # 19 + 2 downsample convs
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert resnet20(num_classes=100)(torch.randn(2, 3, 16, 16)).shape == (2, 100)


def test_resnet50_matches_torchvision_layout():
    m = resnet50()
    assert _n_params(m) == 25_557_032
    keys = m.state_dict().keys()
    for k in ["conv1.weight", "bn1.running_mean", "layer1.0.downsample.0.weight", "layer1.0.downsample.1.running_var",
              "layer2.3.conv3.weight", "layer3.5.bn2.bias", "layer4.2.conv3.weight", "layer4.0.downsample.1.weight",
              "fc.weight", "fc.bias"]:
        assert k in keys, k
    assert "layer1.1.downsample.0.weight" not in keys and "layer3.6.conv1.weight" not in keys
    assert m.layer2[0].conv2.stride == (2, 2) and m.layer2[0].conv1.stride == (1, 1)  # v1.5: stride in the 3×3
    m.eval()
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 1000)


def test_mobilenet_v1_matches_str_definition():
    m = mobilenet_v1()
    # STR's models/mobilenetv1.py: conv_bn(3, 32, 2), 13 depthwise-separable blocks, fc = 1×1 conv without bias.
    # Conv weights: 864 + Σ (9·in + in·out) + 1024·1000 = 4,209,088; BatchNorm: 2·10,944 = 21,888.
    assert _n_params(m) == 4_230_976
    convs = sum(p.numel() for mod in m.modules() if isinstance(mod, nn.Conv2d) for p in mod.parameters())
    assert convs == 4_209_088
    sd = m.state_dict()
    assert tuple(sd["model.0.0.weight"].shape) == (32, 3, 3, 3)
    assert tuple(sd["model.1.0.weight"].shape) == (32, 1, 3, 3)  # depthwise
    assert tuple(sd["model.1.3.weight"].shape) == (64, 32, 1, 1)  # pointwise
    assert tuple(sd["model.13.4.running_var"].shape) == (1024,)
    assert tuple(sd["fc.weight"].shape) == (1000, 1024, 1, 1) and "fc.bias" not in sd
    assert not any(k.startswith("model.14") for k in sd)  # pooling, no parameters
    m.eval()
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 1000)
    assert mobilenet_v1(num_classes=10)(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_bad_num_classes(bad):
    for ctor in (resnet20, resnet50, mobilenet_v1):
        with pytest.raises(ValueError, match="num_classes"):
            ctor(num_classes=bad)


def test_input_shapes_fit_the_models():
    for name in MODEL_NAMES:
        model = pretrained.ARCHITECTURES[name]().eval()
        assert model(torch.randn(2, *INPUT_SHAPES[name])).shape == (2, 10)


# ----------------------------------------------------------------------------- pretrained


def test_load_pretrained_mlpnet_matches_derived_file():
    sd = torch.load(_checkpoint("mlpnet_mnist_state_dict.pt"), map_location="cpu", weights_only=True)
    m = load_pretrained("mlpnet")
    assert isinstance(m, MLPNet) and not m.training
    for k, v in sd.items():
        assert torch.equal(m.state_dict()[k], v)


def test_original_ckpt_gives_same_tensors_as_derived(tmp_path):
    shutil.copy(_checkpoint("mnist_25_epoch_93.97.ckpt"), tmp_path)
    _checkpoint("mlpnet_mnist_state_dict.pt")
    from_ckpt = load_pretrained("mlpnet", root=tmp_path, download=False)
    from_derived = load_pretrained("mlpnet")
    assert pretrained._find_checkpoint("mlpnet", tmp_path, False).name == "mnist_25_epoch_93.97.ckpt"
    a, b = from_ckpt.state_dict(), from_derived.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_load_pretrained_resnet20():
    ckpt = torch.load(_checkpoint("resnet20_cifar10.pth.tar"), map_location="cpu", weights_only=True)
    m = load_pretrained("resnet20")
    assert not m.training
    sd = m.state_dict()
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(sd[k.removeprefix("module.")], v)


def test_corrupted_checkpoint_raises(tmp_path):
    blob = _checkpoint("resnet20_cifar10.pth.tar").read_bytes()
    (tmp_path / "resnet20_cifar10.pth.tar").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="resnet20_cifar10.pth.tar") as info:
        load_pretrained("resnet20", root=tmp_path, download=False)
    assert pretrained._SHA256["resnet20_cifar10.pth.tar"] in str(info.value)


def test_missing_checkpoint_raises(tmp_path, monkeypatch):
    monkeypatch.delenv("CHITA_NO_DOWNLOAD")
    with pytest.raises(FileNotFoundError) as info:
        load_pretrained("mlpnet", root=tmp_path, download=False)
    msg = str(info.value)
    assert str(tmp_path) in msg and "CHITA_CHECKPOINT_DIR" in msg and "mnist_25_epoch_93.97.ckpt" in msg


def test_unknown_name_raises():
    with pytest.raises(ValueError, match="mlpnet.*resnet20"):
        load_pretrained("vgg16")


def test_load_pretrained_device():
    m = load_pretrained("mlpnet", device="cpu")
    assert next(m.parameters()).device == torch.device("cpu")


def test_download_path_with_a_fake_pooch(tmp_path, monkeypatch):
    """The download branch (no network here): pooch.retrieve is replaced by a local copy."""
    import pooch

    calls = []
    source = _checkpoint("mnist_25_epoch_93.97.ckpt")
    sd = torch.load(_checkpoint("mlpnet_mnist_state_dict.pt"), map_location="cpu", weights_only=True)

    def fake_retrieve(url, known_hash, fname, path, **kwargs):
        calls.append((url, known_hash))
        Path(path).mkdir(parents=True, exist_ok=True)
        shutil.copy(source, Path(path) / fname)
        return str(Path(path) / fname)

    monkeypatch.delenv("CHITA_NO_DOWNLOAD")
    monkeypatch.setenv("CHITA_CHECKPOINT_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(pretrained, "_cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr(pooch, "retrieve", fake_retrieve)
    m = load_pretrained("mlpnet")
    assert calls == [("https://github.com/mazumder-lab/CHITA/raw/main/checkpoints/mnist_25_epoch_93.97.ckpt",
                      "sha256:56083559fe28b22bf9fac71134322d7c4fe55ea5f7d6eba30b4c300783900f12")]
    assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())
