"""The solver core: problem (P) and its solvers. Tensors in, tensors out — no ``nn.Module``, no datasets.

| module | what |
|---|---|
| ``problem`` | problem (P): ½‖Xw − y‖² + λ‖w − w̄‖² + αᵀw s.t. ‖w‖₀ ≤ k (Eq. 4); gradient; Lipschitz constant |
| ``iht`` | hard thresholding, IHT with fixed step and with the line-search step (Alg 2/3) |
| ``active_set`` | active-set CHITA (Alg 4) |
| ``backsolve`` | CHITA-BSO (Alg 5); ridge solve on a support, Woodbury path when n < k |
| ``blocks`` | block approximation (Alg 6): per-layer blocks, batched block operator, block backsolve, block IHT |
| ``patterns`` | N:M semi-structured sparsity as a constraint of (P) |
| ``schedules`` | CHITA++ sparsity schedules (Alg 1) |
| ``solve`` | ``solve(X, w_bar, k, method=...)``: one entry point for all solvers |
| ``reference`` | plain numpy references (textbook IHT with line search, looped block backsolve) for benchmarks |
"""

from chita_minimal.utils import lazy_submodules

__getattr__ = lazy_submodules(__name__, ("problem", "iht", "active_set", "backsolve", "blocks", "patterns",
                                         "schedules", "solve", "reference"))
