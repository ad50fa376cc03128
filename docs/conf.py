"""Sphinx configuration: builds offline, warnings are errors (see tests/test_docs.py)."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "optax-multirate"
author = "optax-multirate developers"
copyright = "2026, optax-multirate developers"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
html_theme = "alabaster"
html_static_path = []
suppress_warnings = ["myst.header"]
napoleon_use_ivar = True
