"""Text for language models: the tokenized WikiText-2 splits, and token windows for calibration and evaluation.

    text = cm.data.text.load_text("wikitext-2", "valid")          # or cm.data.load("wikitext-2", "valid")
    calib = token_windows(text, tokenizer, 64, 512, seed=0)        # 64 windows of 512 tokens at random starts
    test = token_windows(cm.data.load("wikitext-2", "test"), tokenizer, 40, 512, random=False)  # the first 40

WikiText-2 (Merity et al. 2016) is the *tokenized* release that PyTorch's word-language-model example ships
(words split, rare words as ``<unk>``): found in ``$CHITA_DATA_DIR/wikitext-2``, else ``../shared/data/wikitext-2``,
else downloaded from its pinned public source with the SHA256 below. Perplexities on it compare methods with each
other; they are not the numbers papers report on the raw release.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from chita_minimal.data.files import candidate_folders, download_allowed, file_hash, import_pooch, retrieve, shared_dir
from chita_minimal.utils import check_int

SPLITS = ("valid", "test")
_URL = ("https://raw.githubusercontent.com/pytorch/examples/d5678bc8ac0cdd79dbd5e44d4130271018bcec4e/"
        "word_language_model/data/wikitext-2/{split}.txt")
SHA256 = {"valid.txt": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
          "test.txt": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0"}


def load_text(name: str = "wikitext-2", split: str = "test", *, root=None, download: bool = True) -> str:
    """The text of a WikiText-2 split ("valid" or "test"), hash-checked."""
    if name != "wikitext-2":
        raise ValueError(f"unknown text data set {name!r}; valid: 'wikitext-2'")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} for wikitext-2 (the training split is not used), got {split!r}")
    fname = f"{split}.txt"
    cache = Path(import_pooch().os_cache("chita_minimal")) / "wikitext-2"
    folders = candidate_folders(None if root is None else Path(root), "CHITA_DATA_DIR", shared_dir("data"), cache)
    for folder in folders:
        for path in (folder / "wikitext-2" / fname, folder / fname):
            if path.is_file():
                if file_hash(path) != SHA256[fname]:
                    raise ValueError(f"{path} is not the pinned WikiText-2 file (SHA256 {file_hash(path)}, expected "
                                     f"{SHA256[fname]}); delete it or point CHITA_DATA_DIR elsewhere")
                return path.read_text(encoding="utf-8")
    if not download_allowed(download):
        raise FileNotFoundError(f"WikiText-2 {fname} not found in {', '.join(map(str, folders))} and downloads are "
                                "off (download=False or CHITA_NO_DOWNLOAD): put the file in one of those folders")
    path = retrieve(_URL.format(split=split), f"sha256:{SHA256[fname]}", fname, cache)
    return Path(path).read_text(encoding="utf-8")


class TokenWindows(Dataset):
    """Token windows as a dataset: item i is {"input_ids": (T,), "labels": (T,)} (the labels are the ids: a causal
    LM predicts token t+1 from tokens ≤ t). ``ids`` holds them all as one (n, T) LongTensor."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}

    def __repr__(self) -> str:
        return f"TokenWindows({len(self.ids)} × {self.ids.shape[1]} tokens)"


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """The text as one 1-d LongTensor of token ids (``tokenizer(text).input_ids``, no special tokens added)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("text is empty")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def token_windows(text, tokenizer=None, n: int | None = None, length: int = 512, *, random: bool = True,
                  seed: int = 0) -> TokenWindows:
    """Windows of ``length`` tokens from a text (or from token ids, a 1-d LongTensor, without a tokenizer).

    random=True (calibration): ``n`` windows at seeded uniformly random starts; random=False (evaluation): the
    first ``n`` non-overlapping windows (all that fit when n is None). ValueError when the text is shorter than
    one window, or holds fewer than ``n`` non-overlapping windows."""
    check_int("length", length, low=2)
    ids = text if isinstance(text, torch.Tensor) else tokenize(text, tokenizer) if tokenizer is not None else None
    if ids is None:
        raise TypeError("give a tokenizer to cut a text into token windows (or pass token ids as a LongTensor)")
    ids = ids.reshape(-1).long()
    if ids.numel() < length:
        raise ValueError(f"length = {length} tokens is longer than the text ({ids.numel()} tokens)")
    if random:
        if n is None:
            raise ValueError("n (the number of random windows) is needed with random=True")
        check_int("n", n)
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, ids.numel() - length + 1, (n,), generator=g)
        return TokenWindows(torch.stack([ids[s:s + length] for s in starts.tolist()]))
    fits = ids.numel() // length
    if n is None:
        n = fits
    check_int("n", n)
    if n > fits:
        raise ValueError(f"n = {n} non-overlapping windows of {length} tokens do not fit in the text "
                         f"({ids.numel()} tokens hold {fits})")
    return TokenWindows(ids[:n * length].view(n, length))
