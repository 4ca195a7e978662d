"""Structure removed in one call: ``cm.shrink(model, data, fraction, method=...)`` and its registry of methods.

    report = cm.shrink(model, loader, 0.5)                          # L1, half the multiply-adds removed
    report = cm.shrink(model, loader, 0.3, method="taylor", n_grads=64, budget="params")
    report.model                                                    # the smaller dense network
    report.keep, report.achieved                                    # kept channels, fraction removed

A structure method is an object that owns and checks its options, registered by name as the unstructured
methods are (:mod:`chita_minimal.methods.base`); adding one is one file::

    @register
    @dataclass
    class Random(StructureMethod):
        name = "random"
        summary = "channels kept at random (a sanity baseline)"
        needs_data = False
        seed: int = 0

        def scores(self, model, data, run):
            g = torch.Generator().manual_seed(self.seed)
            return {name: torch.rand(c, generator=g) for name, c in run.widths(model).items()}

A *score* method only says how important each channel is; the budget is met by
:func:`~chita_minimal.structure.channels.select` (the lowest normalised scores removed first, never more than
``fraction`` of the budget) and the channels removed for real by
:func:`~chita_minimal.structure.channels.shrink` (Torch-Pruning's dependency graph: any traceable model). A method
with its own selection and weight updates (group-CHITA, I-SpaSP) overrides :meth:`StructureMethod.remove`. The three-call recipe
(scores → ``select`` → ``shrink``) stays available underneath.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from chita_minimal.registry import OptionError, Options, Registry  # noqa: F401 (OptionError: part of this API)
from chita_minimal.structure import channels
from chita_minimal.structure.graph import channel_groups, example_inputs_for
from chita_minimal.utils import check_choice, check_fraction, check_int, check_number

# shrink's own arguments: a structure method's options must not take these names
SHRINK_ARGUMENTS = ("budget", "residual", "example_inputs", "input_shape", "seed")


@dataclass
class Run:
    """``shrink``'s own arguments as a method sees them."""

    budget: str
    residual: bool
    example_inputs: object
    input_shape: tuple
    seed: int

    def widths(self, model: nn.Module) -> dict[str, int]:
        """Channels of every group the call prunes."""
        groups = channel_groups(model, self.example_inputs, residual=self.residual)
        return {name: gr.channels for name, gr in groups.items()}


class StructureMethod(Options):
    """Base of the structure methods; subclasses are dataclasses whose fields are their options.

    ``needs_data``: the method reads the calibration data (L1 does not)."""

    kind: ClassVar[str] = "structure method"
    needs_data: ClassVar[bool] = True

    def scores(self, model: nn.Module, data, run: Run) -> dict[str, torch.Tensor]:
        """Importance of every channel: group name → (channels,), low = removed first."""
        raise NotImplementedError

    def counted(self, model: nn.Module) -> nn.Module:
        """The dense model as its budget is counted (the same function, modules the counter sees)."""
        return model

    def remove(self, model: nn.Module, data, fraction: float,
               run: Run) -> tuple[nn.Module, dict[str, torch.Tensor]] | channels.ChannelReport:
        """(the smaller model, keep masks), at most ``fraction`` of the budget removed; ``model`` is not modified.
        By default: :meth:`scores` → :func:`~chita_minimal.structure.channels.select` → ``channels.shrink``. A
        method with more to say returns its own :class:`~chita_minimal.structure.channels.ChannelReport` (``shrink``
        then sets its budget figures)."""
        keep, _ = channels.select(model, self.scores(model, data, run), fraction, run.input_shape,
                                  residual=run.residual, example_inputs=run.example_inputs, budget=run.budget)
        return channels.shrink(model, keep, run.example_inputs), keep


REGISTRY = Registry(StructureMethod, "shrink", SHRINK_ARGUMENTS)
register = REGISTRY.register  # class decorator: make a StructureMethod subclass available to shrink(method=...)
get = REGISTRY.get  # a structure method object from a registered name and options, or the object itself
available = REGISTRY.available  # registered structure method names with their one-line descriptions


