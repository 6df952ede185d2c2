"""The folder tree's dependency rules (docs/developing.md, "Map"), read from the import statements
of every module, function-level imports included. A new import that crosses a rule fails here.

Layers, bottom up: ``contract`` (checks, dtypes, keys, types: imports nothing of cdds_fast);
``reference`` (the executable spec: only itself); ``kernels`` (only themselves and the contract);
the loss API at the package root; the open_clip wrapper, the data and the retrieval metrics; and
the applications (the ``cdds-fast`` commands and the demo), which may use everything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CONTRACT = {"cdds_fast.contract"}
API = {
    "cdds_fast",
    "cdds_fast.dispatch",
    "cdds_fast.functional",
    "cdds_fast.contrastive",
    "cdds_fast.head",
    "cdds_fast.loss",
    "cdds_fast.fused_loss",
    "cdds_fast.chunked_sampling",
}
APPS = {"cdds_fast.cli", "cdds_fast.demo", "cdds_fast.open_clip.train", "cdds_fast.eval.command"}
#: The only places outside ``reference/`` that import it: where they call it as the fallback path
#: (``backend="reference"``, float64 inputs), behind :func:`cdds_fast.dispatch.resolve_backend`.
REFERENCE_FALLBACKS = {
    ("cdds_fast.functional", "cdds_fast.reference"),
    ("cdds_fast.chunked_sampling", "cdds_fast.reference"),
    ("cdds_fast.contrastive", "cdds_fast.reference.contrastive"),
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in ("kernels", "reference"):
        parts = ["cdds_fast", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    paths = [
        *ROOT.glob("cdds_fast/**/*.py"),
        *ROOT.glob("kernels/*.py"),
        *ROOT.glob("reference/*.py"),
    ]
    return {_module_name(p): p for p in paths if "__pycache__" not in p.parts}


def _imports(name: str, path: Path) -> set[str]:
    """Absolute names of the cdds_fast modules ``name`` imports (``from a import b`` counts as
    ``a.b`` when that is a module, else as ``a``)."""
    modules = _modules()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m == "cdds_fast" or m.startswith("cdds_fast.")}


EDGES = sorted(
    (name, target)
    for name, path in _modules().items()
    for target in _imports(name, path)
    if target != name
)


def _layer(module: str) -> str:
    if module in CONTRACT:
        return "contract"
    if module.startswith("cdds_fast.reference"):
        return "reference"
    if module.startswith("cdds_fast.kernels"):
        return "kernels"
    if module in APPS:
        return "apps"
    if module in API:
        return "api"
    return "integration"  # open_clip wrapper and checkpoints, data, retrieval metrics


#: layer -> the layers it may import (the reference additionally only through the fallbacks)
ALLOWED = {
    "contract": set(),
    "reference": {"reference"},
    "kernels": {"kernels", "contract"},
    "api": {"api", "kernels", "contract", "reference"},
    "integration": {"integration", "api", "contract"},
    "apps": {"apps", "integration", "api", "kernels", "contract"},
}


def test_every_module_is_classified_and_the_rules_see_imports():
    modules = _modules()
    assert {
        "cdds_fast.contract",
        "cdds_fast.kernels.contrastive",
        "cdds_fast.open_clip.model",
        "cdds_fast.data.scenes",
        "cdds_fast.eval.retrieval",
    } <= set(modules)
    assert ("cdds_fast.loss", "cdds_fast.functional") in EDGES  # the parser finds real edges
    assert ("cdds_fast.kernels.contrastive", "cdds_fast.kernels.launch") in EDGES


@pytest.mark.parametrize("edge", EDGES, ids=[f"{a}->{b}" for a, b in EDGES])
def test_import_respects_the_layers(edge):
    source, target = edge
    src, dst = _layer(source), _layer(target)
    assert dst in ALLOWED[src], f"{source} ({src}) may not import {target} ({dst})"
    if dst == "reference" and src != "reference":
        assert edge in REFERENCE_FALLBACKS, (
            f"{source} imports the reference ({target}) outside the fallback path"
        )


def test_reference_fallbacks_still_exist():
    """Every allowed fallback edge is still used (the list shrinks with the code)."""
    assert REFERENCE_FALLBACKS <= set(EDGES)
