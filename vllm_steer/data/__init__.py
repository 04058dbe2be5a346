"""Prompt sets for calibration and evaluation: the public sets by name, or the user's own files.

Named sets are read from a data directory (``--data-dir``, ``$VLLM_STEER_DATA``,
or ``../shared/data`` next to the checkout), never downloaded:

==============  ===========================================  ======================
name            file                                         category column
==============  ===========================================  ======================
``advbench``    ``advbench_harmful_behaviors.csv`` (goal)    —
``alpaca``      ``alpaca_harmless_1000.jsonl`` (instruction)  —
``catqa``       ``catqa_english.csv`` (question)              ``category`` (11)
``harmbench``   ``harmbench_behaviors_text_all.csv``          ``SemanticCategory``
                (Behavior; ``FunctionalCategory == standard``)
==============  ===========================================  ======================

Anything else is a path to a user file: CSV or JSONL with a text column
(``text``, ``prompt``, ``instruction``, ``goal``, ``question`` or ``Behavior``,
first found), an optional ``category`` column and an optional ``label`` column
(``1``/``harmful``/``unsafe``/``true`` vs ``0``/``harmless``/``safe``/``false``), so
one labelled file can hold both classes (:func:`load_labelled`).
"""

from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Prompt", "DatasetError", "load_prompts", "load_labelled", "cycled_prompts", "default_data_dir", "split"]

TEXT_COLUMNS = ("text", "prompt", "instruction", "goal", "question", "Behavior")
CATEGORY_COLUMNS = ("category", "SemanticCategory")
LABEL_COLUMNS = ("label", "is_harmful", "harmful")
_HARMFUL_LABELS = {"1", "harmful", "unsafe", "true", "yes"}
_HARMLESS_LABELS = {"0", "harmless", "safe", "false", "no"}

_NAMED = {
    "advbench": ("advbench_harmful_behaviors.csv", "goal", None, None),
    "alpaca": ("alpaca_harmless_1000.jsonl", "instruction", None, None),
    "catqa": ("catqa_english.csv", "question", "category", None),
    "harmbench": ("harmbench_behaviors_text_all.csv", "Behavior", "SemanticCategory", ("FunctionalCategory", "standard")),
}


class DatasetError(ValueError):
    pass


@dataclass(frozen=True)
class Prompt:
    text: str
    category: str | None = None
    harmful: bool | None = None
    """From the file's label column, when it has one."""


def default_data_dir() -> Path:
    env = os.environ.get("VLLM_STEER_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        raise DatasetError(f"{path}: file not found")
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DatasetError(f"{path}:{i}: not valid JSON ({exc.msg})") from None
        return rows
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, list):
            raise DatasetError(f"{path}: expected a JSON list of records")
        return data
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def load_prompts(source: str, data_dir: str | Path | None = None, limit: int | None = None) -> list[Prompt]:
    """Prompts of a named set or a user file; refuses empty sets and rows without text."""
    if source in _NAMED:
        name, text_col, cat_col, keep = _NAMED[source]
        path = Path(data_dir) if data_dir else default_data_dir()
        rows = _rows(path / name)
        if keep:
            rows = [r for r in rows if r.get(keep[0]) == keep[1]]
    else:
        path = Path(source)
        rows = _rows(path)
        if not rows:
            raise DatasetError(f"{path}: no rows")
        text_col = next((c for c in TEXT_COLUMNS if c in rows[0]), None)
        if text_col is None:
            raise DatasetError(f"{path}: no text column (expected one of {', '.join(TEXT_COLUMNS)}; found {', '.join(rows[0])})")
        cat_col = next((c for c in CATEGORY_COLUMNS if c in rows[0]), None)
    label_col = None if source in _NAMED else next((c for c in LABEL_COLUMNS if c in rows[0]), None)
    prompts = []
    for i, row in enumerate(rows):
        text = row.get(text_col)
        if not isinstance(text, str) or not text.strip():
            raise DatasetError(f"{source}: row {i} has no text in column {text_col!r}")
        label = _label(source, i, label_col, row.get(label_col)) if label_col else None
        prompts.append(Prompt(text.strip(), (row.get(cat_col) or None) if cat_col else None, label))
    if not prompts:
        raise DatasetError(f"{source}: no prompts")
    return prompts[:limit] if limit else prompts


def _label(source: str, i: int, column: str, value) -> bool:
    key = str(value).strip().lower()
    if key in _HARMFUL_LABELS:
        return True
    if key in _HARMLESS_LABELS:
        return False
    raise DatasetError(f"{source}: row {i} has label {value!r} in column {column!r} "
                       f"(expected one of {sorted(_HARMFUL_LABELS)} or {sorted(_HARMLESS_LABELS)})")


def load_labelled(source: str, data_dir: str | Path | None = None, limit: int | None = None
                  ) -> tuple[list[Prompt], list[Prompt]]:
    """``(harmful, harmless)`` from one file with a label column; both classes must be present."""
    prompts = load_prompts(source, data_dir)
    if any(p.harmful is None for p in prompts):
        raise DatasetError(f"{source}: no label column (expected one of {', '.join(LABEL_COLUMNS)}) — "
                           "pass --harmless with a separate file instead")
    harmful = [p for p in prompts if p.harmful]
    harmless = [p for p in prompts if not p.harmful]
    if not harmful or not harmless:
        only = "harmful" if harmful else "harmless"
        raise DatasetError(f"{source}: every row is labelled {only}; calibration contrasts two classes "
                           "and needs rows of both")
    return (harmful[:limit] if limit else harmful), (harmless[:limit] if limit else harmless)


def cycled_prompts(source: str, n: int, fallback: str | Path | None = None) -> list[str]:
    """``n`` prompt texts of ``source``, repeated as needed; ``fallback`` (a file) when the set is not here.

    For benchmarks, which need a fixed number of rows and must also run where ``../shared/data`` is absent.
    """
    try:
        texts = [p.text for p in load_prompts(source)]
    except DatasetError:
        if fallback is None:
            raise
        texts = [p.text for p in load_prompts(str(fallback))]
    return [texts[i % len(texts)] for i in range(n)]


def split(prompts: list[Prompt], held_out: float, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """A seeded train / held-out split (the profile records seed and sizes)."""
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    n_held = int(round(len(prompts) * held_out))
    held = sorted(order[:n_held])
    train = sorted(order[n_held:])
    return [prompts[i] for i in train], [prompts[i] for i in held]
