#!/usr/bin/env bash
# Set up what the book and the tests need, beside the repository (idempotent, quick when done before):
#   1. .venv with chita_minimal and the book and test extras at the pinned versions (constraints.txt);
#   2. MathJax 3 for math that renders offline: es5/tex-chtml.js and the files it loads (CHTML fonts, the
#      TeX extensions it autoloads, the assistive-MathML module its menu enables) from the npm registry into
#      _static/mathjax/ (git-ignored, never committed; the book's HTML copies it to _build/html/_static/).
#      Without npm the book loads MathJax from the CDN instead (a warning says so).
#   3. with --browser (scripts/test.sh): Debian's chromium for tests/test_browser.py, installed with apt-get
#      when it is missing and we are root with apt; otherwise that test skips and says why.
set -euo pipefail
cd "$(dirname "$0")/.."

BROWSER=0
for arg in "$@"; do
  case "$arg" in
    --browser) BROWSER=1 ;;
    *) echo "usage: bash scripts/setup.sh [--browser]" >&2; exit 2 ;;
  esac
done

# 1. Python environment ----------------------------------------------------------------------------------
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[book,test,llm]"

# 2. MathJax, vendored from the npm registry ------------------------------------------------------------
MATHJAX_VERSION=3.2.2
MATHJAX_SHA256=1b9c0a1c44df864e915690558e72adb9cc5203360daefd385084ced3b6c64c09   # of mathjax-3.2.2.tgz
MJ=_static/mathjax
if [ "$(cat "$MJ/VERSION" 2>/dev/null)" != "$MATHJAX_VERSION" ]; then
  if command -v npm >/dev/null 2>&1; then
    tmp=$(mktemp -d)
    if (cd "$tmp" && npm pack "mathjax@$MATHJAX_VERSION" --silent >/dev/null 2>&1) \
        && echo "$MATHJAX_SHA256  $tmp/mathjax-$MATHJAX_VERSION.tgz" | sha256sum --check --status; then
      tar -xzf "$tmp/mathjax-$MATHJAX_VERSION.tgz" -C "$tmp"
      rm -rf "$MJ" && mkdir -p "$MJ/output/chtml/fonts" "$MJ/input/tex" "$MJ/a11y"
      cp "$tmp/package/es5/tex-chtml.js" "$tmp/package/LICENSE" "$MJ/"
      cp -r "$tmp/package/es5/output/chtml/fonts/woff-v2" "$MJ/output/chtml/fonts/"
      cp -r "$tmp/package/es5/input/tex/extensions" "$MJ/input/tex/"
      cp "$tmp/package/es5/a11y/assistive-mml.js" "$MJ/a11y/"
      echo "$MATHJAX_VERSION" > "$MJ/VERSION"
    else
      echo "WARNING: could not fetch mathjax@$MATHJAX_VERSION from the npm registry (or its hash differs):" \
           "the book will load MathJax from the CDN, so its math needs a network connection to render." >&2
    fi
    rm -rf "$tmp"
  else
    echo "WARNING: npm not found: the book will load MathJax from the CDN (cdn.jsdelivr.net), so its math" \
         "needs a network connection to render. Install Node.js/npm and rerun scripts/setup.sh for offline math." >&2
  fi
fi

# 3. A browser for tests/test_browser.py ----------------------------------------------------------------
if [ "$BROWSER" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "Installing chromium with apt-get (for tests/test_browser.py) ..."
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1; then
      echo "WARNING: apt-get could not install chromium; tests/test_browser.py will skip." >&2
    fi
  else
    echo "NOTE: chromium is missing and cannot be installed here (needs root and apt-get); tests/test_browser.py will skip." >&2
  fi
fi
