"""The audit log: one JSON line per policy decision, so a safety team can answer "what steering did tenant T's
request R get, and why was R refused".

Lines go to the standard logging logger ``vllm_steer.audit`` (INFO), and to the file named by
``--steer-audit-log`` / ``VLLM_STEER_AUDIT_LOG`` when set (appended, one JSON object per line). Each line::

    {"time": "2026-12-02T03:04:05.678Z", "event": "policy", "request_id": "steer-5f0c…",
     "client_request_id": null, "tenant": "acme", "tier": "strict", "method": "POST",
     "route": "/v1/chat/completions", "decision": "admitted", "status": null, "rows": 1,
     "steering": {"steer_profile": "refusal", "steer_scale": 1.0}, "field": null, "reason": null}

A gated request (its profile has gates: docs/methods.md §3.11) gets a second line once it is answered,
``"event": "gate"``, with the same ``request_id``, the tenant, tier and route, and per row of the request
its ``profile``, ``action``, whether it ``fired`` (``null``: cut off before its prompt ended), the deciding
``gates`` that fired and every gate's ``score``; for a routing request (``steer_categories: "auto"``) also the
``category`` the row was steered with (``null``: not gated, or undecided).

``decision`` is ``admitted`` (``status`` null: what vLLM answers is not the policy's) or ``refused``; a
refusal has the HTTP ``status``, the refused ``field`` and the
``reason`` the client was told. ``request_id`` is the id the server gives the request (vLLM's response ``id``
then reads ``cmpl-<request_id>-0`` / ``chatcmpl-<request_id>``), ``client_request_id`` the client's own
``X-Request-Id`` if it sent one. Never the API key; never the prompt text unless the operator opts in
(``--steer-audit-prompts``: then ``prompt`` / ``messages`` are included as sent). Client-chosen strings
(field names, request ids) are truncated to :data:`MAX_TEXT` characters; JSON escapes newlines, so one
decision is always one line.
"""

from __future__ import annotations

import json
import logging
import threading
from datetime import UTC, datetime
from typing import Any

__all__ = ["AUDIT_LOGGER", "MAX_TEXT", "AuditLog", "printable"]

AUDIT_LOGGER = logging.getLogger("vllm_steer.audit")
MAX_TEXT = 128


def printable(text: Any, limit: int = MAX_TEXT) -> str | None:
    """A client-chosen string made safe for a log line: truncated, control characters escaped."""
    if text is None:
        return None
    text = str(text)
    if len(text) > limit:
        text = text[:limit] + f"…(+{len(text) - limit})"
    return text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text


def _gate_row(row: dict[str, Any]) -> dict[str, Any]:
    """One row of a gate line; ``category`` only for a routing request's row (the engine reports it there)."""
    line = {key: row.get(key) for key in ("profile", "action", "fired", "gates", "scores")}
    if "category" in row:
        line["category"] = row["category"]
    return line


class AuditLog:
    """Writes the decision lines (to ``vllm_steer.audit`` and, if given, appended to ``path``)."""

    def __init__(self, path: str | None = None, *, prompts: bool = False):
        self.path = path
        self.prompts = prompts
        self._lock = threading.Lock()
        if path is not None:
            with open(path, "a", encoding="utf-8"):
                pass  # fail at start-up, not at the first request, if the file cannot be written

    def record(
        self,
        *,
        decision: str,
        status: int | None,
        request_id: str,
        tenant: str | None,
        tier: str | None,
        method: str,
        route: str,
        client_request_id: str | None = None,
        steering: dict[str, Any] | None = None,
        rows: int | None = None,
        field: str | None = None,
        reason: str | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        line: dict[str, Any] = {
            "request_id": request_id,
            "client_request_id": printable(client_request_id),
            "tenant": tenant,
            "tier": tier,
            "method": method,
            "route": printable(route),
            "decision": decision,
            "status": status,
            "rows": rows,
            "steering": steering,
            "field": printable(field),
            "reason": printable(reason, 512),
        }
        if self.prompts and body is not None:
            for key in ("prompt", "messages"):
                if key in body:
                    line[key] = body[key]
        self._write("policy", line)

    def gate(
        self,
        *,
        request_id: str,
        tenant: str | None,
        tier: str | None,
        route: str,
        decisions: list[dict[str, Any]],
        client_request_id: str | None = None,
    ) -> None:
        """The gate line of an answered gated request: per row, the decision the engine made."""
        line: dict[str, Any] = {
            "request_id": request_id,
            "client_request_id": printable(client_request_id),
            "tenant": tenant,
            "tier": tier,
            "route": printable(route),
            "rows": [_gate_row(row) for row in decisions],
        }
        self._write("gate", line)

    def _write(self, event: str, fields: dict[str, Any]) -> None:
        """One line: the time and the event, then ``fields``."""
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        text = json.dumps({"time": now, "event": event, **fields}, ensure_ascii=True, default=str)
        AUDIT_LOGGER.info(text)
        if self.path is not None:
            with self._lock, open(self.path, "a", encoding="utf-8") as out:
                out.write(text + "\n")
