"""Integration tests import the helpers under ``tests/support`` as ``support``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
