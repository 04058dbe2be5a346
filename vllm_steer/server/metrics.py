"""Prometheus counters of the steering front door (on the server's ``/metrics``), and the usage meter
that reads each admitted response's token counts. Labels are tiers, profiles and refused fields —
never tenants' keys or prompt text."""

from __future__ import annotations

import json

from prometheus_client import Counter

__all__ = ["REQUESTS", "TOKENS", "REJECTIONS", "UsageMeter", "count_admitted", "count_rejection"]

REQUESTS = Counter("vllm_steer_requests", "Requests admitted by the steering policy", ["tier", "profile"])
TOKENS = Counter(
    "vllm_steer_tokens", "Tokens of admitted requests (from the response's usage)", ["tier", "profile", "kind"]
)
REJECTIONS = Counter("vllm_steer_rejections", "Requests refused by the steering policy", ["reason", "field"])


def count_admitted(labels: dict[str, str]) -> None:
    REQUESTS.labels(**labels).inc()


def count_rejection(status: int, field: str) -> None:
    REJECTIONS.labels(reason=str(status), field=field).inc()


class UsageMeter:
    """Reads ``usage`` from the response for the token counters.

    A JSON body is kept (bounded) and parsed once at the end; of a streamed (SSE) body only the
    last chunk that mentions ``"usage"`` is kept — vLLM sends usage in the final chunk, so nothing
    accumulates while tokens stream.
    """

    _MAX_JSON_BYTES = 4 * 1024 * 1024

    def __init__(self, labels: dict[str, str]):
        self.labels = labels
        self.streaming = False
        self._chunks: list[bytes] = []
        self._size = 0
        self.usage: dict | None = None

    def start(self, headers: list[tuple[bytes, bytes]]) -> None:
        content_type = next((v for k, v in headers if k.lower() == b"content-type"), b"")
        self.streaming = content_type.startswith(b"text/event-stream")

    def feed(self, chunk: bytes) -> None:
        if self.streaming:
            if b'"usage"' in chunk:
                self._chunks = [chunk]
        elif self._size < self._MAX_JSON_BYTES:
            self._chunks.append(chunk)
            self._size += len(chunk)

    def finish(self) -> None:
        text = b"".join(self._chunks).decode("utf-8", errors="replace")
        candidates = (
            [line[5:].strip() for line in text.splitlines() if line.startswith("data:")] if self.streaming else [text]
        )
        for candidate in reversed(candidates):
            if '"usage"' not in candidate:
                continue
            try:
                usage = json.loads(candidate).get("usage")
            except (ValueError, AttributeError):
                continue
            if isinstance(usage, dict):
                self.usage = usage
                break
        if self.usage:
            for kind in ("prompt_tokens", "completion_tokens"):
                if isinstance(self.usage.get(kind), int):
                    TOKENS.labels(kind=kind.split("_")[0], **self.labels).inc(self.usage[kind])
