"""The request body's bounds at the front door: nesting depth (400, never a RecursionError's 500), size (413,
refused early from Content-Length), a cap sized for the model, and large bodies parsed off the event loop."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from support.tenants import KEYS, POLICY, PROFILES
from vllm_steer.core.errors import SteerError
from vllm_steer.core.settings import ConfigError, SteerConfig
from vllm_steer.server import body as body_module
from vllm_steer.server.body import (
    MAX_JSON_DEPTH,
    BadBody,
    body_limit,
    declared_length,
    parse_body,
    parse_body_async,
    read_body,
)
from vllm_steer.server.middleware import SteeringPolicyMiddleware
from vllm_steer.server.state import make_state

MiB = 1024 * 1024
TOO_DEEP = "nested deeper than 64 levels"


def _refusal(raw: bytes) -> tuple[str, str, int]:
    with pytest.raises(BadBody) as caught:
        parse_body(raw)
    return caught.value.field, caught.value.message, caught.value.status


def _nested(levels: int, open_: bytes = b"[", close: bytes = b"]") -> bytes:
    """A body of ``levels`` levels in all: the object and ``levels - 1`` arrays (or objects) inside it."""
    return b'{"messages": ' + open_ * (levels - 1) + close * (levels - 1) + b"}"


# ---------------------------------------------------------------------------------------------- depth


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 5000 + b"]" * 5000,
        _nested(5000),  # past the parser's own guard (RecursionError)
        _nested(900),  # within it: the old recursive walk over the value ran out of stack
        _nested(MAX_JSON_DEPTH + 1),
        b'{"a": ' + b'{"a": ' * MAX_JSON_DEPTH + b"1" + b"}" * MAX_JSON_DEPTH + b"}",
        b'{"a": ' + b'[{"a": ' * 40 + b"1" + b"}]" * 40 + b"}",
        json.dumps({"prompt": "\ud800", "messages": json.loads(b"[" * 100 + b"]" * 100)}).encode(),
        (b'{"messages": ' + b"[" * 100 + b"]" * 100 + b"}").decode().encode("utf-16"),
    ],
    ids=["array-5000", "object-5000", "object-900", "65-levels", "objects", "mixed", "depth-first", "utf-16"],
)
def test_deep_nesting_is_a_400_naming_the_body(raw):
    assert _refusal(raw) == ("body", TOO_DEEP, 400)


@pytest.mark.parametrize("open_, close", [(b"[", b"]"), (b'{"k": ', b"}")])
def test_64_levels_still_parse(open_, close):
    raw = b'{"a": ' + open_ * (MAX_JSON_DEPTH - 1) + b"1" + close * (MAX_JSON_DEPTH - 1) + b"}"
    assert parse_body(raw)["a"]
    assert parse_body(raw.decode().encode("utf-16"))["a"], "the parser also reads UTF-16"


def test_brackets_inside_strings_do_not_count():
    for text in ["[" * 500, "{" * 500, '\\"[' * 300, "\\\\" + "[" * 300, "\\u005b" * 300]:
        raw = b'{"prompt": "' + text.encode() + b'", "n": [[1], [2], {"a": []}]}'
        assert parse_body(raw)["n"][2] == {"a": []}, text


_TEXTS = [1, -2.5, None, True, "x", '\\"[{', "]}\\", "\\\\", "\u00e9[", ""]


def _random_value(rng: random.Random, levels: int):
    """A value ``levels`` deep along one spine, with shallow branches of scalars and tricky strings beside it."""
    value = rng.choice(_TEXTS)
    for _ in range(levels):
        side = [rng.choice(_TEXTS) if rng.random() < 0.7 else [rng.choice(_TEXTS)] for _ in range(rng.randint(0, 2))]
        if rng.random() < 0.5:
            value = [*side, value] if rng.random() < 0.5 else [value, *side]
        else:
            value = {rng.choice(["k", "[", '"{', "\\"]) + str(i): v for i, v in enumerate([*side, value])}
    return value


def _depth(value) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def test_the_depth_check_agrees_with_the_parsed_value():
    """Strings full of brackets, quotes and backslashes, in UTF-8 and UTF-16, around the limit."""
    rng, refused = random.Random(7), 0
    for _ in range(400):
        body = {"a": _random_value(rng, rng.randint(MAX_JSON_DEPTH - 8, MAX_JSON_DEPTH + 8))}
        deep = _depth(body) > MAX_JSON_DEPTH
        for raw in (json.dumps(body).encode(), json.dumps(body, ensure_ascii=False).encode("utf-16")):
            if deep:
                assert _refusal(raw) == ("body", TOO_DEEP, 400)
            else:
                assert parse_body(raw) == body
        refused += deep
    assert 100 < refused < 300, "both sides of the limit were tried"


def test_finding_broken_text_does_not_recurse():
    """The walk that names a lone surrogate is iterative: a value deeper than the interpreter's stack."""
    value: list = ["ok", "\udc00"]
    for _ in range(20_000):
        value = [value]
    assert body_module._first_broken_text({"messages": value}) == "messages" + "[0]" * 20_000 + "[1]"


# ----------------------------------------------------------------------------------------------- size


def _receiver(*chunks: bytes, disconnect: bool = False):
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    if disconnect:
        messages[-1:] = [{"type": "http.disconnect"}]
    calls = []

    async def receive():
        calls.append(1)
        return messages[len(calls) - 1]

    return receive, calls


