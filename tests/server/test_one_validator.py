"""One request validator: the same `steer_*` keys get the same verdict offline (core.request, what the engine
runs) and served (the tenant policy, before the engine) — same limits, same field, same message."""

from __future__ import annotations

import pytest

from vllm_steer.core.profile import ModelFingerprint
from vllm_steer.core.request import (
    MAX_CATEGORIES,
    MAX_LAYERS,
    SteeringRequestError,
    parse_steering,
    resolve_steering,
)
from vllm_steer.server.tenants import PolicyError, TenantPolicy, hash_api_key
from vllm_steer.testing.synthetic import random_profile

DEEP = ModelFingerprint(architecture="LlamaForCausalLM", hidden_size=8, num_layers=MAX_LAYERS)
CATEGORIES = tuple(f"c{i}" for i in range(MAX_CATEGORIES))
PROFILES = {
    "deep": random_profile("deep", "addition", DEEP, range(MAX_LAYERS), seed=1, scale=1.0),
    "cats": random_profile("cats", "category", DEEP, [0], seed=2, scale=1.0, categories=CATEGORIES),
    "rot": random_profile("rot", "selective", DEEP, [1, 2, 3], seed=3, angle=90.0),
}
KEY = "key-research-0123456789"
POLICY = TenantPolicy.from_mapping(
    {
        "format_version": 1,
        "tiers": {"research": {"profiles": "*", "allow_layers_override": True, "allow_unsteered": True}},
        "tenants": [{"name": "lab", "tier": "research", "key_hash": hash_api_key(KEY)}],
    }
)
RESEARCH = POLICY.authenticate(KEY)

CASES = {
    "1024 layers": {"steer_profile": "deep", "steer_layers": list(range(MAX_LAYERS))},
    "1023 layers": {"steer_profile": "deep", "steer_layers": list(range(1, MAX_LAYERS))},
    "1025 layers": {"steer_profile": "deep", "steer_layers": list(range(MAX_LAYERS + 1))},
    "bare-int layer": {"steer_profile": "deep", "steer_layers": 7},
    "bare-int layer of another profile": {"steer_profile": "rot", "steer_layers": 0},
    "repeated layers": {"steer_profile": "rot", "steer_layers": [1, 1]},
    "256 categories": {"steer_profile": "cats", "steer_categories": list(CATEGORIES)},
    "257 categories": {"steer_profile": "cats", "steer_categories": [*CATEGORIES, "c0"]},
    "one category as a string": {"steer_profile": "cats", "steer_categories": "c3"},
    "unknown steer_ key": {"steer_profile": "rot", "steer_angel": 90},
    "steer_ key in capitals": {"steer_profile": "rot", "STEER_ANGLE": 90},
    "angle as a string": {"steer_profile": "rot", "steer_angle": "90"},
    "angle as a bool": {"steer_profile": "rot", "steer_angle": True},
    "angle NaN": {"steer_profile": "rot", "steer_angle": float("nan")},
    "scale as a list": {"steer_profile": "deep", "steer_scale": [1.0]},
    "profile as an int": {"steer_profile": 7},
    "empty profile": {"steer_profile": ""},
    "no profile": {"steer_angle": 90},
    "layers as a string": {"steer_profile": "rot", "steer_layers": "1"},
    "layers of floats": {"steer_profile": "rot", "steer_layers": [1.5]},
    "layers of bools": {"steer_profile": "rot", "steer_layers": [True]},
    "negative layer": {"steer_profile": "rot", "steer_layers": [-1]},
    "empty layers": {"steer_profile": "rot", "steer_layers": []},
    "categories as an int": {"steer_profile": "cats", "steer_categories": 5},
    "categories of ints": {"steer_profile": "cats", "steer_categories": [5]},
    "angle for an additive profile": {"steer_profile": "deep", "steer_angle": 90.0},
    "unknown profile": {"steer_profile": "nope"},
    "angle out of range": {"steer_profile": "rot", "steer_angle": 361.0},
}


def _offline(extra):
    try:
        request = parse_steering(extra)
        return ("admitted", resolve_steering(request, PROFILES))
    except SteeringRequestError as err:
        return ("refused", err.field, err.message)


def _served(extra):
    try:
        forwarded = POLICY.decide(RESEARCH, extra, PROFILES)
    except PolicyError as err:
        assert err.status == 400, "a request no profile could take is malformed for every tier"
        return ("refused", err.field, err.message)
    return ("admitted", resolve_steering(parse_steering(forwarded), PROFILES))  # what the engine then runs


@pytest.mark.parametrize("extra", CASES.values(), ids=CASES.keys())
def test_same_verdict_offline_and_served(extra):
    assert _served(extra) == _offline(extra)


def test_the_limits_are_core_s_and_the_verdicts_are_the_expected_ones():
    verdicts = {name: _offline(extra)[0] for name, extra in CASES.items()}
    assert {name for name, v in verdicts.items() if v == "admitted"} == {
        "1024 layers",
        "1023 layers",
        "bare-int layer",
        "256 categories",
        "one category as a string",
    }
    assert _offline(CASES["1025 layers"])[1] == "steer_layers"
    assert _offline(CASES["257 categories"])[1] == "steer_categories"
    assert _offline(CASES["bare-int layer"])[1].layers == (7,)


@pytest.mark.parametrize("tier, status", [("strict", 403), ("standard", 403), ("research", 200)])
def test_a_bare_int_layer_is_a_layer_override_under_every_tier(tier, status):
    policy = TenantPolicy.from_mapping(
        {
            "format_version": 1,
            "tiers": {
                "strict": {"forced": {"profile": "rot", "angle": 90.0}},
                "standard": {"profiles": {"rot": {}}},
                "research": {"profiles": "*", "allow_layers_override": True},
            },
            "tenants": [
                {"name": t, "tier": t, "key_hash": hash_api_key(f"key-{t}-0123456789")}
                for t in ("strict", "standard", "research")
            ],
        }
    )
    tenant = policy.authenticate(f"key-{tier}-0123456789")
    extra = {"steer_profile": "rot", "steer_angle": 90.0, "steer_layers": 2}
    if status == 200:
        assert policy.decide(tenant, extra, PROFILES)["steer_layers"] == [2]
    else:
        with pytest.raises(PolicyError) as err:
            policy.decide(tenant, extra, PROFILES)
        assert (err.value.status, err.value.field) == (status, "steer_layers")
    restated = {"steer_profile": "rot", "steer_layers": [3, 2, 1]}  # the profile's own layers: a restatement
    if tier == "strict":
        assert policy.decide(tenant, restated, PROFILES) == {"steer_profile": "rot", "steer_angle": 90.0}
