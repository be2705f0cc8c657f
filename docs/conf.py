"""Sphinx configuration of the gradclip_jax documentation (``sphinx-build -W docs docs/_build``)."""

import os
import re
import shutil
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

import gradclip_jax  # noqa: E402

project = "gradclip_jax"
author = "gradclip_jax developers"
release = version = gradclip_jax.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",
]

# The notebooks are rendered from their committed outputs: CI executes them in the tests.
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "sphinx_book_theme"
html_title = "gradclip_jax"
exclude_patterns = ["_build", "images/*.md"]

# Sphinx reads sources only under docs/, so the notebooks are copied in at each build.
_NOTEBOOKS = os.path.join(os.path.dirname(__file__), "notebooks")
shutil.rmtree(_NOTEBOOKS, ignore_errors=True)
shutil.copytree(os.path.join(ROOT, "notebooks"), _NOTEBOOKS)

# The guides include sections of the README, which links to repository files and to its own
# headings. In the docs, a heading lives on the guide that includes it, and a repository file
# (a test, a module) is named rather than linked, since it is not part of the site.
_ANCHORS = {
    "#training-outcomes": "percentile_rule.md#training-outcomes",
    "#scaling-out": "scaling_out.md",
}
_REPO_FILE = re.compile(r"\[([^\]]+)\]\(((?:tests|gradclip_jax|benchmarks)/[^)\s]*)\)")


def _rewrite_readme(app, relative_path, parent_docname, content):
    if relative_path.name != "README.md":
        return
    text = content[0]
    for anchor, target in _ANCHORS.items():
        text = text.replace(f"]({anchor})", f"]({target})")
    content[0] = _REPO_FILE.sub(_named, text)


def _named(match):
    text, path = match.group(1), match.group(2)
    return f"`{path}`" if text.strip("`") == path else f"{text} (`{path}` in the repository)"


def setup(app):
    app.connect("include-read", _rewrite_readme)
