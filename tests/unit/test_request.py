"""Per-request steering keys: parsing, resolution against profiles, prefix-cache salt."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_steer.core.profile import ModelFingerprint, Profile, ProfileSpec
from vllm_steer.core.request import (
    ResolvedSteering,
    SteeringRequest,
    SteeringRequestError,
    cache_salt,
    parse_steering,
    resolve_steering,
)
from vllm_steer.testing.synthetic import random_profile

FP = ModelFingerprint(architecture="LlamaForCausalLM", hidden_size=16, num_layers=4)


def _narrowed(profile: Profile, **update) -> Profile:
    spec = ProfileSpec.model_validate({**profile.spec.model_dump(), **update})
    return Profile(spec, profile.vectors, source=profile.source)


def _profiles() -> dict[str, Profile]:
    profiles = {
        "add": random_profile("add", "addition", FP, [1], seed=1, scale=2.0),
        "probe": random_profile("probe", "probe", FP, [2], seed=2),
        "cat": random_profile("cat", "category", FP, [1], seed=3, categories=("violence", "fraud", "malware")),
        "abl": random_profile("abl", "ablation", FP, [0, 1, 2, 3], seed=4),
        "sas": random_profile("sas", "angular_standard", FP, [1, 2], seed=5, angle=180.0),
        "aas": random_profile("aas", "angular_adaptive", FP, [1, 2], seed=6),
        "ss": random_profile("ss", "selective", FP, [2, 3], seed=7, angle=90.0),
    }
    profiles["narrow-ss"] = _narrowed(
        random_profile("narrow-ss", "selective", FP, [1], seed=8, angle=60.0),
        allowed={"angle": {"min": 30.0, "max": 120.0}},
    )
    profiles["narrow-add"] = _narrowed(
        random_profile("narrow-add", "addition", FP, [1], seed=9, scale=-1.0),
        allowed={"scale": {"min": -2.0, "max": 0.0}},
    )
    return profiles


PROFILES = _profiles()


def _resolve(extra: dict) -> ResolvedSteering:
    request = parse_steering(extra)
    assert request is not None
    return resolve_steering(request, PROFILES)


def _parse_error(extra) -> SteeringRequestError:
    with pytest.raises(SteeringRequestError) as info:
        parse_steering(extra)
    return info.value


def _resolve_error(extra) -> SteeringRequestError:
    request = parse_steering(extra)
    with pytest.raises(SteeringRequestError) as info:
        resolve_steering(request, PROFILES)
    return info.value


# ----------------------------------------------------------------- parse_steering


@pytest.mark.parametrize("extra", [None, {}, {"temperature_override": 0.3, "other_plugin": {"x": 1}}])
def test_no_steer_keys_is_unsteered(extra):
    assert parse_steering(extra) is None


def test_other_plugins_keys_are_ignored():
    extra = {"steer_profile": "ss", "lora_hint": "x", "steering": 1, 7: "int key"}
    request = parse_steering(extra)
    assert request == SteeringRequest(steer_profile="ss")
    assert parse_steering({"steering": 1, "steerable": True}) is None


@pytest.mark.parametrize("key", ["STEER_PROFILE", "Steer_Profile", " steer_profile", "steer_profile ", "ſteer_profile"])
def test_a_steering_key_spelled_another_way_is_an_error_not_another_plugins_key(key):
    """Otherwise {"STEER_PROFILE": "none"} would pass by silently while the client believes it opted out."""
    with pytest.raises(SteeringRequestError) as info:
        parse_steering({key: "none"})
    assert info.value.field == key and "case-sensitive: write 'steer_profile'" in str(info.value)


@pytest.mark.parametrize("key", ["steer_angel", "steer_", "steer_Profile", "steer_strength"])
def test_unknown_steer_key(key):
    err = _parse_error({"steer_profile": "ss", key: 1.0})
    assert err.field == key
    assert key in str(err)
    # Reported even when the profile key is missing too.
    assert _parse_error({key: 1.0}).field == key


def test_missing_profile():
    for extra in ({"steer_angle": 30.0}, {"steer_scale": 1.0}, {"steer_categories": ["fraud"]}):
        err = _parse_error(extra)
        assert err.field == "steer_profile"


@pytest.mark.parametrize("value", [None, 3, "", ["ss"], True])
def test_bad_profile_values(value):
    assert _parse_error({"steer_profile": value}).field == "steer_profile"


@pytest.mark.parametrize("field", ["steer_angle", "steer_scale"])
@pytest.mark.parametrize("value", ["90", True, False, [90.0], {"deg": 90}, float("nan"), float("inf"), -float("inf")])
def test_bad_number_types(field, value):
    err = _parse_error({"steer_profile": "ss", field: value})
    assert err.field == field
    assert str(err).startswith(field)


@pytest.mark.parametrize("value", [3, [3], {"a": 1}, [["fraud"]]])
def test_bad_categories_types(value):
    assert _parse_error({"steer_profile": "cat", "steer_categories": value}).field == "steer_categories"


def test_ints_are_accepted_as_numbers():
    request = parse_steering({"steer_profile": "ss", "steer_angle": 90})
    assert request.steer_angle == 90.0
    as_int = _resolve({"steer_profile": "ss", "steer_angle": 90})
    assert as_int == _resolve({"steer_profile": "ss", "steer_angle": 90.0})


def test_extra_args_must_be_a_mapping():
    assert _parse_error([("steer_profile", "ss")]).field == "extra_args"


# ----------------------------------------------------------------- resolve_steering


def test_unknown_profile():
    err = _resolve_error({"steer_profile": "nope"})
    assert err.field == "steer_profile"
    assert "nope" in str(err)
    with pytest.raises(SteeringRequestError) as info:
        resolve_steering(parse_steering({"steer_profile": "ss"}), {})
    assert info.value.field == "steer_profile"


@pytest.mark.parametrize("pid", ["add", "probe", "cat", "abl"])
def test_angle_refused_for_non_angular_profiles(pid):
    assert _resolve_error({"steer_profile": pid, "steer_angle": 30.0}).field == "steer_angle"


@pytest.mark.parametrize("pid", ["sas", "aas", "ss", "abl"])
def test_scale_refused_for_non_scale_profiles(pid):
    assert _resolve_error({"steer_profile": pid, "steer_scale": 1.0}).field == "steer_scale"


@pytest.mark.parametrize("pid", ["add", "probe", "abl", "sas", "aas", "ss"])
def test_categories_refused_for_non_category_profiles(pid):
    assert _resolve_error({"steer_profile": pid, "steer_categories": ["fraud"]}).field == "steer_categories"


@pytest.mark.parametrize(
    "extra,field",
    [
        ({"steer_profile": "ss", "steer_angle": 360.5}, "steer_angle"),
        ({"steer_profile": "ss", "steer_angle": -0.1}, "steer_angle"),
        ({"steer_profile": "narrow-ss", "steer_angle": 29.0}, "steer_angle"),
        ({"steer_profile": "narrow-ss", "steer_angle": 121.0}, "steer_angle"),
        ({"steer_profile": "add", "steer_scale": 64.5}, "steer_scale"),
        ({"steer_profile": "add", "steer_scale": -1e9}, "steer_scale"),
        ({"steer_profile": "narrow-add", "steer_scale": 0.5}, "steer_scale"),
        ({"steer_profile": "narrow-add", "steer_scale": -2.5}, "steer_scale"),
    ],
)
def test_out_of_range(extra, field):
    err = _resolve_error(extra)
    assert err.field == field
    assert extra["steer_profile"] in str(err)


@pytest.mark.parametrize(
    "extra",
    [
        {"steer_profile": "ss", "steer_angle": 0.0},
        {"steer_profile": "ss", "steer_angle": 360.0},
        {"steer_profile": "narrow-ss", "steer_angle": 30.0},
        {"steer_profile": "narrow-ss", "steer_angle": 120.0},
        {"steer_profile": "add", "steer_scale": -64.0},
        {"steer_profile": "narrow-add", "steer_scale": 0.0},
    ],
)
def test_range_bounds_are_inclusive(extra):
    resolved = _resolve(extra)
    assert resolved.angle == extra.get("steer_angle", resolved.angle)
    assert resolved.scale == extra.get("steer_scale", resolved.scale)


def test_unknown_and_repeated_categories():
    err = _resolve_error({"steer_profile": "cat", "steer_categories": ["fraud", "arson"]})
    assert err.field == "steer_categories" and "arson" in str(err)
    err = _resolve_error({"steer_profile": "cat", "steer_categories": ["fraud", "fraud"]})
    assert err.field == "steer_categories"
    err = _resolve_error({"steer_profile": "cat", "steer_categories": []})
    assert err.field == "steer_categories"


def test_defaults_are_filled():
    ss = _resolve({"steer_profile": "ss"})
    assert (ss.profile_id, ss.method, ss.angle, ss.categories) == ("ss", "selective", 90.0, ())
    assert ss.profile_digest == PROFILES["ss"].digest
    assert _resolve({"steer_profile": "sas"}).angle == 180.0
    assert _resolve({"steer_profile": "narrow-ss"}).angle == 60.0
    assert _resolve({"steer_profile": "add"}).scale == 2.0
    assert _resolve({"steer_profile": "narrow-add"}).scale == -1.0
    cat = _resolve({"steer_profile": "cat"})
    assert cat.categories == ("fraud", "malware", "violence")  # all of them, sorted
    assert cat.scale == 1.0
    abl = _resolve({"steer_profile": "abl"})
    assert abl.method == "ablation" and abl.categories == ()


def test_explicit_values_override_defaults():
    assert _resolve({"steer_profile": "ss", "steer_angle": 45}).angle == 45.0
    assert _resolve({"steer_profile": "add", "steer_scale": -3.5}).scale == -3.5


def test_single_string_category_is_accepted():
    request = parse_steering({"steer_profile": "cat", "steer_categories": "fraud"})
    assert request.steer_categories == ("fraud",)
    assert _resolve({"steer_profile": "cat", "steer_categories": "fraud"}).categories == ("fraud",)


def test_category_order_does_not_matter():
    a = _resolve({"steer_profile": "cat", "steer_categories": ["violence", "fraud"]})
    b = _resolve({"steer_profile": "cat", "steer_categories": ["fraud", "violence"]})
    assert a == b and a.slot_key == b.slot_key
    assert cache_salt(a, None) == cache_salt(b, None)


def test_slot_key_ignores_angle_and_scale():
    a = _resolve({"steer_profile": "ss", "steer_angle": 10.0})
    b = _resolve({"steer_profile": "ss", "steer_angle": 200.0})
    assert a.slot_key == b.slot_key
    c = _resolve({"steer_profile": "cat", "steer_categories": ["fraud"]})
    d = _resolve({"steer_profile": "cat", "steer_categories": ["fraud", "malware"]})
    assert c.slot_key != d.slot_key


@pytest.mark.parametrize("angle", [0.0, 30.0, 90.0, 180.0, 270.0, 360.0])
def test_cos_sin(angle):
    c, s = _resolve({"steer_profile": "ss", "steer_angle": angle}).cos_sin
    assert math.isclose(c, math.cos(math.radians(angle)), abs_tol=1e-12)
    assert math.isclose(s, math.sin(math.radians(angle)), abs_tol=1e-12)


# ----------------------------------------------------------------- cache_salt


def test_salt_is_stable_for_equal_inputs():
    a = _resolve({"steer_profile": "ss", "steer_angle": 30.0})
    b = _resolve({"steer_profile": "ss", "steer_angle": 30.0})
    assert cache_salt(a, None) == cache_salt(b, None)
    assert cache_salt(a, "client") == cache_salt(b, "client")
    assert cache_salt(a, None).startswith("vllm-steer:")


def test_salt_distinguishes_every_setting():
    settings_ = [
        {"steer_profile": "ss"},
        {"steer_profile": "ss", "steer_angle": 30.0},
        {"steer_profile": "sas", "steer_angle": 30.0},
        {"steer_profile": "aas", "steer_angle": 30.0},
        {"steer_profile": "add"},
        {"steer_profile": "add", "steer_scale": 3.0},
        {"steer_profile": "probe", "steer_scale": 3.0},
        {"steer_profile": "cat", "steer_scale": 3.0},
        {"steer_profile": "cat", "steer_scale": 3.0, "steer_categories": ["fraud"]},
        {"steer_profile": "cat", "steer_scale": 3.0, "steer_categories": ["malware"]},
        {"steer_profile": "abl"},
    ]
    resolved = [_resolve(extra) for extra in settings_]
    salts = [cache_salt(r, None) for r in resolved]
    assert len(set(salts)) == len(salts)
    client = {cache_salt(resolved[0], c) for c in (None, "", "a", "b")}
    assert len(client) == 4


def test_salt_is_bound_to_the_tenant_and_keyed():
    """Under tiers every request is salted per tenant; a client's salt never passes through as is."""
    a = _resolve({"steer_profile": "ss", "steer_angle": 30.0})
    assert cache_salt(a, None, "acme") != cache_salt(a, None, "beta")
    assert cache_salt(None, None, "acme") != cache_salt(None, None, "beta")
    assert cache_salt(None, None, None) is None, "unsteered, no tenant, no client salt: vLLM's shared cache"
    derived = cache_salt(a, None, "acme")
    # the poisoning attempt: an unsteered request that sends the strict tier's derived salt as its own
    assert cache_salt(None, derived, "research") != derived
    assert cache_salt(None, derived, None) != derived
    assert cache_salt(a, None, "acme") != cache_salt(None, None, "acme"), "steered and unsteered never share"


