"""The pruning methods and their registry: each method is an object that owns its options.

    cm.prune(model, data, 0.9, method="wf", block_size=50)                 # a registered name + options
    cm.prune(model, data, 0.9, method=cm.methods.WoodFisher(block_size=50))  # the same, as an object
    cm.methods.available()                                                    # name → one-line description

| module | what |
|---|---|
| ``base`` | ``Method`` (a flat pruning step), ``ModelMethod`` (runs the whole call), the registry, ``Stage``/``Step`` |
| ``chita`` | CHITA, CHITA-IHT, CHITA-BSO, CHITA-block, CHITA-block-IHT, CHITA++ (Alg 1–6 of the paper) |
| ``magnitude`` | magnitude pruning, and the result type and checks the baselines share |
| ``woodfisher``, ``mfac``, ``cbs`` | WoodFisher, M-FAC, Combinatorial Brain Surgeon |
| ``saliency`` | SNIP, first-order Taylor, L1-norm filters |
| ``layerwise``, ``sparsegpt`` | SparseGPT/OBS layer-wise reconstruction, calibration Hessians, DP allocation; its method |
| ``layer_method`` | ``LayerMethod``: a method that prunes one weight matrix; the sequential driver runs it over a model |
| ``wanda``, ``alps``, ``chita_layer`` | Wanda and per-layer magnitude, ALPS, layer-wise CHITA (language models) |

A new method is one module with a ``@register``-ed subclass of ``Method`` (see :mod:`.base`).
"""

from chita_minimal.methods.base import (REGISTRY, Method, ModelMethod, OptionError, Settings, Stage, Step, available,
                                        get, register, table)
# registration order = the order of ``available()``: CHITA first, then the baselines and neighbours
from chita_minimal.methods.chita import Chita, ChitaBlock, ChitaBlockIHT, ChitaBSO, ChitaIHT, ChitaPlusPlus  # noqa: I001
from chita_minimal.methods.magnitude import Magnitude
from chita_minimal.methods.woodfisher import WoodFisher
from chita_minimal.methods.mfac import MFAC
from chita_minimal.methods.cbs import CBS
from chita_minimal.methods.saliency import SNIP, L1Filter, Taylor
from chita_minimal.methods.sparsegpt import SparseGPT
from chita_minimal.methods.wanda import MagnitudeLayer, Wanda
from chita_minimal.methods.alps import ALPS
from chita_minimal.methods.chita_layer import ChitaLayer

__all__ = ["REGISTRY", "Method", "ModelMethod", "OptionError", "Settings", "Stage", "Step", "available", "get",
           "register", "table", "Chita", "ChitaIHT", "ChitaBSO", "ChitaBlock", "ChitaBlockIHT", "ChitaPlusPlus",
           "Magnitude", "WoodFisher", "MFAC", "CBS", "SNIP", "Taylor", "L1Filter", "SparseGPT", "Wanda", "MagnitudeLayer", "ALPS", "ChitaLayer"]
