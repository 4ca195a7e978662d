#!/usr/bin/env bash
# Set up (with chromium for the browser test, where it can be installed), then run every test: the package
# tests, every notebook in quick mode (nbmake), the book built once from the stored outputs with warnings as
# errors (tests/test_book.py) and checked in a browser (tests/test_browser.py), and the Colab path against a
# local download server (tests/test_colab_path.py). This is what CI runs (.ci/run, .github/workflows/book.yml).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --browser
export CHITA_QUICK=1
# Two workers (pytest-xdist), one thread each: on the 2-core CI machine two single-threaded processes do more
# than one process with two threads (small solves and notebooks do not scale over threads, and two processes
# with two threads each oversubscribe the cores). The notebooks come first so that the longest start early;
# the tests that need the built book share one worker (tests/conftest.py). CHITA_TEST_WORKERS=1 runs serially.
WORKERS="${CHITA_TEST_WORKERS:-2}"
if [ "$WORKERS" -gt 1 ]; then
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
    PARALLEL=(-n "$WORKERS" --dist loadgroup)
else
    PARALLEL=()
fi
.venv/bin/python -m pytest book tests --nbmake --nbmake-timeout=900 -q --durations=30 "${PARALLEL[@]}" "$@"
