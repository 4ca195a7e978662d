#!/usr/bin/env bash
# Set up (with chromium for the browser test, where it can be installed), then run every test: the package
# tests, every notebook in quick mode (nbmake), the book built once from the stored outputs with warnings as
# errors (tests/test_book.py) and checked in a browser (tests/test_browser.py), and the Colab path against a
# local download server (tests/test_colab_path.py). This is what CI runs (.ci/run, .github/workflows/book.yml).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --browser
export CHITA_QUICK=1
.venv/bin/python -m pytest tests book --nbmake --nbmake-timeout=900 -q --durations=30 "$@"
