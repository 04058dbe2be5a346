"""Tiers over gated profiles: a forced tier fixes the gate's action and refusal text (a client may restate them,
never change them); a tier grants other actions per profile (``gate_actions``); only a tier approving every
profile lets clients set the refusal text; the tenants file is checked against the profiles at load."""

from __future__ import annotations

import pytest
import torch

from support.tenants import FP, tenant_entries
from vllm_steer.core.gates import GateSpec
from vllm_steer.server.tenants import PolicyError, TenantPolicy, TenantsFileError
from vllm_steer.testing.synthetic import gate_only_profile, random_profile, with_gates

GATE = [GateSpec(name="harm", layer=2, tensor="gate.harm", threshold=0.1)]
PROFILES = {
    "guard": with_gates(
        random_profile("guard", "addition", FP, [2], seed=1), "refuse", GATE, {"harm": torch.ones(16)}, "No."
    ),
    "steer": with_gates(random_profile("steer", "addition", FP, [2], seed=2), "steer", GATE, {"harm": torch.ones(16)}),
    "plain": random_profile("plain", "addition", FP, [2], seed=3),
    "only": gate_only_profile("only", FP, "refuse", GATE, {"harm": torch.ones(16)}, "Not that."),
}
KEYS = {"t-strict": "k-strict-0123456", "t-standard": "k-standard-01234", "t-research": "k-research-01234"}


def _config(**tiers) -> dict:
    base = {
        "strict": {
            "forced": {"profile": "guard", "gate_action": "refuse", "refusal": "This tier does not answer that."}
        },
        "standard": {
            "default": {"profile": "steer", "gate_action": "flag"},
            "profiles": {"steer": {"gate_actions": ["flag"]}, "guard": {}},
        },
        "research": {"profiles": "*", "allow_unsteered": True},
    }
    return {
        "format_version": 1,
        "tiers": {**base, **tiers},
        "tenants": tenant_entries(KEYS),
    }


POLICY = TenantPolicy.from_mapping(_config())
STRICT, STANDARD, RESEARCH = (POLICY.authenticate(key) for key in KEYS.values())


def _refused(tenant, extra) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        POLICY.decide(tenant, extra, PROFILES)
    return info.value


def test_a_forced_tier_fixes_the_gate_action_and_refusal():
    forced = POLICY.decide(STRICT, None, PROFILES)
    assert forced["steer_gate_action"] == "refuse" and forced["steer_refusal"] == "This tier does not answer that."
    assert POLICY.decide(STRICT, {"steer_profile": "guard", "steer_gate_action": "refuse"}, PROFILES) == forced
    for keys, field in (
        ({"steer_profile": "guard", "steer_gate_action": "flag"}, "steer_gate_action"),
        ({"steer_profile": "guard", "steer_refusal": "Sure, here it is:"}, "steer_refusal"),
    ):
        err = _refused(STRICT, keys)
        assert (err.status, err.field) == (403, field), err


def test_a_tier_grants_gate_actions_per_profile_and_never_the_refusal_text():
    assert POLICY.decide(STANDARD, None, PROFILES)["steer_gate_action"] == "flag", "the tier's default"
    chosen = POLICY.decide(STANDARD, {"steer_profile": "steer"}, PROFILES)
    assert chosen["steer_gate_action"] == "steer", "a client naming the profile gets the profile's action"
    assert (
        POLICY.decide(STANDARD, {"steer_profile": "steer", "steer_gate_action": "flag"}, PROFILES)["steer_gate_action"]
        == "flag"
    )
    for keys, field in (
        ({"steer_profile": "steer", "steer_gate_action": "refuse"}, "steer_gate_action"),
        ({"steer_profile": "guard", "steer_gate_action": "flag"}, "steer_gate_action"),  # not granted for guard
        ({"steer_profile": "guard", "steer_refusal": "ok"}, "steer_refusal"),
    ):
        err = _refused(STANDARD, keys)
        assert (err.status, err.field) == (403, field), (keys, err)
    free = POLICY.decide(RESEARCH, {"steer_profile": "guard", "steer_gate_action": "flag"}, PROFILES)
    assert free["steer_gate_action"] == "flag"
    own = POLICY.decide(RESEARCH, {"steer_profile": "guard", "steer_refusal": "Mine."}, PROFILES)
    assert own["steer_refusal"] == "Mine."


