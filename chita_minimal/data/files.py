"""Finding and checking local files (data sets, checkpoints): shared by data.py and models/pretrained.py."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path


def shared_dir(name: str) -> Path:
    """<repo root>/../shared/<name>, where the repo root holds the package directory (this file is chita_minimal/data/files.py)."""
    return Path(__file__).resolve().parents[3] / "shared" / name


def candidate_folders(root, env_var: str, shared: Path, cache: Path) -> list[Path]:
    """Folders to search, in order: ``root`` if given (alone); else ``$env_var`` if set, else ``shared``
    if it exists; then the download cache (earlier downloads)."""
    if root is not None:
        return [Path(root)]
    if os.environ.get(env_var):
        folders = [Path(os.environ[env_var])]
    elif shared.is_dir():
        folders = [shared]
    else:
        folders = []
    return folders + [cache]


def download_allowed(download: bool) -> bool:
    """Downloads are tried unless ``download=False`` or ``$CHITA_NO_DOWNLOAD`` is set."""
    return bool(download) and os.environ.get("CHITA_NO_DOWNLOAD", "") not in ("1", "true", "yes")


@functools.lru_cache(maxsize=None)
def _digest(path: str, size: int, mtime_ns: int, algorithm: str) -> str:
    # size and mtime are part of the cache key so that a file changed on disk is hashed again.
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_hash(path, algorithm: str = "sha256") -> str:
    """Hex digest of a file (computed once per process for an unchanged file)."""
    st = os.stat(path)
    return _digest(str(Path(path).resolve()), st.st_size, st.st_mtime_ns, algorithm)


def import_pooch():
    """Import pooch (downloads and the user cache folder) without the warning its tqdm.auto import
    prints in notebooks that lack ipywidgets."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found")
        import pooch
    return pooch
