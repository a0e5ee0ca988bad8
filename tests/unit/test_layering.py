"""The module layering DESIGN.md describes: each module imports only modules above it.

Data flows one way (references → registry → store → pulls → volumes → records →
caches → builds → artifacts → matcher → server → CLI); an import that points back up
the list is a design change, and this test makes it a deliberate one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "builder"

LAYERS = [
    "errors", "units", "faults", "digest", "home", "reference", "oci", "compression",
    "registry.hosts", "registry.auth", "registry.retry", "registry.transport",
    "registry.blobs", "registry.manifests", "registry.uploads", "registry.client",
    "store", "throughput", "pull", "volume.format", "volume.packer", "volume", "export", "imagecache", "records",
    "retirement", "caches", "build", "drift", "plan",
    "artifact", "matcher",
    "server.accesslog", "server.hits", "server.upstream", "server.registry", "server.metrics", "server.patch",
    "server.discovery", "server.api", "server.app",
    "cli",
]


def layer_of(module: str) -> int:
    """The position of ``builder.<module>`` in LAYERS: its own if placed, else its
    package's (a package's ``__init__`` may sit below the sub-modules it gathers)."""
    if module in LAYERS:
        return LAYERS.index(module)
    for i in range(len(LAYERS) - 1, -1, -1):
        if module.startswith(LAYERS[i] + "."):
            return i
    raise AssertionError(f"builder.{module} is not placed in LAYERS: add it where it belongs")


def builder_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("builder"):
            base = node.module[len("builder."):] if node.module != "builder" else ""
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                # ``from builder.registry import blobs`` imports the module registry.blobs
                where = PACKAGE / Path(*sub.split("."))
                is_module = where.with_suffix(".py").exists() or (where / "__init__.py").exists()
                out.add(sub if is_module else base)
        elif isinstance(node, ast.Import):
            out |= {a.name[len("builder."):] for a in node.names if a.name.startswith("builder.")}
    return {m for m in out if m and m not in ("__version__",)}


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")
                 or p.parent.name == "cli")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_only_up_the_layers(path: Path) -> None:
    module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
    own = layer_of(module)
    for imported in builder_imports(path):
        if imported.startswith(module.split(".")[0] + ".") and module.startswith("cli"):
            continue  # the CLI's own modules import each other
        assert layer_of(imported) < own or imported.startswith(module), (
            f"builder.{module} imports builder.{imported}, which is not above it")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_caches_opens_the_records(path: Path) -> None:
    """``Caches`` is the one door to the records: whatever it notices on the way (a
    builder that died) then holds for every reader."""
    module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
    if module in ("caches", "records"):
        return
    assert "records" not in builder_imports(path), f"builder.{module} opens the records: ask Caches instead"
