"""One error base: every field-carrying refusal is a SteerError naming the field; one pydantic → field helper."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from vllm_steer.calibration.interop import VectorImportError
from vllm_steer.calibration.pipeline import CalibrationError
from vllm_steer.core.errors import SteerError, field_and_message
from vllm_steer.core.profile import ProfileError
from vllm_steer.core.request import SteeringRequestError, parse_steering
from vllm_steer.evaluation.runner import EvalError


@pytest.mark.parametrize(
    "err, field, path, text",
    [
        (
            ProfileError("/p/profile.json", "defaults.angle", "required"),
            "defaults.angle",
            "/p/profile.json",
            "/p/profile.json: defaults.angle: required",
        ),
        (SteeringRequestError("steer_angle", "takes no angle"), "steer_angle", None, "steer_angle: takes no angle"),
        (
            VectorImportError("v.gguf", "direction.3", "is all zeros"),
            "direction.3",
            "v.gguf",
            "v.gguf: direction.3: is all zeros",
        ),
        (CalibrationError("layers", "[9] do not exist"), "layers", None, "layers: [9] do not exist"),
        (EvalError("offset", "200 leaves no prompts"), "offset", None, "offset: 200 leaves no prompts"),
    ],
)
def test_field_carrying_errors_share_the_base(err, field, path, text):
    assert isinstance(err, SteerError) and isinstance(err, ValueError)
    assert (err.field, err.path, str(err)) == (field, path, text)
    assert text.endswith(err.message)
    assert VectorImportError("v.gguf", "f", "m").source == "v.gguf"


class _Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self):
        if self.low > self.high:
            raise ValueError("low: is above high")
        return self


class _Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: list[int]
    inner: _Inner | None = None

    @model_validator(mode="after")
    def _cross(self):
        if self.inner is not None and len(self.keys) > 3:
            raise ValueError("keys: at most 3 with an inner")
        return self


def _first(raw) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        _Outer.model_validate(raw)
    return info.value


def test_field_and_message():
    not_int = "Input should be a valid integer, unable to parse string as an integer"
    assert field_and_message(_first({"keys": [1, "x"]})) == ("keys.1", not_int)
    assert field_and_message(_first({"keys": [1, 2, 3, 4], "inner": {"low": 0, "high": 1}})) == (
        "keys",
        "at most 3 with an inner",
    )
    assert field_and_message(_first({"keys": [], "inner": {"low": 2, "high": 1}})) == ("inner.low", "is above high")
    assert field_and_message(_first([])) == ("<root>", "Input should be a valid dictionary or instance of _Outer")
    assert field_and_message(_first([]), default="body")[0] == "body"
    two = _first({"keys": ["x", "y"]})
    assert field_and_message(two, count_more=True)[1].endswith("(and 1 more problem)")
    # depth: only the top-level key; a field name in the message stays there when the path has no room for it
    assert field_and_message(_first({"keys": [1, "x"]}), depth=1)[0] == "keys"
    assert field_and_message(_first({"keys": [], "inner": {"low": 2, "high": 1}}), depth=1) == (
        "inner",
        "low: is above high",
    )


def test_request_errors_name_the_request_key():
    with pytest.raises(SteeringRequestError) as info:
        parse_steering({"steer_profile": "p", "steer_layers": [1, "two"]})
    assert info.value.field == "steer_layers"
    assert info.value.message == "Input should be a valid integer"  # strict: no coercion
