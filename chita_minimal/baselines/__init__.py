"""Baselines the CHITA paper compares with (Benbaki et al. 2023, Sec. 5).

Each returns ``Pruned(w, support)``: the pruned weights w (p,) — exactly 0.0 off the
support — and the bool support (p,) with exactly k kept coordinates.

- :func:`magnitude`  — MP, global top-k of |w̄|.
- :func:`woodfisher` — WoodFisher (Singh & Alistarh 2020), block-diagonal Fisher OBS.
- :func:`mfac`       — M-FAC (Frantar et al. 2021), matrix-free inverse-Fisher OBS.
- :func:`cbs`        — Combinatorial Brain Surgeon (Yu et al. 2022), swap local search.
"""

from .cbs import cbs
from .mfac import InverseFisher, mfac
from .mp import Pruned, magnitude
from .woodfisher import block_fisher_inverse, joint_obs_loss, woodfisher

__all__ = ["Pruned", "magnitude", "woodfisher", "mfac", "cbs", "InverseFisher",
           "block_fisher_inverse", "joint_obs_loss"]
