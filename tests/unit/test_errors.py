"""Exit codes: every one is named once, in builder/errors.py, and the README lists them all."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import builder.errors as errors
from builder.errors import ExitCode, ImcError

ROOT = Path(__file__).resolve().parents[2]


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


def test_the_readme_table_is_the_exit_code_enum() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Exit codes"):]
    section = section[:section.index("\n## ")]
    rows = dict(re.findall(r"^\| (\d+) \| (.+?) \|$", section, re.M))
    source = (ROOT / "builder" / "errors.py").read_text()
    meanings = {code: meaning for _, code, meaning in re.findall(r"^    (\w+) = (\d+)  # (.*)$", source, re.M)}
    assert {int(c) for c in rows} == {int(c) for c in ExitCode}
    assert rows == meanings


def test_every_error_exits_with_a_named_code() -> None:
    import builder.server.api  # noqa: F401  (errors defined outside errors.py must use the enum too)

    for cls in [ImcError, *_subclasses(ImcError)]:
        assert isinstance(cls.exit_code, ExitCode), f"{cls.__name__}.exit_code is not an ExitCode"
    assert errors.NoMatchError.exit_code == 13 and errors.BuildFailedError.exit_code == 12


def test_no_exit_code_is_spelled_as_a_number_outside_errors_py() -> None:
    """``sys.exit(4)`` or ``exit_code = 13`` elsewhere is how one code came to mean two things."""
    found = []
    for path in (ROOT / "builder").rglob("*.py"):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "exit" and node.args \
                    and isinstance(node.args[0], ast.Constant):
                found.append(f"{path.name}:{node.lineno} sys.exit({node.args[0].value})")
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "exit_code" for t in node.targets):
                found.append(f"{path.name}:{node.lineno} exit_code = ...")
    assert found == []