def shrink(model: nn.Module, data=None, fraction: float = 0.5, method="l1", *, budget: str = "flops",
           residual: bool = False, example_inputs=None, input_shape=None, seed: int = 0,
           **options) -> channels.ChannelReport:
    """Remove channels (and the weights that read them) of any traceable model in one call.

    data: calibration data for the methods that read it (a dataset, a DataLoader or batches, as for
    :func:`chita_minimal.prune`); fraction: share of the budget removed, at most; budget: "flops" (multiply-adds
    for one input) or "params" (Conv2d/Linear weights); method: a registered name (:func:`available`) or a
    :class:`StructureMethod`, its options as keywords; residual: also prune the residual streams (channels added
    by skip connections); example_inputs / input_shape: what the model is called with, for tracing and counting
    (defaults exist for the package's models; else the first input of ``data``).

    Returns a :class:`~chita_minimal.structure.channels.ChannelReport`: ``model`` the new smaller network (the
    model given is left untouched), ``keep`` the kept channels per group, ``achieved`` the fraction of the budget
    removed, measured on the small model.
    """
    t0 = time.perf_counter()
    fraction = check_fraction("fraction", fraction)
    check_choice("budget", budget, channels.BUDGETS)
    if not isinstance(residual, bool):
        raise TypeError(f"residual must be a bool, got {type(residual).__name__}")
    check_int("seed", seed, None)
    if isinstance(method, str) and method == "l1" and _is_language_model(model):
        method = "lm-chita"  # the default on a language model
    m = get(method, **options)
    if m.needs_data and data is None:
        raise ValueError(f"structure method {m.name!r} needs calibration data; got data=None")
    if isinstance(m, LanguageStructureMethod) or _is_language_model(model):
        return _shrink_language_model(model, data, fraction, m, budget, t0)
    if example_inputs is None and input_shape is None and channels.default_input_shape(model) is None \
            and data is not None:
        example_inputs = _first_input(data)
    shape = channels._input_shape(model, input_shape, example_inputs)
    example_inputs = example_inputs_for(model, example_inputs, shape)
    run = Run(budget, residual, example_inputs, shape, seed)
    out = m.remove(model, data, fraction, run)
    report = out if isinstance(out, channels.ChannelReport) else \
        channels.ChannelReport(method=m.name, target=fraction, achieved=0.0, seconds={}, model=out[0], keep=out[1],
                               flops_dense=0, flops_pruned=0)
    measure = channels.flops if budget == "flops" else channels.weight_count
    dense, small = m.counted(model), report.model
    dense_cost, small_cost = measure(dense, shape), measure(small, shape)
    report.target, report.achieved = fraction, 1.0 - small_cost / dense_cost
    report.flops_dense, report.flops_pruned = channels.flops(dense, shape), channels.flops(small, shape)
    report.seconds = dict(report.seconds, total=time.perf_counter() - t0)
    report.notes.append(f"budget {budget}: {dense_cost:,} → {small_cost:,}")
    return report


def _is_language_model(model) -> bool:
    from chita_minimal.methods.layer_method import has_decoder_blocks

    return has_decoder_blocks(model)


def _shrink_language_model(model, data, fraction, m, budget, t0):
    from chita_minimal.network.lm_structure import decoder_macs, shrink_decoder

    if not isinstance(m, LanguageStructureMethod):
        raise ValueError(f"structure method {m.name!r} prunes channels of CNNs; for a language model use one of "
                         + ", ".join(n for n, c in REGISTRY.items() if issubclass(c, LanguageStructureMethod)))
    if not _is_language_model(model):
        raise ValueError(f"structure method {m.name!r} needs a Hugging Face language model with decoder blocks")
    if budget != "flops":
        raise ValueError("on a language model the budget is the decoder's multiply-adds: use budget='flops'")
    small = copy.deepcopy(model)
    info = shrink_decoder(small, data, fraction, m.rule(small, data), batch_size=m.batch_size,
                          calibrate=m.needs_gram)
    dense_cost, small_cost = decoder_macs(model), decoder_macs(small)
    report = channels.ChannelReport(method=m.name, target=fraction, achieved=1.0 - small_cost / dense_cost,
                                    seconds=dict(info["seconds"], total=time.perf_counter() - t0), model=small,
                                    keep=info["keep"], flops_dense=dense_cost, flops_pruned=small_cost)
    report.notes.append("flops: multiply-adds per token of the decoder's linear maps (attention scores aside)")
    if info["objective"]:
        errs = [o["objective"] for o in info["objective"].values()]
        report.notes.append(f"consumer reconstruction error f/f(∅): mean {sum(errs) / len(errs):.4g}")
    return report


