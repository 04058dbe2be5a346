"""Gate decisions of answered requests (docs/methods.md §3.11): read back from the engine, then told to the client,
counted and audited.

The engine decides inside its forward pass and keeps each gated request's decision (bound, or among the last
finished); the server asks for the decisions of one request by its request id (the one it gives vLLM through
``X-Request-Id``), which the workers answer between steps. Then:

* a **non-streaming** response gets the header ``x-vllm-steer-gate`` before it is sent: the action and, per row
  of the request (a prompt of ``/v1/completions``), whether it fired — ``action=refuse; fired=1,0``
  (``-``: undecided, the row was cut off before its prompt ended); a routing request (``steer_categories:
  "auto"``) also the category each row was steered with, percent-encoded (``-``: not gated, or undecided) —
  ``action=steer; fired=1,0; category=cat_a,-``. A streamed response's headers leave before
  any row is decided, so it gets none; its decisions are counted and audited when the stream ends;
* every decided row is counted once per deciding gate of its profile (``vllm_steer_gate_decisions``), and a
  routed row once by its category (``vllm_steer_gate_routes``): :func:`~vllm_steer.server.metrics.count_gate_decisions`;
* the request's audit log gets a ``gate`` line (:meth:`~vllm_steer.server.audit.AuditLog.gate`), with each row's
  routed ``category`` for a routing request.

A failure to read the decisions is logged and never fails the response.
"""

from __future__ import annotations

import asyncio
import logging
import re
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

from vllm_steer.server.audit import AuditLog
from vllm_steer.server.metrics import count_gate_decisions

__all__ = ["GATE_HEADER", "header_value", "GateReport"]

logger = logging.getLogger("vllm_steer.server.decisions")

GATE_HEADER = b"x-vllm-steer-gate"
_TASKS: set[asyncio.Task[None]] = set()  # streamed requests' reports in flight (strong references)


def _row_index(request_id: str, engine_id: str) -> int:
    """The row (prompt index) of an engine request: vLLM names ``/v1/completions`` rows ``cmpl-<id>-<i>``."""
    match = re.search(re.escape(request_id) + r"-(\d+)(?:-|$)", engine_id)
    return int(match.group(1)) if match else 0


def _category_value(category: Any) -> str:
    """One row's routed category in the header: percent-encoded (UTF-8), ``-`` for none."""
    if category is None:
        return "-"
    encoded = urllib.parse.quote(str(category), safe="")
    return "%2D" if encoded == "-" else encoded  # a category named "-" is not "none"


def header_value(request_id: str, decisions: list[dict[str, Any]]) -> bytes:
    """``action=<action>; fired=<1|0|-> per row`` for the response header; a routing request's decisions (the
    engine adds ``category`` to them) add ``; category=<category|-> per row``."""
    rows = sorted(decisions, key=lambda d: _row_index(request_id, str(d["request"])))
    fired = ",".join("-" if d["fired"] is None else str(int(bool(d["fired"]))) for d in rows)
    actions = sorted({str(d["action"]) for d in rows}) or ["none"]
    value = f"action={'|'.join(actions)}; fired={fired or '-'}"
    if any("category" in d for d in rows):
        value += "; category=" + ",".join(_category_value(d.get("category")) for d in rows)
    return value.encode("ascii")


class GateReport:
    """One gated request's report: fetch its decisions once, then header, counters and audit line."""

    def __init__(
        self,
        fetch: Callable[[str], Awaitable[list[dict[str, Any]]]],
        audit: AuditLog,
        *,
        request_id: str,
        client_request_id: str | None,
        tenant: str,
        tier: str,
        route: str,
    ):
        self.fetch, self.audit = fetch, audit
        self.request_id, self.client_request_id = request_id, client_request_id
        self.tenant, self.tier, self.route = tenant, tier, route

    async def decisions(self) -> list[dict[str, Any]] | None:
        """Fetch, count and audit the decisions (``None``: they could not be read; logged)."""
        try:
            decisions = await self.fetch(self.request_id)
        except Exception:  # a report must never fail the response
            logger.exception("vllm-steer: could not read the gate decisions of %s", self.request_id)
            return None
        count_gate_decisions(self.tenant, self.tier, decisions)
        self.audit.gate(
            request_id=self.request_id,
            client_request_id=self.client_request_id,
            tenant=self.tenant,
            tier=self.tier,
            route=self.route,
            decisions=decisions,
        )
        return decisions

    async def headers(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """A non-streaming response's headers with the decision header added (unchanged if unreadable)."""
        decisions = await self.decisions()
        return headers if decisions is None else [*headers, (GATE_HEADER, header_value(self.request_id, decisions))]

    def after_stream(self) -> None:
        """A streamed response ended: count and audit its decisions in the background."""
        task = asyncio.get_running_loop().create_task(self._report())
        _TASKS.add(task)
        task.add_done_callback(_TASKS.discard)

    async def _report(self) -> None:
        await self.decisions()
