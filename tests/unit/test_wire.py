"""The policy stamp (core/wire.py): bound to tenant, steering and expiry; read without changing the request."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_steer.core.wire import (
    DIGEST_KEY,
    POLICY_SECRET_ENV,
    POLICY_TOKEN_KEY,
    STAMP_TTL_S,
    TENANT_KEY,
    StampError,
    keyed_digest,
    stamp,
    verify_stamp,
    without_reserved,
)

STEERING = {"steer_profile": "refusal", "steer_scale": 1.0, "steer_categories": ["a", "b"], "other": 3}


def test_a_stamp_verifies_for_its_tenant_and_leaves_the_request_unchanged():
    stamped = stamp(STEERING, "acme")
    before = dict(stamped)
    assert verify_stamp(stamped) == "acme"
    assert verify_stamp(stamped) == "acme", "a second prompt sharing the dict verifies too"
    assert stamped == before
    assert without_reserved(stamped) == STEERING


@pytest.mark.parametrize(
    "change",
    [
        {"steer_scale": 2.0},
        {"steer_profile": "other"},
        {"steer_categories": ["a"]},
        {"steer_layers": [1]},
        {TENANT_KEY: "beta"},
        {POLICY_TOKEN_KEY: "0.abc"},
        {POLICY_TOKEN_KEY: "forged"},
        {POLICY_TOKEN_KEY: 12},
    ],
)
def test_any_change_to_steering_tenant_or_token_breaks_the_stamp(change):
    with pytest.raises(StampError):
        verify_stamp({**stamp(STEERING, "acme"), **change})


def test_other_plugins_keys_may_change():
    assert verify_stamp({**stamp(STEERING, "acme"), "other": 4, "kv_transfer_params": 1}) == "acme"


def test_a_stamp_expires():
    stamped = stamp(STEERING, "acme", now=1_000_000.0)
    assert verify_stamp(stamped, now=1_000_000.0 + STAMP_TTL_S - 1) == "acme"
    with pytest.raises(StampError, match="expired"):
        verify_stamp(stamped, now=1_000_000.0 + STAMP_TTL_S + 1)


def test_a_stamp_from_another_secret_does_not_verify(monkeypatch):
    monkeypatch.setenv(POLICY_SECRET_ENV, "one")
    stamped = stamp(STEERING, "acme")
    monkeypatch.setenv(POLICY_SECRET_ENV, "two")
    with pytest.raises(StampError):
        verify_stamp(stamped)


@pytest.mark.parametrize("extra_args", [None, {}, [], "x", {"steer_profile": "refusal"}, {TENANT_KEY: "acme"}])
def test_no_stamp_is_refused(extra_args):
    with pytest.raises(StampError):
        verify_stamp(extra_args)


def test_without_reserved_drops_every_server_key():
    assert without_reserved({POLICY_TOKEN_KEY: 1, TENANT_KEY: 2, DIGEST_KEY: 3, "steer_profile": "x"}) == {
        "steer_profile": "x"
    }


@settings(max_examples=200, deadline=None)
@given(a=st.text(max_size=12), b=st.text(max_size=12))
def test_keyed_digests_separate_purposes_and_payloads(a, b):
    assert (keyed_digest("p", a) == keyed_digest("p", b)) == (a == b)
    assert keyed_digest("p", a) != keyed_digest("q", a)


def test_an_admission_in_context_names_the_tenant_only_for_the_admitted_steering():
    from vllm_steer.core.wire import ADMISSION, Admission, admitted_tenant

    token = ADMISSION.set(Admission("acme", {"steer_profile": "refusal", "steer_scale": 1.0}))
    try:
        assert admitted_tenant({"steer_profile": "refusal", "steer_scale": 1.0, "other": 1}) == "acme"
        for changed in ({"steer_profile": "refusal", "steer_scale": 2.0}, {"steer_profile": "refusal"}, None):
            with pytest.raises(StampError):
                admitted_tenant(changed)
    finally:
        ADMISSION.reset(token)
    with pytest.raises(StampError):
        admitted_tenant({"steer_profile": "refusal", "steer_scale": 1.0})
