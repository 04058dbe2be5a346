"""The OpenAI server's steering front door: tenant policy before the engine, the profiles route, metrics.

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

Nothing here imports vLLM: the glue (:mod:`vllm_steer.engine.vllm`) mounts
it through vLLM's endpoint-plugin hook and supplies the loaded profiles.
Logs name tenants, tiers and profiles — never keys or prompt text.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vllm_steer.core.profile import Profile
from vllm_steer.core.request import is_steering_key
from vllm_steer.core.wire import POLICY_TOKEN_KEY, RESERVED_XARGS_PREFIX, check_policy_token, policy_token
from vllm_steer.server.tenants import PolicyError, TenantPolicy, bearer_token

__all__ = [
    "GENERATE_PATHS",
    "POLICY_TOKEN_KEY",
    "ServingState",
    "SteeringPolicyMiddleware",
    "attach",
    "policy_token",
    "check_policy_token",
]

logger = logging.getLogger("vllm_steer.server.middleware")

GENERATE_PATHS = ("/v1/chat/completions", "/v1/completions")
GUARDED_PREFIX = "/v1"
PROFILES_PATH = "/v1/steering/profiles"
ADMIN_PREFIX = "/v1/steering/admin"
MAX_BODY_BYTES = 32 * 1024 * 1024

REQUESTS = Counter("vllm_steer_requests", "Requests admitted by the steering policy",
                   ["tier", "profile"])
TOKENS = Counter("vllm_steer_tokens", "Tokens of admitted requests (from the response's usage)",
                 ["tier", "profile", "kind"])
REJECTIONS = Counter("vllm_steer_rejections", "Requests refused by the steering policy", ["reason", "field"])


@dataclass
class ServingState:
    """What the middleware and routes need, set once the engine is up (``app.state.vllm_steer``)."""

    policy: TenantPolicy
    profiles: Callable[[], Mapping[str, Profile]]
    stamp: bool
    """Stamp admitted requests with the policy token (on when a tenants file is configured)."""
    admin: Any = None
    """Hot-reload operations (``async reload()``, ``async remove(id)``), supplied by the vLLM glue."""


class _BadBody(Exception):
    def __init__(self, field: str, message: str):
        self.field, self.message = field, message


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _BadBody(key, "appears twice in the JSON object; send each field once")
        seen[key] = value
    return seen


def _error(err: PolicyError) -> JSONResponse:
    REJECTIONS.labels(reason=str(err.status), field=err.field).inc()
    return JSONResponse(err.to_openai(), status_code=err.status)


def _parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except (ValueError, UnicodeDecodeError) as exc:  # _BadBody (a duplicate key) is not a ValueError: it passes
        raise _BadBody("body", f"not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise _BadBody("body", "must be a JSON object")
    broken = _first_broken_text(body, "")
    if broken is not None:  # JSON's \ud800 escapes decode to text no engine can encode: vLLM answered 500
        raise _BadBody(broken or "body", "is not valid Unicode text (it contains a lone surrogate escape)")
    stray = sorted(k for k in body if is_steering_key(k))
    if stray:
        raise _BadBody(stray[0], "steering fields go inside vllm_xargs (extra_body={'vllm_xargs': {...}})")
    xargs = body.get("vllm_xargs")
    if xargs is not None and not isinstance(xargs, dict):
        raise _BadBody("vllm_xargs", f"must be an object, got {type(xargs).__name__}")
    for key, value in (xargs or {}).items():
        if key.startswith(RESERVED_XARGS_PREFIX):
            raise _BadBody(key, "is reserved for the server; remove it")
        if not _flat_value(value):
            raise _BadBody(key or "vllm_xargs", f"vllm_xargs[{key!r}]: values must be a string, a number or a list of those")
        if not all(_INT_MIN <= v <= _INT_MAX for v in (value if isinstance(value, list) else [value])
                   if isinstance(v, int) and not isinstance(v, bool)):
            # vLLM refuses these too, but names its internal field (extra_args), which the client never sent.
            raise _BadBody(key or "vllm_xargs", f"vllm_xargs[{key!r}]: integers must be between -2**63 and 2**64 - 1")
    return body


_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1





def _pydantic_true(value: Any) -> bool:
    """Whether vLLM's request model (pydantic, lax mode) will read ``value`` as ``True``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value == 1
    return isinstance(value, str) and value.strip().lower() in {"1", "true", "t", "yes", "y", "on"}


