"""The capability-retention sample and its scoring (pure Python, no engine)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from vllm_steer.evaluation.capability import (
    LETTERS,
    MCFormatError,
    MCItem,
    accuracy,
    default_sample_path,
    format_mc_prompt,
    load_mc_sample,
    score_from_logprobs,
    top_logprobs_from_vllm,
)

ITEM = MCItem(id="q1", question="What is 2 + 2?", choices=("3", "4", "5", "22"), answer=1)


def test_packaged_sample_loads_and_is_well_formed():
    items = load_mc_sample()
    assert len(items) >= 30
    assert len({it.id for it in items}) == len(items)
    for it in items:
        assert it.question.strip()
        assert 2 <= len(it.choices) <= 8
        assert all(c.strip() for c in it.choices)
        assert 0 <= it.answer < len(it.choices)
    # The packaged file is the one the README documents: 60 ARC-Easy validation items, first one verbatim.
    assert len(items) == 60
    assert {it.subject for it in items} == {"ARC-Easy"}
    first = items[0]
    assert first.id == "MCAS_2000_4_6"
    assert first.question == "Which technology was developed most recently?"
    assert first.choices == ("cellular telephone", "television", "refrigerator", "airplane")
    assert first.answer == 0 and first.answer_letter == "A"


def test_default_path_is_inside_the_package():
    p = default_sample_path()
    assert p.name == "mc_sample.jsonl" and p.parent.name == "data" and p.parent.parent.name == "vllm_steer"
    assert p.is_file()


def test_prompt_format_is_exact():
    assert format_mc_prompt(ITEM) == "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:"
    five = MCItem(id="x", question="Q?", choices=("a", "b", "c", "d", "e"), answer=4)
    assert format_mc_prompt(five).splitlines() == ["Q?", "A. a", "B. b", "C. c", "D. d", "E. e", "Answer:"]


def test_letters():
    assert LETTERS[:4] == "ABCD" and len(LETTERS) == 8


def test_scoring_takes_max_over_whitespace_variants():
    # " B" alone would lose to "A", but "B" (no space) is higher than both.
    lp = {" A": -1.0, "A": -3.0, " B": -2.0, "B": -0.5, "\nC": -4.0}
    assert score_from_logprobs(ITEM, lp) == (1, True)
    # A's best variant wins when it is the largest of all.
    lp = {"A": -3.0, " A": -0.2, " B": -1.0, "B": -0.9}
    assert score_from_logprobs(ITEM, lp) == (0, False)


def test_scoring_ignores_non_letters_and_letters_beyond_the_options():
    lp = {"The": -0.1, " E": -0.2, "a": -0.3, "A.": -0.4, " C": -2.0}
    assert score_from_logprobs(ITEM, lp) == (2, False)


def test_missing_letters_count_as_wrong():
    pred, ok = score_from_logprobs(ITEM, {"The": -0.1, " answer": -1.0, "E": -2.0})
    assert pred is None and ok is False
    assert score_from_logprobs(ITEM, {}) == (None, False)
    assert accuracy([score_from_logprobs(ITEM, {}), score_from_logprobs(ITEM, {" B": -1.0})]) == 0.5


def test_ties_go_to_the_earlier_letter_and_nan_is_ignored():
    assert score_from_logprobs(ITEM, {" D": -1.0, " B": -1.0}) == (1, True)
    assert score_from_logprobs(ITEM, {" A": math.nan, " C": -5.0}) == (2, False)


def test_top_logprobs_from_vllm_shape():
    lp = SimpleNamespace
    position = {
        10: lp(logprob=-0.5, decoded_token=" B"),
        11: lp(logprob=-0.1, decoded_token=" B"),  # a second id with the same text keeps the max
        12: lp(logprob=-2.0, decoded_token="A"),
        13: lp(logprob=-1.0, decoded_token=None),
    }
    assert top_logprobs_from_vllm(position) == {" B": -0.1, "A": -2.0}
    assert score_from_logprobs(ITEM, top_logprobs_from_vllm(position)) == (1, True)


def test_accuracy():
    assert accuracy([True, False, True, True]) == 0.75
    assert accuracy([(1, True), (None, False)]) == 0.5
    with pytest.raises(ValueError):
        accuracy([])


def _write(tmp_path, rows):
    p = tmp_path / "mc.jsonl"
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return p


GOOD = {"id": "g", "question": "Q?", "choices": ["x", "y"], "answer": 1}


@pytest.mark.parametrize(
    "bad, reason",
    [
        ({**GOOD, "id": "b", "answer": 2}, "out of range"),
        ({**GOOD, "id": "b", "answer": -1}, "out of range"),
        ({**GOOD, "id": "b", "answer": True}, "integer"),
        ({**GOOD, "id": "b", "choices": ["only one"], "answer": 0}, "2 to 8"),
        ({**GOOD, "id": "b", "choices": [str(i) for i in range(9)], "answer": 0}, "2 to 8"),
        ({**GOOD, "id": "b", "choices": ["x", ""]}, "non-empty"),
        ({"id": "b", "question": "Q?", "choices": ["x", "y"]}, "missing"),
        ({**GOOD, "id": "b", "question": " "}, "question"),
        ({**GOOD}, "duplicate id"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_bad_line_is_named(tmp_path, bad, reason):
    p = _write(tmp_path, [GOOD, "", bad])  # the bad row is on line 3 (a blank line 2 is skipped)
    with pytest.raises(MCFormatError) as exc:
        load_mc_sample(p)
    msg = str(exc.value)
    assert f"{p}:3:" in msg
    assert reason in msg


def test_custom_file_and_empty_file(tmp_path):
    items = load_mc_sample(_write(tmp_path, [GOOD, {**GOOD, "id": 7, "subject": "s"}]))
    assert [it.id for it in items] == ["g", "7"] and items[1].subject == "s"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(MCFormatError, match="no items"):
        load_mc_sample(empty)
