"""The home's layout: every location derived from the root in builder/home.py, and
spelled nowhere else, and the one way to open a path there for writing."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from builder.caches import Caches
from builder.digest import Digest
from builder.home import Home, open_unlinked, partial_of
from builder.store import Store

PACKAGE = Path(__file__).resolve().parents[2] / "builder"
DIGEST = Digest.of(b"layer")


def test_every_location_is_under_the_root_and_distinct(tmp_path: Path) -> None:
    home = Home(tmp_path)
    files = [home.oci_layout, home.image_index, home.blob(DIGEST), home.ingest_partial(DIGEST),
             home.quarantined(DIGEST), home.unpacked_record(DIGEST), home.gc_lock, home.index_lock,
             home.blob_lock(DIGEST), home.cache_lock("imc-abc"), home.volume("imc-abc", 2), home.records,
             home.settings, home.build_log("web")]
    assert all(p.is_relative_to(tmp_path) for p in files)
    assert len(set(files)) == len(files)
    assert home.blob(DIGEST) == tmp_path / "store" / "blobs" / "sha256" / DIGEST.hex
    assert home.volume("imc-abc", 2).name == "imc-abc-2.imcv"
    assert Home(home) == home and os.fspath(home) == str(tmp_path)  # a Home is path-like: Home(home) is itself
    assert not any(tmp_path.iterdir())  # naming creates nothing


def test_volume_files_name_their_cache(tmp_path: Path) -> None:
    home = Home(tmp_path)
    home.volumes.mkdir()
    finished, written = home.volume("imc-a-b", 3), partial_of(home.volume("imc-c", 1))
    for p in (finished, written, home.volumes / "stray.txt"):
        p.write_bytes(b"")
    assert home.volume_files() == {finished: "imc-a-b", written: "imc-c"}
    assert home.volumes_of("imc-a-b") == [finished]
    home.ingest.mkdir()
    (home.ingest / "x.partial").write_bytes(b"")
    assert home.ingest_partials() == [home.ingest_partial(DIGEST).with_name("x.partial")]


def test_store_and_caches_create_what_the_home_names(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    caches = Caches(home.root)
    assert caches.home == home and caches.store.home == home
    for d in (home.blob_dir("sha256"), home.ingest, home.locks, home.quarantine, home.volumes):
        assert d.is_dir()
    assert home.image_index.is_file() and home.oci_layout.is_file() and home.records.is_file()
    store = Store(home)
    store.put_bytes(DIGEST, b"layer")
    assert home.blob(DIGEST).read_bytes() == b"layer"


def test_open_unlinked_replaces_a_planted_link(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"keep me")
    planted = tmp_path / "planted"
    planted.symlink_to(target)
    fd = open_unlinked(planted, os.O_WRONLY | os.O_TRUNC)
    with os.fdopen(fd, "wb") as f:
        f.write(b"new")
    assert target.read_bytes() == b"keep me"
    assert not planted.is_symlink() and planted.read_bytes() == b"new"
    fd = open_unlinked(planted, os.O_WRONLY | os.O_APPEND)  # an ordinary file is opened as it is
    with os.fdopen(fd, "ab") as f:
        f.write(b"er")
    assert planted.read_bytes() == b"newer"


# Where the home's layout could be spelled outside home.py: a path joined with a literal
# (``x / "volumes"``), a glob or renamed path, or one of the layout's own names.
LAYOUT_NAMES = (".imcv", ".partial", "caches.db", "settings.json", "meta/unpacked", "index.lock", "gc.lock")
# Outside the home, or inside a part of it another module owns: docker's config.json, the
# containers' auth.json files, and
# the secret files under secrets/ (registry.auth), write_atomic's temporary files (store),
# the temporary names of an archive exported where the user asks (export).
ALLOWED = {
    ("export.py", "self.out.with_name(f'.{self.out.name}.{os.getpid()}.link')"),
    ("export.py", "out.with_name(f'.{out.name}.{os.getpid()}.partial')"),
    ("export.py", "'.partial' names .partial"),
    ("registry/auth.py", "Path(base) / 'config.json'"),
    ("registry/auth.py", "Path(config_home) / 'containers' / 'auth.json'"),
    ("registry/auth.py", "Path(config_home) / 'containers'"),
    ("registry/auth.py", "self.root / namespace / f'{name}.json'"),
    ("registry/auth.py", "path.with_suffix('.tmp')"),
    ("registry/auth.py", "self.root.glob('*/*.json')"),
    ("store.py", "self.home.meta.glob('*/.*.tmp')"),
    ("store.py", "self.home.blobs.glob('*/.*.tmp')"),
}


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def spellings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    docstrings = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and (
                isinstance(node.right, ast.JoinedStr)
                or (isinstance(node.right, ast.Constant) and isinstance(node.right.value, str)))) or (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                "glob", "rglob", "with_name", "with_suffix", "joinpath")):
            found.append(ast.unparse(node))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found += [f"{node.value!r} names {name}" for name in LAYOUT_NAMES if name in node.value]
    return found


@pytest.mark.parametrize("path", sorted(p for p in PACKAGE.rglob("*.py") if p.name != "home.py"),
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_layout_is_spelled_only_in_home(path: Path) -> None:
    where = str(path.relative_to(PACKAGE))
    stray = [s for s in spellings(path) if (where, s) not in ALLOWED]
    assert stray == [], f"builder/{where} spells a path of the home: use builder.home.Home"


def test_the_check_finds_a_spelled_path(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text('def f(home, i):\n    """Writes home/volumes/x.imcv."""\n'
                      '    return home / "volumes" / f"{i}.imcv", home.glob("*.partial")\n')
    assert set(spellings(sample)) == {"home / 'volumes' / f'{i}.imcv'", "home / 'volumes'", "'.imcv' names .imcv",
                                      "home.glob('*.partial')", "'*.partial' names .partial"}
