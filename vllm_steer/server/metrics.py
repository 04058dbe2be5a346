"""Prometheus counters of the steering front door (on the server's ``/metrics``), and the usage meter
that reads each admitted response's token counts. Labels are tenant names, tiers, profiles, gate names
(all the operator's), refused fields from a closed set — never tenants' keys or prompt text.

Every label set lives in the process (and in each scrape) forever, so no label value is the client's
choice: a refused field is named by :func:`field_label` from the closed :data:`REJECTION_FIELDS`."""

from __future__ import annotations

import json

from prometheus_client import Counter

from vllm_steer.core.request import STEER_KEYS
from vllm_steer.server.tenants.controls import CONTROLS

__all__ = [
    "REQUESTS",
    "TOKENS",
    "REJECTIONS",
    "GATE_DECISIONS",
    "GATE_ROUTES",
    "count_gate_decisions",
    "REJECTION_FIELDS",
    "OTHER_FIELD",
    "UsageMeter",
    "count_admitted",
    "count_rejection",
    "field_label",
]

REQUESTS = Counter("vllm_steer_requests", "Requests admitted by the steering policy", ["tier", "profile"])
TOKENS = Counter(
    "vllm_steer_tokens", "Tokens of admitted requests (from the response's usage)", ["tier", "profile", "kind"]
)
REJECTIONS = Counter("vllm_steer_rejections", "Requests refused by the steering policy", ["reason", "field"])
GATE_DECISIONS = Counter(
    "vllm_steer_gate_decisions",
    "Gate decisions of gated rows: one per row and deciding gate of its profile (fired: that gate fired on the row)",
    ["tenant", "tier", "profile", "gate", "action", "fired"],
)
GATE_ROUTES = Counter(
    "vllm_steer_gate_routes",
    "Gated rows of routing requests (steer_categories: auto), by the category they were steered with",
    ["tenant", "tier", "profile", "category"],
)


def count_gate_decisions(tenant: str, tier: str, decisions: list[dict]) -> None:
    """Count each decided row of a request once per deciding gate of its profile (an undecided row, cut off before
    its prompt ended, is not a decision; routing gates only route), and each routed row once by its category."""
    for row in decisions:
        if row.get("fired") is None:
            continue
        fired = set(row.get("gates") or ())
        routing = set(row.get("route_gates") or ())
        for gate in row.get("scores") or {}:
            if gate in routing:
                continue
            labels = {"profile": str(row["profile"]), "gate": gate, "action": str(row["action"])}
            GATE_DECISIONS.labels(tenant=tenant, tier=tier, fired=str(gate in fired).lower(), **labels).inc()
        if row.get("category"):
            GATE_ROUTES.labels(
                tenant=tenant, tier=tier, profile=str(row["profile"]), category=str(row["category"])
            ).inc()


def count_admitted(labels: dict[str, str]) -> None:
    REQUESTS.labels(**labels).inc()


REJECTION_FIELDS = frozenset(
    {
        *STEER_KEYS,
        # the front door's own
        "authorization",
        "body",
        "vllm_xargs",
        "server",
        "route",
        "profile_id",
        "profiles",
        # OpenAI request fields a refusal may name: every field a tier's controls govern, and these
        *(name for control in CONTROLS.values() for name in control.fields),
        "use_beam_search",
        "tools",
        "cache_salt",
        "max_tokens",
    }
)
"""The ``field`` label values of ``vllm_steer_rejections`` (with :data:`OTHER_FIELD`): a closed set."""
OTHER_FIELD = "other"
"""The ``field`` label of a refusal naming anything else (an unknown key, a duplicated one, ...)."""


def field_label(field: str) -> str:
    """The ``field`` label for a refused field: its head (``messages`` for ``messages[3].content``) when that
    is in :data:`REJECTION_FIELDS`, else :data:`OTHER_FIELD` (the name is the client's: unbounded)."""
    head = field.partition(".")[0].partition("[")[0]
    return head if head in REJECTION_FIELDS else OTHER_FIELD


def _reason_label(status: int) -> str:
    """The ``reason`` label: the HTTP status (an int of ours; anything else is ``other``)."""
    return str(status) if isinstance(status, int) and 100 <= status <= 599 else OTHER_FIELD


def count_rejection(status: int, field: str) -> None:
    REJECTIONS.labels(reason=_reason_label(status), field=field_label(field)).inc()


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
