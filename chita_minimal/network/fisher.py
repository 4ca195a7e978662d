"""The gradient matrix X of CHITA's empirical Fisher (Benbaki et al. 2023, §2).

    H ≈ (1/n) Xᵀ X,   X ∈ R^{n×p},  row i = ∇_w (mean loss over mini-batch i)

Rows are computed with ``torch.func``: ``functional_call`` runs the model with the
prunable weights as explicit inputs, ``grad`` differentiates the mean loss of one
mini-batch w.r.t. them, and ``vmap`` maps that over many mini-batches at once.
Rows are produced in chunks written into a preallocated X, so memory stays at
n·p plus one chunk. :func:`gradients_loop` computes the same X with one backward
pass per row; it is the reference for tests and the benchmark.

    sample = gradients(model, train_set, n_grads=1000)  # FisherSample
    sample.X          # (n, p) one gradient per row
    sample.mean_grad  # (p,)   α, the optional first-order term of (P)
"""

from __future__ import annotations

import contextlib
import itertools
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap
from torch.utils.data import TensorDataset
from tqdm import tqdm

from chita_minimal.network import language, samples
from chita_minimal.network.params import Layout, layout
from chita_minimal.scale import distributed
from chita_minimal.solver.problem import all_finite
from chita_minimal.utils import check_int as _check_int
from chita_minimal.utils import renamed

CHUNK_BYTES = 256 * 2**20  # default chunk: about this many bytes of gradients


@dataclass
class FisherSample:
    """n gradients of the loss at the current weights (the data of problem (P)).

    Attributes:
        X: (n, p) row i = gradient of the mean loss over mini-batch i.
        mean_grad: (p,) mean of the rows of X (the first-order term α).
        layout: which parameters the p columns belong to (see ``params.Layout``).
        indices: (n, batch_size) dataset indices of the samples of each mini-batch.
        seconds: wall-clock time taken to build X.
        n_total: rows over all ranks; ``sharded``: X holds only this rank's rows (under
            ``torch.distributed``, see :mod:`chita_minimal.scale.distributed`).
    """

    X: torch.Tensor = field(repr=False)
    mean_grad: torch.Tensor = field(repr=False)
    layout: Layout = field(repr=False)
    indices: torch.Tensor = field(repr=False)
    seconds: float
    n_total: int = 0
    sharded: bool = False

    @property
    def n(self) -> int:
        """Rows held here (this rank's share when sharded)."""
        return self.X.shape[0]

    @property
    def p(self) -> int:
        return self.X.shape[1]

    @property
    def batch_size(self) -> int:
        return self.indices.shape[1]

    def __repr__(self) -> str:
        return (f"FisherSample(n={self.n}, p={self.p}, batch_size={self.batch_size}, "
                f"dtype={self.X.dtype}, device={self.X.device}, seconds={self.seconds:.2f})")


# -----------------------------------------------------------------------------
# public API


@renamed(n="n_grads", params="names")
def gradients(model: nn.Module, dataset, n_grads: int, *, batch_size: int = 1, names=None, device=None,
              seed: int = 0, chunk_size: int | None = None, loss_fn=None, output_fn=None,
              progress: bool = True, shard: bool | None = None) -> FisherSample:
    """Build X (n×p) with ``torch.func`` (``vmap`` of ``grad`` of ``functional_call``).

    Args:
        model: the network; its prunable weights are differentiated, every other
            parameter and all buffers are held constant.
        dataset: a ``TensorDataset(inputs, labels)``, any indexable dataset of ``(x, y)``
            pairs or HF-style dicts, a ``DataLoader`` over one, or an iterable of batches
            (see :mod:`chita_minimal.network.samples`). n·batch_size distinct samples are
            drawn without replacement by a permutation seeded with ``seed``.
        n_grads: number of rows (mini-batches); the old keyword ``n=`` still works, deprecated.
        batch_size: samples per mini-batch; row i is the gradient of the mean loss
            over its batch_size samples (1: per-sample gradients).
        names: parameter names to differentiate (see ``params.resolve``); None means the
            default prunable set (the old keyword ``params=`` still works, deprecated).
        device: where to compute and store X; default the model's device. The
            model is moved there temporarily if needed and moved back afterwards.
        seed: seed of the sample permutation (results are deterministic).
        chunk_size: mini-batches per vmap call; default so that a chunk's
            gradients take about 256 MiB. It changes memory use, not the result.
        loss_fn: ``loss_fn(output, target) -> scalar``, the mean loss of one
            mini-batch; default cross-entropy on the model's output (logits).
        output_fn: what of the model's output the loss reads; default: the output itself
            when it is a tensor, else its ``.logits``, ``["logits"]`` or first element.
        progress: show a tqdm progress bar.
        shard: compute only this rank's rows (contiguous share of the n rows, the same
            samples as one process would draw for ``seed``, whatever the world size);
            None means: when an initialised process group has more than one process.
            ``mean_grad`` is then the mean over all n rows (all-reduced).

    The model is put in eval mode during the computation (each module's mode is
    restored afterwards): per-sample gradients are not defined when BatchNorm
    normalises with batch statistics, because then every sample's output depends
    on the other samples of the batch; with running statistics each row depends
    only on its own mini-batch. Dropout is off too. Floating-point inputs are cast
    to the parameters' dtype. A model vmap cannot trace (data-dependent control
    flow, ``.item()``) gets the rows of :func:`gradients_loop` instead, with a warning
    that says so (same X, one backward pass per row).

    Raises ValueError on bad sizes, NaN/Inf parameters, or NaN/Inf gradients
    (naming the parameters concerned).
    """
    return _sample(model, dataset, n_grads, batch_size, names, device, seed, chunk_size, (loss_fn, output_fn),
                   progress, _vmap_rows, "gradients (vmap)", shard)