def test_salt_needs_the_server_secret(monkeypatch):
    from vllm_steer.core.wire import POLICY_SECRET_ENV

    a = _resolve({"steer_profile": "ss", "steer_angle": 30.0})
    monkeypatch.setenv(POLICY_SECRET_ENV, "one")
    first = cache_salt(a, None, "acme")
    monkeypatch.setenv(POLICY_SECRET_ENV, "two")
    assert cache_salt(a, None, "acme") != first


def test_salt_distinguishes_profile_content():
    """Same id, different tensors (a profile replaced on disk): different salt."""
    other = dict(PROFILES)
    other["ss"] = random_profile("ss", "selective", FP, [2, 3], seed=99, angle=90.0)
    request = parse_steering({"steer_profile": "ss"})
    a = resolve_steering(request, PROFILES)
    b = resolve_steering(request, other)
    assert a.profile_digest != b.profile_digest
    assert cache_salt(a, None) != cache_salt(b, None)


@settings(max_examples=50, deadline=None)
@given(
    a=st.floats(min_value=0.0, max_value=360.0, allow_nan=False),
    b=st.floats(min_value=0.0, max_value=360.0, allow_nan=False),
    salt=st.one_of(st.none(), st.text(max_size=8)),
)
def test_salt_is_a_function_of_the_angle(a, b, salt):
    ra = _resolve({"steer_profile": "ss", "steer_angle": a})
    rb = _resolve({"steer_profile": "ss", "steer_angle": b})
    assert (cache_salt(ra, salt) == cache_salt(rb, salt)) == (a == b)