def _first_input(data):
    """One input (batch of 1) from a dataset, a DataLoader or an iterable of (x, y) batches."""
    if isinstance(data, torch.utils.data.Dataset):
        x = data[0][0]
        return x.unsqueeze(0) if isinstance(x, torch.Tensor) else x
    batch = next(iter(data))
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    return x[:1] if isinstance(x, torch.Tensor) else x


# ----------------------------------------------------------------------------- the methods


@register
@dataclass
class L1(StructureMethod):
    """L1 norm of every filter that writes the channel (Li et al., ICLR 2017), summed over all producers."""

    name = "l1"
    summary = "L1 norm of the filters writing each channel (Li et al. 2017); no data"
    needs_data = False

    def scores(self, model, data, run):
        return channels.l1_scores(model, residual=run.residual, example_inputs=run.example_inputs)


@dataclass
class _Gradients(StructureMethod):
    n_grads: int = 128
    batch_size: int = 1

    def check(self):
        check_int("n_grads", self.n_grads)
        check_int("batch_size", self.batch_size)


@register
@dataclass
class Taylor(_Gradients):
    """First-order Taylor importance (Molchanov et al., CVPR 2019): mean over samples of (g_i · w_c)²."""

    name = "taylor"
    summary = "first-order Taylor importance (g·w)² per channel (Molchanov et al. 2019)"

    def scores(self, model, data, run):
        return channels.taylor_scores(model, data, self.n_grads, batch_size=self.batch_size, seed=run.seed,
                                      residual=run.residual, example_inputs=run.example_inputs)


@register
@dataclass
class SOSP(_Gradients):
    """SOSP-H (Nonnenmacher et al., ICLR 2022): second-order channel saliency from the empirical Fisher."""

    name = "sosp"
    summary = "SOSP-H second-order channel saliency (Fisher, Hessian-free)"

    def scores(self, model, data, run):
        from chita_minimal.structure.sosp import sosp_scores

        return sosp_scores(model, data, self.n_grads, seed=run.seed, batch_size=self.batch_size,
                           residual=run.residual, example_inputs=run.example_inputs)


@register
@dataclass
class Spectral(_Gradients):
    """Channel scores from the spectral radius of each channel's curvature block (Fisher or Hessian)."""

    name = "spectral"
    summary = "spectral radius of each channel's Fisher/Hessian block"
    curvature: str = "fisher"
    iterations: int = 20
    max_hvps: int = 5000

    def check(self):
        super().check()
        check_choice("curvature", self.curvature, ("fisher", "hessian"))
        check_int("iterations", self.iterations)
        check_int("max_hvps", self.max_hvps)

    def scores(self, model, data, run):
        from chita_minimal.structure.spectral import spectral_scores

        return spectral_scores(model, data, self.n_grads, curvature=self.curvature, seed=run.seed,
                               iterations=self.iterations, batch_size=self.batch_size, max_hvps=self.max_hvps,
                               residual=run.residual, example_inputs=run.example_inputs)


