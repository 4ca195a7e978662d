#!/usr/bin/env bash
# Set up, execute every chapter notebook in full mode (outputs written into the notebooks),
# then build the HTML book into _build/html.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
unset CHITA_QUICK

.venv/bin/python -m pytest book --nbmake --overwrite --nbmake-timeout=7200 -q -p no:cacheprovider
.venv/bin/jupyter-book build . -W --keep-going
echo "Book built: $(pwd)/_build/html/index.html"
