#!/usr/bin/env bash
# Set up, execute every chapter notebook in full mode (outputs written into the notebooks),
# then build the HTML book into _build/html. CHITA_QUICK=1 bash scripts/book.sh gives a fast
# preview with small sizes (it overwrites the notebooks' full-run outputs: don't commit those).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest book --nbmake --overwrite --nbmake-timeout=7200 -q -p no:cacheprovider
.venv/bin/jupyter-book build . -W --keep-going
echo "Book built: $(pwd)/_build/html/index.html"
