"""The OpenAI server's steering front door: the tenant policy before the engine, as an ASGI middleware.

:class:`SteeringPolicyMiddleware` is a pure ASGI middleware (so streaming
responses pass through untouched). For ``POST /v1/chat/completions`` and
``/v1/completions`` it reads the JSON body, authenticates the caller's API key,
asks :class:`~vllm_steer.server.tenants.TenantPolicy` for the *effective* steering,
writes that into ``vllm_xargs`` and hands the request on. Errors come back in
OpenAI's error shape with the field named: 400 malformed, 401 unknown key, 403
above the tier, 429 over the tier's concurrency. Every other ``/v1`` path still
needs a valid key when a tenants file is configured.

Defense in depth, and fail closed: the middleware stamps each request it
passed with a per-process secret (:data:`POLICY_TOKEN_KEY`); with a tenants
file configured, the engine's input validation refuses any request without it,
so a server on which this middleware failed to load refuses requests instead
of serving them outside their tiers.

Nothing here imports vLLM: :func:`vllm_steer.server.routes.attach` mounts it (with the routes) on
vLLM's app through the endpoint plugin (:mod:`vllm_steer.server.plugin`) or on Ray's ingress
(:mod:`vllm_steer.server.ray_app`), whose :class:`~vllm_steer.server.state.ServingState` supplies the
policy and the loaded profiles. Logs name tenants, tiers and profiles — never keys or prompt text.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vllm_steer.core.wire import POLICY_TOKEN_KEY, policy_token
from vllm_steer.server.body import MAX_BODY_BYTES, BadBody, parse_body, read_body
from vllm_steer.server.metrics import UsageMeter, count_admitted, count_rejection
from vllm_steer.server.state import serving_state
from vllm_steer.server.tenants import PolicyError, bearer_token

__all__ = [
    "GENERATE_PATHS",
    "GUARDED_PREFIX",
    "ADMIN_PREFIX",
    "MAX_BODY_BYTES",
    "SteeringPolicyMiddleware",
    "error_response",
]

logger = logging.getLogger("vllm_steer.server.middleware")

GENERATE_PATHS = ("/v1/chat/completions", "/v1/completions")
"""The routes whose body the policy reads and rewrites (``vllm_xargs``)."""
GUARDED_PREFIX = "/v1"
"""With a tenants file, every route under it needs a tenant's key."""
ADMIN_PREFIX = "/v1/steering/admin"
"""The admin routes check admin keys themselves (:mod:`vllm_steer.server.routes`)."""


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
        if scope["type"] != "http" or scope.get("method") == "OPTIONS":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if not path.startswith(GUARDED_PREFIX) or path.startswith(ADMIN_PREFIX):  # admin routes check admin keys
            return await self.app(scope, receive, send)
        state = serving_state(scope["app"]) if "app" in scope else None
        if state is None:
            err = PolicyError(503, "server", "vllm-steer is not initialized yet; retry shortly")
            return await error_response(err)(scope, receive, send)
        headers = Headers(scope=scope)
        try:
            tenant = state.policy.authenticate(bearer_token(headers.get("authorization")))
        except PolicyError as err:
            return await error_response(err)(scope, receive, send)
        if scope.get("method") != "POST" or path not in GENERATE_PATHS:
            scope.setdefault("state", {})["vllm_steer_tenant"] = tenant
            return await self.app(scope, receive, send)

        try:
            raw = await read_body(receive)
            body = parse_body(raw)
            effective = state.policy.decide(tenant, body.get("vllm_xargs"), state.profiles())
        except ConnectionAbortedError:
            return None
        except BadBody as bad:
            return await error_response(PolicyError(400, bad.field, bad.message))(scope, receive, send)
        except PolicyError as err:
            logger.info(
                "vllm-steer refused a request of tenant %s (tier %s): %d on %s",
                tenant.name,
                tenant.tier_name,
                err.status,
                err.field,
            )
            return await error_response(err)(scope, receive, send)

        profile_id = (effective or {}).get("steer_profile", "none")
        if _pydantic_true(body.get("use_beam_search")) and (profile_id != "none" or state.stamp):
            beam = PolicyError(
                400,
                "use_beam_search",
                "beam search is not available with vllm-steer: vLLM's beam search "
                "re-submits every step without vllm_xargs, so the steering (and the tier) would be lost",
            )
            return await error_response(beam)(scope, receive, send)
        slot = None
        if profile_id != "none":
            try:
                slot = state.policy.acquire(tenant)
            except PolicyError as err:
                return await error_response(err)(scope, receive, send)
        if state.stamp:
            effective = dict(effective or {})
            effective[POLICY_TOKEN_KEY] = policy_token()
        if effective is None:
            body.pop("vllm_xargs", None)
        else:
            body["vllm_xargs"] = effective
        new_body = json.dumps(body).encode()
        scope = dict(scope)
        scope["headers"] = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        scope["headers"].append((b"content-length", str(len(new_body)).encode()))
        labels = {"tier": tenant.tier_name, "profile": str(profile_id)}
        count_admitted(labels)
        meter = UsageMeter(labels)

        async def send_and_count(message: Message) -> None:
            if message["type"] == "http.response.start":
                meter.start(message.get("headers", []))
            elif message["type"] == "http.response.body":
                meter.feed(message.get("body", b""))
                if not message.get("more_body", False):
                    meter.finish()
                    if slot is not None:
                        slot.release()
            await send(message)

        try:
            await self.app(scope, _replay(new_body, receive), send_and_count)
        finally:
            if slot is not None:
                slot.release()
