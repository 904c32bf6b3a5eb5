"""The source tree's layering, read from every module's imports (``ast``, nothing is imported).

- A pass family (``onnxopt/passes/<family>/`` or ``onnxopt/passes/<family>.py``) never imports
  another family's private module (``onnxopt.passes.<other>._x``): only its facade, or
  ``onnxopt.passes._shared``, which any family may use and which imports no family.
- The core (``onnxopt/*.py``, ``export/``, ``report/``) reaches passes only through the registry:
  ``onnxopt/registry.py`` is the one core module that imports ``onnxopt.passes``.
- ``onnxopt/runner.py`` imports nothing from onnxopt (it ships alone to boards).

Imports inside functions count, relative imports are resolved, and ``importlib.import_module``
or ``__import__`` with a literal name counts as an import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "onnxopt"  # read, not imported
SHARED = "_shared"
REGISTRY = "onnxopt.registry"
STANDALONE = "onnxopt.runner"


def module_name(root: Path, path: Path) -> str:
    """``onnxopt.passes.quantize._prepare`` for ``<root>/passes/quantize/_prepare.py``."""
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, name: str) -> set[str]:
    """Every module ``path`` (module ``name``) imports, as absolute dotted names.

    ``from a import b`` gives both ``a`` and ``a.b`` (``b`` may be a submodule)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (getattr(node.func, "attr", None) == "import_module"
                   or getattr(node.func, "id", None) in ("__import__", "import_module"))):
            found.add(node.args[0].value)
    return found


def family_of(name: str, top: str) -> str | None:
    """The pass family a module belongs to (``quantize``, ``cleanup``, ``_shared``; ``""`` for
    the ``passes`` package itself), or None outside ``passes`` (the core)."""
    parts = name.split(".")
    if parts[:2] != [top, "passes"]:
        return None
    return parts[2] if len(parts) >= 3 else ""


def violations(root: Path) -> list[str]:
    """Every import in the package at ``root`` that breaks the layering, one line each."""
    top = root.name
    found = []
    for path in sorted(root.rglob("*.py")):
        name = module_name(root, path)
        own = family_of(name, top)
        for target in sorted(imported(path, name)):
            parts = target.split(".")
            if parts[0] != top:
                continue
            where = f"{path.relative_to(root.parent)}: imports {target}"
            if name == f"{top}.runner":
                found.append(f"{where} (runner.py ships alone: no onnxopt imports)")
                continue
            other = family_of(target, top)
            if own is None:  # core
                if parts[:2] == [top, "passes"] and name != f"{top}.registry":
                    found.append(f"{where} (the core reaches passes only through the registry)")
            elif own == SHARED:
                if other is not None and other != SHARED:
                    found.append(f"{where} (_shared imports no family)")
            elif other not in (None, "", own, SHARED) and any(
                    p.startswith("_") and not p.startswith("__") for p in parts[3:]):
                found.append(f"{where} (another family's private module: use its facade)")
    return found


def test_the_package_keeps_its_layering() -> None:
    # the parse sees real imports: the registry's lazy one, a family's own private module
    assert "onnxopt.passes" in imported(PACKAGE / "registry.py", "onnxopt.registry")
    assert "onnxopt.passes.quantize._prepare" in imported(
        PACKAGE / "passes" / "quantize" / "quantize.py", "onnxopt.passes.quantize.quantize")
    assert violations(PACKAGE) == []


def test_isolation_names_passes_only_as_data() -> None:
    """``isolation.py`` may name ``onnxopt.passes`` in its preload list (a string the child
    imports), never import it itself."""
    path = PACKAGE / "isolation.py"
    assert not any(n.startswith("onnxopt.passes") for n in imported(path, "onnxopt.isolation"))


@pytest.mark.parametrize("module, source, broken", [
    ("passes/quantize/quantize.py", "from onnxopt.passes.fusion._rules import x\n",
     "another family's private module"),
    ("passes/quantize/quantize.py", "from onnxopt.passes.fusion import _rules\n",
     "another family's private module"),
    ("passes/fusion/fuse.py", "from .._shared import scoring\nfrom ..quantize._prepare import p\n",
     "another family's private module"),
    ("passes/_shared/scoring.py", "from onnxopt.passes.quantize import QuantizePass\n",
     "_shared imports no family"),
    ("pipeline.py", "def f():\n    from onnxopt.passes.quantize import QuantizePass\n",
     "only through the registry"),
    ("export/_torch.py", "import importlib\nimportlib.import_module('onnxopt.passes')\n",
     "only through the registry"),
    ("runner.py", "from onnxopt.errors import InputError\n", "ships alone"),
    ("runner.py", "from . import errors\n", "ships alone"),
])
def test_each_kind_of_violation_is_found(tmp_path: Path, module: str, source: str,
                                         broken: str) -> None:
    """The check can fail: a small tree with one forbidden import of each kind."""
    root = tmp_path / "onnxopt"
    allowed = {
        "registry.py": "import onnxopt.passes\n",
        "passes/__init__.py": "from onnxopt.passes.quantize import QuantizePass\n",
        "passes/quantize/__init__.py": "from .quantize import QuantizePass\n",
        "passes/quantize/quantize.py": "from onnxopt.passes.quantize._prepare import p\n"
                                       "from onnxopt.passes.fusion import split\n"
                                       "from onnxopt.passes._shared.scoring import Evaluator\n",
        "passes/quantize/_prepare.py": "from onnxopt import runner\n",
        "passes/fusion/__init__.py": "", "passes/fusion/fuse.py": "", "passes/fusion/_rules.py": "",
        "passes/_shared/__init__.py": "", "passes/_shared/scoring.py": "from onnxopt import metrics\n",
        "pipeline.py": "from onnxopt.registry import OptPass\n",
        "export/__init__.py": "", "export/_torch.py": "", "runner.py": "import numpy\n",
    }
    for rel, text in allowed.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    assert violations(root) == []  # the allowed imports above are allowed
    (root / module).write_text(source)
    found = violations(root)
    assert found and all(broken in line for line in found), found
