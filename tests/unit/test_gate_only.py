"""Gate-only profiles (``method: null``): the format (only gates that refuse or flag; every steering field refused
naming it), requests (every steering field refused, 400-style, naming the field), the runtime (gate sites only; a
fired refusing row forced, nothing steered), and the commands that need a steering method refusing one."""

from __future__ import annotations

import json

import pytest
import torch

from support.runtime import FP, D
from vllm_steer.core.gates import GateSpec
from vllm_steer.core.profile import PROFILE_FILE, ProfileError, ProfileSpec, load_profile, save_profile
from vllm_steer.core.request import SteeringRequestError, cache_salt, parse_steering, resolve_steering
from vllm_steer.engine.runtime import Site, SteeringRuntime, sites_for_profiles
from vllm_steer.testing.synthetic import gate_only_profile, random_profile

GATE = torch.nn.functional.normalize(torch.randn(D, generator=torch.Generator().manual_seed(5)), dim=0)
_OTHER = torch.randn(D, generator=torch.Generator().manual_seed(6))
ORTHOGONAL = torch.nn.functional.normalize(_OTHER - (_OTHER @ GATE) * GATE, dim=0)
GATES = [
    GateSpec(name="a", layer=1, tensor="gate.a", score="projection", threshold=0.5),
    GateSpec(name="b", layer=3, tensor="gate.b", score="cast", threshold=0.9),  # off-axis: never fires here
]
ONLY = gate_only_profile("only", FP, "refuse", GATES, {"a": GATE, "b": ORTHOGONAL}, refusal="no")
PROFILES = {
    "only": ONLY,
    "flagger": gate_only_profile("flagger", FP, "flag", GATES[:1], {"a": GATE}),
    "add": random_profile("add", "addition", FP, [1, 2], seed=1, vector_norm=3.0, scale=1.5),
}


def resolve(**keys):
    return resolve_steering(parse_steering({"steer_profile": "only", **keys}), PROFILES)


# ----------------------------------------------------------------- the format


def test_a_gate_only_profile_round_trips_and_has_nothing_that_steers(tmp_path):
    save_profile(tmp_path / "only", ONLY.spec, ONLY.vectors, ONLY.gate_vectors)
    raw = json.loads((tmp_path / "only" / PROFILE_FILE).read_text())
    assert (raw["method"], raw["layers"], raw["tensors"]) == (None, [], {})
    loaded = load_profile(tmp_path / "only")
    assert loaded.digest == ONLY.digest and loaded.vectors == {}
    assert loaded.spec.gate_only and not PROFILES["add"].spec.gate_only
    assert loaded.spec.hooks == () and loaded.spec.expected_roles() == ()
    assert torch.allclose(loaded.gate_vectors["b"], ORTHOGONAL)
    with pytest.raises(ValueError, match="gate-only"):
        _ = loaded.spec.method_spec
    assert PROFILES["add"].spec.method_spec.name == "addition"


def _edited(edit) -> dict:
    raw = ONLY.spec.model_dump()
    edit(raw)
    return raw


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda r: r.update(layers=[1]), "layers"),
        (lambda r: r.update(tensors={1: {"vector": "gate.a"}}), "tensors"),
        (lambda r: r.update(categories=["a"]), "categories"),
        (lambda r: r["defaults"].update(scale=1.0), "defaults.scale"),
        (lambda r: r["allowed"].update(angle={"min": 0, "max": 10}), "allowed.angle"),
        (lambda r: r.update(threshold=0.5), "threshold"),
        (lambda r: r.update(gating=None), "gating"),
        (lambda r: r["gating"].update(action="steer"), "gating.action"),
        (lambda r: r["gating"]["gates"][0].update(layer=4), "gating.gates.0.layer"),
        (lambda r: r["gating"]["gates"].append({**r["gating"]["gates"][0], "name": "r", "category": "x"}),
         "gating.gates.2.category"),
    ],
)  # fmt: skip
def test_a_gate_only_profile_refuses_what_would_steer_naming_the_field(tmp_path, edit, field):
    save_profile(tmp_path / "only", ONLY.spec, ONLY.vectors, ONLY.gate_vectors)
    (tmp_path / "only" / PROFILE_FILE).write_text(json.dumps(_edited(edit)))
    with pytest.raises(ProfileError) as info:
        load_profile(tmp_path / "only")
    assert info.value.field == field, info.value
    assert info.value.path.endswith(PROFILE_FILE)


def test_a_steering_profile_still_needs_a_layer():
    raw = PROFILES["add"].spec.model_dump() | {"layers": [], "tensors": {}}
    with pytest.raises(ValueError, match="layers: a addition profile steers at least one layer"):
        ProfileSpec.model_validate(raw)


# ----------------------------------------------------------------- requests


