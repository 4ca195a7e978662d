"""Finding, downloading and checking files (data sets, checkpoints): shared by data/datasets.py and
models/pretrained.py.

Environment variables (read at each call):

- ``CHITA_DATA_DIR`` / ``CHITA_CHECKPOINT_DIR``: local folders searched first;
- ``CHITA_NO_SHARED=1``: do not look in ``../shared`` beside the repository (as on a machine that has no such
  folder, e.g. Colab);
- ``CHITA_NO_DOWNLOAD=1``: never download;
- ``CHITA_DOWNLOAD_BASE_URL``: download from a mirror instead of the public hosts: a file published at
  ``https://HOST/PATH`` is fetched from ``$CHITA_DOWNLOAD_BASE_URL/HOST/PATH`` (the layout ``wget -x URL``
  makes). Downloads are hash-checked against the same pinned hashes wherever they come from.

Downloads land in the user cache (``pooch.os_cache("chita_minimal")``, ``~/.cache/chita_minimal`` on Linux,
which follows ``$XDG_CACHE_HOME``).
"""

from __future__ import annotations

import functools
import hashlib
import os
import urllib.parse
from pathlib import Path

_TRUE = ("1", "true", "yes")


def shared_dir(name: str) -> Path:
    """<repo root>/../shared/<name>, where the repo root holds the package directory (this file is chita_minimal/data/files.py)."""
    return Path(__file__).resolve().parents[3] / "shared" / name


def candidate_folders(root, env_var: str, shared: Path, cache: Path) -> list[Path]:
    """Folders to search, in order: ``root`` if given (alone); else ``$env_var`` if set, else ``shared``
    if it exists (and ``$CHITA_NO_SHARED`` is not set); then the download cache (earlier downloads)."""
    if root is not None:
        return [Path(root)]
    if os.environ.get(env_var):
        folders = [Path(os.environ[env_var])]
    elif shared.is_dir() and os.environ.get("CHITA_NO_SHARED", "").lower() not in _TRUE:
        folders = [shared]
    else:
        folders = []
    return folders + [cache]


def download_allowed(download: bool) -> bool:
    """Downloads are tried unless ``download=False`` or ``$CHITA_NO_DOWNLOAD`` is set."""
    return bool(download) and os.environ.get("CHITA_NO_DOWNLOAD", "").lower() not in _TRUE


def download_url(url: str) -> str:
    """Where to download the file published at ``url``: ``url`` itself, or, when ``$CHITA_DOWNLOAD_BASE_URL`` is
    set, its mirror ``$CHITA_DOWNLOAD_BASE_URL/<host>/<path>``."""
    base = os.environ.get("CHITA_DOWNLOAD_BASE_URL", "").strip()
    if not base:
        return url
    parts = urllib.parse.urlsplit(url)
    return f"{base.rstrip('/')}/{parts.netloc}{parts.path}"


def retrieve(url: str, known_hash: str, fname: str, path, processor=None) -> str:
    """Download ``url`` (through ``download_url``) into ``path/fname`` with pooch, which checks ``known_hash``
    before it keeps the file; a download with the wrong hash is refused with a ValueError and nothing is
    stored. Returns what ``pooch.retrieve`` returns (the file's path, or the processor's result)."""
    pooch = import_pooch()
    source = download_url(url)
    try:
        return pooch.retrieve(source, known_hash=known_hash, fname=fname, path=path, processor=processor,
                              progressbar=True)
    except ValueError as err:
        if "hash" not in str(err):
            raise
        raise ValueError(
            f"download of {fname} from {source} refused: it does not match the pinned hash ({err}). Nothing "
            f"was stored in {path}. The server sent a corrupted, truncated or different file"
            + (" (check the mirror set by CHITA_DOWNLOAD_BASE_URL)" if source != url else "; try again later")
            + "."
        ) from None


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
