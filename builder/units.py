"""Sizes as people read them: one formatter, so that the CLI, the logs and the
events a cache records all print a size the same way."""

from __future__ import annotations


def human(n: float) -> str:
    """Bytes in decimal units (as registries and skopeo print them): ``812 B``, ``41.9 MB``."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
