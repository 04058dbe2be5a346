"""The OpenAI server's steering front door: the tenant policy before the engine, as an ASGI middleware.

:class:`SteeringPolicyMiddleware` is a pure ASGI middleware (so streaming responses pass through
untouched). With a tenants file configured, **every route is denied unless the route table allows it**
(:mod:`vllm_steer.server.access`): ``/health`` and ``/ping`` are public, ``/metrics`` needs an admin key
unless the operator opts in, a tenant's key opens the generation routes, the model list, the steering
profiles, tokenization and the API docs, and any other route — including whatever a later vLLM adds —
is 401 without a key and 403 with one. Without a tenants file (single-tenant mode) everything passes.

For ``POST /v1/chat/completions`` and ``/v1/completions`` it reads the JSON body (bounded by the model's
context: :func:`~vllm_steer.server.body.body_limit`; parsed off the event loop when large), authenticates
the caller's API key, asks :class:`~vllm_steer.server.tenants.TenantPolicy` for the *effective* steering
and whether the tier permits the request's sampling controls (:mod:`vllm_steer.server.tenants.controls`),
writes the steering into ``vllm_xargs`` and hands the request on. Errors come back in OpenAI's error
shape with the field named: 400 malformed, 401 unknown key, 403 above the tier, 413 too large, 429 over
the tier's concurrency (every sequence of ``n`` and every prompt counts).

Defense in depth, and fail closed: every admitted request is marked for the engine with its tenant and
effective steering — in the request's context (:data:`vllm_steer.core.wire.ADMISSION`) on ``vllm serve``,
or with an HMAC stamp in ``vllm_xargs`` (:func:`vllm_steer.core.wire.stamp`) when the engine runs in
another process (Ray). With a tenants file configured, the engine's front end refuses any request
without a valid mark, so a server on which this middleware failed to load refuses requests instead of
serving them outside their tiers. The engine derives each request's prefix-cache salt from the marked
tenant (:func:`vllm_steer.core.request.cache_salt`).

Every decision is one JSON line in the audit log (:mod:`vllm_steer.server.audit`). Nothing here imports
vLLM: :func:`vllm_steer.server.routes.attach` mounts it (with the routes) on vLLM's app through the
endpoint plugin (:mod:`vllm_steer.server.plugin`) or on Ray's ingress (:mod:`vllm_steer.server.ray_app`),
whose :class:`~vllm_steer.server.state.ServingState` supplies the policy and the loaded profiles.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocketClose

from vllm_steer.core.wire import ADMISSION, Admission, stamp, steering_keys
from vllm_steer.server.access import WEBSOCKET, Access, classify, route_path
from vllm_steer.server.body import BadBody, body_limit, declared_length, parse_body_async, read_body
from vllm_steer.server.decisions import GateReport
from vllm_steer.server.metrics import UsageMeter, count_admitted, count_rejection
from vllm_steer.server.state import ServingState, serving_state
from vllm_steer.server.tenants import PolicyError, Tenant, bearer_token
from vllm_steer.server.tenants.controls import rows

__all__ = [
    "GENERATE_PATHS",
    "ADMIN_PREFIX",
    "REQUEST_ID_HEADER",
    "SteeringPolicyMiddleware",
    "error_response",
]

logger = logging.getLogger("vllm_steer.server.middleware")

GENERATE_PATHS = ("/v1/chat/completions", "/v1/completions")
"""The routes whose body the policy reads and rewrites (``vllm_xargs``)."""
ADMIN_PREFIX = "/v1/steering/admin"
"""The admin routes check admin keys themselves (:mod:`vllm_steer.server.routes`)."""
REQUEST_ID_HEADER = b"x-request-id"
"""vLLM names a request after this header; the middleware sets it (and the body's ``request_id``, which Ray
Serve LLM forwards instead) to the audit log's request id."""