@register
@dataclass
class GroupCHITA(_Gradients):
    """Group-CHITA: problem (P) under a group-L0 constraint, IHT with group projection and line search, then the
    backsolve on the kept channels (weights of the kept channels refit); counts per group from L1 + the budget."""

    name = "group-chita"
    summary = "CHITA's problem (P) with whole channels as groups: group IHT + backsolve (weights refit)"
    l2: float = 1e-3
    max_iter: int = 100
    swap_rounds: int = 10

    def check(self):
        super().check()
        check_number("l2", self.l2, low=0)
        check_int("max_iter", self.max_iter)
        check_int("swap_rounds", self.swap_rounds, low=0)

    def remove(self, model, data, fraction, run):
        work = copy.deepcopy(model)  # channels.group_chita writes the refit weights back into the model it is given
        return channels.group_chita(work, data, fraction, n_grads=self.n_grads, l2=self.l2,
                                    batch_size=self.batch_size, seed=run.seed, input_shape=run.input_shape,
                                    max_iter=self.max_iter, swap_rounds=self.swap_rounds, residual=run.residual,
                                    example_inputs=run.example_inputs, budget=run.budget)


@register
@dataclass
class ISpaSP(StructureMethod):
    """I-SpaSP (Wolfe et al. 2021): CoSaMP-style selection of each group's channels on hidden outputs, consumer
    columns rescaled by least squares; the same keep ratio in every group."""

    name = "ispasp"
    summary = "I-SpaSP: sparse recovery of each layer's hidden output (forward passes only)"
    n_samples: int = 64
    iterations: int = 10
    batch_size: int = 16

    def check(self):
        check_int("n_samples", self.n_samples)
        check_int("iterations", self.iterations, 0)
        check_int("batch_size", self.batch_size)

    def remove(self, model, data, fraction, run):
        from chita_minimal.structure.ispasp import ispasp

        return ispasp(model, data, fraction, n_samples=self.n_samples, iterations=self.iterations, seed=run.seed,
                      batch_size=self.batch_size, input_shape=run.input_shape, residual=run.residual,
                      example_inputs=run.example_inputs, budget=run.budget)


@register
@dataclass
class Heads(StructureMethod):
    """Whole attention heads of ``nn.MultiheadAttention`` modules (or :class:`~chita_minimal.structure.heads.
    HeadAttention`): the lowest-scored ⌊fraction · heads⌋ heads removed (never a module's last one), so the
    fraction applies to the attention projections; ``achieved`` is measured on the model's whole budget."""

    name = "heads"
    summary = "attention heads of nn.MultiheadAttention (L1, L2 or Taylor scores per head)"
    needs_data = False
    kind: str = "l1"
    n_grads: int = 32
    batch_size: int = 1

    def check(self):
        from chita_minimal.structure.heads import KINDS

        check_choice("kind", self.kind, tuple(k for k in KINDS if k != "gate"))
        check_int("n_grads", self.n_grads)
        check_int("batch_size", self.batch_size)

    def counted(self, model):
        from chita_minimal.structure.heads import split_attention

        return split_attention(model)  # nn.MultiheadAttention's projections are not nn.Linear calls

    def remove(self, model, data, fraction, run):
        from chita_minimal.structure.heads import head_scores, remove_heads, select_heads

        if self.kind == "taylor" and data is None:
            raise ValueError("structure method 'heads' with kind='taylor' needs calibration data; got data=None")
        scores = head_scores(model, data if self.kind == "taylor" else None, kind=self.kind,
                             n_grads=self.n_grads if self.kind == "taylor" else None, batch_size=self.batch_size,
                             seed=run.seed)
        keep, _ = select_heads(scores, fraction)
        return remove_heads(model, keep), keep


# ----------------------------------------------------------------------------- language models


