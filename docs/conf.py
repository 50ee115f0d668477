"""Sphinx configuration: the project's pages (Markdown, through MyST) and the API reference
generated from the code (autodoc) and from the CLI's own argparse parser (sphinx-argparse),
so `--help` and the reference have one source. Build with `make docs`; tests/test_docs.py
builds it with warnings as errors."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")          # importing the API must not look for accelerators
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

project = "capibara-export"
author = "the capibara-export developers"
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinxarg.ext"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "measurements/*.json"]
html_theme = "alabaster"
html_static_path: list[str] = []

autodoc_default_options = {"members": True, "show-inheritance": True, "member-order": "bysource"}
autodoc_typehints = "description"
autodoc_class_signature = "separated"
napoleon_google_docstring = False
nitpicky = False                 # type hints name numpy/jax types Sphinx has no inventory for (offline)

myst_heading_anchors = 3
# The prose pages link to source files and folders of the repository (`../model/hf.py`), which
# are not documents: such links stay plain links. Every other warning fails the build.
suppress_warnings = ["myst.xref_missing"]
