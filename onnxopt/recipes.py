"""Recipes: an ordered list of pass steps, given as a built-in name, a TOML/JSON file, or data.

A step is ``{"pass": NAME, **options}`` (or just ``NAME``). Files hold ``[[steps]]`` tables (TOML)
or ``{"steps": [...]}`` / ``[...]`` (JSON).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

from onnxopt.errors import InputError
from onnxopt.registry import make_config, pass_class

# Every built-in recipe, in one place: name -> ordered steps. Step lists are plain data (the same
# form a recipe file holds); their passes and options are validated when a recipe is loaded.
BUILTIN_RECIPES: dict[str, list[dict[str, Any] | str]] = {
    "cleanup": ["cleanup"],
    # The default grows as pass families prove themselves on every model: fusion is exact.
    "default": ["cleanup", "fuse"],
    "fuse": ["cleanup", "fuse"],
    "prune-channels": ["cleanup", "fuse", "prune-channels"],
    "transformer": ["cleanup", "fuse", "fuse-transformer"],
    # fuse-transformer first: ORT's dynamic quantizer turns its Attention into QAttention, which
    # quantizes the QKV projections too (MiniLM-L6: 2.97x / 2.00x over FP32 against 2.47x / 1.86x
    # without it, same cosine; benchmarks/RESULTS.md "INT8"); it skips models with no transformer op.
    "int8": ["cleanup", "fuse", "fuse-transformer", "quantize"],
    "fp16": ["cleanup", "fuse", "fp16"],
    # weight-only: MatMul weights to 4 bits (LM head 8), activations float (docs/quantize-weights.md)
    "int4": ["cleanup", "fuse", "quantize-weights"],
    "deep-compression": ["cleanup", "fuse", {"pass": "deep-compress"}],
    # Chains (docs/chains.md): each later pass keeps what the earlier one bought.
    # speed: fewer MACs, then INT8 on what is left (the two multiply).
    "speed": ["cleanup", "fuse", "prune-channels", "quantize"],
    # size: deep-compress's codebook/sparse storage, then INT8 only on layers it left dense
    # (quantize keeps coded weights and their decoding float: passes/quantize/_coded.py).
    "size": ["cleanup", "fuse", {"pass": "deep-compress"}, "quantize"],
    # arm: fused graph in FP16 (ARM cores with FP16 arithmetic; onnxopt/isa.py).
    "arm": ["cleanup", "fuse", "fp16"],
}


def builtin_recipes() -> dict[str, list[dict[str, Any] | str]]:
    """Every built-in recipe, by name (a copy: callers may not change the table)."""
    return {name: list(steps) for name, steps in BUILTIN_RECIPES.items()}


RecipeLike = Union[str, Path, Sequence[Any], Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class Step:
    """One validated pipeline step."""

    name: str
    options: dict[str, Any]

    def build(self, context: Any = None) -> Any:
        cls = pass_class(self.name)
        return cls(make_config(cls, self.options), context)


def load_recipe(recipe: RecipeLike) -> tuple[str, list[Step]]:
    """Resolve ``recipe`` into ``(name, steps)``; every pass name and option is checked here."""
    if isinstance(recipe, (str, Path)):
        text = str(recipe)
        recipes = builtin_recipes()
        if text in recipes:
            return text, _steps(recipes[text], text)
        path = Path(text)
        if path.suffix.lower() in (".toml", ".json") or path.exists():
            return path.stem, _steps(_read_recipe_file(path), path)
        raise InputError(
            f"unknown recipe '{text}' (built-in: {', '.join(recipes)}; or a .toml/.json file)"
        )
    if isinstance(recipe, Mapping):
        return str(recipe.get("name", "custom")), _steps(recipe.get("steps", []), "recipe")
    return "custom", _steps(recipe, "recipe")


def apply_overrides(steps: list[Step], overrides: Mapping[str, Any]) -> list[Step]:
    """Set options across a recipe: ``"pass.option"`` for one pass, ``"option"`` for every step
    whose pass has that option (e.g. ``max_drop`` from the CLI's ``--max-drop``).

    An override that no step accepts is an error, so a typo never passes silently.
    """
    steps = list(steps)
    for key, value in overrides.items():
        target, _, opt = key.rpartition(".")
        opt = opt.replace("-", "_")
        hits = 0
        for i, step in enumerate(steps):
            if target and step.name != target:
                continue
            fields = {f.name for f in dataclasses.fields(pass_class(step.name).Config)}
            if opt in fields:
                options = {**step.options, opt: value}
                make_config(pass_class(step.name), options)  # validate the value's type
                steps[i] = Step(step.name, options)
                hits += 1
        if not hits:
            names = ", ".join(s.name for s in steps)
            raise InputError(f"no pass in the recipe ({names}) takes option '{key}'")
    return steps


def _read_recipe_file(path: Path) -> Any:
    if not path.is_file():
        raise InputError("no such recipe file", path)
    try:
        if path.suffix.lower() == ".toml":
            data: Any = tomllib.loads(path.read_text())
        else:
            data = json.loads(path.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"not a valid recipe file ({exc})", path) from exc
    if isinstance(data, Mapping):
        if "steps" not in data:
            raise InputError("recipe has no 'steps' list", path)
        data = data["steps"]
    return data


def _steps(raw: Any, where: str | Path) -> list[Step]:
    if not isinstance(raw, Sequence) or isinstance(raw, (str, bytes)) or not raw:
        raise InputError("a recipe needs a non-empty list of steps", where)
    steps = []
    for item in raw:
        if isinstance(item, str):
            name, options = item, {}
        elif isinstance(item, Mapping) and isinstance(item.get("pass"), str):
            options = {k: v for k, v in item.items() if k != "pass"}
            name = item["pass"]
        else:
            raise InputError(f"bad recipe step {item!r}: expected a pass name or {{pass = NAME, ...}}", where)
        try:
            make_config(pass_class(name), options)  # validate now, build later
        except InputError as exc:
            raise InputError(exc.message, where) from exc
        steps.append(Step(name, dict(options)))
    return steps
