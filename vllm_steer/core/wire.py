"""The contract between the HTTP front door (:mod:`vllm_steer.server`) and the engine (:mod:`vllm_steer.engine`).

Both sides read and write a few keys of a request's ``extra_args`` (``vllm_xargs`` over the API) that no
client may set: they are defined once, here, so neither layer imports the other.

* :data:`POLICY_TOKEN_KEY` — the tenant-policy middleware stamps every request it admitted with a secret
  (:func:`policy_token`); with a tenants file configured the engine's front end refuses requests without
  it (:func:`check_policy_token`), so a server on which the middleware failed to load fails closed.
* :data:`DIGEST_KEY` — the engine's front end stamps a steered request with the digest of the profile
  version it validated, which the worker then uses (a hot reload never changes a request mid-way).
* :data:`RESERVED_XARGS_PREFIX` — every server-written key starts with it; the middleware refuses client
  keys that do.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

__all__ = [
    "RESERVED_XARGS_PREFIX",
    "POLICY_TOKEN_KEY",
    "DIGEST_KEY",
    "POLICY_SECRET_ENV",
    "policy_token",
    "check_policy_token",
    "deployment_secret",
]

RESERVED_XARGS_PREFIX = "vllm_steer_"
"""Keys the server itself writes into ``vllm_xargs`` (the policy token, the profile version)."""
POLICY_TOKEN_KEY = RESERVED_XARGS_PREFIX + "policy"
DIGEST_KEY = RESERVED_XARGS_PREFIX + "digest"
POLICY_SECRET_ENV = "VLLM_STEER_POLICY_SECRET"
"""A shared policy secret for deployments where middleware and engine are different processes (Ray).
It travels in the processes' environment (:meth:`vllm_steer.core.settings.SteerConfig.to_env`); never log it."""

_RANDOM_TOKEN = secrets.token_hex(16)


def policy_token() -> str:
    """The secret only requests that went through the middleware carry.

    Per process on ``vllm serve`` (middleware and engine front end share the process); a Ray deployment
    gives its ingress and replicas one shared secret in ``VLLM_STEER_POLICY_SECRET``.
    """
    return os.environ.get(POLICY_SECRET_ENV) or _RANDOM_TOKEN


def check_policy_token(extra_args: Any) -> bool:
    """Pop the token from ``extra_args`` (it must never reach the engine core); was it there and right?"""
    if not isinstance(extra_args, dict):
        return False
    token = extra_args.pop(POLICY_TOKEN_KEY, None)
    return isinstance(token, str) and secrets.compare_digest(token, policy_token())


def deployment_secret() -> str:
    """The policy secret to hand every process of a multi-process deployment (Ray's ingress and replicas):
    ``VLLM_STEER_POLICY_SECRET`` from this environment (stable across redeploys), else a new random one."""
    return os.environ.get(POLICY_SECRET_ENV) or secrets.token_hex(16)
