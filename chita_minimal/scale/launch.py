"""Prune a pretrained network with CHITA under ``torchrun`` (one process per GPU, or several CPU processes).

    torchrun --nproc-per-node 2 -m chita_minimal.scale.launch --model mlpnet --sparsity 0.9 --n-grads 1000

Every rank computes its share of the n gradient rows and takes part in the row-sharded solve
(:mod:`chita_minimal.scale.distributed`); rank 0 evaluates, prints and optionally writes a JSON report
and the pruned weights. Without torchrun it runs as one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from chita_minimal.scale.distributed import active, rank_and_world, row_range


def main(argv=None) -> dict:
    """Prune a pretrained network under torchrun; rank 0 writes a JSON report (and the weights).

    Every rank computes its share of the gradients and takes part in the solve; the model
    ends identical on every rank. The backend is nccl when CUDA is available, else gloo.
    """
    import argparse
    import datetime
    import json
    import os
    import time

    from chita_minimal import models
    from chita_minimal.data import datasets as data_mod
    from chita_minimal.network import params
    from chita_minimal.network.evaluate import evaluate
    from chita_minimal.prune import prune

    ap = argparse.ArgumentParser(prog="torchrun --nproc-per-node N -m chita_minimal.scale.launch")
    ap.add_argument("--model", default="mlpnet", choices=models.MODEL_NAMES)
    ap.add_argument("--method", default="chita")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--n-grads", type=int, default=1000)
    ap.add_argument("--l2", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads per rank")
    ap.add_argument("--timeout", type=float, default=600, help="seconds before a stuck collective fails")
    ap.add_argument("--out", default=None, help="JSON report written by rank 0")
    ap.add_argument("--weights", default=None, help="rank 0 saves the pruned flat weights here (torch.save)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = not dist.is_initialized() and "RANK" in os.environ
    if started:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.timeout))
    rank, world = rank_and_world()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else None
    try:
        dataset = models.pretrained.DATASETS[args.model]
        train, test = data_mod.load(dataset, "train"), data_mod.load(dataset, "test")
        model = models.load_pretrained(args.model, device=device)
        t0 = time.perf_counter()
        report = prune(model, train, args.sparsity, args.method, n_grads=args.n_grads, l2=args.l2, seed=args.seed)
        seconds = time.perf_counter() - t0
        out = dict(model=args.model, method=args.method, sparsity=args.sparsity, n=args.n_grads, l2=args.l2,
                   world_size=world, rows_per_rank=row_range(args.n_grads, rank, world)[1] - row_range(args.n_grads, rank, world)[0],
                   gradients_s=report.seconds["gradients"], solve_s=report.seconds["solve"], total_s=seconds,
                   objective=report.objective, achieved_sparsity=report.achieved_sparsity,
                   threads=torch.get_num_threads(), backend=dist.get_backend() if active() else "none")
        if rank == 0:
            out["accuracy"] = 100 * evaluate(model, test)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(out, f, indent=1)
            if args.weights:
                torch.save(params.flatten(model, params.layout(model)).cpu(), args.weights)
            print(json.dumps(out))
        return out
    finally:
        if started:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
