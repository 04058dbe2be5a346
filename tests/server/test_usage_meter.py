"""The server's token counter reads `usage` from JSON bodies and from the last usage chunk of a stream."""

from __future__ import annotations

import json

from vllm_steer.server.metrics import TOKENS, UsageMeter


def _count(tier: str, kind: str) -> float:
    return TOKENS.labels(tier=tier, profile="p", kind=kind)._value.get()


def test_json_body_split_across_messages():
    meter = UsageMeter({"tier": "json-t", "profile": "p"})
    meter.start([(b"content-type", b"application/json")])
    body = json.dumps(
        {"choices": [{"text": "x" * 1000}], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}
    ).encode()
    meter.feed(body[:500])
    meter.feed(body[500:])
    meter.finish()
    assert (_count("json-t", "prompt"), _count("json-t", "completion")) == (7, 3)


def test_stream_keeps_only_the_usage_chunk():
    meter = UsageMeter({"tier": "sse-t", "profile": "p"})
    meter.start([(b"content-type", b"text/event-stream; charset=utf-8")])
    for i in range(100):
        meter.feed(f"data: {json.dumps({'choices': [{'text': str(i)}], 'usage': None})}\n\n".encode())
    meter.feed(b'data: {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 100}}\n\n')
    meter.feed(b"data: [DONE]\n\n")
    assert len(meter._chunks) == 1, "nothing accumulates while tokens stream"
    meter.finish()
    assert (_count("sse-t", "prompt"), _count("sse-t", "completion")) == (5, 100)
