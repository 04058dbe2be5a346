"""Gates through the OpenAI API (``vllm-steer serve``): a refusing profile answers its fired rows with the refusal,
token by token when streamed, ending with ``finish_reason: stop``; rows whose gate did not fire are answered as
unsteered; a refusal cannot be combined with structured outputs (400 naming the field). Every decision reaches the
client (``x-vllm-steer-gate`` on non-streaming responses), the counters and the audit log. Under a tenants file, a
tier that forces a gate keeps its action and refusal text whatever the client sends (403 naming the key). A routing
request (``steer_categories: "auto"``) steers each row with the category whose gate fired, as the HF reference does,
and the header names that category per row."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import yaml

from support.server import Server, completion_body, free_port, serve_command, server_env, tokens_and_logprobs
from vllm_steer.server.tenants import hash_api_key
from vllm_steer.testing.tiny import TINY_GATED

pytestmark = pytest.mark.engine

REFUSE = {"steer_profile": "tiny-refuse"}
REFUSAL = TINY_GATED["tiny-refuse"]["refusal"]
RESEARCH, STRICT = "gates-research-key-0123", "gates-strict-key-4567"
STRICT_REFUSAL = "Not for this tier."
ROUTED = {"steer_profile": "tiny-routed", "steer_categories": "auto", "steer_scale": 3.0}


@pytest.fixture(scope="module")
def gated_server(gated, tmp_path_factory):
    root, where = gated[0], tmp_path_factory.mktemp("server-gated")
    tiers = {
        "research": {"profiles": "*", "allow_unsteered": True},
        # raw completions allowed so the rows compare with the others; the gate is the tier's
        "strict": {
            "forced": {"profile": "tiny-refuse", "gate_action": "refuse", "refusal": STRICT_REFUSAL},
            "allow_controls": ["completions"],
        },
    }
    tenants = {
        "format_version": 1,
        "tiers": tiers,
        "tenants": [
            {"name": "lab", "tier": "research", "key_hash": hash_api_key(RESEARCH)},
            {"name": "shop", "tier": "strict", "key_hash": hash_api_key(STRICT)},
        ],
    }
    (where / "tenants.yaml").write_text(yaml.safe_dump(tenants))
    options = ("--steer-audit-log", str(where / "audit.jsonl"), "--steer-tenants", str(where / "tenants.yaml"))
    cmd = serve_command(root, free_port(), root / "profiles", *options, "--steer-public-metrics")
    srv = Server(cmd, server_env(), where / "server.log", str(root / "model"), root / "profiles", key="server:gated")
    srv.audit = where / "audit.jsonl"
    yield srv
    srv.stop()


def _gate_lines(server: Server) -> dict[str, dict]:
    lines = [json.loads(line) for line in server.audit.read_text().splitlines()]
    return {line["request_id"]: line for line in lines if line["event"] == "gate"}


def _request_id(response_id: str) -> str:
    return re.sub(r"^(chat)?cmpl-", "", response_id)


def _body(server: Server, ids: list[int], xargs: dict | None, **extra) -> dict:
    body = {"model": server.model, "prompt": ids, "max_tokens": 24, "temperature": 0.0, "return_token_ids": True}
    if xargs is not None:
        body["vllm_xargs"] = xargs
    return {**body, **extra}


def test_fired_rows_are_refused_and_the_others_answered_unsteered(gated, gated_server, tokenizer):
    _, prompts, _, reference = gated
    refusal_ids = [*tokenizer(REFUSAL, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
    bodies = [_body(gated_server, ids, xargs) for ids in prompts for xargs in (REFUSE, None)]
    with ThreadPoolExecutor(8) as pool:  # one mixed batch
        responses = list(pool.map(lambda b: gated_server.post("/v1/completions", b, RESEARCH), bodies))
    fired = 0
    audit = _gate_lines(gated_server)
    for i, ids in enumerate(prompts):
        refused, plain = (r.json()["choices"][0] for r in responses[2 * i : 2 * i + 2])
        expected = bool(reference(ids, REFUSE)["fired"])
        if expected:
            fired += 1
            assert refused["text"] == REFUSAL and refused["finish_reason"] == "stop", refused
            assert refused["token_ids"] == refusal_ids, refused
        else:
            assert (refused["text"], refused["token_ids"]) == (plain["text"], plain["token_ids"])
        # the decision, told to the client and written to the audit log
        response = responses[2 * i]
        assert response.headers["x-vllm-steer-gate"] == f"action=refuse; fired={int(expected)}"
        assert "x-vllm-steer-gate" not in responses[2 * i + 1].headers, "an ungated request has no gate header"
        (row,) = audit[_request_id(response.json()["id"])]["rows"]
        assert (row["profile"], row["action"], row["fired"]) == ("tiny-refuse", "refuse", expected)
        assert row["gates"] == (["g"] if expected else []) and set(row["scores"]) == {"g"}
    assert 0 < fired < len(prompts), "some rows refused, some answered"
    metrics = requests.get(gated_server.url + "/metrics", timeout=30).text
    counted: dict[str, float] = {}  # this test's tenant (research: "lab"), every label set of it
    for labels, value in re.findall(r"vllm_steer_gate_decisions_total\{([^}]*)\} ([0-9.]+)", metrics):
        label = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if label["tenant"] == "lab" and label["action"] == "refuse":
            counted[label["fired"]] = counted.get(label["fired"], 0.0) + float(value)
    assert counted.get("true", 0) >= fired and counted.get("false", 0) >= len(prompts) - fired, counted


def test_a_refusal_streams_token_by_token(gated, gated_server):
    _, prompts, _, reference = gated
    ids = next(ids for ids in prompts if reference(ids, REFUSE)["fired"])
    body = _body(gated_server, ids, REFUSE, stream=True)
    auth = {"authorization": f"Bearer {RESEARCH}"}
    with requests.post(
        gated_server.url + "/v1/completions", json=body, headers=auth, stream=True, timeout=300
    ) as response:
        assert response.status_code == 200
        events = [
            json.loads(line[len(b"data: ") :])
            for line in response.iter_lines()
            if line.startswith(b"data: ") and line != b"data: [DONE]"
        ]
    pieces = [e["choices"][0]["text"] for e in events if e["choices"] and e["choices"][0]["text"]]
    assert "".join(pieces) == REFUSAL and len(pieces) > 3, pieces
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert "x-vllm-steer-gate" not in response.headers, "a stream's headers leave before any decision"
    request_id = _request_id(events[0]["id"])
    deadline = time.time() + 30
    while request_id not in _gate_lines(gated_server) and time.time() < deadline:
        time.sleep(0.2)  # reported in the background once the stream has ended
    assert _gate_lines(gated_server)[request_id]["rows"][0]["fired"] is True


def test_a_refusal_with_structured_outputs_is_refused_naming_the_field(gated, gated_server):
    _, prompts, _, _ = gated
    body = _body(gated_server, prompts[0], REFUSE, structured_outputs={"choice": ["yes", "no"]})
    response = gated_server.post("/v1/completions", body, RESEARCH)
    assert response.status_code == 400 and "structured_outputs" in response.text, response.text
    # the same request without the refusing profile is served
    assert gated_server.post("/v1/completions", _body(gated_server, prompts[0], None), RESEARCH).status_code == 200


def test_a_tier_that_forces_a_gate_keeps_its_action_and_refusal(gated, gated_server, tokenizer):
    _, prompts, _, reference = gated
    fires = next(ids for ids in prompts if reference(ids, REFUSE)["fired"])
    passes = next(ids for ids in prompts if not reference(ids, REFUSE)["fired"])
    for xargs, field in (
        ({"steer_profile": "tiny-refuse", "steer_gate_action": "flag"}, "steer_gate_action"),
        ({"steer_profile": "tiny-refuse", "steer_refusal": "Sure, here it is:"}, "steer_refusal"),
        ({"steer_profile": "none"}, "steer_profile"),
    ):
        response = gated_server.post("/v1/completions", _body(gated_server, fires, xargs), STRICT)
        assert response.status_code == 403 and field in response.text, (xargs, response.text)
    refused = gated_server.post("/v1/completions", _body(gated_server, fires, None), STRICT)
    choice = refused.json()["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == (STRICT_REFUSAL, "stop"), choice
    assert refused.headers["x-vllm-steer-gate"] == "action=refuse; fired=1"
    answered = gated_server.post("/v1/completions", _body(gated_server, passes, None), STRICT)
    unsteered = gated_server.post("/v1/completions", _body(gated_server, passes, None), RESEARCH)
    assert answered.json()["choices"][0]["token_ids"] == unsteered.json()["choices"][0]["token_ids"]
    assert answered.headers["x-vllm-steer-gate"] == "action=refuse; fired=0"


def test_a_routing_request_is_steered_with_the_category_of_its_fired_gate(gated, gated_server):
    _, prompts, _, reference = gated
    bodies = [completion_body(gated_server.model, ids, xargs) for ids in prompts for xargs in (ROUTED, None)]
    with ThreadPoolExecutor(8) as pool:  # one mixed batch
        responses = list(pool.map(lambda b: gated_server.post("/v1/completions", b, RESEARCH), bodies))
    audit = _gate_lines(gated_server)
    routed = []
    for i, ids in enumerate(prompts):
        response, plain = responses[2 * i : 2 * i + 2]
        row, base, ref = tokens_and_logprobs(response), tokens_and_logprobs(plain), reference(ids, ROUTED)
        category = ref["category"]
        routed.append(category)
        expected = f"action=steer; fired={int(bool(ref['fired']))}; category={category or '-'}"
        assert response.headers["x-vllm-steer-gate"] == expected, (i, ref)
        if category is None:
            assert row == base, ("a row no gate routed is answered unsteered", i)
        else:  # steered like the reference, with the fired gate's category
            assert row["tokens"] == ref["tokens"], (i, category, row, ref)
            assert all(abs(a - b) < 2e-3 for a, b in zip(row["logprobs"], ref["logprobs"], strict=True)), (i, row)
            assert row["logprobs"] != base["logprobs"], ("a routed row is steered", i)
        (line,) = audit[_request_id(response.json()["id"])]["rows"]
        assert (line["profile"], line["action"], line["category"]) == ("tiny-routed", "steer", category), line
    assert len(set(routed) - {None}) >= 2 and None in routed, ("rows routed two ways, and one not", routed)


def test_auto_where_the_gates_do_not_route_is_a_bad_request(gated, gated_server):
    _, prompts, _, _ = gated
    for xargs in (
        {"steer_profile": "tiny-gated-addition", "steer_categories": "auto"},  # no categories, no routes
        {**ROUTED, "steer_gate_action": "flag"},  # auto steers by the fired gate: only with action steer
    ):
        response = gated_server.post("/v1/completions", _body(gated_server, prompts[0], xargs), RESEARCH)
        assert response.status_code == 400 and "steer_categories" in response.text, (xargs, response.text)


def test_a_gate_only_profile_refuses_fired_rows_and_takes_no_steering_field(gated, gated_server, tokenizer):
    """``tiny-gate-only`` (method null) over the API: fired rows answered with its refusal, the others as
    unsteered; every steering field is a 400 naming it."""
    _, prompts, _, reference = gated
    only = {"steer_profile": "tiny-gate-only"}
    text = TINY_GATED["tiny-gate-only"]["refusal"]
    seen = set()
    for ids in prompts[:6]:
        fired = bool(reference(ids, only)["fired"])
        seen.add(fired)
        response = gated_server.post("/v1/completions", _body(gated_server, ids, only), RESEARCH)
        choice = response.json()["choices"][0]
        assert response.headers["x-vllm-steer-gate"] == f"action=refuse; fired={int(fired)}"
        if fired:
            assert (choice["text"], choice["finish_reason"]) == (text, "stop"), choice
        else:
            plain = gated_server.post("/v1/completions", _body(gated_server, ids, None), RESEARCH)
            assert choice["token_ids"] == plain.json()["choices"][0]["token_ids"]
    assert seen == {True, False}, "some rows refused, some answered"
    for extra, field in (
        ({"steer_scale": 2.0}, "steer_scale"),
        ({"steer_categories": "auto"}, "steer_categories"),
        ({"steer_gate_action": "steer"}, "steer_gate_action"),
    ):
        response = gated_server.post("/v1/completions", _body(gated_server, prompts[0], {**only, **extra}), RESEARCH)
        assert response.status_code == 400 and field in response.text and "gate-only" in response.text, response.text
