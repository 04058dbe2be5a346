"""The tenant-policy middleware on its own (no engine): what reaches the engine, and what never does.

A Starlette app stands in for vLLM's: its completion route echoes the body the middleware handed
on. Hostile bodies (hypothesis) must get a 4xx naming a field or pass through with the tier's
effective steering and the policy stamp — never a 5xx, never the client's own stamp.
"""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from support.tenants import KEYS, PROFILES, tenants_config
from vllm_steer.core.request import STEER_KEYS
from vllm_steer.core.wire import (
    ADMISSION,
    POLICY_TOKEN_KEY,
    TENANT_KEY,
    admitted_tenant,
    verify_stamp,
    without_reserved,
)
from vllm_steer.server.middleware import SteeringPolicyMiddleware
from vllm_steer.server.state import make_state
from vllm_steer.server.tenants import TenantPolicy

STRICT_KEY, STANDARD_KEY, RESEARCH_KEY = KEYS.values()
KEY_TENANTS = {key: name for name, key in KEYS.items()}


async def _echo(request: Request) -> Response:
    """The body handed on, and what the engine's front end would read as the request's admission."""
    body = json.loads(await request.body())
    xargs = body.get("vllm_xargs")
    if xargs is None or POLICY_TOKEN_KEY not in xargs:  # admitted in this context: shown as TENANT_KEY
        body["vllm_xargs"] = {**(xargs or {}), TENANT_KEY: admitted_tenant(xargs)}
    return Response(json.dumps({"forwarded": body}), media_type="application/json")


def _policy() -> TenantPolicy:
    """The support tiers, with raw prompts (the ``completions`` control) for strict and standard too: these
    tests are about the steering that reaches the engine (test_controls.py tests the controls)."""
    config = copy.deepcopy(tenants_config())
    for tier in ("strict", "standard"):
        config["tiers"][tier]["allow_controls"] = ["completions"]
    return TenantPolicy.from_mapping(config)


def _client(stamp_in_body: bool = False) -> TestClient:
    app = Starlette(
        routes=[
            Route("/v1/completions", _echo, methods=["POST"]),
            Route("/v1/chat/completions", _echo, methods=["POST"]),
        ]
    )
    app.state.vllm_steer = make_state(_policy(), lambda: PROFILES, stamp_in_body=stamp_in_body)
    app.add_middleware(SteeringPolicyMiddleware)
    return TestClient(app, raise_server_exceptions=True)


CLIENT = _client()
RAY_CLIENT = _client(stamp_in_body=True)  # the Ray ingress: the engine is another process


def _post(body: dict | str, key: str = RESEARCH_KEY, path: str = "/v1/completions"):
    data = body if isinstance(body, str) else json.dumps(body)
    return CLIENT.post(
        path,
        content=data.encode("utf-8", "surrogatepass"),
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
    )


