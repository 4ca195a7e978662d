"""The solver core: problem (P) and its solvers. Tensors in, tensors out — no ``nn.Module``, no datasets.

| module | what |
|---|---|
| ``problem`` | problem (P): ½‖Xw − y‖² + λ‖w − w̄‖² + αᵀw s.t. ‖w‖₀ ≤ k (Eq. 4); gradient; Lipschitz constant |
| ``threshold`` | hard thresholding H_k (top-k or N:M) and the support of a feasible point |
| ``iht`` | IHT with fixed step and with the line-search step (Alg 2/3) |
| ``iht_sync_free`` | IHT with the line search decided on the device, no host read per iteration (GPUs) |
| ``active_set`` | active-set CHITA (Alg 4) |
| ``backsolve`` | CHITA-BSO (Alg 5); ridge solve on a support, Woodbury path when n < k |
| ``gram`` | the factorised support Gram of the refits, updated as columns enter and leave |
| ``blocks`` | block approximation (Alg 6): per-layer blocks, batched block operator, block backsolve, block IHT |
| ``patterns`` | N:M semi-structured sparsity as a constraint of (P) |
| ``schedules`` | CHITA++ sparsity schedules (Alg 1) |
| ``solve`` | ``solve(X, w_bar, k, method=...)``: one entry point for all solvers |
| ``layer`` | the layer-wise problem in Gram form (language models): objective, projection, backsolve of all rows |
| ``alps`` | ALPS: ADMM penalty path and CG refit on the layer problem |
| ``layer_chita`` | CHITA on the layer problem: penalty path, swap local search, backsolve |
| ``reference`` | plain numpy references (textbook IHT with line search, looped block backsolve) for benchmarks |
"""

from chita_minimal.utils import lazy_submodules

__getattr__ = lazy_submodules(__name__, ("problem", "threshold", "iht", "iht_sync_free", "active_set", "backsolve",
                                         "gram", "blocks", "patterns", "schedules", "solve", "layer", "alps",
                                         "layer_chita", "reference"))
