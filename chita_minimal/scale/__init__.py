"""Scale-out: ``torch.distributed`` sharding, streamed block backsolve, the ``torchrun`` launcher.

| module | what |
|---|---|
| ``distributed`` | row-sharded X: process-group helpers, ``ShardedProblem``, blocks dealt out to ranks |
| ``streaming`` | block backsolve (Alg 6) from streamed gradients: per-block Grams only, never X |
| ``launch`` | ``torchrun -m chita_minimal.scale.launch``: prune a model on several processes or GPUs |
"""

from chita_minimal.utils import lazy_submodules

__getattr__ = lazy_submodules(__name__, ("distributed", "streaming", "launch"))
