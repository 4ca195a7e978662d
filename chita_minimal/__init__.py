"""chita_minimal: CHITA one-shot pruning (Benbaki et al., ICML 2023) in compact torch code."""

from .iht import hard_threshold
from .problem import Problem, num_kept
from .schedules import SCHEDULES, schedule
from .solve import METHODS, SolveResult, solve
from .utils import device, seed_everything

__version__ = "0.1.0"