def _flat_value(value: Any) -> bool:
    """What vLLM's ``vllm_xargs`` schema admits: a string or number, or a list of them."""
    scalar = (str, int, float)
    return isinstance(value, scalar) or (isinstance(value, list) and all(isinstance(v, scalar) for v in value))


def _first_broken_text(value: Any, path: str) -> str | None:
    """The dotted path of the first key or string that cannot be encoded as UTF-8, if any."""
    if isinstance(value, str):
        return None if _encodable(value) else path
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else key
            if not _encodable(key):
                return path or "body"
            found = _first_broken_text(item, where)
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _first_broken_text(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


async def _read_body(receive: Receive) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionAbortedError
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _BadBody("body", f"larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later reads: disconnect notifications

    return replay


class _UsageMeter:
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
        candidates = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")] if self.streaming else [text]
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
        state: ServingState | None = getattr(scope["app"].state, "vllm_steer", None) if "app" in scope else None
        if state is None:
            err = PolicyError(503, "server", "vllm-steer is not initialized yet; retry shortly")
            return await _error(err)(scope, receive, send)
        headers = Headers(scope=scope)
        try:
            tenant = state.policy.authenticate(bearer_token(headers.get("authorization")))
        except PolicyError as err:
            return await _error(err)(scope, receive, send)
        if scope.get("method") != "POST" or path not in GENERATE_PATHS:
            scope.setdefault("state", {})["vllm_steer_tenant"] = tenant
            return await self.app(scope, receive, send)

        try:
            raw = await _read_body(receive)
            body = _parse_body(raw)
            effective = state.policy.decide(tenant, body.get("vllm_xargs"), state.profiles())
        except ConnectionAbortedError:
            return None
        except _BadBody as bad:
            return await _error(PolicyError(400, bad.field, bad.message))(scope, receive, send)
        except PolicyError as err:
            logger.info("vllm-steer refused a request of tenant %s (tier %s): %d on %s",
                        tenant.name, tenant.tier_name, err.status, err.field)
            return await _error(err)(scope, receive, send)

        profile_id = (effective or {}).get("steer_profile", "none")
        if _pydantic_true(body.get("use_beam_search")) and (profile_id != "none" or state.stamp):
            err = PolicyError(400, "use_beam_search", "beam search is not available with vllm-steer: vLLM's beam search "
                              "re-submits every step without vllm_xargs, so the steering (and the tier) would be lost")
            return await _error(err)(scope, receive, send)
        slot = None
        if profile_id != "none":
            try:
                slot = state.policy.acquire(tenant)
            except PolicyError as err:
                return await _error(err)(scope, receive, send)
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
        REQUESTS.labels(**labels).inc()
        meter = _UsageMeter(labels)

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


async def list_profiles(request: Request) -> JSONResponse:
    """``GET /v1/steering/profiles``: the profiles this caller's tier may use, with its ranges."""
    state: ServingState = request.app.state.vllm_steer
    tenant = request.scope.get("state", {}).get("vllm_steer_tenant")
    if tenant is None:  # the middleware always sets it; refuse rather than show everything
        return _error(PolicyError(401, "authorization", "no tenant on this request"))
    return JSONResponse({"object": "list", "data": state.policy.visible_profiles(tenant, state.profiles())})


def _admin(request: Request) -> tuple[ServingState, str]:
    state: ServingState | None = getattr(request.app.state, "vllm_steer", None)
    if state is None or state.admin is None:
        raise PolicyError(503, "server", "vllm-steer is not initialized yet; retry shortly")
    name = state.policy.authenticate_admin(bearer_token(request.headers.get("authorization")))
    return state, name


async def reload_profiles(request: Request) -> JSONResponse:
    """``POST /v1/steering/admin/reload``: re-read the profile directory; no restart, no recompile.

    Everything is validated before anything changes: a bad file (400, naming file and field), a
    tier that would lose its profile or a profile needing hooks the engine lacks (409) leave the
    loaded profiles as they were. Requests already admitted finish with the version they started with.
    """
    from vllm_steer.core.profile import ProfileError
    from vllm_steer.server.tenants import TenantsFileError

    try:
        state, name = _admin(request)
        changes = await state.admin.reload()
    except PolicyError as err:
        return _error(err)
    except ProfileError as err:
        return _error(PolicyError(400, err.field, str(err)))
    except (TenantsFileError, ValueError) as err:
        return _error(PolicyError(409, "profiles", str(err)))
    except Exception as err:  # noqa: BLE001 - the workers' refusal arrives as whatever the RPC layer raises
        return _error(PolicyError(409, "profiles", f"the engine refused the reload: {err}"))
    logger.info("vllm-steer: admin %s reloaded profiles", name)
    return JSONResponse(changes)


async def remove_profile(request: Request) -> JSONResponse:
    """``DELETE /v1/steering/admin/profiles/{id}``: unload until the next reload (delete its directory to keep it gone)."""
    from vllm_steer.server.tenants import TenantsFileError

    profile_id = request.path_params["profile_id"]
    try:
        state, name = _admin(request)
        result = await state.admin.remove(profile_id)
    except PolicyError as err:
        return _error(err)
    except KeyError:
        return _error(PolicyError(404, "profile_id", f"no loaded profile {profile_id!r}"))
    except TenantsFileError as err:
        return _error(PolicyError(409, "profile_id", str(err)))
    except RuntimeError as err:  # a Ray replica did not confirm; the ingress no longer admits the profile
        return _error(PolicyError(409, "profile_id", str(err)))
    logger.info("vllm-steer: admin %s unloaded profile %s", name, profile_id)
    return JSONResponse(result)


async def admin_status(request: Request) -> JSONResponse:
    """``GET /v1/steering/admin/status``: loaded profile versions, and per engine replica its pid, requests
    admitted, profile versions and workers' runtime state (which replicas have which version)."""
    try:
        state, _ = _admin(request)
        return JSONResponse(await state.admin.status())
    except PolicyError as err:
        return _error(err)
    except Exception as err:  # noqa: BLE001 - an engine replica not answering: say so, do not 500
        return _error(PolicyError(503, "server", f"engine replicas did not answer: {err}"))


def attach(app: Any) -> None:
    """Mount the routes and the middleware on vLLM's FastAPI app (called from the endpoint plugin)."""
    app.add_api_route(PROFILES_PATH, list_profiles, methods=["GET"], tags=["vllm-steer"],
                      summary="Steering profiles the caller may use")
    app.add_api_route(ADMIN_PREFIX + "/reload", reload_profiles, methods=["POST"], tags=["vllm-steer admin"],
                      summary="Hot-reload the profile directory")
    app.add_api_route(ADMIN_PREFIX + "/status", admin_status, methods=["GET"], tags=["vllm-steer admin"],
                      summary="Profile versions and engine replicas")
    app.add_api_route(ADMIN_PREFIX + "/profiles/{profile_id}", remove_profile, methods=["DELETE"],
                      tags=["vllm-steer admin"], summary="Unload a profile")
    app.add_middleware(SteeringPolicyMiddleware)


def make_state(policy: TenantPolicy, profiles: Callable[[], Mapping[str, Profile]], admin: Any = None) -> ServingState:
    """The state for ``app.state.vllm_steer``; logs loudly in single-tenant mode."""
    if policy.single_tenant:
        logger.warning("vllm-steer: NO TENANTS FILE — single-tenant mode: every caller may use every profile "
                       "at any allowed strength, or none. Set VLLM_STEER_TENANTS (or --steer-tenants) to enforce tiers.")
    else:
        logger.info("vllm-steer: tenant tiers enforced (%d tenants, tiers %s)", len(policy.tenants),
                    ", ".join(sorted(policy.tiers)))
    return ServingState(policy=policy, profiles=profiles, stamp=not policy.single_tenant, admin=admin)
