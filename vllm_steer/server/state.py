"""What the middleware and the routes share, set once the engine is up: ``app.state.vllm_steer``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vllm_steer.core.profile import Profile
from vllm_steer.core.settings import SteerConfig
from vllm_steer.server.audit import AuditLog
from vllm_steer.server.tenants import TenantPolicy

__all__ = ["ServingState", "make_state", "serving_state"]

logger = logging.getLogger("vllm_steer.server")


@dataclass
class ServingState:
    """The policy, the loaded profiles and the admin operations of one server (``app.state.vllm_steer``)."""

    policy: TenantPolicy
    profiles: Callable[[], Mapping[str, Profile]]
    stamp: bool
    """Mark admitted requests for the engine (on when a tenants file is configured): in the request's context
    (:data:`vllm_steer.core.wire.ADMISSION`), or with ``stamp_in_body`` in its ``vllm_xargs``."""
    admin: Any = None
    """Hot-reload operations (``async reload()``, ``async remove(id)``, ``async status()``), supplied by the
    endpoint plugin (:mod:`vllm_steer.server.plugin`) or the Ray ingress (:mod:`vllm_steer.server.ray_app`)."""
    base_models: tuple[str, ...] = ()
    """The names the base model is served under (``--served-model-name``); any other ``model`` names an
    adapter (LoRA). Empty: unknown (the check is skipped)."""
    max_body_bytes: int | None = None
    """The largest request body the front door reads; ``None``: :data:`vllm_steer.server.body.MAX_BODY_BYTES`."""
    stamp_in_body: bool = False
    """Stamp ``vllm_xargs`` (:func:`vllm_steer.core.wire.stamp`): the engine runs in another process (Ray)."""
    audit: AuditLog = field(default_factory=AuditLog)
    """Where the policy's decisions are written (:mod:`vllm_steer.server.audit`)."""
    public_metrics: bool = False
    """Serve ``/metrics`` without a key (``VLLM_STEER_PUBLIC_METRICS``); otherwise it needs an admin key
    (:func:`vllm_steer.server.access.classify`)."""


def make_state(
    policy: TenantPolicy,
    profiles: Callable[[], Mapping[str, Profile]],
    admin: Any = None,
    *,
    base_models: tuple[str, ...] = (),
    max_body_bytes: int | None = None,
    audit: AuditLog | None = None,
    public_metrics: bool = False,
    stamp_in_body: bool = False,
) -> ServingState:
    """The state for ``app.state.vllm_steer``; logs loudly in single-tenant mode."""
    if policy.single_tenant:
        tenants = SteerConfig.option("tenants")
        logger.warning(
            "vllm-steer: NO TENANTS FILE — single-tenant mode: every caller may use every profile "
            "at any allowed strength, or none. Set %s (or %s) to enforce tiers.",
            tenants.env,
            tenants.flag,
        )
    else:
        logger.info(
            "vllm-steer: tenant tiers enforced (%d tenants, tiers %s)",
            len(policy.tenants),
            ", ".join(sorted(policy.tiers)),
        )
    return ServingState(
        policy=policy,
        profiles=profiles,
        stamp=not policy.single_tenant,
        admin=admin,
        base_models=base_models,
        max_body_bytes=max_body_bytes,
        audit=audit or AuditLog(),
        stamp_in_body=stamp_in_body,
        public_metrics=public_metrics,
    )


def serving_state(app: Any) -> ServingState | None:
    """The app's state, or ``None`` before the engine is up."""
    return getattr(app.state, "vllm_steer", None)
