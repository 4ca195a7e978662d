"""Structure removed, not just zeroed: channels, low rank, quantization.

| module | what |
|---|---|
| ``methods`` | ``shrink(model, data, fraction, method=...)`` (``cm.shrink``): one call, a registry of structure methods (CNN channels; a language model's MLP neurons and key/value groups) |
| ``graph`` | channel groups of any traceable model, from Torch-Pruning's dependency graph |
| ``channels`` | ``shrink`` (channels really removed), FLOP counter, L1/Taylor scores, FLOP-budget selection, group-CHITA |
| ``sosp`` | SOSP-H channel scores (second-order, Fisher) |
| ``spectral`` | Hessian-spectral-radius channel scores |
| ``ispasp`` | I-SpaSP: CoSaMP-style channel selection on hidden outputs |
| ``smcp`` | SMCP soft channel masks with a FLOP/latency knapsack |
| ``lowrank`` | ALDS-style SVD factorisation with min-max error rank allocation |
| ``quantize`` | OBQ/GPTQ-style and round-to-nearest quantization, sparse + quantized |

One-shot structure removal goes through ``cm.shrink`` and its registry (``methods``); the scores, ``select``
and ``shrink`` of ``channels`` are the steps underneath. Every entry point returns a
:class:`chita_minimal.report.Report`: ``cm.shrink`` and ``smcp_train`` (training-time) a
:class:`channels.ChannelReport` whose ``model`` is the small network and ``keep`` the kept channels,
``lowrank.compress`` a report whose ``model`` is the factorized copy. The per-family entry points of earlier
releases (``group_chita_prune``, ``spectral_prune``, ``ispasp_prune``) still work for this release and warn
(``DeprecationWarning``) with the ``cm.shrink`` call that replaces them.
"""

from chita_minimal.utils import lazy_submodules

__getattr__ = lazy_submodules(__name__, ("methods", "graph", "channels", "sosp", "spectral", "ispasp", "smcp", "lowrank",
                                         "quantize", "heads"))
