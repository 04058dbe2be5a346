"""Which prompt sets ``vllm-steer eval`` scores as harmful and as harmless (no engine needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_steer.evaluation.runner import EvalConfig, EvalError, _load_sets


def _config(**kw) -> EvalConfig:
    return EvalConfig(model="m", profiles="p", targets=[], out=Path("out"), n=500, offset=0, **kw)


@pytest.mark.parametrize(("field", "kw"), [("harmful", {"harmful": "xstest"}), ("harmless", {"harmless": "xstest"})])
def test_a_set_with_both_classes_is_refused_naming_the_field(field, kw):
    with pytest.raises(EvalError) as info:
        _load_sets(_config(**kw))
    assert info.value.field == field
    assert "xstest-unsafe" in str(info.value) and "xstest-safe" in str(info.value)


def test_the_one_class_halves_of_xstest_are_accepted():
    harmful, harmless = _load_sets(_config(harmful="xstest-unsafe", harmless="xstest-safe"))
    assert len(harmful) == 200 and all(p.harmful for p in harmful)
    assert len(harmless) == 250 and all(p.harmful is False for p in harmless)


def test_unlabelled_sets_pass_as_before():
    harmful, harmless = _load_sets(_config())
    assert len(harmful) == 500 and len(harmless) == 500