def test_bad_body_keeps_the_steer_error_constructor_and_has_a_status():
    bad = BadBody("prompt", "why")
    assert isinstance(bad, SteerError) and (bad.field, bad.message, bad.status) == ("prompt", "why", 400)
    assert str(bad) == "prompt: why" and BadBody("body", "big", status=413).status == 413


def test_read_body_within_and_over_the_limit():
    receive, _ = _receiver(b"a" * 600, b"b" * 400)
    assert asyncio.run(read_body(receive, 1000)) == b"a" * 600 + b"b" * 400
    receive, calls = _receiver(b"a" * 600, b"b" * 401, b"never read")
    with pytest.raises(BadBody) as caught:
        asyncio.run(read_body(receive, 1000))
    assert (caught.value.field, caught.value.status) == (
        "body",
        413,
    ) and "larger than 1000 bytes" in caught.value.message
    assert len(calls) == 2, "stops reading at the chunk that passes the limit"


def test_a_declared_length_over_the_limit_is_refused_before_reading():
    receive, calls = _receiver(b"{}")
    with pytest.raises(BadBody) as caught:
        asyncio.run(read_body(receive, 1000, declared=1001))
    assert caught.value.status == 413 and calls == []
    assert asyncio.run(read_body(receive, 1000, declared=1000)) == b"{}"


def test_a_disconnect_while_reading_aborts():
    receive, _ = _receiver(b"a", b"b", disconnect=True)
    with pytest.raises(ConnectionAbortedError):
        asyncio.run(read_body(receive, 1000))


@pytest.mark.parametrize(
    "headers, declared",
    [({"content-length": "123"}, 123), ({"content-length": " 7 "}, 7), ({}, None), ({"content-length": "-1"}, None)]
    + [({"content-length": v}, None) for v in ["", "1e3", "0x10", "²", "١٢", "9" * 40]],
)
def test_declared_length_reads_only_plain_decimal(headers, declared):
    assert declared_length(headers) == declared


@pytest.mark.parametrize(
    "max_model_len, configured, limit",
    [
        (None, None, 16 * MiB),
        (2048, None, 1 * MiB),  # 128 KiB by the tokens: the floor
        (16_384, None, 1 * MiB),
        (32_768, None, 2 * MiB),
        (131_072, None, 8 * MiB),
        (1_000_000, None, 16 * MiB),  # the cap
        (2048, 4096, 4096),  # configured wins, either way
        (None, 64 * MiB, 64 * MiB),
    ],
)
def test_body_limit(max_model_len, configured, limit):
    assert body_limit(max_model_len, configured) == limit


def test_the_setting_is_an_env_var_and_a_flag_with_a_floor():
    option = SteerConfig.option("max_body_bytes")
    assert (option.env, option.flag) == ("VLLM_STEER_MAX_BODY_BYTES", "--steer-max-body-bytes")
    assert SteerConfig.resolve(None, environ={option.env: "2097152"}).max_body_bytes == 2 * MiB
    with pytest.raises(ConfigError) as caught:
        SteerConfig.parse({"max_body_bytes": 100})
    assert caught.value.field == "max_body_bytes"


# ------------------------------------------------------------------------------------ off the event loop


def test_small_bodies_parse_inline(monkeypatch):
    def no_thread(*args):
        raise AssertionError("a small body went to a thread")

    monkeypatch.setattr(asyncio.BaseEventLoop, "run_in_executor", no_thread)
    assert asyncio.run(parse_body_async(b'{"prompt": "x"}')) == {"prompt": "x"}
    with pytest.raises(BadBody):
        asyncio.run(parse_body_async(b"[" * 5000 + b"]" * 5000))


def test_large_bodies_parse_without_stalling_the_event_loop():
    """8 chat bodies of ~4 MB at once: a ticker on the loop is never late by half of one inline parse."""
    raw = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hello, \\" + "x" * 60} for _ in range(40_000)]}
    ).encode()
    assert len(raw) > 4_000_000

    def timed() -> float:
        start = time.perf_counter()
        parse_body(raw)
        return time.perf_counter() - start

    inline = statistics.median(timed() for _ in range(3))

    async def main() -> float:
        lag, done = 0.0, asyncio.Event()

        async def tick() -> None:
            nonlocal lag
            while not done.is_set():
                start = time.perf_counter()
                await asyncio.sleep(0.005)
                lag = max(lag, time.perf_counter() - start - 0.005)

        async def parse() -> None:
            assert len((await parse_body_async(raw))["messages"]) == 40_000

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0.02)
        await asyncio.gather(*(parse() for _ in range(8)))
        done.set()
        await ticker
        return lag

    lag = asyncio.run(main())
    assert lag < inline / 2, f"the loop stalled {lag * 1000:.0f} ms; one inline parse takes {inline * 1000:.0f} ms"


# -------------------------------------------------------------------------------------- through the door


async def _echo(request: Request) -> Response:
    return Response(b'{"forwarded": ' + await request.body() + b"}", media_type="application/json")


def test_a_deeply_nested_body_is_a_400_through_the_middleware():
    app = Starlette(routes=[Route("/v1/completions", _echo, methods=["POST"])])
    app.state.vllm_steer = make_state(POLICY, lambda: PROFILES)
    app.add_middleware(SteeringPolicyMiddleware)
    client = TestClient(app, raise_server_exceptions=True)
    response = client.post(
        "/v1/completions",
        content=b'{"prompt": "x", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        headers={"authorization": f"Bearer {KEYS['gamma-research']}", "content-type": "application/json"},
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "body" and TOO_DEEP in error["message"]
