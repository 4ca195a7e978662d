"""The ImageNet code path on a tiny fake ImageFolder made here (no ImageNet on CI)."""

import numpy as np
import pytest
import torch

import chita_minimal as cm
from chita_minimal.data import imagenet
from chita_minimal.scale.streaming import block_backsolve_streamed

PIL = pytest.importorskip("PIL.Image")


@pytest.fixture
def fake_imagenet(tmp_path):
    rng = np.random.default_rng(0)
    for split, per_class in [("train", 3), ("val", 2)]:
        for c in ["n01440764", "n01443537", "n01484850"]:
            folder = tmp_path / split / c
            folder.mkdir(parents=True)
            for i in range(per_class):
                w, h = int(rng.integers(40, 80)), int(rng.integers(40, 80))
                PIL.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.JPEG")
            (folder / "notes.txt").write_text("not an image")
    return tmp_path


def test_reads_the_folder_layout(fake_imagenet, monkeypatch):
    monkeypatch.setenv("CHITA_IMAGENET_DIR", str(fake_imagenet))
    train = imagenet.load("train", size=32, resize=36)
    assert len(train) == 9 and train.classes == ["n01440764", "n01443537", "n01484850"]
    x, y = train[4]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and int(y) == 1
    assert len(imagenet.load("val", root=fake_imagenet, size=32, resize=36)) == 6


def test_preprocess_resize_crop_normalise():
    image = PIL.fromarray(np.full((50, 100, 3), 255, dtype=np.uint8))
    x = imagenet.preprocess(image, size=24, resize=32)
    assert x.shape == (3, 24, 24)
    expected = (1.0 - torch.tensor(imagenet.MEAN)) / torch.tensor(imagenet.STD)
    torch.testing.assert_close(x[:, 5, 7], expected)


def test_missing_data_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("CHITA_IMAGENET_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="CHITA_IMAGENET_DIR"):
        imagenet.load("train")
    with pytest.raises(FileNotFoundError, match="train"):
        imagenet.load("train", root=tmp_path)
    (tmp_path / "val").mkdir()
    with pytest.raises(ValueError, match="no class"):
        imagenet.load("val", root=tmp_path)
    (tmp_path / "val" / "c0").mkdir()
    with pytest.raises(ValueError, match="no images"):
        imagenet.load("val", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        imagenet.load("test", root=tmp_path)


def test_checkpoint_loading(tmp_path):
    model = cm.models.mobilenet_v1()
    path = tmp_path / "MobileNetV1-Dense-STR.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, path)
    loaded = imagenet.load_model("mobilenet_v1", path)
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert not loaded.training
    bad = tmp_path / "resnet50-0676ba61.pth"
    bad.write_bytes(b"not the checkpoint")
    with pytest.raises(ValueError, match="SHA256"):
        imagenet.load_model("resnet50", bad)
    with pytest.raises(FileNotFoundError, match="download.pytorch.org"):
        imagenet.load_model("resnet50", tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="name"):
        imagenet.load_model("vgg16", path)


def _small_net():
    # a small ImageNet-style convnet (MobileNetV1's 4.2M weights would make this test slow on CI)
    from torch import nn
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 1000)).eval()


def test_prune_runs_on_the_fake_folder(fake_imagenet):
    train = imagenet.load("train", root=fake_imagenet, size=32, resize=36)
    val = imagenet.load("val", root=fake_imagenet, size=32, resize=36)
    torch.manual_seed(0)
    a, b = _small_net(), _small_net()
    b.load_state_dict(a.state_dict())
    report = cm.prune(a, train, 0.5, "chita-block", n_grads=6, l2=1e-2, block_size=100, seed=1)
    assert abs(report.achieved_sparsity - 0.5) < 1e-4
    res = block_backsolve_streamed(b, train, 0.5, n_grads=6, l2=1e-2, block_size=100, seed=1, chunk=4)
    lay = cm.network.params.layout(a)
    torch.testing.assert_close(cm.network.params.flatten(b, lay), cm.network.params.flatten(a, lay), rtol=1e-4, atol=1e-6)
    assert res.seconds["total"] > 0
    assert 0.0 <= cm.evaluate(a, val, batch_size=4) <= 1.0
