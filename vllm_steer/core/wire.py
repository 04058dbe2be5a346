"""The contract between the HTTP front door (:mod:`vllm_steer.server`) and the engine (:mod:`vllm_steer.engine`).

Both sides read and write a few keys of a request's ``extra_args`` (``vllm_xargs`` over the API) that no
client may set: they are defined once, here, so neither layer imports the other.

* :data:`ADMISSION` — where middleware and engine front end share a process (``vllm serve``: the API
  server process), the middleware marks each request it admitted in this context variable: the tenant
  and the effective steering. It never travels in the request, so nothing can log, echo or forge it;
  vLLM's handlers run inside the middleware's context (tasks copy it), so the front end reads it back.
* :data:`POLICY_TOKEN_KEY` and :data:`TENANT_KEY` — across processes (Ray: the ingress, then a replica)
  the middleware stamps the request instead (:func:`stamp`): the tenant's name and a token binding tenant,
  effective steering and an expiry with an HMAC under the shared secret. A stamp copied out of a log is
  worth little: it admits only the steering the policy already chose for that tenant, for a few minutes,
  and the middleware refuses client keys in the reserved namespace. The engine drops both keys before
  anything else sees the request (:func:`without_reserved`); vLLM's request log shows them redacted.

With a tenants file configured the engine's front end admits only requests with one or the other
(:func:`admitted_tenant`), so a server on which the middleware failed to load fails closed.
* :data:`DIGEST_KEY` — the engine's front end stamps a steered request with the digest of the profile
  version it validated, which the worker then uses (a hot reload never changes a request mid-way).
* :data:`RESERVED_XARGS_PREFIX` — every server-written key starts with it; the middleware refuses client
  keys that do.
* :func:`keyed_digest` — HMACs under the server's secret, one sub-key per purpose (policy stamps,
  prefix-cache salts): what the server derives, no client can compute or collide with.

The secret is :data:`POLICY_SECRET_ENV` where middleware and engine are different processes (Ray), else
random per process (``vllm serve``: the middleware and the engine's front end share the API process).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

__all__ = [
    "RESERVED_XARGS_PREFIX",
    "POLICY_TOKEN_KEY",
    "TENANT_KEY",
    "DIGEST_KEY",
    "ROUTE_KEY",
    "POLICY_SECRET_ENV",
    "STAMP_TTL_S",
    "StampError",
    "Admission",
    "ADMISSION",
    "admitted_tenant",
    "steering_keys",
    "keyed_digest",
    "stamp",
    "verify_stamp",
    "without_reserved",
    "deployment_secret",
]

RESERVED_XARGS_PREFIX = "vllm_steer_"
"""Keys the server itself writes into ``vllm_xargs`` (the policy stamp, the tenant, the profile version)."""
POLICY_TOKEN_KEY = RESERVED_XARGS_PREFIX + "policy"
TENANT_KEY = RESERVED_XARGS_PREFIX + "tenant"
DIGEST_KEY = RESERVED_XARGS_PREFIX + "digest"
ROUTE_KEY = RESERVED_XARGS_PREFIX + "route"
"""The categories a routing request (``steer_categories: "auto"``) may be steered with, stamped by the engine's
front end: the scheduler reserves a slot for each."""
POLICY_SECRET_ENV = "VLLM_STEER_POLICY_SECRET"
"""A shared secret for deployments where middleware and engine are different processes (Ray).
It travels in the processes' environment (:meth:`vllm_steer.core.settings.SteerConfig.to_env`); never log it."""
STAMP_TTL_S = 600
"""How long a stamp admits its request at the engine: long enough for a queue in front of a Ray replica,
short enough that an old stamp is dead."""

_RANDOM_SECRET = secrets.token_hex(32)


class StampError(ValueError):
    """Why a stamp did not verify (never says what the right one would be)."""


@dataclass(frozen=True)
class Admission:
    """What the policy admitted a request as: its tenant and its effective ``steer_*`` keys."""

    tenant: str
    steering: dict[str, Any]