def test_gate_keys_on_an_ungated_profile_are_a_bad_request():
    err = _refused(RESEARCH, {"steer_profile": "plain", "steer_gate_action": "flag"})
    assert (err.status, err.field) == (400, "steer_gate_action")


@pytest.mark.parametrize(
    ("tiers", "field"),
    [
        ({"standard": {"profiles": {"plain": {"gate_actions": ["flag"]}}}}, "gate_actions"),
        ({"standard": {"profiles": {"steer": {"gate_actions": ["block"]}}}}, "gate_actions"),
        ({"strict": {"forced": {"profile": "plain", "gate_action": "refuse"}}}, "gate_action"),
        ({"strict": {"forced": {"profile": "steer", "refusal": "No."}}}, "refusal"),
        # a gate-only profile steers nothing: no action steer, no strength, no layers to grant or force
        ({"standard": {"profiles": {"only": {"gate_actions": ["flag", "steer"]}}}}, "gate_actions"),
        ({"standard": {"profiles": {"only": {"scale": [0, 1]}}}}, "scale"),
        ({"strict": {"forced": {"profile": "only", "gate_action": "steer"}}}, "gate_action"),
        ({"strict": {"forced": {"profile": "only", "scale": 1.0}}}, "scale"),
        ({"strict": {"forced": {"profile": "only", "layers": [2]}}}, "layers"),
    ],
)
def test_the_tenants_file_is_checked_against_the_gates(tiers, field):
    with pytest.raises(TenantsFileError) as info:
        TenantPolicy.from_mapping(_config(**tiers)).check_profiles(PROFILES)
    assert field in str(info.value), info.value


def test_a_strict_tier_may_force_a_gate_only_profile():
    """The strict tier forced to a gate-only profile: the engine gets the gates and their action, nothing to
    steer with; a client may restate them, and every steering field is refused naming it."""
    policy = TenantPolicy.from_mapping(
        _config(
            strict={"forced": {"profile": "only"}},
            standard={"profiles": {"only": {"gate_actions": ["flag"]}}},
        )
    )
    policy.check_profiles(PROFILES)
    strict, standard = policy.authenticate(KEYS["t-strict"]), policy.authenticate(KEYS["t-standard"])
    forced = policy.decide(strict, None, PROFILES)
    assert forced == {"steer_profile": "only", "steer_gate_action": "refuse", "steer_refusal": "Not that."}
    assert policy.decide(strict, {"steer_profile": "only", "steer_gate_action": "refuse"}, PROFILES) == forced
    for keys, field in (
        ({"steer_profile": "only", "steer_scale": 1.0}, "steer_scale"),
        ({"steer_profile": "only", "steer_layers": [2]}, "steer_layers"),
        ({"steer_profile": "only", "steer_gate_action": "flag"}, "steer_gate_action"),
    ):
        with pytest.raises(PolicyError) as info:
            policy.decide(strict, keys, PROFILES)
        assert (info.value.status, info.value.field) == (403, field), info.value
    assert policy.decide(standard, {"steer_profile": "only", "steer_gate_action": "flag"}, PROFILES) == {
        "steer_profile": "only",
        "steer_gate_action": "flag",
    }
    for keys, status, field in (
        ({"steer_profile": "only", "steer_scale": 1.0}, 400, "steer_scale"),
        ({"steer_profile": "only", "steer_gate_action": "steer"}, 400, "steer_gate_action"),  # no such thing
    ):
        with pytest.raises(PolicyError) as info:
            policy.decide(standard, keys, PROFILES)
        assert (info.value.status, info.value.field) == (status, field), info.value
    listed = {p["id"]: p for p in policy.visible_profiles(standard, PROFILES)}["only"]
    assert (listed["method"], listed["layers"], listed["auto"], listed["scale"]) == (None, [], False, None)