def test_a_request_gets_the_gates_and_nothing_else():
    r = resolve()
    assert (r.method, r.gated, r.gate_action, r.refusal, r.categories, r.layers) == (
        None,
        True,
        "refuse",
        "no",
        (),
        None,
    )
    flagged = resolve(steer_gate_action="flag")
    assert flagged.gate_action == "flag" and flagged.refusal is None and flagged.slot_key != r.slot_key
    assert resolve(steer_refusal="Not here.").refusal == "Not here."
    assert cache_salt(r, None, None, 5) != cache_salt(r, None, None, 6), "gated: the salt holds the prompt length"


@pytest.mark.parametrize(
    ("keys", "field"),
    [
        ({"steer_scale": 1.0}, "steer_scale"),
        ({"steer_angle": 10.0}, "steer_angle"),
        ({"steer_categories": ["a"]}, "steer_categories"),
        ({"steer_categories": "auto"}, "steer_categories"),
        ({"steer_layers": [1]}, "steer_layers"),
        ({"steer_gate_action": "steer"}, "steer_gate_action"),
        ({"steer_gate_action": "flag", "steer_refusal": "x"}, "steer_refusal"),
    ],
)
def test_steering_fields_on_a_gate_only_profile_are_refused_naming_the_field(keys, field):
    with pytest.raises(SteeringRequestError) as info:
        resolve(**keys)
    assert info.value.field == field, info.value
    assert "gate-only" in str(info.value) or field == "steer_refusal", info.value


# ----------------------------------------------------------------- the runtime

REFUSAL_IDS = {"no": [7, 8, 9]}
EOS, VOCAB = 2, 12


def test_only_gate_sites_are_hooked_for_it():
    assert sites_for_profiles({"only": ONLY}) == [Site(1, "layer_output"), Site(3, "layer_output")]


def test_a_fired_row_is_refused_and_no_row_is_steered():
    """Two gate-only rows (one fires: its state lies along gate ``a``), one flagging row that fires, one unsteered:
    no site's delta is ever non-zero; the fired refusing row is forced to the refusal, every other row's logits
    are untouched; each decision is recorded."""
    rt = SteeringRuntime(
        PROFILES,
        sites_for_profiles(PROFILES),
        hidden_size=D,
        max_slots=4,
        max_tokens=32,
        max_requests=4,
        tokenize=lambda text: REFUSAL_IDS[text],
    )
    rt.add_request("yes", resolve(), eos_token_id=EOS)
    rt.add_request("no", resolve(), eos_token_id=EOS)
    rt.add_request("flag", resolve_steering(parse_steering({"steer_profile": "flagger"}), PROFILES))
    states = {"yes": 3 * GATE, "no": -3 * GATE, "flag": 3 * GATE, "free": 3 * GATE}
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(0))
    sites = sorted(rt.site_ids, key=lambda s: s.layer)
    forced = []
    for step in range(4):
        count = 3 if step == 0 else 1
        rt.begin_step(list(states), [count] * 4, [0 if step == 0 else 2 + step] * 4, [3] * 4)
        h = torch.cat([states[r].expand(count, D) for r in states])
        for site in sites:
            assert not rt.delta(h, rt.site_ids[site]).any(), (site, "a gate-only profile steers nothing")
        out = rt.force_refusals(logits.clone())
        forced.append(int(out[0].argmax()))
        assert torch.equal(out[1:], logits[1:]), "the other rows untouched"
    assert forced == [7, 8, 9, EOS]
    assert [rt.decision(r).fired for r in ("yes", "no", "flag")] == [True, False, True]
    assert rt.decision("yes").scores["a"] == pytest.approx(1.0, abs=1e-5)


# ----------------------------------------------------------------- what needs a steering method


def test_commands_that_need_a_steering_method_refuse_a_gate_only_profile(tmp_path):
    from vllm_steer.calibration.interop import VectorImportError, export_vectors
    from vllm_steer.calibration.sweep import sweep_profile_dir
    from vllm_steer.evaluation.gates import ungated_profile, write_eval_profiles

    with pytest.raises(VectorImportError, match="gate-only"):
        export_vectors(ONLY)
    save_profile(tmp_path / "p" / "only", ONLY.spec, ONLY.vectors, ONLY.gate_vectors)
    with pytest.raises(ValueError, match="gate-only"):
        sweep_profile_dir(tmp_path / "p" / "only", "no-model", [1.0], ["a"], ["b"])  # refused before any engine
    with pytest.raises(ValueError, match="gate-only"):
        ungated_profile(ONLY)
    loaded = {"only": load_profile(tmp_path / "p" / "only")}
    assert write_eval_profiles(loaded, ["only"], tmp_path / "served") == {}, "its unconditional row is the unsteered"
    assert load_profile(tmp_path / "served" / "only").digest == ONLY.digest
