#!/usr/bin/env bash
# Create .venv (if missing) and install chita_minimal with the book and test extras at the pinned versions.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[book,test]"