@dataclass
class LanguageStructureMethod(StructureMethod):
    """A structure method for the decoder of a language model (:mod:`chita_minimal.network.lm_structure`): it
    says, for one consumer layer (``down_proj`` for MLP neurons, ``o_proj`` for key/value groups), which groups
    of its input columns to keep, through :meth:`choose`. ``needs_gram``: it reads the Gram matrix of the
    consumer's inputs (the calibration pass block by block); a method that scores the dense model once instead
    (Taylor) overrides :meth:`rule`."""

    needs_gram: ClassVar[bool] = True
    batch_size: int = 8

    def check(self):
        check_int("batch_size", self.batch_size)

    def rule(self, model: nn.Module, data):
        """The rule ``shrink_decoder`` calls for every consumer: by default :meth:`choose`."""
        return self.choose

    def choose(self, W, H, groups, keep, producers, name=None):
        """(kept (G,) bool, the consumer's new weight or None to keep its weights, info or None); ``name``: the
        consumer's module name."""
        raise NotImplementedError


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    kept = torch.zeros(scores.numel(), dtype=torch.bool)
    kept[torch.topk(scores.cpu(), keep).indices] = True
    return kept


@register
@dataclass
class LMMagnitude(LanguageStructureMethod):
    """The groups of largest weight norm: ‖producer rows‖² + ‖consumer columns‖² of each unit; no data read."""

    name = "lm-magnitude"
    summary = "language model: MLP neurons / KV groups of largest weight norm (no refit)"
    needs_data = False
    needs_gram = False

    def choose(self, W, H, groups, keep, producers, name=None):
        from chita_minimal.solver.group_layer import group_scores

        score = group_scores(W, H, groups, "norm") ** 2
        for P in producers.values():  # each producer's rows come in equal runs per group (r query heads, 1 kv)
            score = score + (P.to(torch.float64) ** 2).sum(1).view(groups.shape[0], -1).sum(1).to(score.device)
        return _top(score, keep), None, None


@register
@dataclass
class LMWanda(LanguageStructureMethod):
    """Wanda per group: Σ over the group's consumer columns of ‖W_{:,j}‖²·‖X_j‖²/N (activation-weighted); no refit."""

    name = "lm-wanda"
    summary = "language model: groups by activation-weighted consumer norms (Wanda per group; no refit)"

    def choose(self, W, H, groups, keep, producers, name=None):
        from chita_minimal.solver.group_layer import group_scores

        return _top(group_scores(W, H, groups, "wanda"), keep), None, None


@register
@dataclass
class LMTaylor(LanguageStructureMethod):
    """First-order Taylor importance per group (Molchanov et al. 2019; LLM-Pruner's group score): the mean over
    calibration batches of (Σ_{θ ∈ group} θ·∂L/∂θ)², L the next-token loss of the dense model, θ the group's
    producer rows and consumer columns (:func:`~chita_minimal.network.lm_structure.taylor_unit_scores`); one
    backward pass per batch of ``batch_size`` windows, no Gram, no refit."""

    name = "lm-taylor"
    summary = "language model: groups by first-order Taylor importance (Σθ·∂L/∂θ)² of the dense model (no refit)"
    needs_gram = False
    batch_size: int = 1

    def rule(self, model, data):
        from chita_minimal.network.lm_structure import taylor_unit_scores

        scores = taylor_unit_scores(model, data, batch_size=self.batch_size)

        def choose(W, H, groups, keep, producers, name=None):
            return _top(scores[name], keep), None, None

        return choose


@register
@dataclass
class LMChita(LanguageStructureMethod):
    """CHITA on the structured layer problem (OSSCAR's): greedy OBS group removal, swap local search with
    restarts, backsolve of the consumer on the kept groups (:func:`~chita_minimal.solver.group_layer.select_groups`)."""

    name = "lm-chita"
    summary = "language model: CHITA/OSSCAR group selection on the layer Gram (OBS greedy, swaps, backsolve)"
    percdamp: float = 0.01
    swap_rounds: int = 10
    restarts: int = 0

    def check(self):
        super().check()
        check_number("percdamp", self.percdamp, low=0)
        check_int("swap_rounds", self.swap_rounds, low=0)
        check_int("restarts", self.restarts, low=0)

    def choose(self, W, H, groups, keep, producers, name=None):
        from chita_minimal.solver.group_layer import select_groups

        kept, What, info = select_groups(W, H.to(W.dtype), groups.to(W.device), keep, percdamp=self.percdamp,
                                         swap_rounds=self.swap_rounds, restarts=self.restarts)
        return kept, What, info
