"""vLLM's endpoint plugin: the tenant policy and the steering routes mounted on ``vllm serve``'s app.

Registered under the ``vllm.endpoint_plugins`` entry point; vLLM loads it only when ``VLLM_PLUGINS``
names it. The admin routes' operations (:class:`_AdminOps`) act on this server's one engine through
:mod:`vllm_steer.engine`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from vllm_steer.engine.vllm import (
    apply_reload,
    check_vllm_version,
    engine_status_async,
    gate_decisions_async,
    profiles_for,
    share_vllm_log_handlers,
    unload_profile,
)
from vllm_steer.server.access import check_admin_options
from vllm_steer.server.audit import AuditLog
from vllm_steer.server.body import body_limit
from vllm_steer.server.routes import attach
from vllm_steer.server.state import make_state
from vllm_steer.server.tenants import TenantPolicy

__all__ = ["SteeringEndpointPlugin", "served_model_names"]

logger = logging.getLogger("vllm_steer.server.plugin")


class SteeringEndpointPlugin:
    """vLLM endpoint plugin (``vllm.endpoint_plugins`` entry point, vLLM >= 0.32): tenant policy + profiles route.

    vLLM loads endpoint plugins only when ``VLLM_PLUGINS`` names them (``VLLM_PLUGINS=vllm_steer``, which
    ``vllm-steer serve --plugin vllm_steer`` sets). If it does not load while a tenants file is configured,
    the front end's validation refuses every request (see :mod:`vllm_steer.server.middleware`): fail closed.
    (Its name, ``vllm_steer``, is :data:`vllm_steer.core.settings.PLUGIN_NAME`.)
    """

    name = "vllm_steer"
    required_tasks = ("generate",)

    def __init__(self) -> None:
        check_vllm_version()
        share_vllm_log_handlers()

    def attach_router(self, app: Any) -> None:
        attach(app)

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        if engine_client is None:  # vLLM's CPU-only render server: no engine, nothing to steer
            return
        vllm_config = engine_client.vllm_config
        config, profiles = profiles_for(vllm_config)
        policy = TenantPolicy.from_file(config.tenants) if config.tenants else TenantPolicy.single_tenant()
        policy.check_profiles(profiles)  # a tier naming a profile that is not loaded stops the server here
        if not policy.single_tenant:  # options that give clients admin powers stop the server here too
            check_admin_options(
                os.environ, args, allow=config.allow_admin_options, logger=logger, vllm_config=vllm_config
            )
        state.vllm_steer = make_state(
            policy,
            lambda: profiles_for(vllm_config)[1],
            admin=_AdminOps(engine_client, vllm_config, policy),
            base_models=served_model_names(args, vllm_config),
            max_body_bytes=body_limit(getattr(vllm_config.model_config, "max_model_len", None), config.max_body_bytes),
            public_metrics=config.public_metrics,
            audit=AuditLog(config.audit_log, prompts=config.audit_prompts),
        )


def served_model_names(args: Any, vllm_config: Any = None) -> tuple[str, ...]:
    """The names ``/v1/models`` lists the base model under, as vLLM's ``init_app_state`` picks them:
    ``--served-model-name`` (one name or several) when given, else ``--model``; without either in ``args``,
    the engine's ``model_config.served_model_name`` (its first name only)."""
    names = getattr(args, "served_model_name", None)
    if names is None:
        names = getattr(args, "model", None)
    if names is None and vllm_config is not None:
        names = getattr(getattr(vllm_config, "model_config", None), "served_model_name", None)
    if names is None:
        return ()
    return (names,) if isinstance(names, str) else tuple(str(name) for name in names)


class _AdminOps:
    """The admin routes' operations on this server's one engine (see :mod:`vllm_steer.server.routes`)."""

    def __init__(self, engine_client: Any, vllm_config: Any, policy: Any):
        self.engine_client, self.vllm_config, self.policy = engine_client, vllm_config, policy
        self._lock: asyncio.Lock | None = None  # made in the event loop that serves the routes

    async def reload(self) -> dict[str, Any]:
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            return await apply_reload(self.engine_client, check=self.policy.check_profiles)

    async def remove(self, profile_id: str) -> dict[str, Any]:
        return unload_profile(self.vllm_config, profile_id, check=self.policy.check_profiles)

    async def gate_decisions(self, request_id: str) -> list[dict[str, Any]]:
        return await gate_decisions_async(self.engine_client, request_id)

    async def status(self) -> dict[str, Any]:
        status = await engine_status_async(self.engine_client)
        return {"profiles": status["profiles"], "replicas": [{"replica": "local", **status}]}
