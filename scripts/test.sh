#!/usr/bin/env bash
# Set up, then run every test: the package tests, every notebook in quick mode (nbmake),
# and the book build with warnings as errors (tests/test_book.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export CHITA_QUICK=1
.venv/bin/python -m pytest tests book --nbmake --nbmake-timeout=900 -q --durations=30 "$@"