@renamed(n="n_grads", params="names")
def gradients_loop(model: nn.Module, dataset, n_grads: int, *, batch_size: int = 1, names=None,
                   device=None, seed: int = 0, chunk_size: int | None = None, loss_fn=None, output_fn=None,
                   progress: bool = True, shard: bool | None = None) -> FisherSample:
    """Same X as :func:`gradients`, one plain backward pass per row.

    Same arguments and result (same samples for the same seed). Rows are taken with
    ``torch.autograd.grad``, so the model's ``.grad`` fields are left untouched;
    ``chunk_size`` only sets how many mini-batches are loaded at a time. Slow but
    simple: the reference implementation for tests and benchmarks.
    """
    return _sample(model, dataset, n_grads, batch_size, names, device, seed, chunk_size, (loss_fn, output_fn),
                   progress, _loop_rows, "gradients (loop)", shard)


# -----------------------------------------------------------------------------
# the two ways to fill a chunk of rows: inputs (c, bs, ...), targets (c, bs) -> out (c, p)


def _vmap_rows(model: nn.Module, lay: Layout, loss_fn):
    prms = dict(model.named_parameters())
    train = {name: prms[name].detach() for name in lay.names}
    const = {name: t.detach() for name, t in prms.items() if name not in train}
    const.update(dict(model.named_buffers()))

    def batch_loss(train, x, y):  # x: (bs, ...), y: (bs,) -> scalar mean loss
        return loss_fn(samples.call(model, x, (train, const)), y)

    per_batch = vmap(grad(batch_loss), in_dims=(None, 0, 0))

    def rows(x, y, out):
        grads = per_batch(train, x, y)  # {name: (c, *shape)}
        for name, o, k in zip(lay.names, lay.offsets, lay.numels):
            out[:, o:o + k] = grads[name].reshape(-1, k)

    return rows


def _loop_rows(model: nn.Module, lay: Layout, loss_fn):
    prms = dict(model.named_parameters())
    ts = [prms[name] for name in lay.names]

    def rows(x, y, out):
        flags = [t.requires_grad for t in ts]
        try:
            for t in ts:
                t.requires_grad_(True)
            with torch.enable_grad():
                for i in range(samples.leading_size(y)):
                    loss = loss_fn(samples.call(model, samples.index(x, i)), samples.index(y, i))
                    gs = torch.autograd.grad(loss, ts)
                    for g, o, k in zip(gs, lay.offsets, lay.numels):
                        out[i, o:o + k] = g.reshape(k)
        finally:
            for t, flag in zip(ts, flags):
                t.requires_grad_(flag)

    return rows


# -----------------------------------------------------------------------------
# shared driver