ADMISSION: ContextVar[Admission | None] = ContextVar("vllm_steer_admission", default=None)
"""The admission of the request being handled in this context (set by the middleware around the app)."""


def steering_keys(extra_args: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``steer_*`` entries of ``extra_args``."""
    return {k: v for k, v in (extra_args or {}).items() if isinstance(k, str) and k.startswith("steer_")}


def admitted_tenant(extra_args: Any) -> str:
    """The tenant the policy admitted this request for: from :data:`ADMISSION` when set (the request's
    steering must be what was admitted), else from its stamp; :class:`StampError` otherwise."""
    admission = ADMISSION.get()
    if admission is not None:
        if not isinstance(extra_args, Mapping | None) or steering_keys(extra_args) != admission.steering:
            raise StampError("the request's steering is not what the policy admitted")
        return admission.tenant
    return verify_stamp(extra_args)


def _secret() -> bytes:
    return (os.environ.get(POLICY_SECRET_ENV) or _RANDOM_SECRET).encode()


def keyed_digest(purpose: str, payload: Any) -> str:
    """HMAC-SHA256 (hex) of ``payload`` (canonical JSON) under the server secret's sub-key for ``purpose``."""
    key = hmac.new(_secret(), purpose.encode(), hashlib.sha256).digest()
    message = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def _bound(extra_args: Mapping[str, Any]) -> dict[str, Any]:
    """What a stamp covers: the steering keys and the tenant (other plugins' keys are not ours to bind)."""
    bound = steering_keys(extra_args)
    if TENANT_KEY in extra_args:
        bound[TENANT_KEY] = extra_args[TENANT_KEY]
    return bound


def stamp(extra_args: Mapping[str, Any], tenant: str, *, now: float | None = None) -> dict[str, Any]:
    """``extra_args`` with :data:`TENANT_KEY` and a :data:`POLICY_TOKEN_KEY` bound to it (a new dict)."""
    stamped = {k: v for k, v in extra_args.items() if k not in (POLICY_TOKEN_KEY, TENANT_KEY)}
    stamped[TENANT_KEY] = tenant
    expires = int((time.time() if now is None else now) + STAMP_TTL_S)
    stamped[POLICY_TOKEN_KEY] = f"{expires}.{keyed_digest('policy-stamp', [expires, _bound(stamped)])}"
    return stamped


def verify_stamp(extra_args: Any, *, now: float | None = None) -> str:
    """The tenant a request was admitted for; :class:`StampError` if its stamp is missing, altered or expired.

    Reads without changing ``extra_args`` (vLLM hands one dict to every prompt of a request).
    """
    if not isinstance(extra_args, Mapping):
        raise StampError("the request carries no policy stamp")
    token, tenant = extra_args.get(POLICY_TOKEN_KEY), extra_args.get(TENANT_KEY)
    if not isinstance(token, str) or not isinstance(tenant, str):
        raise StampError("the request carries no policy stamp")
    expires_text, _, mac = token.partition(".")
    if not expires_text.isdigit():
        raise StampError("the policy stamp is malformed")
    expires = int(expires_text)
    expected = keyed_digest("policy-stamp", [expires, _bound(extra_args)])
    if not hmac.compare_digest(mac, expected):
        raise StampError("the policy stamp does not match this request")
    if expires < (time.time() if now is None else now):
        raise StampError("the policy stamp has expired")
    return tenant


def without_reserved(extra_args: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``extra_args`` without the server's own keys."""
    return {k: v for k, v in extra_args.items() if not (isinstance(k, str) and k.startswith(RESERVED_XARGS_PREFIX))}


def deployment_secret() -> str:
    """The secret to hand every process of a multi-process deployment (Ray's ingress and replicas):
    ``VLLM_STEER_POLICY_SECRET`` from this environment (stable across redeploys), else a new random one."""
    return os.environ.get(POLICY_SECRET_ENV) or secrets.token_hex(32)
