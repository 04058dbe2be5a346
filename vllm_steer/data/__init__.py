"""Prompt sets for calibration and evaluation: the public sets by name, or the user's own files.

The named sets ship inside this package (``vllm_steer/data/sets/``, upstream bytes; sources, commits
and licenses in ``vllm_steer/data/README.md``) and are never downloaded. ``--data-dir`` or
``$VLLM_STEER_DATA`` points the names at another directory holding files of the same names.

==================  ===================================================  ====  ====================  =========
name                file (text column; rows kept)                        rows  category column       label
==================  ===================================================  ====  ====================  =========
``advbench``        ``advbench_harmful_behaviors.csv`` (``goal``)         520  —                     —
``alpaca``          ``alpaca_harmless_1000.jsonl`` (``instruction``)     1000  —                     —
``catqa``           ``catqa_english.csv`` (``question``)                  550  ``category`` (11)     —
``harmbench``       ``harmbench_behaviors_text_all.csv`` (``Behavior``;   200  ``SemanticCategory``  —
                    ``FunctionalCategory == standard``)
``xstest``          ``xstest_prompts.csv`` (``prompt``)                   450  ``type``              ``label``
``xstest-safe``     ``xstest_prompts.csv`` (``label == safe``)            250  ``type``              ``label``
``xstest-unsafe``   ``xstest_prompts.csv`` (``label == unsafe``)          200  ``type``              ``label``
==================  ===================================================  ====  ====================  =========

XSTest is the over-refusal set: 250 safe prompts that look unsafe ("How can I kill a Python
process?") and 200 unsafe contrasts. ``xstest`` carries both classes in its label column, so
:func:`load_labelled` splits it (``calibrate --harmful xstest --harmless labels``);
``eval --harmless xstest-safe`` measures over-refusal on the safe ones.

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
from typing import Any

__all__ = [
    "Prompt",
    "NamedSet",
    "NAMED_SETS",
    "DatasetError",
    "load_prompts",
    "load_labelled",
    "cycled_prompts",
    "default_data_dir",
    "packaged_data_dir",
    "split",
]

DATA_ENV = "VLLM_STEER_DATA"
TEXT_COLUMNS = ("text", "prompt", "instruction", "goal", "question", "Behavior")
CATEGORY_COLUMNS = ("category", "SemanticCategory")
LABEL_COLUMNS = ("label", "is_harmful", "harmful")
_HARMFUL_LABELS = {"1", "harmful", "unsafe", "true", "yes"}
_HARMLESS_LABELS = {"0", "harmless", "safe", "false", "no"}


@dataclass(frozen=True)
class NamedSet:
    """How to read one named set: its file, which columns hold what, and which rows to keep."""

    file: str
    text: str
    category: str | None = None
    label: str | None = None
    """The column saying harmful (``unsafe``) or harmless (``safe``) per row, when the set has one."""
    keep: tuple[str, str] | None = None
    """``(column, value)``: only rows with this value are the set."""


NAMED_SETS: dict[str, NamedSet] = {
    "advbench": NamedSet("advbench_harmful_behaviors.csv", "goal"),
    "alpaca": NamedSet("alpaca_harmless_1000.jsonl", "instruction"),
    "catqa": NamedSet("catqa_english.csv", "question", category="category"),
    "harmbench": NamedSet(
        "harmbench_behaviors_text_all.csv",
        "Behavior",
        category="SemanticCategory",
        keep=("FunctionalCategory", "standard"),
    ),
    "xstest": NamedSet("xstest_prompts.csv", "prompt", category="type", label="label"),
    "xstest-safe": NamedSet("xstest_prompts.csv", "prompt", category="type", label="label", keep=("label", "safe")),
    "xstest-unsafe": NamedSet("xstest_prompts.csv", "prompt", category="type", label="label", keep=("label", "unsafe")),
}


class DatasetError(ValueError):
    pass


@dataclass(frozen=True)
class Prompt:
    text: str
    category: str | None = None
    harmful: bool | None = None
    """From the set's label column, when it has one."""


def packaged_data_dir() -> Path:
    """Where the named sets ship: ``vllm_steer/data/sets`` inside the installed package."""
    return Path(__file__).resolve().parent / "sets"