def _setup(model, dataset, n, batch_size, params, seed, chunk_size, loss_fn, shard):
    """Checks and the sample plan shared by :func:`gradients` and :func:`gradient_chunks`:
    (dataset, layout, dtype, indices (rows here, batch_size), n_total, shard, chunk_size, loss)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_int("n_grads", n, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("seed", seed, None)
    if chunk_size is not None:
        _check_int("chunk_size", chunk_size, 1)
    loss_fn, output_fn = loss_fn if isinstance(loss_fn, tuple) else (loss_fn, None)
    for name, fn in (("loss_fn", loss_fn), ("output_fn", output_fn)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
    loss_fn = loss_of(loss_fn, output_fn)
    need = n * batch_size
    dataset = samples.as_dataset(dataset, need)
    if len(dataset) < need:
        raise ValueError(f"dataset has {len(dataset)} samples but n·batch_size = {n}·{batch_size} "
                         f"= {need} distinct samples are needed")

    lay = layout(model, params)
    prms = dict(model.named_parameters())
    dtypes = {prms[name].dtype for name in lay.names}
    if len(dtypes) > 1:
        raise ValueError(f"the selected parameters must share one dtype, got {sorted(map(str, dtypes))}")
    dtype = dtypes.pop()
    _check_finite_model(model)

    g = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(dataset), generator=g)[:need].view(n, batch_size)  # (n, bs)
    n_total = n
    if shard is None:
        shard = distributed.active()
    if shard:
        rank, world = distributed.rank_and_world()
        if world < 2:
            raise ValueError("shard=True needs an initialised torch.distributed process group of > 1 process")
        if n < world:
            raise ValueError(f"n = {n} rows cannot be shared by {world} ranks (need n >= world size)")
        distributed.check_same(n=n, batch_size=batch_size, seed=seed, dataset_size=len(dataset))
        start, stop = distributed.row_range(n, rank, world)
        indices = indices[start:stop]
    if chunk_size is None:
        row_bytes = lay.p * torch.empty((), dtype=dtype).element_size()
        chunk_size = max(1, CHUNK_BYTES // row_bytes)
    chunk_size = min(chunk_size, indices.shape[0])
    return dataset, lay, dtype, indices, n_total, bool(shard), chunk_size, loss_fn


def default_loss(output, target):
    """The loss when none is given: the output's own ``.loss`` where it carries one (a Hugging Face model given
    labels); the shifted next-token cross-entropy for 3-d logits (B, T, V) and 2-d labels (B, T) (a causal LM);
    else cross-entropy of the logits against the target. ValueError naming the shapes when they do not fit."""
    own = getattr(output, "loss", None)
    if isinstance(own, torch.Tensor):
        return own
    logits = samples.logits_of(output)
    if logits.dim() == 3 and target.dim() == 2 and logits.shape[:2] == target.shape:
        return language.next_token_loss(logits, target)
    try:
        return F.cross_entropy(logits, target)
    except (RuntimeError, ValueError, IndexError) as err:
        raise ValueError(f"the default loss (cross-entropy, or next-token cross-entropy for logits (B, T, V) with "
                         f"labels (B, T)) does not fit the model's output of shape {tuple(logits.shape)} and the "
                         f"target of shape {tuple(target.shape)}: pass loss_fn=... (and output_fn=...) ({err})") from None


def loss_of(loss_fn=None, output_fn=None):
    """``loss(output, target)``: ``loss_fn`` on ``output_fn(output)`` (default
    :func:`~chita_minimal.network.samples.logits_of`); without either, :func:`default_loss`."""
    if loss_fn is None and output_fn is None:
        return default_loss
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    output_fn = samples.logits_of if output_fn is None else output_fn

    def loss(output, target):
        return loss_fn(output_fn(output), target)

    return loss


def _fill(rows, lay, dataset, idx, dev, dtype, out, r0):
    """Rows for the mini-batches idx (c, bs) into out (c, p), checked for NaN/Inf (r0: first row's number)."""
    x, y = load_samples(dataset, idx, dev, dtype)  # (c, bs, ...), (c, bs)
    rows(x, y, out)
    bad = [name for name, o, k in zip(lay.names, lay.offsets, lay.numels) if not all_finite(out[:, o:o + k])]
    if bad:
        raise ValueError(f"non-finite (NaN/Inf) gradients in parameter(s) {bad} for rows {r0}..{r0 + len(idx) - 1}")


def _sample(model, dataset, n, batch_size, params, device, seed, chunk_size, loss_fn, progress,
            make_rows, desc, shard=None) -> FisherSample:
    t0 = time.perf_counter()
    if device is not None and not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
    dataset, lay, dtype, indices, n_total, shard, chunk_size, loss_fn = _setup(
        model, dataset, n, batch_size, params, seed, chunk_size, loss_fn, shard)
    n = indices.shape[0]
    with prepared(model, device) as dev:
        rows = make_rows(model, lay, loss_fn)
        X = torch.empty(n, lay.p, dtype=dtype, device=dev)  # (n, p)
        with tqdm(total=n, desc=desc, unit="row", disable=not progress) as bar:
            for r0 in range(0, n, chunk_size):
                r1 = min(n, r0 + chunk_size)
                try:
                    _fill(rows, lay, dataset, indices[r0:r1], dev, dtype, X[r0:r1], r0)
                except Exception as e:  # torch.func cannot trace every model: fall back to one backward per row
                    if make_rows is not _vmap_rows or r0 > 0 or isinstance(e, ValueError):
                        raise
                    warnings.warn(f"gradients: torch.func (vmap) cannot trace this model ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:160]}); computing the same rows with one backward "
                                  "pass per row (slower)", stacklevel=3)
                    make_rows = _loop_rows
                    rows = _loop_rows(model, lay, loss_fn)
                    _fill(rows, lay, dataset, indices[r0:r1], dev, dtype, X[r0:r1], r0)
                bar.update(r1 - r0)
        if shard:
            mean_grad = X.sum(0)
            torch.distributed.all_reduce(mean_grad)
            mean_grad /= n_total  # (p,) mean over every rank's rows
        else:
            mean_grad = X.mean(0)  # (p,)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    return FisherSample(X, mean_grad, lay, indices, time.perf_counter() - t0, n_total=n_total, sharded=shard)


@renamed(n="n_grads", params="names")
def gradient_chunks(model: nn.Module, dataset, n_grads: int, *, batch_size: int = 1, names=None, device=None,
                    seed: int = 0, chunk_size: int = 16, loss_fn=None, progress: bool = False):
    """The rows of :func:`gradients` (same samples for the same seed), ``chunk_size`` at a time,
    without ever holding X: yields ``(r0, X[r0:r0 + c])`` with a (c, p) tensor that is
    overwritten by the next chunk (copy it to keep it). For networks whose n×p matrix does not
    fit in memory (see :mod:`chita_minimal.scale.streaming`). Not sharded.
    """
    dataset, lay, dtype, indices, _, _, chunk_size, loss_fn = _setup(
        model, dataset, n_grads, batch_size, names, seed, chunk_size, loss_fn, False)  # checked now, not at first next()
    return _chunks(model, dataset, lay, dtype, indices, chunk_size, loss_fn, device, progress)


def _chunks(model, dataset, lay, dtype, indices, chunk_size, loss_fn, device, progress):
    n = indices.shape[0]
    with prepared(model, device) as dev:
        rows = _vmap_rows(model, lay, loss_fn)
        buf = torch.empty(chunk_size, lay.p, dtype=dtype, device=dev)  # (c, p)
        with tqdm(total=n, desc="gradients (streamed)", unit="row", disable=not progress) as bar:
            for r0 in range(0, n, chunk_size):
                r1 = min(n, r0 + chunk_size)
                out = buf[:r1 - r0]
                _fill(rows, lay, dataset, indices[r0:r1], dev, dtype, out, r0)
                yield r0, out
                bar.update(r1 - r0)


def _check_finite_model(model: nn.Module) -> None:
    bad = [name for name, t in itertools.chain(model.named_parameters(), model.named_buffers())
           if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"model parameter(s)/buffer(s) {bad} contain NaN/Inf values; "
                         "their gradients would not be finite")


def _model_device(model: nn.Module) -> torch.device:
    devs = {t.device for t in itertools.chain(model.parameters(), model.buffers())}
    if len(devs) > 1:
        raise ValueError(f"model spans several devices {sorted(map(str, devs))}; "
                         "put it on one device first")
    return devs.pop() if devs else torch.device("cpu")


@contextlib.contextmanager
def prepared(model: nn.Module, device):
    """Model in eval mode on ``device`` inside the block; modes and device restored after."""
    home = _model_device(model)
    dev = home if device is None else torch.device(device)
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        if dev != home:
            model.to(dev)
        yield dev
    finally:
        if dev != home:
            model.to(home)
        for m, mode in modes:
            m.training = mode


def load_samples(dataset, idx: torch.Tensor, dev: torch.device, dtype: torch.dtype):
    """The samples ``idx`` (c, bs) as inputs (c, bs, ...) and targets (c, bs, ...) on ``dev``
    (inputs: a tensor, or a tuple / dict of tensors with those leading dimensions)."""
    c, bs = idx.shape
    flat = idx.reshape(-1)
    if isinstance(dataset, TensorDataset):
        if len(dataset.tensors) != 2:
            raise ValueError(f"TensorDataset must hold exactly 2 tensors (inputs, labels), "
                             f"got {len(dataset.tensors)}")
        xs, ys = dataset.tensors
        x, y = xs[flat.to(xs.device)], ys[flat.to(ys.device)]
    else:
        items = [samples.split_sample(dataset[int(i)]) for i in flat]
        x = samples.stack([a for a, _ in items])
        y = samples.stack([b for _, b in items])

    def to_device(t):
        t = t.to(dev, dtype=dtype) if t.is_floating_point() else t.to(dev)
        return t.reshape(c, bs, *t.shape[1:])

    return samples.apply(x, to_device), samples.apply(y, to_device)
