"""The README's "In CI" section read as tests read it: its fenced blocks by language."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
# The public image the recipes copy into the service registry; tests copy a fixture instead.
RECIPE_SOURCE = "docker://docker.io/library/busybox:1.36"
RECIPE_REGISTRY = "localhost:5000"


def ci_section() -> str:
    text = README.read_text()
    start = text.index("\n## In CI\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


def fenced_blocks(language: str) -> list[str]:
    """The bodies of the ```LANGUAGE blocks of the In CI section, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```$", ci_section(), flags=re.MULTILINE | re.DOTALL)


def shell_recipe() -> str:
    """The plain-shell steps for any CI: the sh block that pushes the test image."""
    blocks = [b for b in fenced_blocks("sh") if b.startswith("skopeo copy")]
    assert len(blocks) == 1, f"want one sh block starting with skopeo copy in In CI, found {len(blocks)}"
    return blocks[0]
