"""Routing requests (``steer_categories: "auto"``: each row steered with the category whose gate fired) under tiers
and at the engine's front door, without a server: the policy passes ``auto`` through as ``auto`` (never as an
empty category list); a tier grants ``auto`` only with every category the gates route to; a tier may force or
default it on a profile that routes (the tenants file is checked); discovery says where ``auto`` is accepted; the
front end refuses a routing request that could never get its slots; the decision header and the audit line carry
each row's category."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from support.tenants import FP, tenant_entries
from vllm_steer.core.gates import GateSpec
from vllm_steer.core.request import parse_steering, resolve_steering
from vllm_steer.core.settings import SteerConfig
from vllm_steer.server.audit import AuditLog
from vllm_steer.server.decisions import header_value
from vllm_steer.server.tenants import PolicyError, TenantPolicy, TenantsFileError
from vllm_steer.testing.synthetic import random_profile, with_gates

CATEGORIES = ("cat_a", "cat_b", "cat_c")
PLAIN_GATES = [GateSpec(name="harm", layer=1, tensor="gate.harm", threshold=0.1)]
ROUTED_GATES = PLAIN_GATES + [
    GateSpec(name=f"g{c[-1]}", layer=1, tensor=f"gate.{c}", threshold=0.1, category=c) for c in CATEGORIES
]
PROFILES = {
    "routed": with_gates(
        random_profile("routed", "category", FP, [2, 3], seed=11, scale=2.0),
        "steer",
        ROUTED_GATES,
        {g.name: torch.randn(16, generator=torch.Generator().manual_seed(i)) for i, g in enumerate(ROUTED_GATES)},
    ),
    "gated-cat": with_gates(
        random_profile("gated-cat", "category", FP, [2], seed=12), "steer", PLAIN_GATES, {"harm": torch.ones(16)}
    ),
}
AUTO = {"steer_profile": "routed", "steer_categories": "auto"}
KEYS = {"t-open": "k-open-0123456789", "t-narrow": "k-narrow-01234567", "t-wide": "k-wide-0123456789"}
KEYS |= {"t-forced": "k-forced-01234567", "t-default": "k-default-0123456"}


def _config(**tiers) -> dict:
    base = {
        "open": {"profiles": "*", "allow_unsteered": True},
        "narrow": {"profiles": {"routed": {"categories": ["cat_a", "cat_b"]}}},
        "wide": {"profiles": {"routed": {"categories": list(CATEGORIES)}, "gated-cat": {}}},
        "forced": {"forced": {"profile": "routed", "categories": ["auto"], "scale": 1.5}},
        "default": {"default": {"profile": "routed", "categories": ["auto"]}, "profiles": {"routed": {}}},
    }
    return {
        "format_version": 1,
        "tiers": {**base, **tiers},
        "tenants": tenant_entries(KEYS),
    }


POLICY = TenantPolicy.from_mapping(_config())
OPEN, NARROW, WIDE, FORCED, DEFAULT = (POLICY.authenticate(key) for key in KEYS.values())


def _refused(tenant, extra) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        POLICY.decide(tenant, extra, PROFILES)
    return info.value


def _routes(extra_args: dict) -> tuple[str, ...]:
    """What the engine makes of the keys the policy forwards: the categories the request may be routed to."""
    request = parse_steering(extra_args)
    assert request is not None
    resolved = resolve_steering(request, PROFILES)
    assert resolved.categories == () or not resolved.route
    return resolved.route


def test_a_routing_request_passes_through_as_auto():
    POLICY.check_profiles(PROFILES)
    for tenant in (OPEN, WIDE):
        for spelled in ("auto", ["auto"]):
            out = POLICY.decide(tenant, {**AUTO, "steer_categories": spelled}, PROFILES)
            assert out["steer_categories"] == "auto" and out["steer_gate_action"] == "steer", out
            assert _routes(out) == CATEGORIES
    named = POLICY.decide(WIDE, {"steer_profile": "routed", "steer_categories": ["cat_b"]}, PROFILES)
    assert named["steer_categories"] == ["cat_b"] and _routes(named) == ()
    single = TenantPolicy.single_tenant()
    assert single.decide(single.authenticate(None), AUTO, PROFILES) == AUTO


def test_a_tier_grants_auto_only_with_every_category_the_gates_route_to():
    err = _refused(NARROW, AUTO)
    assert (err.status, err.field) == (403, "steer_categories"), err
    assert "cat_c" in err.message and "cat_a" not in err.message.split("approved")[0], err.message
    assert POLICY.decide(NARROW, {"steer_profile": "routed", "steer_categories": "cat_a"}, PROFILES)
    err = _refused(OPEN, {"steer_profile": "gated-cat", "steer_categories": "auto"})  # gates that do not route
    assert (err.status, err.field) == (400, "steer_categories"), err
    err = _refused(OPEN, {**AUTO, "steer_gate_action": "flag"})  # auto steers, or it means nothing
    assert (err.status, err.field) == (400, "steer_categories"), err


def test_a_tier_may_force_or_default_auto():
    forced = POLICY.decide(FORCED, None, PROFILES)
    assert forced == {
        "steer_profile": "routed",
        "steer_scale": 1.5,
        "steer_categories": "auto",
        "steer_gate_action": "steer",
    }
    assert POLICY.decide(FORCED, AUTO, PROFILES) == forced, "restating the forced setting is fine"
    assert POLICY.decide(FORCED, {**AUTO, "steer_categories": ["auto"]}, PROFILES) == forced
    for keys, field in (
        ({"steer_profile": "routed", "steer_categories": ["cat_a"]}, "steer_categories"),
        ({**AUTO, "steer_gate_action": "flag"}, "steer_gate_action"),
        ({**AUTO, "steer_scale": 3.0}, "steer_scale"),
    ):
        err = _refused(FORCED, keys)
        assert (err.status, err.field) == (403, field), (keys, err)
    assert "auto" in _refused(FORCED, {"steer_profile": "routed", "steer_categories": ["cat_a"]}).message
    default = POLICY.decide(DEFAULT, None, PROFILES)
    assert default["steer_categories"] == "auto" and _routes(default) == CATEGORIES
    chosen = POLICY.decide(DEFAULT, {"steer_profile": "routed", "steer_categories": ["cat_c"]}, PROFILES)
    assert chosen["steer_categories"] == ["cat_c"]


@pytest.mark.parametrize(
    ("tiers", "path"),
    [
        ({"forced": {"forced": {"profile": "gated-cat", "categories": ["auto"]}}}, "tiers.forced.forced.categories"),
        (
            {"forced": {"forced": {"profile": "routed", "categories": ["auto"], "gate_action": "flag"}}},
            "tiers.forced.forced.categories",
        ),
        (
            {
                "default": {
                    "default": {"profile": "routed", "categories": ["auto"]},
                    "profiles": {"routed": {"categories": ["cat_a"]}},
                }
            },
            "tiers.default.default.categories",
        ),
        ({"wide": {"profiles": {"routed": {"categories": ["auto"]}}}}, "tiers.wide.profiles.routed.categories"),
    ],
)
def test_the_tenants_file_allows_auto_only_where_it_can_apply(tiers, path):
    with pytest.raises(TenantsFileError) as info:
        TenantPolicy.from_mapping(_config(**tiers)).check_profiles(PROFILES)
    assert path in str(info.value), info.value


def test_discovery_shows_where_auto_is_accepted():
    def entry(tenant, pid="routed"):
        return {e["id"]: e for e in POLICY.visible_profiles(tenant, PROFILES)}[pid]

    for tenant in (OPEN, WIDE, FORCED, DEFAULT):
        assert (entry(tenant)["auto"], entry(tenant)["routes"]) == (True, list(CATEGORIES)), tenant
    assert (entry(NARROW)["auto"], entry(NARROW)["routes"]) == (False, [])
    assert (entry(WIDE, "gated-cat")["auto"], entry(WIDE, "gated-cat")["routes"]) == (False, [])
    assert entry(FORCED)["defaults"]["categories"] == "auto" and entry(DEFAULT)["defaults"]["categories"] == "auto"
    assert entry(OPEN)["defaults"]["categories"] == list(CATEGORIES), "the profile's own default is all of them"


# ------------------------------------------------------------------------- the front end's slot budget


def test_the_front_end_refuses_a_routing_request_that_could_never_get_its_slots(monkeypatch):
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams

    from vllm_steer.core.wire import ROUTE_KEY
    from vllm_steer.engine.vllm import _frontend

    for option in SteerConfig.options():
        monkeypatch.delenv(option.env, raising=False)
    monkeypatch.setattr(_frontend, "current_profiles", lambda config, vllm_config: PROFILES)

    def vllm_config(max_slots: int | None, max_num_seqs: int = 16) -> SimpleNamespace:
        section = {"profiles": "/profiles", **({"max_slots": max_slots} if max_slots else {})}
        return SimpleNamespace(
            additional_config={"vllm_steer": section},
            scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs),
            use_v2_model_runner=False,
            speculative_config=None,
        )

    params = SamplingParams(max_tokens=4, extra_args=dict(AUTO))
    admitted, steering, _ = _frontend._admit(vllm_config(4), params)  # 1 + 3 categories: just fits
    assert steering is not None and steering.route == CATEGORIES
    assert admitted.extra_args[ROUTE_KEY] == list(CATEGORIES) and params.extra_args == AUTO
    for config in (vllm_config(3), vllm_config(None, max_num_seqs=2)):
        with pytest.raises(VLLMValidationError) as info:
            _frontend._admit(config, params)
        assert info.value.parameter == "steer_categories" and "4 steering slots" in str(info.value), info.value
    named = SamplingParams(max_tokens=4, extra_args={"steer_profile": "routed", "steer_categories": ["cat_a", "cat_b"]})
    assert _frontend._admit(vllm_config(1), named)[1] is not None, "only routing requests hold several slots"


# ------------------------------------------------------------------------- what the client and the audit see


def _decision(row: int, fired: bool | None, category: str | None, *, routes: bool = True) -> dict:
    out = {"request": f"cmpl-abc-{row}-0", "profile": "routed", "action": "steer", "fired": fired, "gates": []}
    return {**out, "scores": {"ga": 0.0}, **({"category": category} if routes else {})}


def test_the_header_names_each_rows_category_only_when_the_request_routes():
    rows = [_decision(1, False, None), _decision(0, True, "cat a,é"), _decision(2, None, None), _decision(3, True, "-")]
    assert header_value("abc", rows) == b"action=steer; fired=1,0,-,1; category=cat%20a%2C%C3%A9,-,-,%2D"
    plain = [_decision(0, True, None, routes=False)]
    assert header_value("abc", plain) == b"action=steer; fired=1"


def test_the_audit_gate_line_records_each_rows_category(tmp_path):
    log = AuditLog(str(tmp_path / "audit.jsonl"))
    common = {"request_id": "abc", "tenant": "t", "tier": "open", "route": "/v1/completions"}
    log.gate(**common, decisions=[_decision(0, True, "cat_b"), _decision(1, False, None)])
    log.gate(**common, decisions=[_decision(0, True, None, routes=False)])
    routed, plain = (json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines())
    assert [row["category"] for row in routed["rows"]] == ["cat_b", None]
    assert "category" not in plain["rows"][0]
