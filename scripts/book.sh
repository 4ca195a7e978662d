#!/usr/bin/env bash
# Build the book.
#
#   bash scripts/book.sh                        set up .venv (scripts/setup.sh), then build the HTML from the
#                                               outputs stored in the notebooks (nothing is executed)
#   bash scripts/book.sh --execute              re-run, at full size, every chapter whose code or package
#                                               source changed since its stored outputs were made
#                                               (data/book_cache.json), write the outputs into the
#                                               notebooks, then build
#   bash scripts/book.sh --execute mlpnet gradual   re-run the named chapters (always), then build
#   CHITA_QUICK=1 bash scripts/book.sh [chapter ...]   quick preview: re-run the named chapters (all when none
#                                               are named) with small sizes, then build. This OVERWRITES the
#                                               full-run outputs stored in the notebooks with quick-mode
#                                               ones: don't commit them (git checkout book/ restores them).
#
# The HTML lands in _build/html; the last line printed says where and how long it took.
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)

EXECUTE=0
CHAPTERS=()
for arg in "$@"; do
  case "$arg" in
    --execute) EXECUTE=1 ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "unknown option $arg (see bash scripts/book.sh --help)" >&2; exit 2 ;;
    *) CHAPTERS+=("$arg") ;;
  esac
done
if [ "${CHITA_QUICK:-}" = 1 ]; then
  EXECUTE=1
fi
if [ "$EXECUTE" = 0 ] && [ "${#CHAPTERS[@]}" -gt 0 ]; then
  echo "chapters are named only with --execute (or CHITA_QUICK=1): bash scripts/book.sh --execute ${CHAPTERS[*]}" >&2
  exit 2
fi

bash scripts/setup.sh
SETUP_DONE=$(date +%s)

if [ "$EXECUTE" = 1 ]; then
  # CHITA_QUICK=1 re-runs everything named (or all) in quick mode; a full run skips unchanged chapters.
  .venv/bin/python scripts/execute_book.py ${CHAPTERS[@]+"${CHAPTERS[@]}"}
fi
EXECUTED=$(date +%s)

.venv/bin/jupyter-book build . -W --keep-going
END=$(date +%s)

echo
if [ "$EXECUTE" = 1 ]; then
  echo "Executed chapters in $((EXECUTED - SETUP_DONE)) s."
fi
if [ "${CHITA_QUICK:-}" = 1 ]; then
  echo "NOTE: the notebooks now hold quick-mode outputs (CHITA_QUICK=1); git checkout book/ restores the full-run ones."
fi
echo "Book built in $((END - START)) s (setup $((SETUP_DONE - START)) s, HTML $((END - EXECUTED)) s): $(pwd)/_build/html/index.html"