@settings(max_examples=50, deadline=None)
@given(
    a=st.floats(min_value=-64.0, max_value=64.0, allow_nan=False),
    b=st.floats(min_value=-64.0, max_value=64.0, allow_nan=False),
)
def test_salt_is_a_function_of_the_scale(a, b):
    a, b = a + 0.0, b + 0.0  # -0.0 → 0.0: the salt may (harmlessly) tell the two zeros apart
    ra = _resolve({"steer_profile": "add", "steer_scale": a})
    rb = _resolve({"steer_profile": "add", "steer_scale": b})
    assert (cache_salt(ra, None) == cache_salt(rb, None)) == (a == b)


def test_steer_layers_picks_a_subset_of_the_profile_layers():
    fp = ModelFingerprint(architecture="LlamaForCausalLM", hidden_size=16, num_layers=4)
    profiles = {"sel": random_profile("sel", "selective", fp, [1, 2, 3])}
    sub = resolve_steering(parse_steering({"steer_profile": "sel", "steer_layers": [3, 1]}), profiles)
    assert sub.layers == (1, 3)
    whole = resolve_steering(parse_steering({"steer_profile": "sel"}), profiles)
    assert whole.layers is None and sub.slot_key != whole.slot_key
    assert cache_salt(sub, None) != cache_salt(whole, None)
    same = resolve_steering(parse_steering({"steer_profile": "sel", "steer_layers": [1, 2, 3]}), profiles)
    assert same == whole, "naming every layer is the same as not overriding"
    assert resolve_steering(parse_steering({"steer_profile": "sel", "steer_layers": 2}), profiles).layers == (2,)
    for bad, message in (
        ([0], r"\[0\] are not layers"),
        ([1, 1], "must not repeat"),
        ([], "at least 1"),
        (["1"], "valid integer"),
        ([True], "valid integer"),
        ([-1], "greater than or equal"),
    ):
        with pytest.raises(SteeringRequestError, match=message) as err:
            resolve_steering(parse_steering({"steer_profile": "sel", "steer_layers": bad}), profiles)
        assert err.value.field == "steer_layers"


