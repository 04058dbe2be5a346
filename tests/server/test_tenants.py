"""Tenant tiers: the tenants file schema, API-key hashing, per-tier decisions, discovery, concurrency."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vllm_steer.server.tenants.keys as keys_module
from support import REPO
from support.tenants import KEYS, POLICY, PROFILES, tenants_config
from vllm_steer.core.profile import load_profile_dir
from vllm_steer.core.request import MAX_CATEGORIES, MAX_LAYERS
from vllm_steer.server.tenants import (
    PolicyError,
    TenantPolicy,
    TenantsFileError,
    bearer_token,
    generate_api_key,
    hash_api_key,
)

EXAMPLE = REPO / "deploy" / "tenants.example.yaml"
STRICT, STANDARD, RESEARCH = (POLICY.authenticate(KEYS[name]) for name in KEYS)
TIERS = {"strict": STRICT, "standard": STANDARD, "research": RESEARCH}
FORCED = {"steer_profile": "refusal", "steer_scale": 1.0}


def _decide(tenant, extra, policy=POLICY, profiles=PROFILES):
    return policy.decide(tenant, extra, profiles)


def _refused(tenant, extra, policy=POLICY, profiles=PROFILES) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        policy.decide(tenant, extra, profiles)
    return info.value


# ------------------------------------------------------------------------- schema


def _mutated(mutate) -> dict:
    config = copy.deepcopy(tenants_config())
    mutate(config)
    return config


def _set(path: str, value):
    def mutate(config):
        node = config
        *parents, last = path.split("/")
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


def _dup_tenant(field: str):
    def mutate(config):
        twin = dict(config["tenants"][0])
        if field == "name":
            twin["key_hash"] = hash_api_key("another-key")
        config["tenants"].append(twin)

    return mutate


SCHEMA_CASES = [
    (_set("tenants/0/tier", "gold"), "tenants.0.tier", "unknown tier 'gold'"),
    (_set("tenants/0/key_hash", "key-strict-0123"), "tenants.0.key_hash", "hash-key"),
    (_set("tenants/0/key_hash", "sha256$zz$12"), "tenants.0.key_hash", "malformed key hash"),
    (_set("tiers/strict/default", {"profile": "refusal"}), "tiers.strict.default", "mutually exclusive"),
    (_set("tiers/strict/allow_unsteered", True), "tiers.strict.allow_unsteered", "opt out"),
    (_set("tiers/strict/profiles", {"sel": {}}), "tiers.strict.profiles", "forced"),
    (_set("tiers/standard/profiles/sel/angle", [210, 150]), "tiers.standard.profiles.sel.angle", "greater than"),
    (_set("tiers/standard/profiles/sel/angle", [150, float("nan")]), "tiers.standard.profiles.sel.angle.1", "finite"),
    (_set("tiers/standard/profiles/sel/angle", [150, 160, 170]), "tiers.standard.profiles.sel.angle", "at most 2"),
    (_set("tiers/standard/profiles/sel/angel", [150, 160]), "tiers.standard.profiles.sel.angel", "Extra inputs"),
    (_set("tiers/standard/max_concurrent", 3), "tiers.standard.max_concurrent", "Extra inputs"),
    (_set("tiers/standard/max_concurrent_steered", 0), "tiers.standard.max_concurrent_steered", "greater than"),
    (_set("tiers/standard/default/profile", "ang"), "tiers.standard.default.profile", "not among"),
    (_set("tiers/research/profiles", "all"), "tiers.research.profiles", "'*' or a mapping"),
    (_set("tiers/research/allow_unsteered", "yes"), "tiers.research.allow_unsteered", "valid boolean"),
    (_set("owner", "me"), "owner", "Extra inputs"),
    (_set("format_version", 2), "format_version", "1"),
    (_dup_tenant("name"), "tenants.3.name", "duplicate tenant name"),
]


@pytest.mark.parametrize("mutate,field,fragment", SCHEMA_CASES)
def test_schema_errors_name_the_field(mutate, field, fragment):
    with pytest.raises(TenantsFileError) as info:
        TenantPolicy.from_mapping(_mutated(mutate))
    assert info.value.field == field
    assert fragment in str(info.value)


def test_duplicate_key_hash_is_refused():
    def mutate(config):
        config["tenants"].append({"name": "copycat", "tier": "research", "key_hash": config["tenants"][0]["key_hash"]})

    with pytest.raises(TenantsFileError) as info:
        TenantPolicy.from_mapping(_mutated(mutate))
    assert info.value.field == "tenants.3.key_hash"
    assert "acme-strict" in str(info.value)


def test_plain_text_key_is_not_echoed_in_the_error():
    with pytest.raises(TenantsFileError) as info:
        TenantPolicy.from_mapping(_mutated(_set("tenants/0/key_hash", "super-secret-plain-key")))
    assert "super-secret-plain-key" not in str(info.value)


def test_allow_unsteered_defaults_to_whether_the_operator_chose_a_setting():
    tiers = POLICY.tiers
    assert tiers["strict"].allow_unsteered is False
    config = tenants_config()
    del config["tiers"]["standard"]["allow_unsteered"]
    config["tiers"]["open"] = {"profiles": {"sel": {}}}
    tiers = TenantPolicy.from_mapping(config).tiers
    assert tiers["standard"].allow_unsteered is False
    assert tiers["open"].allow_unsteered is True


def test_yaml_with_a_repeated_key_is_refused(tmp_path):
    path = tmp_path / "tenants.yaml"
    path.write_text(EXAMPLE.read_text().replace("tiers:\n", "tiers:\n  research: {profiles: '*'}\n", 1))
    with pytest.raises(TenantsFileError) as info:
        TenantPolicy.from_file(path)
    assert "duplicate key 'research'" in str(info.value)


def test_json_file_loads_and_refuses_repeated_keys(tmp_path):
    good = tmp_path / "tenants.json"
    good.write_text(json.dumps(tenants_config()))
    assert TenantPolicy.from_file(good).authenticate(KEYS["beta-standard"]).tier_name == "standard"
    bad = tmp_path / "bad.json"
    bad.write_text('{"format_version": 1, "format_version": 1}')
    with pytest.raises(TenantsFileError, match="duplicate key 'format_version'"):
        TenantPolicy.from_file(bad)


def test_missing_and_empty_files_are_refused(tmp_path):
    with pytest.raises(TenantsFileError, match="not found"):
        TenantPolicy.from_file(tmp_path / "nope.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(TenantsFileError) as info:
        TenantPolicy.from_file(empty)
    assert info.value.field == "<root>"


# ------------------------------------------------------------------------- keys


def test_hash_round_trip_and_format():
    key = generate_api_key()
    stored = hash_api_key(key)
    scheme, salt, digest = stored.split("$")
    assert scheme == "sha256" and len(bytes.fromhex(salt)) == 16 and len(digest) == 64
    assert hash_api_key(key) != stored  # a fresh salt each time
    assert hash_api_key(key, bytes.fromhex(salt)) == stored
    config = tenants_config()
    config["tenants"].append({"name": "new", "tier": "research", "key_hash": stored})
    assert TenantPolicy.from_mapping(config).authenticate(key).name == "new"


def test_generated_keys_are_long_and_distinct():
    keys = {generate_api_key() for _ in range(50)}
    assert len(keys) == 50
    assert all(len(k) >= 40 for k in keys)


@pytest.mark.parametrize("name", list(KEYS))
def test_each_key_authenticates_its_own_tenant(name):
    tenant = POLICY.authenticate(KEYS[name])
    assert tenant.name == name and tenant.tier_name == name.split("-")[1]


@pytest.mark.parametrize("key", [None, "", "key-strict-012", "key-strict-01234", "KEY-STRICT-0123", "x" * 10_000, 42])
def test_wrong_or_missing_key_is_401(key):
    with pytest.raises(PolicyError) as info:
        POLICY.authenticate(key)
    assert info.value.status == 401 and info.value.field == "authorization"
    assert info.value.to_openai()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("key", [KEYS["acme-strict"], KEYS["gamma-research"], "unknown-key"])
def test_every_tenant_is_compared(monkeypatch, key):
    calls = []
    real = keys_module.hmac.compare_digest

    def counting(a, b):
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(keys_module.hmac, "compare_digest", counting)
    with contextlib.suppress(PolicyError):
        POLICY.authenticate(key)
    assert len(calls) == len(KEYS)


@pytest.mark.parametrize(
    "header,token",
    [("Bearer abc", "abc"), ("bearer  abc ", "abc"), ("Basic abc", None), ("Bearer", None), (None, None), ("", None)],
)
def test_bearer_token(header, token):
    assert bearer_token(header) == token


# ------------------------------------------------------------------------- strict tier


def test_strict_applies_the_forced_setting_when_no_field_is_given():
    assert _decide(STRICT, None) == FORCED
    assert _decide(STRICT, {}) == FORCED
    assert _decide(STRICT, {"temperature_boost": 2}) == {"temperature_boost": 2, **FORCED}


@pytest.mark.parametrize(
    "extra",
    [
        {"steer_profile": "refusal", "steer_scale": 1.0},
        {"steer_profile": "refusal", "steer_scale": 1},
        {"steer_profile": "refusal"},
        {"steer_profile": "refusal", "steer_layers": [2, 1]},  # the profile's own layers
    ],
)
def test_strict_accepts_an_exact_restatement(extra):
    assert _decide(STRICT, extra) == FORCED


@pytest.mark.parametrize(
    "extra,field",
    [
        ({"steer_profile": "sel"}, "steer_profile"),
        ({"steer_profile": "none"}, "steer_profile"),
        ({"steer_profile": "REFUSAL"}, "steer_profile"),
        ({"steer_profile": "refusal "}, "steer_profile"),
        ({"steer_profile": "refusal", "steer_angle": 0}, "steer_angle"),
        ({"steer_profile": "refusal", "steer_scale": 0.0}, "steer_scale"),
        ({"steer_profile": "refusal", "steer_scale": 2.0}, "steer_scale"),
        ({"steer_profile": "refusal", "steer_scale": -1.0}, "steer_scale"),
        ({"steer_profile": "refusal", "steer_scale": 1.0000001}, "steer_scale"),
        ({"steer_profile": "refusal", "steer_layers": [1]}, "steer_layers"),
        ({"steer_profile": "refusal", "steer_categories": ["generic"]}, "steer_categories"),
    ],
)
def test_strict_refuses_every_escalation(extra, field):
    err = _refused(STRICT, extra)
    assert (err.status, err.field) == (403, field)
    assert err.to_openai()["error"] == {"message": err.message, "type": "permission_error", "param": field, "code": 403}


def test_strict_with_an_unloaded_forced_profile_is_a_server_error():
    profiles = {k: v for k, v in PROFILES.items() if k != "refusal"}
    err = _refused(STRICT, None, profiles=profiles)
    assert err.status == 500 and err.to_openai()["error"]["type"] == "server_error"


# ------------------------------------------------------------------------- standard tier


def test_standard_applies_its_default_when_no_profile_is_named():
    assert _decide(STANDARD, None) == {"steer_profile": "sel", "steer_angle": 180.0}
    assert _decide(STANDARD, {"other": [1]}) == {"other": [1], "steer_profile": "sel", "steer_angle": 180.0}


@pytest.mark.parametrize(
    "extra,expected",
    [
        ({"steer_profile": "sel", "steer_angle": 160}, {"steer_profile": "sel", "steer_angle": 160.0}),
        ({"steer_profile": "sel", "steer_angle": 210.0}, {"steer_profile": "sel", "steer_angle": 210.0}),
        ({"steer_profile": "sel"}, {"steer_profile": "sel", "steer_angle": 180.0}),
        ({"steer_profile": "narrow", "steer_angle": 110}, {"steer_profile": "narrow", "steer_angle": 110.0}),
        (
            {"steer_profile": "cat"},
            {"steer_profile": "cat", "steer_scale": -1.0, "steer_categories": ["generic"]},
        ),
        (
            {"steer_profile": "cat", "steer_scale": -3, "steer_categories": ["malware", "generic"]},
            {"steer_profile": "cat", "steer_scale": -3.0, "steer_categories": ["generic", "malware"]},
        ),
    ],
)
def test_standard_accepts_picks_within_its_bounds(extra, expected):
    assert _decide(STANDARD, extra) == expected


@pytest.mark.parametrize(
    "extra,status,field,fragment",
    [
        ({"steer_profile": "sel", "steer_angle": 100}, 403, "steer_angle", "outside [150, 210]"),
        ({"steer_profile": "sel", "steer_angle": 0}, 403, "steer_angle", "outside"),
        ({"steer_profile": "sel", "steer_angle": 210.001}, 403, "steer_angle", "outside"),
        ({"steer_profile": "sel-low"}, 403, "steer_angle", "profile's default"),
        ({"steer_profile": "narrow", "steer_angle": 125}, 400, "steer_angle", "profile 'narrow' allows"),
        ({"steer_profile": "cat", "steer_scale": 1.0}, 403, "steer_scale", "outside [-4, 0]"),
        ({"steer_profile": "cat", "steer_categories": ["fraud"]}, 403, "steer_categories", "not approved"),
        ({"steer_profile": "cat", "steer_categories": ["generic", "fraud"]}, 403, "steer_categories", "fraud"),
        ({"steer_profile": "cat", "steer_angle": 180}, 400, "steer_angle", "takes no angle"),
        ({"steer_profile": "sel", "steer_scale": 1.0}, 400, "steer_scale", "takes no scale"),
        ({"steer_profile": "ang"}, 403, "steer_profile", "not approved"),
        ({"steer_profile": "nope"}, 403, "steer_profile", "not approved"),
        ({"steer_profile": "SEL", "steer_angle": 180}, 403, "steer_profile", "not approved"),
        ({"steer_profile": "none"}, 403, "steer_profile", "unsteered"),
        ({"steer_profile": "sel", "steer_layers": [1]}, 403, "steer_layers", "layers"),
    ],
)
def test_standard_refusals(extra, status, field, fragment):
    err = _refused(STANDARD, extra)
    assert (err.status, err.field) == (status, field)
    assert fragment in err.message


def test_an_approved_profile_that_is_not_loaded_is_unknown():
    profiles = {k: v for k, v in PROFILES.items() if k != "narrow"}
    err = _refused(STANDARD, {"steer_profile": "narrow"}, profiles=profiles)
    assert (err.status, err.field) == (400, "steer_profile")
    assert "refusal" not in err.message  # does not list profiles the tier may not use


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    angle=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-1000, 1000)),
    lo=st.floats(-400, 400),
    width=st.floats(0, 400),
)
def test_a_tier_never_passes_an_angle_outside_its_bounds(angle, lo, width):
    hi = lo + width
    config = tenants_config()
    config["tiers"]["standard"]["profiles"]["sel"] = {"angle": [lo, hi]}
    config["tiers"]["standard"].pop("default")
    policy = TenantPolicy.from_mapping(config)
    tenant = policy.authenticate(KEYS["beta-standard"])
    try:
        decided = policy.decide(tenant, {"steer_profile": "sel", "steer_angle": angle}, PROFILES)
    except PolicyError as err:
        assert err.field == "steer_angle"
        in_profile_range = math.isfinite(angle) and 0 <= angle <= 360
        assert err.status == (403 if in_profile_range else 400)
        if err.status == 403:
            assert not lo <= angle <= hi
        return
    assert lo <= decided["steer_angle"] <= hi
    assert decided["steer_angle"] == angle


# ------------------------------------------------------------------------- research tier


@pytest.mark.parametrize(
    "extra,expected",
    [
        ({"steer_profile": "ang", "steer_angle": 0}, {"steer_profile": "ang", "steer_angle": 0.0}),
        ({"steer_profile": "sel", "steer_angle": 359.5}, {"steer_profile": "sel", "steer_angle": 359.5}),
        ({"steer_profile": "refusal", "steer_scale": -64}, {"steer_profile": "refusal", "steer_scale": -64.0}),
        (
            {"steer_profile": "cat", "steer_categories": "fraud"},
            {"steer_profile": "cat", "steer_scale": -1.0, "steer_categories": ["fraud"]},
        ),
        ({"steer_profile": "abl"}, {"steer_profile": "abl"}),
        (
            {"steer_profile": "ang", "steer_angle": 90, "steer_layers": [3, 1]},
            {"steer_profile": "ang", "steer_angle": 90.0, "steer_layers": [1, 3]},
        ),
        ({"steer_profile": "none"}, None),
        ({"steer_profile": "none", "keep": True}, {"keep": True}),
        (None, None),
    ],
)
def test_research_has_full_control(extra, expected):
    assert _decide(RESEARCH, extra) == expected


@pytest.mark.parametrize(
    "extra,field",
    [
        ({"steer_profile": "sel", "steer_layers": [0]}, "steer_layers"),  # not a layer of the profile
        ({"steer_profile": "sel", "steer_angle": 361}, "steer_angle"),  # outside the profile's own range
        ({"steer_profile": "SEL"}, "steer_profile"),
        ({"steer_profile": "nope"}, "steer_profile"),
        ({"steer_profile": "none", "steer_angle": 0}, "steer_angle"),
        ({"steer_profile": "none", "steer_layers": [1]}, "steer_layers"),
    ],
)
def test_research_still_gets_400_for_invalid_requests(extra, field):
    err = _refused(RESEARCH, extra)
    assert (err.status, err.field) == (400, field)


# ------------------------------------------------------------------------- malformed input, every tier

MALFORMED = [
    ({"steer_profile": "sel", "steer_angle": float("nan")}, "steer_angle"),
    ({"steer_profile": "sel", "steer_angle": float("inf")}, "steer_angle"),
    ({"steer_profile": "sel", "steer_angle": "180"}, "steer_angle"),
    ({"steer_profile": "sel", "steer_angle": True}, "steer_angle"),
    ({"steer_profile": "refusal", "steer_scale": [1.0]}, "steer_scale"),
    ({"steer_profile": 7}, "steer_profile"),
    ({"steer_profile": ""}, "steer_profile"),
    ({"steer_profile": "sel", "steer_angel": 180}, "steer_angel"),
    ({"steer_profile": "cat", "steer_categories": ["generic"] * (MAX_CATEGORIES + 1)}, "steer_categories"),
    ({"steer_profile": "sel", "steer_layers": list(range(MAX_LAYERS + 1))}, "steer_layers"),
    ({"steer_profile": "sel", "steer_layers": [1, 1]}, "steer_layers"),
    ({"steer_profile": "sel", "steer_layers": [-1]}, "steer_layers"),
    ({"steer_profile": "sel", "steer_layers": [True]}, "steer_layers"),
    ({"steer_profile": "sel", "steer_layers": "1"}, "steer_layers"),
    ({"steer_profile": "sel", "steer_layers": []}, "steer_layers"),
    ({"steer_angle": 180}, "steer_profile"),
    ({"steer_layers": [1]}, "steer_profile"),
]


@pytest.mark.parametrize("tier", list(TIERS))
@pytest.mark.parametrize("extra,field", MALFORMED)
def test_malformed_input_is_400_in_every_tier(tier, extra, field):
    err = _refused(TIERS[tier], extra)
    assert (err.status, err.field) == (400, field)
    assert err.to_openai()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("tier", list(TIERS))
def test_extra_args_that_are_not_a_mapping_are_400(tier):
    err = _refused(TIERS[tier], [("steer_profile", "sel")])
    assert (err.status, err.field) == (400, "extra_args")


@pytest.mark.parametrize("tier", list(TIERS))
def test_other_plugins_keys_pass_through_untouched(tier):
    nested = {"deep": [1, 2, {"x": None}]}
    extra = {"other_plugin": nested, "steer": "not ours", 3: "int key", "steer_profile": "sel", "steer_angle": 180}
    if tier == "strict":
        extra = {k: v for k, v in extra.items() if not str(k).startswith("steer_")}
    decided = _decide(TIERS[tier], extra)
    assert decided["other_plugin"] is nested
    assert decided["steer"] == "not ours" and decided[3] == "int key"
    assert nested == {"deep": [1, 2, {"x": None}]}


def test_decide_does_not_mutate_the_request():
    extra = {"steer_profile": "cat", "steer_categories": ["malware", "generic"], "keep": 1}
    before = copy.deepcopy(extra)
    _decide(STANDARD, extra)
    assert extra == before


# ------------------------------------------------------------------------- property: strict output is always forced

_steer_values = st.fixed_dictionaries(
    {},
    optional={
        "steer_profile": st.sampled_from(["refusal", "REFUSAL", "sel", "none", "cat", "", "Refusal"]),
        "steer_angle": st.one_of(st.floats(allow_nan=True), st.integers(-10, 400), st.text(max_size=3)),
        "steer_scale": st.one_of(st.floats(allow_nan=True), st.sampled_from([1, 1.0, 0, -1.0]), st.booleans()),
        "steer_categories": st.lists(st.sampled_from(["generic", "malware", "fraud"]), max_size=3),
        "steer_layers": st.lists(st.integers(-1, 4), max_size=4),
        "steer_extra": st.integers(),
        "other": st.integers(),
    },
)


@settings(max_examples=300, deadline=None)
@given(extra=_steer_values)
def test_strict_output_is_the_forced_setting_or_a_refusal(extra):
    try:
        decided = _decide(STRICT, extra)
    except PolicyError as err:
        assert err.status in (400, 403)
        return
    steer = {k: v for k, v in decided.items() if k.startswith("steer_")}
    assert steer == FORCED
    assert {k: v for k, v in decided.items() if not k.startswith("steer_")} == {
        k: v for k, v in extra.items() if not k.startswith("steer_")
    }


# ------------------------------------------------------------------------- single tenant


def test_single_tenant_passes_everything_through():
    policy = TenantPolicy.single_tenant()
    assert policy.single_tenant is True and POLICY.single_tenant is False
    tenant = policy.authenticate(None)
    extra = {"steer_profile": "anything", "steer_angle": 1e9, "other": 1}
    assert policy.decide(tenant, extra, PROFILES) == extra
    assert policy.decide(tenant, None, PROFILES) is None
    assert [p["id"] for p in policy.visible_profiles(tenant, PROFILES)] == sorted(PROFILES)
    with policy.acquire(tenant), policy.acquire(tenant):
        pass
    assert repr(policy) == "TenantPolicy(single_tenant)"


# ------------------------------------------------------------------------- discovery


def test_strict_sees_only_its_forced_profile():
    [entry] = POLICY.visible_profiles(STRICT, PROFILES)
    assert entry["id"] == "refusal" and entry["forced"] is True
    assert entry["scale"] == {"min": 1.0, "max": 1.0} and entry["angle"] is None
    assert entry["defaults"] == {"scale": 1.0} and entry["layers_override"] is False


def test_standard_sees_its_approved_profiles_with_intersected_ranges():
    entries = {e["id"]: e for e in POLICY.visible_profiles(STANDARD, PROFILES)}
    assert sorted(entries) == ["cat", "narrow", "sel", "sel-low"]
    assert entries["sel"]["angle"] == {"min": 150.0, "max": 210.0}
    assert entries["sel"]["default"] is True and entries["sel"]["forced"] is False
    assert entries["sel"]["defaults"] == {"angle": 180.0}
    assert entries["narrow"]["angle"] == {"min": 100.0, "max": 120.0}  # tier [100, 200] ∩ profile [30, 120]
    assert entries["narrow"]["default"] is False
    assert entries["cat"]["scale"] == {"min": -4.0, "max": 0.0} and entries["cat"]["angle"] is None
    assert entries["cat"]["categories"] == ["generic", "malware"]
    assert entries["cat"]["defaults"] == {"scale": -1.0, "categories": ["generic"]}
    assert all(e["layers_override"] is False for e in entries.values())


def test_standard_does_not_list_approved_profiles_that_are_not_loaded():
    profiles = {k: v for k, v in PROFILES.items() if k != "narrow"}
    assert "narrow" not in [e["id"] for e in POLICY.visible_profiles(STANDARD, profiles)]


def test_research_sees_every_profile_with_its_own_ranges():
    entries = {e["id"]: e for e in POLICY.visible_profiles(RESEARCH, PROFILES)}
    assert sorted(entries) == sorted(PROFILES)
    assert entries["sel"]["angle"] == {"min": 0.0, "max": 360.0}
    assert entries["narrow"]["angle"] == {"min": 30.0, "max": 120.0}
    assert entries["abl"]["angle"] is None and entries["abl"]["scale"] is None
    assert entries["cat"]["categories"] == ["generic", "malware", "fraud"]
    assert all(e["layers_override"] is True for e in entries.values())
    assert json.loads(json.dumps(list(entries.values()))) == list(entries.values())


# ------------------------------------------------------------------------- concurrency


def test_concurrency_limit_is_429_until_a_slot_is_released():
    policy = TenantPolicy.from_mapping(tenants_config())
    tenant = policy.authenticate(KEYS["beta-standard"])
    first, second = policy.acquire(tenant), policy.acquire(tenant)
    with pytest.raises(PolicyError) as info:
        policy.acquire(tenant)
    assert (info.value.status, info.value.field) == (429, "steer_profile")
    assert info.value.to_openai()["error"]["type"] == "rate_limit_error"
    first.release()
    first.release()  # idempotent: must not free a second slot
    assert policy.in_flight(tenant) == 1
    third = policy.acquire(tenant)
    with pytest.raises(PolicyError):
        policy.acquire(tenant)
    second.release()
    third.release()
    assert policy.in_flight(tenant) == 0


def test_context_manager_releases_on_error_and_tenants_are_counted_separately():
    policy = TenantPolicy.from_mapping(tenants_config())
    tenant = policy.authenticate(KEYS["beta-standard"])
    with pytest.raises(RuntimeError), policy.acquire(tenant):
        raise RuntimeError("request failed")
    assert policy.in_flight(tenant) == 0
    research = policy.authenticate(KEYS["gamma-research"])
    slots = [policy.acquire(research) for _ in range(10)]  # no limit on that tier
    with policy.acquire(tenant), policy.acquire(tenant):
        assert policy.in_flight(tenant) == 2
    for slot in slots:
        slot.release()


def test_concurrency_limit_holds_across_threads():
    policy = TenantPolicy.from_mapping(tenants_config())
    tenant = policy.authenticate(KEYS["beta-standard"])
    barrier = threading.Barrier(16)
    granted, refused = [], []

    def worker():
        barrier.wait()
        try:
            granted.append(policy.acquire(tenant))
        except PolicyError:
            refused.append(1)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(granted) == 2 and len(refused) == 14
    for slot in granted:
        slot.release()
    assert policy.in_flight(tenant) == 0


# ------------------------------------------------------------------------- start-up check against loaded profiles


def test_check_profiles_accepts_a_consistent_file():
    POLICY.check_profiles(PROFILES)


@pytest.mark.parametrize(
    "mutate,field",
    [
        (_set("tiers/standard/profiles/gone", {}), "tiers.standard.profiles.gone"),
        (_set("tiers/standard/profiles/cat", {"angle": [0, 10]}), "tiers.standard.profiles.cat.angle"),
        (_set("tiers/standard/profiles/narrow", {"angle": [200, 300]}), "tiers.standard.profiles.narrow.angle"),
        (_set("tiers/standard/profiles/cat", {"categories": ["weapons"]}), "tiers.standard.profiles.cat.categories"),
        (_set("tiers/standard/profiles/sel", {"categories": ["generic"]}), "tiers.standard.profiles.sel.categories"),
        (_set("tiers/standard/default", {"profile": "sel", "angle": 100}), "tiers.standard.default.angle"),
        (_set("tiers/standard/default", {"profile": "sel-low"}), "tiers.standard.default.angle"),
        (_set("tiers/strict/forced", {"profile": "refusal", "angle": 10}), "tiers.strict.forced.angle"),
        (_set("tiers/strict/forced", {"profile": "refusal", "layers": [3]}), "tiers.strict.forced.layers"),
        (_set("tiers/strict/forced", {"profile": "gone"}), "tiers.strict.forced.profile"),
    ],
)
def test_check_profiles_names_the_field(mutate, field):
    policy = TenantPolicy.from_mapping(_mutated(mutate))
    with pytest.raises(TenantsFileError) as info:
        policy.check_profiles(PROFILES)
    assert info.value.field == field


def test_forced_layers_are_sent_and_must_be_restated_exactly():
    policy = TenantPolicy.from_mapping(_mutated(_set("tiers/strict/forced", {"profile": "refusal", "layers": [2]})))
    tenant = policy.authenticate(KEYS["acme-strict"])
    expected = {"steer_profile": "refusal", "steer_scale": 1.0, "steer_layers": [2]}
    assert policy.decide(tenant, None, PROFILES) == expected
    assert policy.decide(tenant, {"steer_profile": "refusal", "steer_layers": [2]}, PROFILES) == expected
    err = _refused(tenant, {"steer_profile": "refusal", "steer_layers": [1, 2]}, policy=policy)
    assert (err.status, err.field) == (403, "steer_layers")


# ------------------------------------------------------------------------- the shipped example


def test_example_file_demo_keys_authenticate_to_their_tiers():
    text = EXAMPLE.read_text()
    policy = TenantPolicy.from_file(EXAMPLE)
    for tier in ("strict", "standard", "research"):
        key = f"demo-{tier}-key"
        assert key in text  # documented in the file's comment
        assert policy.authenticate(key).tier_name == tier
    assert "LOCAL DEMOS ONLY" in text


def test_example_file_fits_the_demo_profiles():
    policy = TenantPolicy.from_file(EXAMPLE)
    profiles = load_profile_dir(REPO / "profiles")
    policy.check_profiles(profiles)
    strict = policy.authenticate("demo-strict-key")
    assert policy.decide(strict, None, profiles) == {  # the gate-only guard: nothing to steer with
        "steer_profile": "smollm2-guard",
        "steer_gate_action": "refuse",
        "steer_refusal": "I can't help with that request.",
    }
    assert [e["id"] for e in policy.visible_profiles(strict, profiles)] == ["smollm2-guard"]
    for keys, field in (
        ({"steer_profile": "smollm2-guard", "steer_gate_action": "flag"}, "steer_gate_action"),
        ({"steer_profile": "smollm2-guard", "steer_scale": 1.0}, "steer_scale"),
        ({"steer_profile": "smollm2-refusal-gated"}, "steer_profile"),
    ):
        err = _refused(strict, keys, policy, profiles)
        assert (err.status, err.field) == (403, field), (keys, err)
    standard = policy.authenticate("demo-standard-key")
    assert policy.decide(standard, None, profiles) == {"steer_profile": "smollm2-selective", "steer_angle": 180.0}
    extra = {"steer_profile": "smollm2-category", "steer_categories": ["Fraud/Deception"]}
    err = _refused(standard, extra, policy, profiles)
    assert (err.status, err.field) == (403, "steer_categories")
    flagged = {"steer_profile": "smollm2-refusal-gated", "steer_gate_action": "flag"}
    assert policy.decide(standard, flagged, profiles)["steer_gate_action"] == "flag"
    research = policy.authenticate("demo-research-key")
    assert policy.decide(research, {"steer_profile": "none"}, profiles) is None


# ------------------------------------------------------------------------- nothing secret in reprs


def test_reprs_and_errors_never_show_keys_or_hashes():
    secrets_shown = [*KEYS.values()]
    for entry in tenants_config()["tenants"]:
        _, salt, digest = entry["key_hash"].split("$")
        secrets_shown += [salt, digest]
    from vllm_steer.server.tenants import TenantsFile

    model = TenantsFile.model_validate(tenants_config())
    texts = [
        repr(POLICY),
        str(POLICY),
        repr(STRICT),
        str(STANDARD),
        repr(POLICY.tenants),
        repr(model.tenants[0]),
        str(model.tenants),
        repr(POLICY._credentials),
    ]
    for key in (None, "wrong", KEYS["acme-strict"] + "x"):
        try:
            POLICY.authenticate(key)
        except PolicyError as err:
            texts += [str(err), json.dumps(err.to_openai())]
    for text in texts:
        for secret in secrets_shown:
            assert secret not in text, text


@pytest.mark.parametrize(
    "status,kind",
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (429, "rate_limit_error"),
        (500, "server_error"),
    ],
)
def test_openai_error_shape(status, kind):
    assert PolicyError(status, "steer_angle", "nope").to_openai() == {
        "error": {"message": "nope", "type": kind, "param": "steer_angle", "code": status}
    }


def test_admin_keys_are_separate_from_tenant_keys():
    from vllm_steer.server.tenants import PolicyError, TenantPolicy, TenantsFileError, hash_api_key

    base = {
        "format_version": 1,
        "tiers": {"open": {"profiles": "*"}},
        "tenants": [{"name": "t", "tier": "open", "key_hash": hash_api_key("tenant-key")}],
    }
    no_admins = TenantPolicy.from_mapping(base)
    with pytest.raises(PolicyError) as err:
        no_admins.authenticate_admin("tenant-key")
    assert err.value.status == 403 and "disabled" in err.value.message
    policy = TenantPolicy.from_mapping({**base, "admins": [{"name": "ops", "key_hash": hash_api_key("admin-key")}]})
    assert policy.authenticate_admin("admin-key") == "ops"
    for key, status in (("tenant-key", 403), ("nope", 401), (None, 401)):
        with pytest.raises(PolicyError) as err:
            policy.authenticate_admin(key)
        assert err.value.status == status and err.value.field == "authorization"
    with pytest.raises(PolicyError):
        policy.authenticate("admin-key")  # an admin key is not a tenant
    same = hash_api_key("tenant-key", salt=b"0123456789abcdef")
    clash = {
        **base,
        "tenants": [{"name": "t", "tier": "open", "key_hash": same}],
        "admins": [{"name": "ops", "key_hash": same}],
    }
    with pytest.raises(TenantsFileError, match=r"admins\.0\.key_hash"):
        TenantPolicy.from_mapping(clash)
    assert "admin-key" not in repr(policy)
