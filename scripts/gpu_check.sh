#!/usr/bin/env bash
# The GPU checks, as one prepared run for a session that is lent a machine with a GPU (the `device` tool's
# `run`; CI never has one): the package's tests on CUDA, and bench/solver.py on the GPU — one line-search IHT
# iteration and the whole solve, sequential and sync-free line search, in bare passes, at p = 32k / 270k / 1M.
# Writes $OUT/cuda_tests_<gpu>.log and $OUT/solver_cuda.csv (copy both into data/bench/).
#
# The device image has torch, numpy, tqdm, safetensors, pytest and pytest-xdist, not torch-pruning (imported by
# chita_minimal.structure). Here, once per session, fetch its wheel into an ignored folder:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl torch-pruning==1.6.1
# then: run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=480). The datasets stay behind
# (../shared does not travel): the tests that need them skip; the benchmark uses synthetic gradients.
# Elsewhere (a Colab GPU, a workstation): `bash scripts/gpu_check.sh` with the package's requirements installed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-_build/gpu}"
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check.sh: no torch that sees a CUDA device here" >&2
    exit 1
fi
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).split()[-1].lower())")
log="$OUT/cuda_tests_$gpu.log"
status=0
{
    versions=$(python3 -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')
    gpu_info=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)
    echo "# bash scripts/gpu_check.sh, $(date -u +%F): $gpu_info, torch $versions"
    python3 -m pytest tests/solver tests/network/test_fisher.py tests/network/test_measure.py -q -rs \
        -p no:cacheprovider -n 8
} 2>&1 | tee "$log" || status=1
python3 bench/solver.py --device cuda --out "$OUT/solver.csv" || status=1
exit $status