def test_admission_keys_normalize_the_request_spelling():
    from vllm_steer.core.request import admission_keys

    stamp, route = "vllm_steer_digest", "vllm_steer_route"
    (one,) = admission_keys({"steer_profile": "p", "steer_categories": ["b", "a"], stamp: "d"}, stamp)
    (two,) = admission_keys(
        {"steer_profile": "p", "steer_categories": ["a", "b"], "steer_scale": 2.0, stamp: "d"}, stamp
    )
    assert one == two == ("p", "d", ("a", "b"), None, None), "angle and scale travel per token: not part of the slot"
    (flag,) = admission_keys({"steer_profile": "p", "steer_gate_action": "flag", stamp: "d"}, stamp)
    assert flag[4] == "flag", "a gate action loads the slot differently: part of the key"
    assert admission_keys({"steer_profile": "p", stamp: "other"}, stamp) != admission_keys(
        {"steer_profile": "p", stamp: "d"}, stamp
    )
    assert admission_keys({"steer_profile": "p", "steer_layers": [3, 1]}, stamp)[0][3] == (1, 3)
    assert admission_keys(None, stamp) == () and admission_keys({"other_plugin": 1}, stamp) == ()
    assert admission_keys({"steer_angle": 3}, stamp)[0][0] == "unparsed"
    routed = admission_keys(
        {"steer_profile": "p", "steer_categories": "auto", stamp: "d", route: ["x", "y"]}, stamp, route
    )
    assert routed == (
        ("p", "d", ("auto",), None, None),
        ("p", "d", ("x",), None, "steer"),
        ("p", "d", ("y",), None, "steer"),
    ), "a routing request holds its own slot and one per category the front end stamped"
