"""Reports of benchmark results: self-contained HTML (inline SVG charts) and Markdown.

``results.json`` (schema in :mod:`onnxopt.report.schema`) is the source of truth; this package
only renders it. The HTML needs matplotlib (the ``report`` extra); Markdown needs nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from onnxopt.errors import InputError
from onnxopt.model_io import write_bytes_atomic
from onnxopt.report.html import render_html
from onnxopt.report.markdown import render_markdown, render_results_section, replace_between_markers
from onnxopt.report.schema import SCHEMA_VERSION, as_suite_document, load_results, pareto_front

__all__ = [
    "SCHEMA_VERSION", "as_suite_document", "load_results", "pareto_front", "render_html",
    "render_markdown", "render_results_section", "replace_between_markers", "write_report",
]

FORMATS = {".html": render_html, ".htm": render_html, ".md": render_markdown}


def write_report(doc: Mapping[str, Any], path: str | Path) -> Path:
    """Render ``doc`` to ``path`` (``.html`` or ``.md``, by its suffix), written atomically."""
    path = Path(path)
    render = FORMATS.get(path.suffix.lower())
    if render is None:
        raise InputError(f"unknown report format '{path.suffix}' (use .html or .md)", path)
    return write_bytes_atomic(render(as_suite_document(doc)).encode(), path)
