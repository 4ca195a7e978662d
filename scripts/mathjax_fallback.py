"""Sphinx extension for the book (_config.yml: sphinx.local_extensions): MathJax from the book itself.

- _config.yml sets ``mathjax_path: mathjax/tex-chtml.js``, the copy that scripts/setup.sh vendors from the npm
  registry into ``_static/mathjax/`` (git-ignored); Sphinx copies ``_static`` into the HTML, so the math renders
  without a network. When that copy is missing (no npm when setup ran), the book switches to the same MathJax
  version on the CDN and prints a warning (printed, not a Sphinx warning, so ``jupyter-book build -W`` passes).
- Jupyter Book adds every .js file under ``_static`` to every page; MathJax's own files are taken out again
  (Sphinx loads ``tex-chtml.js``, which loads the TeX extensions it needs on demand).
- MathJax is loaded on every page, not only on pages with equations: the table of contents in the sidebar holds
  math too (a chapter title), which would otherwise stay raw TeX on pages without equations.
- Each page's scripts are de-duplicated: Sphinx 7.4 adds an inline script registered after the builder started
  (sphinx-thebe's, sphinx-togglebutton's) twice, and the second ``const THEBE_JS_URL`` is a JavaScript error.
"""

import sys
from pathlib import Path

CDN = "https://cdn.jsdelivr.net/npm/mathjax@3.2.2/es5/tex-chtml.js"


def _configure_mathjax(app, config):
    path = config.mathjax_path or ""
    if "://" in path or path.startswith("//"):
        return
    folder = path.rsplit("/", 1)[0] + "/" if "/" in path else None
    if folder:
        config.html_js_files = [js for js in config.html_js_files
                                if not (js[0] if isinstance(js, (tuple, list)) else js).startswith(folder)]
    if not (Path(app.srcdir) / "_static" / path).is_file():
        print(f"WARNING: {Path(app.srcdir) / '_static' / path} is missing (npm was not available to "
              f"scripts/setup.sh): the book loads MathJax from {CDN}, so its math renders only online.",
              file=sys.stderr)
        config.mathjax_path = CDN


def _dedupe_scripts(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, unique = set(), []
    for js in scripts:
        key = (getattr(js, "filename", None) or "", repr(sorted(getattr(js, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            unique.append(js)
    scripts[:] = unique


def setup(app):
    app.connect("config-inited", _configure_mathjax)
    app.set_html_assets_policy("always")
    app.connect("html-page-context", _dedupe_scripts, priority=900)  # after the others have added theirs
    return {"parallel_read_safe": True, "parallel_write_safe": True}
