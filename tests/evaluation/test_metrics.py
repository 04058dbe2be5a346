"""The §5 metrics against hand-computed values (docs/methods.md §5.2–5.6)."""

from __future__ import annotations

import math
import zlib

import pytest

from vllm_steer.evaluation.metrics import (
    PERPLEXITY_VIOLATION,
    compression_ratio,
    is_refusal,
    ngram_repetition,
    perplexity_from_logprobs,
    unicode_score,
)


def test_refusal_is_lowercased_containment_of_the_selective_steering_list():
    assert is_refusal("Well... I'M SORRY, no.")
    assert is_refusal("sure! as an AI I will")  # anywhere, any case
    assert not is_refusal("I’m sorry")  # curly apostrophe does not match (§5.2)
    assert not is_refusal("Here is how to bake bread.")
    assert not is_refusal("")


def test_perplexity_is_exp_of_mean_negative_logprob():
    assert perplexity_from_logprobs([math.log(0.5), math.log(0.25)]) == pytest.approx(
        math.exp((math.log(2) + math.log(4)) / 2)
    )
    assert perplexity_from_logprobs([0.0, 0.0]) == 1.0
    assert math.isnan(perplexity_from_logprobs([]))
    assert PERPLEXITY_VIOLATION == 2.0


def test_unicode_score_counts_ascii_and_latin_only():
    assert unicode_score("abc") == 1.0
    assert unicode_score("   ") == 1.0  # no non-whitespace characters
    assert unicode_score("café") == 1.0  # LATIN SMALL LETTER E WITH ACUTE
    assert unicode_score("ab—") == pytest.approx(2 / 3)  # EM DASH is contamination
    assert unicode_score("a 中") == pytest.approx(1 / 2)
    assert unicode_score("a\u00a0b") == 1.0  # no-break space is whitespace


def test_compression_ratio_is_zlib_level_9_over_utf8_bytes():
    assert compression_ratio("hello") == pytest.approx(13 / 5)
    assert compression_ratio("") == 1.0
    text = "na " * 100
    assert compression_ratio(text) == pytest.approx(len(zlib.compress(text.encode(), 9)) / len(text.encode()))
    assert compression_ratio(text) < 0.1


def test_ngram_repetition_is_the_share_of_repeated_word_4grams():
    assert ngram_repetition("a b c") == 0.0  # fewer than 4 words
    assert ngram_repetition("a b c d") == 0.0  # one 4-gram
    assert ngram_repetition("a b c d a b c d") == pytest.approx(1 / 5)  # 5 grams, 4 distinct
    assert ngram_repetition("x x x x x x") == pytest.approx(2 / 3)  # 3 grams, 1 distinct
    assert ngram_repetition("A b c d a b c d") == 0.0  # case kept
