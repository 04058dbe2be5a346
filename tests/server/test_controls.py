"""Tier-governed request controls: the fields outside ``vllm_xargs`` that can counteract steering.

What a request uses (:func:`used_controls`), read as vLLM's lax pydantic models will; how many sequences
it asks for (:func:`rows`); the ``allow_controls`` field of a tier (defaults, errors); the policy's
refusals (:meth:`TenantPolicy.check_controls`) and its per-sequence concurrency (:meth:`TenantPolicy.acquire`).
Hypothesis mixes these fields with odd values: a forced tier never admits a request that uses a control,
and (against vLLM's own request models) never one that vLLM would serve with a lever set.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from support.tenants import tenants_config
from vllm_steer.server.tenants import (
    CONTROL_NAMES,
    CONTROLS,
    PolicyError,
    TenantPolicy,
    TenantsFileError,
    Tier,
    hash_api_key,
    rows,
    used_controls,
)
from vllm_steer.server.tenants.controls import MAX_ROWS, PRIORITY_HEADER

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
BASE = ("base",)
USER = [{"role": "user", "content": "How do I pick a lock?"}]


def _config() -> dict:
    """The support tiers, plus ``open`` (no setting: opt-out allowed) and ``picky`` (a forced tier with two
    controls and a concurrency of 4)."""
    config = copy.deepcopy(tenants_config())
    config["tiers"]["open"] = {"profiles": "*"}
    config["tiers"]["picky"] = {
        "forced": {"profile": "refusal", "scale": 1.0},
        "allow_controls": ["n", "structured_outputs"],
        "max_concurrent_steered": 4,
    }
    for i, tier in enumerate(("open", "picky")):
        salt = bytes([0x40 + i]) * 16
        config["tenants"].append(
            {"name": f"t-{tier}", "tier": tier, "key_hash": hash_api_key(f"key-{tier}", salt=salt)}
        )
    return config


POLICY = TenantPolicy.from_mapping(_config())
TENANTS = {tenant.tier_name: tenant for tenant in POLICY.tenants}
STRICT, STANDARD, RESEARCH, OPEN, PICKY = (TENANTS[t] for t in ("strict", "standard", "research", "open", "picky"))


def _chat(**fields: Any) -> dict:
    return {"messages": USER, **fields}


def _cmpl(**fields: Any) -> dict:
    return {"prompt": "Hi", **fields}


# ------------------------------------------------------------------------- used_controls: each control

USED = [
    # completions: the route itself
    (_cmpl(), COMPLETIONS, [("completions", "prompt")]),
    (_cmpl(prompt=[1, 2, 3]), COMPLETIONS, [("completions", "prompt")]),
    # assistant_prefill
    (
        _chat(continue_final_message=True, add_generation_prompt=False),
        CHAT,
        [
            ("assistant_prefill", "continue_final_message"),
            ("assistant_prefill", "add_generation_prompt"),
        ],
    ),
    (_chat(add_generation_prompt=False), CHAT, [("assistant_prefill", "add_generation_prompt")]),
    (
        {"messages": [*USER, {"role": "assistant", "content": "Sure, here is"}]},
        CHAT,
        [("assistant_prefill", "messages")],
    ),
    ({"messages": [*USER, {"role": " Assistant", "content": "Sure"}]}, CHAT, [("assistant_prefill", "messages")]),
    ({"messages": [{"content": "no role"}]}, CHAT, [("assistant_prefill", "messages")]),
    (_chat(chat_template="{{ messages[0].content }}"), CHAT, [("assistant_prefill", "chat_template")]),
    (_chat(chat_template_kwargs={"enable_thinking": False}), CHAT, [("assistant_prefill", "chat_template_kwargs")]),
    # logit_bias, bad_words, allowed_token_ids
    (_chat(logit_bias={"1234": -100}), CHAT, [("logit_bias", "logit_bias")]),
    (_cmpl(logit_bias={"1234": 5}), COMPLETIONS, [("completions", "prompt"), ("logit_bias", "logit_bias")]),
    (_chat(bad_words=["sorry"]), CHAT, [("bad_words", "bad_words")]),
    (_chat(allowed_token_ids=[1, 2]), CHAT, [("allowed_token_ids", "allowed_token_ids")]),
    # structured_outputs in all its spellings
    (_chat(structured_outputs={"choice": ["Sure"]}), CHAT, [("structured_outputs", "structured_outputs")]),
    (_chat(structured_outputs={}), CHAT, [("structured_outputs", "structured_outputs")]),
    (_chat(response_format={"type": "json_object"}), CHAT, [("structured_outputs", "response_format")]),
    (_chat(response_format={"type": "structural_tag"}), CHAT, [("structured_outputs", "response_format")]),
    (_chat(response_format={"type": "TEXT"}), CHAT, [("structured_outputs", "response_format")]),
    (_chat(response_format="text"), CHAT, [("structured_outputs", "response_format")]),
    (_chat(tool_choice="required"), CHAT, [("structured_outputs", "tool_choice")]),
    (_chat(tool_choice={"type": "function", "function": {"name": "f"}}), CHAT, [("structured_outputs", "tool_choice")]),
    (_chat(guided_json={"type": "object"}), CHAT, [("structured_outputs", "guided_json")]),
    (
        _chat(guided_regex="Sure.*", guided_choice=["a"]),
        CHAT,
        [
            ("structured_outputs", "guided_regex"),
            ("structured_outputs", "guided_choice"),
        ],
    ),
    (
        _cmpl(guided_grammar="root ::= 'Sure'"),
        COMPLETIONS,
        [
            ("completions", "prompt"),
            ("structured_outputs", "guided_grammar"),
        ],
    ),
    # prompt_embeds: the completions field, and embeddings as chat content parts
    ({"prompt_embeds": "AAAA"}, COMPLETIONS, [("completions", "prompt"), ("prompt_embeds", "prompt_embeds")]),
    ({"prompt_embeds": ["AAAA", "BBBB"]}, COMPLETIONS, [("completions", "prompt"), ("prompt_embeds", "prompt_embeds")]),
    (
        {"messages": [{"role": "user", "content": [{"type": "prompt_embeds", "data": "AAAA"}]}]},
        CHAT,
        [("prompt_embeds", "messages")],
    ),
    (
        {"messages": [{"role": "user", "content": [{"image_embeds": "AAAA"}]}]},
        CHAT,
        [("prompt_embeds", "messages")],
    ),
    # n / best_of
    (_chat(n=2), CHAT, [("n", "n")]),
    (_cmpl(best_of=3), COMPLETIONS, [("completions", "prompt"), ("n", "best_of")]),
    # lora: a model other than the served base models
    (_chat(model="refusal-ablation-lora"), CHAT, [("lora", "model")]),
    (_chat(model="BASE"), CHAT, [("lora", "model")]),
    (_chat(model=["base"]), CHAT, [("lora", "model")]),
    # priority
    (_chat(priority=-5), CHAT, [("priority", "priority")]),
    # kv / ec transfer
    (_chat(kv_transfer_params={"do_remote_prefill": True}), CHAT, [("kv_transfer_params", "kv_transfer_params")]),
    (_chat(ec_transfer_params={"x": 1}), CHAT, [("kv_transfer_params", "ec_transfer_params")]),
    # several at once: table order, then the control's field order
    (
        _chat(priority=1, n=4, logit_bias={"1": 1}, chat_template="x"),
        CHAT,
        [
            ("assistant_prefill", "chat_template"),
            ("logit_bias", "logit_bias"),
            ("n", "n"),
            ("priority", "priority"),
        ],
    ),
]


@pytest.mark.parametrize("body, path, expected", USED)
def test_used_controls_names_each_control_and_the_field_sent(body, path, expected):
    assert used_controls(body, path, BASE) == expected


def test_every_control_is_exercised_and_fields_are_declared():
    seen = {name for _, _, expected in USED for name, _ in expected}
    assert seen == set(CONTROL_NAMES)
    for _, _, expected in USED:
        for name, field in expected:
            assert field in CONTROLS[name].fields, (name, field)
    for control in CONTROLS.values():
        assert control.description and "\n" not in control.description


LAX_TRUE = [True, 1, 1.0, "1", "true", "True", "TRUE", "t", "yes", "y", "on"]
LAX_FALSE = [False, 0, 0.0, "0", "false", "f", "no", "n", "off"]
ODD = ["maybe", 2, [], {}, [True], " yes "]  # vLLM cannot read these as booleans: they count as used


@pytest.mark.parametrize("value", [*LAX_TRUE, *ODD])
def test_continue_final_message_counts_when_vllm_reads_true_or_cannot_read_it(value):
    assert used_controls(_chat(continue_final_message=value), CHAT, BASE) == [
        ("assistant_prefill", "continue_final_message")
    ]


@pytest.mark.parametrize("value", [*LAX_FALSE, None])
def test_continue_final_message_false_is_no_use(value):
    assert used_controls(_chat(continue_final_message=value), CHAT, BASE) == []


@pytest.mark.parametrize("value", [*LAX_FALSE, *ODD])
def test_add_generation_prompt_counts_when_vllm_reads_false_or_cannot_read_it(value):
    assert used_controls(_chat(add_generation_prompt=value), CHAT, BASE) == [
        ("assistant_prefill", "add_generation_prompt")
    ]


@pytest.mark.parametrize("value", [*LAX_TRUE, None])
def test_add_generation_prompt_true_is_no_use(value):
    assert used_controls(_chat(add_generation_prompt=value), CHAT, BASE) == []


@pytest.mark.parametrize("field", ["n", "best_of"])
@pytest.mark.parametrize("value", [2, "2", " 2 ", 2.0, "2.0", "+3", "1_0", 10**30, 2.5, "two", [2], {}, float("inf")])
def test_more_than_one_sample_in_lax_spellings_or_unreadable_counts(field, value):
    assert used_controls(_chat(**{field: value}), CHAT, BASE) == [("n", field)]


@pytest.mark.parametrize("field", ["n", "best_of"])
@pytest.mark.parametrize("value", [None, 1, "1", 1.0, True, 0, -3, "0"])
def test_one_sample_or_fewer_is_no_use(field, value):
    """1 is the default; 0 and negatives are refused by vLLM itself, whatever the tier."""
    assert used_controls(_chat(**{field: value}), CHAT, BASE) == []


@pytest.mark.parametrize("value", [1, -1, "3", "-2", 0.5, True, "high", [0]])
def test_priority_other_than_zero_counts(value):
    assert used_controls(_chat(priority=value), CHAT, BASE) == [("priority", "priority")]


@pytest.mark.parametrize("value", [None, 0, "0", 0.0, False, " 0 "])
def test_priority_zero_is_no_use(value):
    assert used_controls(_chat(priority=value), CHAT, BASE) == []


@pytest.mark.parametrize(
    "headers, used",
    [
        ({"X-Vllm-Priority": "5"}, True),
        ({"x-vllm-priority": " -1 "}, True),
        ({"X-VLLM-PRIORITY": "0"}, False),
        ({"x-vllm-priority": "high"}, False),  # vLLM ignores a header it cannot read, and uses the body's
        ({"x-other": "5"}, False),
        (None, False),
    ],
)
def test_the_priority_header_vllm_reads_counts_too(headers, used):
    expected = [("priority", PRIORITY_HEADER)] if used else []
    assert used_controls(_chat(), CHAT, BASE, headers) == expected


DEFAULTS = {
    "logit_bias": [None, {}],
    "bad_words": [None, []],
    "allowed_token_ids": [None, []],
    "structured_outputs": [None],
    "response_format": [None, {"type": "text"}, {"type": "text", "json_schema": None}],
    "tool_choice": [None, "none", "auto"],
    "chat_template": [None, ""],
    "chat_template_kwargs": [None, {}],
    "n": [None, 1],
    "priority": [None, 0],
    "kv_transfer_params": [None, {}],
    "ec_transfer_params": [None, {}],
    "model": [None, "", "base"],
    "continue_final_message": [None, False],
    "add_generation_prompt": [None, True],
    "guided_json": [None],
    "best_of": [None, 1],
}


@pytest.mark.parametrize("field, value", [(f, v) for f, values in DEFAULTS.items() for v in values])
def test_defaults_and_nulls_are_no_use(field, value):
    assert used_controls(_chat(**{field: value}), CHAT, BASE) == []
    assert used_controls(_cmpl(**{field: value}), COMPLETIONS, BASE) == [("completions", "prompt")]


def test_an_ordinary_client_sending_every_default_uses_nothing():
    body = _chat(
        model="base",
        frequency_penalty=0.0,
        logit_bias=None,
        logprobs=False,
        top_logprobs=0,
        max_tokens=64,
        n=1,
        presence_penalty=0.0,
        response_format={"type": "text"},
        seed=7,
        stop=[],
        stream=True,
        temperature=0.7,
        top_p=1.0,
        tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        tool_choice="auto",
        user="u",
        bad_words=[],
        add_generation_prompt=True,
        continue_final_message=False,
        priority=0,
        vllm_xargs={"steer_profile": "sel"},
    )
    assert used_controls(body, CHAT, BASE) == []
    multi_turn = {"messages": [*USER, {"role": "assistant", "content": "No."}, *USER]}
    assert used_controls(multi_turn, CHAT, BASE) == []


def test_route_specific_fields_count_only_on_their_route():
    """A chat-only field sent to /v1/completions is an extra vLLM ignores there (and vice versa)."""
    assert used_controls(_cmpl(continue_final_message=True, tool_choice="required"), COMPLETIONS, BASE) == [
        ("completions", "prompt")
    ]
    assert used_controls(_chat(prompt_embeds="AAAA"), CHAT, BASE) == []
    # any other path: read as either route
    assert [name for name, _ in used_controls(_chat(continue_final_message=True), "/v1/other", BASE)] == [
        "completions",
        "assistant_prefill",
    ]


def test_lora_is_not_checked_when_the_base_models_are_unknown():
    assert used_controls(_chat(model="some-adapter"), CHAT, ()) == []
    assert used_controls(_chat(model="served-name"), CHAT, ["base", "served-name"]) == []


# ------------------------------------------------------------------------- rows


@pytest.mark.parametrize(
    "body, path, expected",
    [
        (_chat(), CHAT, 1),
        (_chat(n=3), CHAT, 3),
        (_chat(n="3"), CHAT, 3),
        (_chat(n=2, best_of=5), CHAT, 5),
        (_chat(n="x"), CHAT, 1),  # vLLM refuses it
        (_chat(n=2.5), CHAT, 1),
        (_chat(n=0), CHAT, 1),
        (_chat(n=-4), CHAT, 1),
        (_chat(n=None), CHAT, 1),
        (_chat(prompt=["a", "b", "c"]), CHAT, 1),  # no prompt field on the chat route
        (_cmpl(), COMPLETIONS, 1),
        (_cmpl(prompt=[1, 2, 3]), COMPLETIONS, 1),  # one prompt of token ids
        (_cmpl(prompt=["a", "b", "c"]), COMPLETIONS, 3),
        (_cmpl(prompt=[[1, 2], [3]]), COMPLETIONS, 2),
        (_cmpl(prompt=["a", "b"], n=3), COMPLETIONS, 6),
        (_cmpl(prompt=[]), COMPLETIONS, 1),
        ({"prompt_embeds": ["A", "B"]}, COMPLETIONS, 2),
        ({"prompt": ["a", "b"], "prompt_embeds": "A"}, COMPLETIONS, 3),  # vLLM serves both
        (_chat(n=10**30), CHAT, MAX_ROWS),
        (_cmpl(prompt=["a"] * 1000, n=10**6), COMPLETIONS, MAX_ROWS),
    ],
)
def test_rows_counts_the_sequences_the_engine_will_generate(body, path, expected):
    assert rows(body, path) == expected


# ------------------------------------------------------------------------- Tier.allow_controls


def test_allow_controls_defaults_to_all_with_opt_out_and_none_otherwise():
    tiers = POLICY.tiers
    assert tiers["strict"].allow_controls == ()  # forced
    assert tiers["standard"].allow_controls == ()  # default setting, no opt-out
    assert tiers["research"].allow_controls == CONTROL_NAMES  # allow_unsteered: true
    assert tiers["open"].allow_controls == CONTROL_NAMES  # no setting: opt-out by default
    assert tiers["picky"].allow_controls == ("structured_outputs", "n")  # listed, kept in table order
    assert Tier(default={"profile": "p"}, profiles={"p": {}}, allow_unsteered=True).allow_controls == CONTROL_NAMES
    assert Tier(profiles="*", allow_unsteered=False).allow_controls == ()
    assert Tier(forced={"profile": "p"}, allow_controls="*").allow_controls == CONTROL_NAMES
    assert Tier(profiles="*", allow_controls=[]).allow_controls == ()
    assert Tier(profiles="*", allow_controls=["n", "completions"]).permits("completions")
    assert not Tier(forced={"profile": "p"}).permits("n")


@pytest.mark.parametrize(
    "value, field, fragment",
    [
        (["n", "sampling"], "tiers.strict.allow_controls", "unknown control 'sampling'"),
        (["N"], "tiers.strict.allow_controls", "unknown control 'N'"),
        ("all", "tiers.strict.allow_controls", "'*' or a list of control names"),
        (["*", "n"], "tiers.strict.allow_controls", "stands alone"),
        (["n", "n"], "tiers.strict.allow_controls", "must not repeat"),
        ([1], "tiers.strict.allow_controls.0", "valid string"),
        (None, "tiers.strict.allow_controls", "valid tuple"),
    ],
)
def test_allow_controls_errors_name_the_field_and_list_the_controls(value, field, fragment):
    config = copy.deepcopy(tenants_config())
    config["tiers"]["strict"]["allow_controls"] = value
    with pytest.raises(TenantsFileError) as info:
        TenantPolicy.from_mapping(config)
    assert info.value.field == field, str(info.value)
    assert fragment in str(info.value)
    if "unknown control" in fragment:
        assert all(name in str(info.value) for name in CONTROL_NAMES)


# ------------------------------------------------------------------------- check_controls


def _refusal(tenant, body, path=CHAT, **kwargs) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        POLICY.check_controls(tenant, body, path, BASE, **kwargs)
    return info.value


@pytest.mark.parametrize("body, path, expected", [case for case in USED if case[2]])
def test_a_forced_tier_refuses_every_control_naming_the_first_field(body, path, expected):
    err = _refusal(STRICT, body, path)
    name, field = expected[0]
    assert (err.status, err.field) == (403, field)
    assert err.message.startswith(f"{name} (") and "tier permits: none" in err.message
    assert err.to_openai()["error"] == {"message": err.message, "type": "permission_error", "param": field, "code": 403}
    POLICY.check_controls(RESEARCH, body, path, BASE)  # a tier that permits all
    POLICY.check_controls(OPEN, body, path, BASE)


def test_a_tier_permits_exactly_what_it_lists():
    POLICY.check_controls(PICKY, _chat(n=3, response_format={"type": "json_object"}), CHAT, BASE)
    err = _refusal(PICKY, _chat(n=3, logit_bias={"1": 1}))
    assert (err.status, err.field) == (403, "logit_bias")
    assert "tier permits: structured_outputs, n" in err.message
    assert _refusal(PICKY, _cmpl(), COMPLETIONS).field == "prompt"
    assert _refusal(STANDARD, _chat(n=2)).field == "n"
    assert _refusal(STRICT, _chat(), headers={"x-vllm-priority": "3"}).field == PRIORITY_HEADER


def test_ordinary_requests_pass_every_tier():
    for tenant in TENANTS.values():
        POLICY.check_controls(tenant, _chat(model="base", n=1, logit_bias={}, bad_words=[]), CHAT, BASE)


def test_single_tenant_mode_checks_nothing():
    policy = TenantPolicy.single_tenant()
    tenant = policy.authenticate(None)
    policy.check_controls(tenant, _cmpl(logit_bias={"1": -100}, n=8, model="lora"), COMPLETIONS, BASE)


# ------------------------------------------------------------------------- acquire with rows


def test_acquire_counts_rows_and_releases_as_many():
    policy = TenantPolicy.from_mapping(_config())
    picky = next(t for t in policy.tenants if t.tier_name == "picky")  # max_concurrent_steered: 4
    first = policy.acquire(picky, 3)
    assert policy.in_flight(picky) == 3
    with pytest.raises(PolicyError) as info:
        policy.acquire(picky, 2)  # would fit once the first ends: 429
    assert (info.value.status, info.value.field) == (429, "steer_profile")
    assert policy.in_flight(picky) == 3  # a refusal takes nothing
    with policy.acquire(picky):
        assert policy.in_flight(picky) == 4
    first.release()
    first.release()  # idempotent
    assert policy.in_flight(picky) == 0
    with policy.acquire(picky, 4):
        assert policy.in_flight(picky) == 4
    assert policy.in_flight(picky) == 0


def test_a_request_larger_than_the_tier_limit_is_403_naming_n():
    policy = TenantPolicy.from_mapping(_config())
    picky = next(t for t in policy.tenants if t.tier_name == "picky")
    with pytest.raises(PolicyError) as info:
        policy.acquire(picky, 5)
    assert (info.value.status, info.value.field) == (403, "n")
    assert "5 steered sequences" in info.value.message and "4 at a time" in info.value.message
    assert policy.in_flight(picky) == 0


def test_acquire_without_a_limit_still_counts_rows_and_rows_below_one_count_one():
    policy = TenantPolicy.from_mapping(_config())
    research = next(t for t in policy.tenants if t.tier_name == "research")
    with policy.acquire(research, 1000), policy.acquire(research, 0):
        assert policy.in_flight(research) == 1001
    assert policy.in_flight(research) == 0


# ------------------------------------------------------------------------- hypothesis: mixed bodies

_junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64),
    st.floats(),
    st.text(max_size=8),
    st.lists(st.one_of(st.integers(-2, 5), st.text(max_size=4)), max_size=3),
    st.dictionaries(st.text(max_size=4), st.one_of(st.integers(-100, 100), st.text(max_size=4)), max_size=2),
)
_ROLES = ["user"] * 4 + ["assistant"] * 2 + ["system", "tool", "Assistant", " assistant", "model", 3, None]
_PARTS = [
    {"type": "text", "text": "hi"},
    {"type": "prompt_embeds", "data": "AAAA"},
    {"prompt_embeds": "AAAA"},
    {"type": "image_embeds", "image_embeds": "AAAA"},
    {"type": "image_url", "image_url": {"url": "http://x"}},
    "plain",
]
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(_ROLES)},
    optional={"content": st.one_of(st.text(max_size=12), st.lists(st.sampled_from(_PARTS), min_size=1, max_size=2))},
)
_TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
FIELD_VALUES: dict[str, list[Any]] = {
    "messages": [],  # drawn from _message below
    "prompt": ["Hi", "Sure, here is", ["a", "b"], [1, 2, 3], [[1, 2], [3]], "", []],
    "model": [None, "", "base", "base-lora", "BASE", 3],
    "n": [None, 0, 1, 2, "1", "2", 1.0, 2.0, True, False, 2.5, "x"],
    "best_of": [None, 1, 2, "3"],
    "logit_bias": [None, {}, {"42": -100}, {"42": 0}, [], "x"],
    "bad_words": [None, [], ["sorry"], "sorry"],
    "allowed_token_ids": [None, [], [1, 2], ["1"]],
    "structured_outputs": [None, {}, {"choice": ["Sure"]}, {"regex": "Sure.*"}, {"json": {"type": "object"}}],
    "response_format": [
        None,
        {"type": "text"},
        {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
        {"type": "TEXT"},
    ],
    "tools": [None, _TOOLS],
    "tool_choice": [None, "none", "auto", "required", "Required", {"type": "function", "function": {"name": "f"}}],
    "guided_json": [None, {"type": "object"}],
    "guided_choice": [None, ["Sure"]],
    "continue_final_message": [None, False, True, "true", "false", 1, 0, "1", "yes", "on", "off"],
    "add_generation_prompt": [None, True, False, "false", 0, "0", "f", "no", 1],
    "chat_template": [None, "", "{{ messages }}"],
    "chat_template_kwargs": [None, {}, {"enable_thinking": False}],
    "prompt_embeds": [None, [], "AAAA", ["AAAA"]],
    "priority": [None, 0, "0", 1, -1, "5", 0.0, False, True],
    "kv_transfer_params": [None, {}, {"do_remote_prefill": True}],
    "ec_transfer_params": [None, {}, {"x": 1}],
    "temperature": [None, 0.5],
    "max_tokens": [None, 16],
    "stream": [None, False],
}


@st.composite
def _requests(draw) -> tuple[str, dict]:
    """A route and a body for it: the route's input (messages, or prompt / prompt_embeds) nearly always there,
    then some of :data:`FIELD_VALUES`, now and then with an odd value instead."""
    path = draw(st.sampled_from([CHAT, COMPLETIONS]))
    body: dict[str, Any] = {}
    if draw(st.integers(0, 9)):
        if path == CHAT:
            body["messages"] = draw(st.lists(_message, min_size=1, max_size=3))
        else:
            body["prompt"] = draw(st.sampled_from(FIELD_VALUES["prompt"]))
    for name in draw(st.lists(st.sampled_from(sorted(FIELD_VALUES)), unique=True, max_size=6)):
        if name == "messages":
            body[name] = draw(st.lists(_message, min_size=1, max_size=3))
        elif draw(st.integers(0, 7)) == 0:
            body[name] = draw(_junk)
        else:
            body[name] = draw(st.sampled_from(FIELD_VALUES[name]))
    return path, body


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=_requests())
def test_a_forced_tier_admits_no_request_that_uses_a_control(request):
    path, body = request
    for tenant in (STRICT, STANDARD, PICKY):
        try:
            POLICY.check_controls(tenant, body, path, BASE)
        except PolicyError as err:
            assert err.status == 403
            assert err.field in body or (err.field == "prompt" and path == COMPLETIONS), (err.field, body)
            first = next((n, f) for n, f in used_controls(body, path, BASE) if not tenant.tier.permits(n))
            assert err.field == first[1] and err.message.startswith(f"{first[0]} ("), (err, first)
        else:
            assert all(tenant.tier.permits(name) for name, _ in used_controls(body, path, BASE)), body
    POLICY.check_controls(RESEARCH, body, path, BASE)
    assert 1 <= rows(body, path) <= MAX_ROWS


# ------------------------------------------------------------------------- hypothesis: against vLLM's own models


@pytest.fixture(scope="module")
def vllm_models():
    chat = pytest.importorskip("vllm.entrypoints.openai.chat_completion.protocol")
    cmpl = pytest.importorskip("vllm.entrypoints.openai.completion.protocol")
    return {CHAT: chat.ChatCompletionRequest, COMPLETIONS: cmpl.CompletionRequest}


def _levers(request: Any, path: str) -> list[str]:
    """What a request vLLM accepted will actually do beyond a plain chat turn, read off vLLM's parsed model
    (an oracle independent of :mod:`~vllm_steer.server.tenants.controls`)."""
    found = []
    if path == COMPLETIONS:
        found.append("completions")
        if request.prompt_embeds:
            found.append("prompt_embeds")
    else:
        if request.continue_final_message or not request.add_generation_prompt:
            found.append("assistant_prefill")
        if request.messages and request.messages[-1].get("role") == "assistant":
            found.append("assistant_prefill")
        if request.chat_template or request.chat_template_kwargs:
            found.append("assistant_prefill")
        if request.tool_choice == "required" or not isinstance(request.tool_choice, (str, type(None))):
            found.append("structured_outputs")
        for message in request.messages:
            content = message.get("content")
            if isinstance(content, list) and any(
                isinstance(p, dict) and p.get("type", "").endswith("embeds") for p in content
            ):
                found.append("prompt_embeds")
    if request.logit_bias:
        found.append("logit_bias")
    if request.bad_words:
        found.append("bad_words")
    if request.allowed_token_ids:
        found.append("allowed_token_ids")
    if request.structured_outputs is not None or (
        request.response_format is not None and request.response_format.type != "text"
    ):
        found.append("structured_outputs")
    if (request.n or 1) > 1:
        found.append("n")
    if request.model and request.model not in BASE:
        found.append("lora")
    if request.priority != 0:
        found.append("priority")
    if request.kv_transfer_params or request.ec_transfer_params:
        found.append("kv_transfer_params")
    return found


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=_requests())
def test_no_request_vllm_would_serve_with_a_lever_passes_a_forced_tier(vllm_models, request):
    path, body = request
    try:
        request = vllm_models[path].model_validate(copy.deepcopy(body))
    except Exception:  # noqa: BLE001 - anything vLLM's model refuses is never served
        event("vLLM refuses the body")
        return
    levers = _levers(request, path)
    event(f"vLLM accepts it, levers: {sorted(set(levers)) or 'none'}")
    if levers:
        err = _refusal(STRICT, body, path)
        assert err.status == 403
        used = {name for name, _ in used_controls(body, path, BASE)}
        assert set(levers) <= used, (levers, used, body)
