"""Gates (vllm_steer.core.gates): the two scores against independent formulas, the batched form against the
reference, the ``gating`` block's schema, and gated profiles on disk (bad files refused naming file and field)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from support.runtime import FP, D
from vllm_steer.core.gates import (
    MAX_GATES,
    SCORE_CODES,
    GateSpec,
    GatingSpec,
    batched_scores,
    gate_fires,
    gate_score,
)
from vllm_steer.core.profile import PROFILE_FILE, TENSORS_FILE, ProfileError, load_profile, save_profile
from vllm_steer.testing.synthetic import random_profile, with_gates


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------- scores


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.01, 100.0))
def test_cast_score_is_cast_formula(seed, scale):
    """CAST: cos(h, tanh(P h)) with the projector P = c cᵀ / (cᵀ c), for any length of c."""
    g = _gen(seed)
    h, c = torch.randn(D, generator=g, dtype=torch.float64), torch.randn(D, generator=g, dtype=torch.float64)
    projector = torch.outer(c, c) / (c @ c)
    v = torch.tanh(projector @ h)
    expected = float((h @ v) / (h.norm() * v.norm()))
    assert gate_score(h, c * scale, "cast").item() == pytest.approx(expected, abs=1e-5)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.01, 100.0))
def test_projection_score_is_the_cosine_and_scale_free(seed, scale):
    g = _gen(seed)
    h, c = torch.randn(D, generator=g), torch.randn(D, generator=g)
    cosine = torch.nn.functional.cosine_similarity(h, c, dim=0).item()
    assert gate_score(h, c, "projection").item() == pytest.approx(cosine, abs=1e-6)
    assert gate_score(h * scale, c, "projection").item() == pytest.approx(cosine, abs=1e-5)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 6), used=st.integers(1, MAX_GATES))
def test_batched_scores_equal_the_reference_per_row_and_gate(seed, k, used):
    g = _gen(seed)
    h = torch.randn(k, D, generator=g) * 5
    directions = torch.zeros(k, MAX_GATES, D)
    raw = torch.randn(k, used, D, generator=g)
    directions[:, :used] = raw / raw.norm(dim=-1, keepdim=True)
    codes = torch.randint(0, 2, (k, MAX_GATES), generator=g)
    out = batched_scores(h, directions, codes)
    assert out.shape == (k, MAX_GATES) and torch.isfinite(out).all()
    names = {v: n for n, v in SCORE_CODES.items()}
    for i in range(k):
        for j in range(used):
            ref = gate_score(h[i], directions[i, j], names[int(codes[i, j])])
            assert out[i, j].item() == pytest.approx(ref.item(), abs=1e-5)
    assert (out[:, used:] == 0).all(), "an unused gate scores 0, never NaN"


def test_gate_fires_both_ways_and_refuses_unknown():
    assert gate_fires(0.3, 0.2, ">") and not gate_fires(0.1, 0.2, ">")
    assert gate_fires(0.1, 0.2, "<") and not gate_fires(0.3, 0.2, "<")
    with pytest.raises(ValueError, match="comparison"):
        gate_fires(0.1, 0.2, ">=")
    with pytest.raises(ValueError, match="gate score"):
        gate_score(torch.ones(D), torch.ones(D), "dot")


# ----------------------------------------------------------------- schema


def _gate(**kw) -> dict:
    return {
        "name": "harm",
        "layer": 1,
        "tensor": "gate.harm",
        "score": "cast",
        "threshold": 0.1,
        "comparison": ">",
        **kw,
    }


def test_gating_block_schema():
    spec = GatingSpec.model_validate({"action": "refuse", "gates": [_gate(), _gate(name="b", layer=3, comparison="<")]})
    assert spec.layers == (1, 3) and spec.decided_after == 3
    for bad, where in (
        ({"action": "block", "gates": [_gate()]}, "action"),
        ({"action": "steer", "gates": []}, "gates"),
        ({"action": "steer", "gates": [_gate()] * 2}, "gates"),
        ({"action": "steer", "gates": [_gate(name=f"g{i}") for i in range(MAX_GATES + 1)]}, "gates"),
        ({"action": "steer", "gates": [_gate(threshold=float("nan"))]}, "threshold"),
        ({"action": "steer", "gates": [_gate(comparison=">=")]}, "comparison"),
        ({"action": "steer", "gates": [_gate(score="dot")]}, "score"),
        ({"action": "steer", "gates": [_gate(extra=1)]}, "extra"),
    ):
        with pytest.raises(ValidationError, match=where):
            GatingSpec.model_validate(bad)


# ----------------------------------------------------------------- profiles on disk


def _gated_profile(action="steer"):
    base = random_profile("gp", "addition", FP, [1, 2], seed=3)
    gates = [GateSpec(name="harm", layer=1, tensor="gate.harm", threshold=0.1)]
    return with_gates(base, action, gates, {"harm": torch.randn(D, generator=_gen(1)) * 7})


def test_gated_profile_round_trips_with_unit_directions(tmp_path):
    profile = _gated_profile()
    save_profile(tmp_path / "p", profile.spec, profile.vectors, profile.gate_vectors)
    loaded = load_profile(tmp_path / "p")
    assert loaded.spec.gating == profile.spec.gating and loaded.digest == profile.digest
    assert loaded.gate_vectors["harm"].norm().item() == pytest.approx(1.0, abs=1e-6)
    # another threshold is another profile (and another slot in the engine)
    raw = json.loads((tmp_path / "p" / PROFILE_FILE).read_text())
    raw["gating"]["gates"][0]["threshold"] = 0.2
    (tmp_path / "p" / PROFILE_FILE).write_text(json.dumps(raw))
    assert load_profile(tmp_path / "p").digest != profile.digest


def test_a_profile_without_gates_is_written_as_before(tmp_path):
    base = random_profile("plain", "addition", FP, [1], seed=3)
    save_profile(tmp_path / "p", base.spec, base.vectors)
    assert "gating" not in json.loads((tmp_path / "p" / PROFILE_FILE).read_text())
    assert load_profile(tmp_path / "p").digest == base.digest


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda g: g["gates"][0].update(threshold=math.nan), "gating.gates.0.threshold"),
        (lambda g: g["gates"][0].update(threshold=math.inf), "gating.gates.0.threshold"),
        (lambda g: g["gates"][0].update(layer=4), "gating.gates.0.layer"),
        (lambda g: g["gates"][0].update(layer=-1), "gating.gates.0.layer"),
        (lambda g: g.update(action="block"), "gating.action"),
        (lambda g: g["gates"][0].update(tensor="nope"), "gating.gates.0.tensor"),
        (lambda g: g["gates"][0].update(tensor="vector.1"), None),  # a steering tensor may be a gate's direction
        (lambda g: g["gates"].append({**g["gates"][0], "name": "r", "category": "harm"}), "gating.gates.1.category"),
        (lambda g: g["gates"][0].update(category="harm"), "gating.gates"),  # routing gates only: none decides
    ],
)
def test_bad_gating_refused_at_load_naming_file_and_field(tmp_path, edit, field):
    profile = _gated_profile()
    save_profile(tmp_path / "p", profile.spec, profile.vectors, profile.gate_vectors)
    path = tmp_path / "p" / PROFILE_FILE
    raw = json.loads(path.read_text())
    edit(raw["gating"])
    path.write_text(json.dumps(raw))  # json writes NaN / Infinity, which Python's reader takes back
    if field is None:
        assert load_profile(tmp_path / "p").spec.gating.gates[0].tensor == "vector.1"
        return
    with pytest.raises(ProfileError) as err:
        load_profile(tmp_path / "p")
    assert err.value.field == field, err.value
    assert err.value.path is not None and err.value.path.endswith((PROFILE_FILE, TENSORS_FILE))


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (torch.zeros(D), "all zeros"),
        (torch.full((D,), math.nan), "NaN"),
        (torch.ones(D + 1), "shape"),
    ],
)
def test_bad_gate_tensors_refused_naming_the_gate(tmp_path, tensor, message):
    from safetensors.torch import load_file, save_file

    profile = _gated_profile()
    save_profile(tmp_path / "p", profile.spec, profile.vectors, profile.gate_vectors)
    stored = load_file(str(tmp_path / "p" / TENSORS_FILE))
    stored["gate.harm"] = tensor
    save_file(stored, str(tmp_path / "p" / TENSORS_FILE))
    with pytest.raises(ProfileError, match=message) as err:
        load_profile(tmp_path / "p")
    assert err.value.field == "gating.gates.0.tensor" and err.value.path.endswith(TENSORS_FILE)


def test_routing_gates_name_categories_of_their_profile_beside_a_deciding_gate(tmp_path):
    base = random_profile("cp", "category", FP, [1, 2], seed=3, categories=("a", "b"))
    gates = [GateSpec(name="harm", layer=1, tensor="gate.harm", threshold=0.1)]
    gates += [GateSpec(name=n, layer=1, tensor=f"gate.{n}", threshold=0.1, category=n) for n in ("a", "b")]
    directions = {n: torch.randn(D, generator=_gen(i)) for i, n in enumerate(("harm", "a", "b"))}
    profile = with_gates(base, "steer", gates, directions)
    assert profile.spec.gating.routes == ("a", "b")
    assert [g.name for g in profile.spec.gating.deciding] == ["harm"]
    save_profile(tmp_path / "p", profile.spec, profile.vectors, profile.gate_vectors)
    path = tmp_path / "p" / PROFILE_FILE
    assert load_profile(tmp_path / "p").digest == profile.digest
    for edit, field, text in (
        (lambda g: g["gates"][2].update(category="c"), "gating.gates.2.category", "not a category"),
        (lambda g: g["gates"][0].update(category="a"), "gating.gates", "add a gate without a category"),
    ):
        raw = json.loads(path.read_text())
        edit(raw["gating"])
        path.write_text(json.dumps(raw))
        with pytest.raises(ProfileError, match=text) as err:
            load_profile(tmp_path / "p")
        assert err.value.field == field, err.value
        save_profile(tmp_path / "p", profile.spec, profile.vectors, profile.gate_vectors)


def test_only_deciding_gates_fire_and_route_of_picks_the_largest_routing_margin_fired_or_not():
    from vllm_steer.core.gates import fired_gates, margin, route_of

    gating = GatingSpec.model_validate(
        {
            "action": "steer",
            "gates": [
                _gate(name="harm", threshold=0.3),
                _gate(name="low", threshold=0.1, comparison="<"),
                _gate(name="a", threshold=0.2, category="A"),
                _gate(name="b", threshold=0.5, category="B"),
                _gate(name="c", threshold=-0.1, comparison="<", category="C"),
            ],
        }
    )
    assert margin(gating.gates[1], 0.0) == pytest.approx(0.1) and margin(gating.gates[0], 0.2) == pytest.approx(-0.1)
    assert fired_gates(gating, {"harm": 0.4, "low": 0.2, "a": 0.9}) == ["harm"]
    assert fired_gates(gating, {"harm": 0.4, "low": 0.0}) == ["harm", "low"]
    assert fired_gates(gating, {"harm": 0.2, "low": 0.2, "a": 0.9, "b": 0.9, "c": -0.9}) == [], "routing never fires"
    assert fired_gates(gating, {"harm": math.nan}) == [], "a missing or NaN score never fires"
    assert route_of(gating, {"a": 0.6, "b": 0.95, "c": 0.0}) == "B"  # margins 0.4, 0.45, -0.1
    assert route_of(gating, {"a": 0.6, "b": 0.55, "c": -0.7}) == "C"  # margins 0.4, 0.05, 0.6
    assert route_of(gating, {"a": -0.5, "b": 0.1, "c": 0.5}) == "B", "none fires (-0.7, -0.4, -0.6): the largest"
    assert route_of(gating, {"a": math.nan, "b": -2.0}) == "B", "a missing or NaN score never routes"
    assert route_of(gating, {"harm": 0.9}) is None, "no routing score"
    tied = [_gate(name="h"), _gate(name="x", layer=2, threshold=0.0, category="X")]
    tied.append(_gate(name="y", layer=1, threshold=0.0, category="Y"))
    shallow = GatingSpec.model_validate({"action": "steer", "gates": tied})
    assert route_of(shallow, {"x": 0.25, "y": 0.25}) == "Y", "ties: the shallower gate, as the engine reads them"
    plain = GatingSpec.model_validate({"action": "steer", "gates": [_gate()]})
    assert plain.routes == () and route_of(plain, {"harm": 0.9}) is None
