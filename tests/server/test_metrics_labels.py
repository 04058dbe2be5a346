"""The rejection counter's labels come from a closed set: a client choosing field names (unknown keys,
duplicated keys, a megabyte-long name) can neither add label sets nor grow ``/metrics``."""

from __future__ import annotations

import secrets

import pytest
from prometheus_client import REGISTRY, generate_latest
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from support.tenants import KEYS, POLICY, PROFILES
from vllm_steer.core.request import STEER_KEYS
from vllm_steer.server.metrics import OTHER_FIELD, REJECTION_FIELDS, REJECTIONS, count_rejection, field_label
from vllm_steer.server.middleware import SteeringPolicyMiddleware
from vllm_steer.server.state import make_state


def _label_sets() -> set[tuple[str, ...]]:
    return set(REJECTIONS._metrics)


def _count(reason: str, field: str) -> float:
    return REGISTRY.get_sample_value("vllm_steer_rejections_total", {"reason": reason, "field": field}) or 0.0


@pytest.mark.parametrize(
    "field, label",
    [
        ("messages[3].content", "messages"),
        ("vllm_xargs.other", "vllm_xargs"),
        ("body", "body"),
        ("authorization", "authorization"),
        ("structured_outputs.json", "structured_outputs"),
        ("steer_xyz", OTHER_FIELD),
        ("messages_", OTHER_FIELD),
        ("", OTHER_FIELD),
        ("vllm_steer_digest", OTHER_FIELD),
        ("x" * 100_000, OTHER_FIELD),
        *((key, key) for key in STEER_KEYS),
    ],
)
def test_field_label(field, label):
    assert field_label(field) == label


def test_the_set_is_closed_and_names_the_front_doors_fields():
    assert isinstance(REJECTION_FIELDS, frozenset) and OTHER_FIELD not in REJECTION_FIELDS
    assert set(STEER_KEYS) <= REJECTION_FIELDS
    assert {"authorization", "body", "vllm_xargs", "prompt", "messages", "use_beam_search"} <= REJECTION_FIELDS


def test_a_thousand_distinct_field_names_add_at_most_one_label_set():
    before = _label_sets()
    for _ in range(1000):
        count_rejection(400, "steer_" + secrets.token_hex(8))
    added = _label_sets() - before
    assert added <= {("400", OTHER_FIELD)}, sorted(added)[:5]


def test_metrics_do_not_grow_with_a_long_field_name():
    count_rejection(400, "warm-up")  # the `other` label set exists from here on
    before = len(generate_latest())
    count_rejection(400, "k" * 100_000)
    count_rejection(400, "m" * 100_000)
    assert len(generate_latest()) - before < 1_000


def test_known_fields_keep_their_own_label_and_the_reason_is_the_status():
    counts = _count("400", "messages"), _count("403", "steer_angle"), _count("413", "body")
    count_rejection(400, "messages[3].content")
    count_rejection(403, "steer_angle")
    count_rejection(413, "body")
    assert (_count("400", "messages"), _count("403", "steer_angle"), _count("413", "body")) == tuple(
        c + 1 for c in counts
    )
    other = _count(OTHER_FIELD, "body")
    count_rejection(10**9, "body")  # not an HTTP status: no label of its own either
    assert _count(OTHER_FIELD, "body") == other + 1


def test_duplicated_keys_through_the_middleware_are_counted_as_other():
    async def ok(request):
        return Response(b"{}", media_type="application/json")

    app = Starlette(routes=[Route("/v1/completions", ok, methods=["POST"])])
    app.state.vllm_steer = make_state(POLICY, lambda: PROFILES)
    app.add_middleware(SteeringPolicyMiddleware)
    client = TestClient(app, raise_server_exceptions=True)
    before, others = _label_sets(), _count("400", OTHER_FIELD)
    for _ in range(20):
        name = "k" + secrets.token_hex(16)
        response = client.post(
            "/v1/completions",
            content=f'{{"prompt": "x", "{name}": 1, "{name}": 2}}'.encode(),
            headers={"authorization": f"Bearer {KEYS['gamma-research']}", "content-type": "application/json"},
        )
        assert response.status_code == 400 and response.json()["error"]["param"] == name, response.text
    assert _label_sets() - before <= {("400", OTHER_FIELD)}
    assert _count("400", OTHER_FIELD) == others + 20
