"""Plain helpers and constants shared by test modules (fixtures live in the conftest.py files).

Importable as ``support`` because pyproject.toml puts tests/ on the path (``pythonpath = ["tests"]``);
test modules never import each other or a conftest.py.
"""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
DATA = TESTS / "data"  # small prompt sets shared by the calibration, evaluation and server tests