def error_response(err: PolicyError) -> JSONResponse:
    """The OpenAI-shaped error response for a refusal, counted in ``vllm_steer_rejections``."""
    count_rejection(err.status, err.field)
    return JSONResponse(err.to_openai(), status_code=err.status)


def _pydantic_true(value: Any) -> bool:
    """Whether vLLM's request model (pydantic, lax mode) will read ``value`` as ``True``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value == 1
    return isinstance(value, str) and value.strip().lower() in {"1", "true", "t", "yes", "y", "on"}


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later reads: disconnect notifications

    return replay


class SteeringPolicyMiddleware:
    """Tenant policy in front of the OpenAI routes (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = route_path(scope)
        method = scope.get("method", "GET") if scope["type"] == "http" else WEBSOCKET
        state = serving_state(scope["app"]) if "app" in scope else None
        if state is None:
            if classify(method, path) is Access.PUBLIC:
                return await self.app(scope, receive, send)
            err = PolicyError(503, "server", "vllm-steer is not initialized yet; retry shortly")
            return await _refusal(err, scope)(scope, receive, send)
        decision = _Decision(state, scope, method, path)
        if state.policy.single_tenant:
            if method == "POST" and path in GENERATE_PATHS:
                return await decision.generate(self.app, receive, send)
            return await self.app(scope, receive, send)

        access = classify(method, path, public_metrics=state.public_metrics)
        if access is Access.PUBLIC or (access is Access.ADMIN and path.startswith(ADMIN_PREFIX)):
            return await self.app(scope, receive, send)  # admin routes check admin keys themselves
        try:
            if access is Access.ADMIN:
                state.policy.authenticate_admin(decision.api_key)
                return await self.app(scope, receive, send)
            decision.tenant = state.policy.authenticate(decision.api_key)
            if access is Access.DENIED:
                raise PolicyError(403, "route", f"{method} {path} is not available to tenants on this server")
        except PolicyError as err:
            decision.audit("refused", err.status, field=err.field, reason=err.message)
            return await _refusal(err, scope)(scope, receive, send)
        scope.setdefault("state", {})["vllm_steer_tenant"] = decision.tenant
        if method == "POST" and path in GENERATE_PATHS:
            return await decision.generate(self.app, receive, send)
        return await self.app(scope, receive, send)


def _refusal(err: PolicyError, scope: Scope) -> ASGIApp:
    """The error response for an HTTP request; a WebSocket is closed (policy violation) instead."""
    if scope["type"] == "websocket":
        count_rejection(err.status, err.field)
        return WebSocketClose(code=1008, reason=f"{err.status} {err.field}")
    return error_response(err)


class _Decision:
    """One request's way through the policy: who, what steering, how many rows; audited once."""

    def __init__(self, state: ServingState, scope: Scope, method: str, path: str):
        self.state, self.scope, self.method, self.path = state, scope, method, path
        self.headers = Headers(scope=scope)
        self.api_key = bearer_token(self.headers.get("authorization"))
        self.client_request_id = self.headers.get("x-request-id")
        self.request_id = "steer-" + uuid.uuid4().hex
        self.tenant: Tenant | None = None
        self.body: dict[str, Any] | None = None
        self.rows: int | None = None

    def audit(self, decision: str, status: int | None, **fields: Any) -> None:
        tenant = self.tenant
        self.state.audit.record(
            decision=decision,
            status=status,
            request_id=self.request_id,
            client_request_id=self.client_request_id,
            tenant=None if tenant is None else tenant.name,
            tier=None if tenant is None else tenant.tier_name,
            method=self.method,
            route=self.path,
            rows=self.rows,
            body=self.body,
            **fields,
        )

    def gate_report(self, profile_id: str, tenant: Tenant) -> GateReport | None:
        """The gate report of a request under a gated profile (``None``: ungated, or no engine to ask)."""
        profile = self.state.profiles().get(profile_id)
        fetch = getattr(self.state.admin, "gate_decisions", None)
        if profile is None or profile.spec.gating is None or fetch is None:
            return None
        return GateReport(
            fetch,
            self.state.audit,
            request_id=self.request_id,
            client_request_id=self.client_request_id,
            tenant=tenant.name,
            tier=tenant.tier_name,
            route=self.path,
        )

    def refuse(self, err: PolicyError) -> JSONResponse:
        self.audit("refused", err.status, field=err.field, reason=err.message)
        return error_response(err)

    async def generate(self, app: ASGIApp, receive: Receive, send: Send) -> None:
        state, scope = self.state, self.scope
        tenant = self.tenant or state.policy.authenticate(None)  # single-tenant: the anonymous tenant
        self.tenant = tenant
        try:
            limit = body_limit(None, state.max_body_bytes)
            raw = await read_body(receive, limit, declared=declared_length(self.headers))
            body = await parse_body_async(raw)
            self.body = body
            self.rows = rows(body, self.path)
            effective = state.policy.decide(tenant, body.get("vllm_xargs"), state.profiles())
            state.policy.check_controls(tenant, body, self.path, state.base_models, self.headers)
        except ConnectionAbortedError:
            return None
        except BadBody as bad:
            return await self.refuse(PolicyError(bad.status, bad.field, bad.message))(scope, receive, send)
        except PolicyError as err:
            return await self.refuse(err)(scope, receive, send)

        profile_id = (effective or {}).get("steer_profile", "none")
        if _pydantic_true(body.get("use_beam_search")) and (profile_id != "none" or state.stamp):
            beam = PolicyError(
                400,
                "use_beam_search",
                "beam search is not available with vllm-steer: vLLM's beam search "
                "re-submits every step without vllm_xargs, so the steering (and the tier) would be lost",
            )
            return await self.refuse(beam)(scope, receive, send)
        slot = None
        if profile_id != "none":
            try:
                slot = state.policy.acquire(tenant, self.rows)
            except PolicyError as err:
                return await self.refuse(err)(scope, receive, send)
        steering = steering_keys(effective)
        admission = None
        if state.stamp and state.stamp_in_body:
            effective = stamp(effective or {}, tenant.name)
        elif state.stamp:
            admission = ADMISSION.set(Admission(tenant.name, steering))
        if effective is None:
            body.pop("vllm_xargs", None)
        else:
            body["vllm_xargs"] = effective
        # The engine names the request (and its rows) after this id, never the client's: vLLM takes the
        # X-Request-Id header below; Ray's LLMServer takes the body's request_id (and sets the header from it).
        body["request_id"] = self.request_id
        new_body = json.dumps(body).encode()
        forwarded = dict(scope)
        forwarded["headers"] = [
            (k, v) for k, v in scope["headers"] if k.lower() not in (b"content-length", REQUEST_ID_HEADER)
        ]
        forwarded["headers"] += [
            (b"content-length", str(len(new_body)).encode()),
            (REQUEST_ID_HEADER, self.request_id.encode()),
        ]
        self.audit("admitted", None, steering=steering or None)
        labels = {"tier": tenant.tier_name, "profile": str(profile_id)}
        count_admitted(labels)
        meter = UsageMeter(labels)
        report = self.gate_report(str(profile_id), tenant)
        streamed = False

        async def send_and_count(message: Message) -> None:
            nonlocal streamed
            if message["type"] == "http.response.start":
                meter.start(message.get("headers", []))
                streamed = meter.streaming
                if report is not None and not streamed and message.get("status") == 200:
                    message = {**message, "headers": await report.headers(list(message.get("headers", [])))}
            elif message["type"] == "http.response.body":
                meter.feed(message.get("body", b""))
                if not message.get("more_body", False):
                    meter.finish()
                    if slot is not None:
                        slot.release()
                    if report is not None and streamed:
                        report.after_stream()
            await send(message)

        try:
            await app(forwarded, _replay(new_body, receive), send_and_count)
        finally:
            if admission is not None:
                ADMISSION.reset(admission)
            if slot is not None:
                slot.release()
