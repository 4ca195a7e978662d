"""The Colab path end to end, without the internet: no local data, an empty cache, real downloads.

A local HTTP server on 127.0.0.1 mirrors the public hosts (``<host>/<path>`` below its root, the layout
``CHITA_DOWNLOAD_BASE_URL`` expects) with the MNIST files and the MLPNet checkpoint. With
``CHITA_DOWNLOAD_BASE_URL`` pointing at it, ``CHITA_NO_SHARED=1`` (no ../shared lookup), no
``CHITA_DATA_DIR``/``CHITA_CHECKPOINT_DIR`` and an empty user cache (``XDG_CACHE_HOME``), the package downloads
through pooch, checks the pinned hashes and caches exactly as on Colab; nothing is mocked. A download with
wrong bytes is refused and not cached. Then the first chapter's install, setup and data cells run in a kernel
in the same setting.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

import chita_minimal as cm
from chita_minimal.data import datasets
from chita_minimal.models import pretrained

ROOT = Path(__file__).resolve().parents[1]
MNIST_FILES = [rel for split in ("train", "test") for rel in datasets._MNIST_FILES[split]]
CKPT = pretrained._DOWNLOAD_FILE["mlpnet"]


def _public_path(url: str) -> str:
    """'https://host/a/b' -> 'host/a/b' (where the mirror keeps it)."""
    return url.split("://", 1)[1]


def _local_sources() -> dict[str, Path] | None:
    """Mirror path -> local file for the four MNIST files and the MLPNet checkpoint, from the usual lookup
    (CHITA_DATA_DIR / ../shared / earlier downloads); None when they are not all here."""
    out = {}
    try:
        for split in ("train", "test"):
            paths = datasets._find_files("mnist", split, None, download=False)
            for rel, path in zip(datasets._MNIST_FILES[split], paths):
                out[_public_path(datasets._MNIST_URL + rel.split("/")[-1])] = path
    except FileNotFoundError:
        return None
    folders = pretrained.candidate_folders(None, "CHITA_CHECKPOINT_DIR", pretrained._repo_checkpoint_dir(),
                                           pretrained._cache_dir())
    for folder in folders:
        if (folder / CKPT).is_file():
            out[_public_path(pretrained._URL + CKPT)] = folder / CKPT
            return out
    return None


class _Mirror:
    """A threaded HTTP server for a folder; paths in ``corrupt`` are served with bytes flipped (same length)."""

    def __init__(self, folder: Path):
        mirror = self
        self.corrupt: set[str] = set()
        self.requests: list[str] = []

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path.lstrip("/")
                mirror.requests.append(path)
                if path in mirror.corrupt:
                    data = bytearray((folder / path).read_bytes())
                    data[len(data) // 2] ^= 0xFF
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(bytes(data))
                    return
                super().do_GET()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    sources = _local_sources()
    if sources is None:
        pytest.skip("the MNIST files and the MLPNet checkpoint are not available locally to serve")
    folder = tmp_path_factory.mktemp("mirror")
    for rel, src in sources.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, folder / rel)
    server = _Mirror(folder)
    server.sources = sources
    yield server
    server.close()


@pytest.fixture
def colab(mirror, tmp_path, monkeypatch):
    """The Colab setting: downloads from the mirror, no local data folders, an empty user cache."""
    for var in ("CHITA_DATA_DIR", "CHITA_CHECKPOINT_DIR", "CHITA_NO_DOWNLOAD"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CHITA_NO_SHARED", "1")
    monkeypatch.setenv("CHITA_DOWNLOAD_BASE_URL", mirror.url)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # pooch.os_cache follows it
    mirror.corrupt.clear()
    mirror.requests.clear()
    yield mirror
    mirror.corrupt.clear()


def _cache() -> Path:
    return Path(datasets._cache_dir())


def test_mnist_and_checkpoint_download_hash_check_and_cache(colab):
    cache = _cache()
    assert str(cache).startswith(os.environ["XDG_CACHE_HOME"]) and not cache.exists()
    local_images = colab.sources[_public_path(datasets._MNIST_URL + "t10k-images-idx3-ubyte.gz")]
    reference_test = datasets.load("mnist", "test", root=local_images.parents[1])

    # a corrupted label file is refused, with the URL and the hash in the message, and not cached
    labels = _public_path(datasets._MNIST_URL + "t10k-labels-idx1-ubyte.gz")
    colab.corrupt.add(labels)
    with pytest.raises(ValueError) as info:
        cm.data.load("mnist", "test")
    msg = str(info.value)
    assert "refused" in msg and "t10k-labels-idx1-ubyte.gz" in msg and colab.url in msg, msg
    assert datasets._SHA256["mnist/t10k-labels-idx1-ubyte.gz"] in msg and "CHITA_DOWNLOAD_BASE_URL" in msg
    assert not (cache / "mnist" / "t10k-labels-idx1-ubyte.gz").exists()
    assert [p.name for p in (cache / "mnist").iterdir()] == ["t10k-images-idx3-ubyte.gz"]  # no partial files

    # served correctly, it is downloaded once; the images, already cached, are not fetched again
    colab.corrupt.clear()
    colab.requests.clear()
    test = cm.data.load("mnist", "test")
    assert colab.requests == [labels]
    assert all(torch.equal(a, b) for a, b in zip(test.tensors, reference_test.tensors))
    train = cm.data.load("mnist", "train")
    assert len(train) == 60000 and len(colab.requests) == 3
    assert sorted(p.name for p in (cache / "mnist").iterdir()) == sorted(Path(r).name for r in MNIST_FILES)

    # the checkpoint: corrupted -> refused and not cached; then downloaded, hash-checked, cached
    ckpt = _public_path(pretrained._URL + CKPT)
    colab.corrupt.add(ckpt)
    with pytest.raises(ValueError, match=f"(?s)refused.*{CKPT}"):
        cm.models.load_pretrained("mlpnet")
    assert not (cache / "checkpoints" / CKPT).exists()
    colab.corrupt.clear()
    colab.requests.clear()
    model = cm.models.load_pretrained("mlpnet")
    assert colab.requests == [ckpt] and (cache / "checkpoints" / CKPT).is_file()
    reference = cm.models.load_pretrained("mlpnet", root=colab.sources[ckpt].parent)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))

    # later calls use the cache: no request at all
    colab.requests.clear()
    cm.data.load("mnist", "test")
    cm.models.load_pretrained("mlpnet")
    assert colab.requests == []


def test_first_chapter_setup_and_data_cells_on_a_fresh_machine(colab, tmp_path, monkeypatch):
    """book/mlpnet.ipynb's install, setup and data cells, in a kernel, downloading through the mirror."""
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    nb = nbformat.read(str(ROOT / "book" / "mlpnet.ipynb"), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    install, setup = code[0], code[1]
    data = next(c for c in code if 'cm.data.load("mnist"' in c.source and "load_pretrained" in c.source)
    assert "pip" in install.source and "git+" in install.source
    run = nbformat.v4.new_notebook(cells=[install, setup, data], metadata=nb.metadata)
    for cell in run.cells:
        cell.outputs = []
    workdir = tmp_path / "colab"  # the notebook's RESULTS folder goes here, not into the repository
    workdir.mkdir()
    monkeypatch.setenv("CHITA_QUICK", "1")  # the kernel inherits this environment
    start = time.perf_counter()
    NotebookClient(run, timeout=600, kernel_name="python3").execute(cwd=str(workdir))
    seconds = time.perf_counter() - start
    text = "".join(o.get("text", "") for c in run.cells for o in c.outputs if o.output_type == "stream")
    errors = [o for c in run.cells for o in c.outputs if o.output_type == "error"]
    assert not errors, json.dumps(errors)[:2000]
    assert "MLPNet: p = 32,360 prunable weights; dense accuracy: test 93.97 %" in text, text
    assert "train part 50000, validation 10000, test 10000 images" in text, text
    cache = _cache()
    assert sorted(p.name for p in (cache / "mnist").iterdir()) == sorted(Path(r).name for r in MNIST_FILES)
    assert (cache / "checkpoints" / CKPT).is_file()
    assert len(colab.requests) == 5, colab.requests  # four MNIST files and the checkpoint, each once
    assert seconds < 300
