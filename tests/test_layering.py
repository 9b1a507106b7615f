"""The package's layering: every import points down, and one forward function runs the decoder.

Layers, lowest first (WORKSPACE.md, "Where a change goes"): a module may import its own package
and the packages below it, never one above. ``training`` sits beside ``study`` and never imports
it; a stage never imports another stage. ``api`` (the common path for users) sits on top beside
``main``, and the package's ``__init__`` re-exports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "refusal_jax"
LAYERS = {
    "text": 0,
    "models": 1,
    "interventions": 2,
    "runtime": 3,
    "directions": 4,
    "evaluation": 5,
    "selection": 6,
    "results": 7,
    "study": 8,
    "training": 8,
    "main": 9,
    "api": 9,
    "__init__": 10,  # the package's own __init__ re-exports the api
}


def _modules() -> list[tuple[str, Path]]:
    return [(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts), path)
            for path in sorted(PACKAGE.rglob("*.py"))]


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every refusal_jax module named by an import in ``path`` (at any depth), with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "refusal_jax":
                found += [(f"refusal_jax.{alias.name}", node.lineno) for alias in node.names]
            elif node.module.startswith("refusal_jax."):
                found.append((node.module, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names
                      if alias.name.startswith("refusal_jax.")]
    return found


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_package_has_a_layer():
    top_level = {path.relative_to(PACKAGE).parts[0].removesuffix(".py")
                 for _, path in _modules()} - {"__init__"}
    assert top_level <= set(LAYERS), f"packages without a layer: {top_level - set(LAYERS)}"


@pytest.mark.parametrize("module,path", _modules(), ids=[name for name, _ in _modules()])
def test_imports_point_down(module, path):
    own = _package(module)
    if own is None:
        return
    upward = []
    for imported, line in _imports(path):
        other = _package(imported)
        if other is None or other == own:
            continue
        if own == "training" and other == "study" or LAYERS[other] > LAYERS[own]:
            upward.append(f"line {line}: {imported} ({other}, layer {LAYERS[other]})")
        if LAYERS[other] == LAYERS[own]:
            upward.append(f"line {line}: {imported} (a sibling layer)")
    assert not upward, f"{module} (layer {LAYERS[own]}) imports upward: {upward}"


def test_stages_do_not_import_each_other():
    stages = PACKAGE / "study" / "stages"
    for path in stages.glob("*.py"):
        others = [name for name, _ in _imports(path)
                  if name.startswith("refusal_jax.study.stages.")
                  and name != f"refusal_jax.study.stages.{path.stem}"]
        assert not others, f"stage {path.stem} imports {others}"


def test_one_forward_runs_the_decoder_layers():
    """Only models/core.py runs decoder blocks; everything else calls its ``forward``."""
    block_names = {"decoder_block", "_block", "attention", "apply_rope"}
    for module, path in _modules():
        if module == "refusal_jax.models.core":
            continue
        tree = ast.parse(path.read_text())
        used = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and node.module == "refusal_jax.models.core" for alias in node.names}
        used |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                 and isinstance(node.value, ast.Name) and node.value.id == "core"}
        assert not used & block_names, f"{module} runs decoder blocks itself: {used & block_names}"