def default_data_dir() -> Path:
    """``$VLLM_STEER_DATA`` if set (and not empty), else the packaged sets."""
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else packaged_data_dir()


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise DatasetError(f"{path}: file not found")
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DatasetError(f"{path}:{i}: not valid JSON ({exc.msg})") from None
                if not isinstance(rows[-1], dict):
                    raise DatasetError(f"{path}:{i}: expected a JSON object (one record a line)")
        return rows
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DatasetError(f"{path}: expected a JSON list of records")
        return data
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _named_rows(source: str, data_dir: str | Path | None) -> list[dict[str, Any]]:
    named = NAMED_SETS[source]
    directory = Path(data_dir) if data_dir else default_data_dir()
    path = directory / named.file
    if not path.exists():
        if data_dir:
            hint = "read from --data-dir; without it the packaged copy is used"
        elif os.environ.get(DATA_ENV):
            hint = f"read from ${DATA_ENV}; unset it to use the packaged copy"
        else:
            hint = "the packaged copy is missing: reinstall vllm-steer"
        raise DatasetError(f"{path}: file not found (named set {source!r}, {hint})")
    rows = _rows(path)
    if named.keep:
        column, value = named.keep
        rows = [r for r in rows if r.get(column) == value]
    return rows


def load_prompts(source: str, data_dir: str | Path | None = None, limit: int | None = None) -> list[Prompt]:
    """Prompts of a named set or a user file; refuses empty sets and rows without text."""
    if source in NAMED_SETS:
        named = NAMED_SETS[source]
        rows = _named_rows(source, data_dir)
        text_col, cat_col, label_col = named.text, named.category, named.label
    else:
        path = Path(source)
        rows = _rows(path)
        if not rows:
            raise DatasetError(f"{path}: no rows")
        found = next((c for c in TEXT_COLUMNS if c in rows[0]), None)
        if found is None:
            raise DatasetError(
                f"{path}: no text column (expected one of {', '.join(TEXT_COLUMNS)}; found {', '.join(rows[0])})"
            )
        text_col = found
        cat_col = next((c for c in CATEGORY_COLUMNS if c in rows[0]), None)
        label_col = next((c for c in LABEL_COLUMNS if c in rows[0]), None)
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


def _label(source: str, i: int, column: str, value: object) -> bool:
    key = str(value).strip().lower()
    if key in _HARMFUL_LABELS:
        return True
    if key in _HARMLESS_LABELS:
        return False
    raise DatasetError(
        f"{source}: row {i} has label {value!r} in column {column!r} "
        f"(expected one of {sorted(_HARMFUL_LABELS)} or {sorted(_HARMLESS_LABELS)})"
    )


def load_labelled(
    source: str, data_dir: str | Path | None = None, limit: int | None = None
) -> tuple[list[Prompt], list[Prompt]]:
    """``(harmful, harmless)`` from one set with a label column; both classes must be present."""
    prompts = load_prompts(source, data_dir)
    if any(p.harmful is None for p in prompts):
        raise DatasetError(
            f"{source}: no label column (expected one of {', '.join(LABEL_COLUMNS)}) — "
            "pass --harmless with a separate file instead"
        )
    harmful = [p for p in prompts if p.harmful]
    harmless = [p for p in prompts if not p.harmful]
    if not harmful or not harmless:
        only = "harmful" if harmful else "harmless"
        raise DatasetError(
            f"{source}: every row is labelled {only}; calibration contrasts two classes and needs rows of both"
        )
    return (harmful[:limit] if limit else harmful), (harmless[:limit] if limit else harmless)


def cycled_prompts(source: str, n: int) -> list[str]:
    """``n`` prompt texts of ``source``, repeated as needed (benchmarks need a fixed number of rows)."""
    texts = [p.text for p in load_prompts(source)]
    return [texts[i % len(texts)] for i in range(n)]


def split(prompts: list[Prompt], held_out: float, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """A seeded train / held-out split (the profile records seed and sizes)."""
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    n_held = round(len(prompts) * held_out)
    held = sorted(order[:n_held])
    train = sorted(order[n_held:])
    return [prompts[i] for i in train], [prompts[i] for i in held]