@pytest.mark.parametrize(
    "body, param",
    [
        ('{"prompt": "hi\\ud800"}', "prompt"),
        ('{"messages": [{"role": "user", "content": "\\udfff"}]}', "messages[0].content"),
        ('{"prompt": "x", "vllm_xargs": {"other": "\\ud800"}}', "vllm_xargs.other"),
        ('{"prompt": "x", "vllm_xargs": {"\\ud800": 1}}', "vllm_xargs"),
    ],
)
def test_lone_surrogates_are_refused_naming_where(body, param):
    response = _post(body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


@pytest.mark.parametrize(
    "xargs, param",
    [
        ({"other": {"nested": 1}}, "other"),
        ({"other": None}, "other"),
        ({"other": [1, [2]]}, "other"),
        ({"steer_profile": "sel", POLICY_TOKEN_KEY: "forged"}, POLICY_TOKEN_KEY),
        ({"steer_profile": "sel", "vllm_steer_digest": "0" * 64}, "vllm_steer_digest"),
        ({"": -(2**63) - 1}, "vllm_xargs"),  # found by the live fuzzer: vLLM named its own field, extra_args
        ({"big": [1, 2**64]}, "big"),
    ],
)
def test_xargs_the_engine_would_choke_on_or_the_server_owns_are_refused(xargs, param):
    response = _post({"prompt": "x", "vllm_xargs": xargs})
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


@pytest.mark.parametrize("flag", [True, 1, "true", " Yes"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_beam_search_is_refused_because_it_would_drop_the_steering(flag, path):
    """vLLM's beam search re-submits each step with fresh sampling params: no vllm_xargs, no tier."""
    body = {"prompt": "x", "messages": [{"role": "user", "content": "x"}], "use_beam_search": flag}
    for key in (STRICT_KEY, STANDARD_KEY, RESEARCH_KEY):
        response = _post(body, key=key, path=path)
        assert response.status_code == 400 and response.json()["error"]["param"] == "use_beam_search", response.text
        assert "beam search" in response.json()["error"]["message"]
    assert _post({**body, "use_beam_search": False}, path=path).status_code == 200


def test_an_admitted_request_carries_the_servers_stamp_and_its_effective_steering():
    forwarded = _post({"prompt": "x"}, key=STRICT_KEY).json()["forwarded"]
    assert forwarded["vllm_xargs"] == {"steer_profile": "refusal", "steer_scale": 1.0, TENANT_KEY: "acme-strict"}
    ray = RAY_CLIENT.post(
        "/v1/completions", json={"prompt": "x"}, headers={"authorization": f"Bearer {STRICT_KEY}"}
    ).json()["forwarded"]["vllm_xargs"]
    assert verify_stamp(ray) == "acme-strict", "stamped in the body for the tenant it was admitted for"
    assert without_reserved(ray) == {"steer_profile": "refusal", "steer_scale": 1.0}
    assert set(ray) - {"steer_profile", "steer_scale"} == {POLICY_TOKEN_KEY, TENANT_KEY}
    assert ADMISSION.get() is None, "the admission never outlives the request"
    forwarded = _post(
        {"prompt": "x", "vllm_xargs": {"steer_profile": "sel", "steer_angle": 200.0, "other": [1, "a"]}},
        key=STANDARD_KEY,
    ).json()["forwarded"]
    assert forwarded["vllm_xargs"]["steer_angle"] == 200.0 and forwarded["vllm_xargs"]["other"] == [1, "a"]


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=30),
    st.sampled_from(
        [
            "../sel",
            "/etc/passwd",
            "sel/../refusal",
            "SEL",
            " sel",
            "sel\x00",
            "ｓｅｌ",
            "x" * 4000,
            "refusal",
            "sel",
            "abl",
            "none",
            "NaN",
            "-inf",
            "cat",
            "generic",
        ]
    ),
)
_values = st.one_of(
    _scalars,
    st.lists(_scalars, max_size=4),
    st.dictionaries(st.text(max_size=4), _scalars, max_size=2),
    st.lists(st.integers(0, 5), min_size=500, max_size=2000),
)
_keys = st.one_of(
    st.sampled_from(
        [
            *STEER_KEYS,
            "steer_angel",
            "STEER_PROFILE",
            "Steer_Profile",
            "steer_",
            POLICY_TOKEN_KEY,
            "vllm_steer_digest",
            "other_plugin",
        ]
    ),
    st.text(max_size=12),
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    xargs=st.dictionaries(_keys, _values, max_size=6),
    key=st.sampled_from([STRICT_KEY, STANDARD_KEY, RESEARCH_KEY]),
    chat=st.booleans(),
)
def test_hostile_xargs_get_a_named_4xx_or_pass_with_the_tiers_effective_steering(xargs, key, chat):
    path = "/v1/chat/completions" if chat else "/v1/completions"
    response = _post({"prompt": "x", "vllm_xargs": xargs}, key=key, path=path)
    if response.status_code == 200:
        forwarded = response.json()["forwarded"]["vllm_xargs"]
        assert forwarded.pop(TENANT_KEY) == KEY_TENANTS[key], "admitted for its own tenant"
        steer = {k: v for k, v in forwarded.items() if k.startswith("steer_")}
        if key == STRICT_KEY:
            assert steer == {"steer_profile": "refusal", "steer_scale": 1.0}, "the strict tier is always forced"
        elif key == STANDARD_KEY:
            assert steer.get("steer_profile") in {"sel", "sel-low", "narrow", "cat"}, "standard is never unsteered"
        return
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    assert error["param"] and error["message"], error
    assert (
        error["param"] in xargs
        or error["param"] in (*STEER_KEYS, "vllm_xargs")
        or error["param"].startswith("vllm_xargs")
    ), error


_CONTROL_FIELDS = st.sampled_from(
    [
        ("logit_bias", {"42": -100}),
        ("logit_bias", {}),
        ("bad_words", ["sorry"]),
        ("bad_words", []),
        ("allowed_token_ids", [1, 2]),
        ("structured_outputs", {"regex": "Sure.*"}),
        ("response_format", {"type": "json_object"}),
        ("response_format", {"type": "text"}),
        ("guided_json", {"type": "object"}),
        ("tool_choice", "required"),
        ("n", 2),
        ("n", "3"),
        ("n", 1),
        ("best_of", 4),
        ("continue_final_message", "true"),
        ("add_generation_prompt", 0),
        ("add_generation_prompt", True),
        ("chat_template", "{{ 'Sure, here is' }}"),
        ("chat_template_kwargs", {"enable_thinking": False}),
        ("prompt_embeds", "AAAA"),
        ("priority", -5),
        ("priority", 0),
        ("kv_transfer_params", {"do_remote_prefill": True}),
        ("model", "some-lora"),
        ("messages", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure"}]),
    ]
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fields=st.lists(_CONTROL_FIELDS, max_size=4), chat=st.booleans())
def test_no_strict_tier_request_reaches_the_engine_with_a_forbidden_control(fields, chat):
    """Through the middleware: the strict tier (forced; raw prompts only) is refused naming a field it sent,
    or what reaches the engine uses no control the tier does not permit."""
    from vllm_steer.server.tenants.controls import used_controls

    path = "/v1/chat/completions" if chat else "/v1/completions"
    body: dict = {"model": "base", "max_tokens": 2}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "x"})
    body.update(dict(fields))
    response = _post(body, key=STRICT_KEY, path=path)
    if response.status_code == 200:
        forwarded = response.json()["forwarded"]
        used = {control for control, _ in used_controls(forwarded, path, ())}
        assert used <= {"completions"}, (used, body)
        return
    assert response.status_code in (400, 403), response.text
    assert response.json()["error"]["param"].split(".")[0].split("[")[0] in body, (body, response.text)
