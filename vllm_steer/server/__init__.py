"""The OpenAI server's steering front door, by concern:

* :mod:`~vllm_steer.server.tenants` — the tenants file, API keys and the per-tier policy (a package);
* :mod:`~vllm_steer.server.middleware` — the ASGI middleware that applies the policy to every request body;
* :mod:`~vllm_steer.server.routes` — ``/v1/steering/profiles`` and the admin routes, and ``attach(app)``;
* :mod:`~vllm_steer.server.state` — what those share on ``app.state``; :mod:`~vllm_steer.server.metrics` — counters;
* :mod:`~vllm_steer.server.plugin` — vLLM's endpoint plugin; :mod:`~vllm_steer.server.ray_app` — the Ray Serve app.

Requests are checked here, then resolved by :mod:`vllm_steer.core` and steered by :mod:`vllm_steer.engine`.
"""

from __future__ import annotations

from vllm_steer.server.middleware import SteeringPolicyMiddleware
from vllm_steer.server.routes import attach
from vllm_steer.server.state import ServingState, make_state
from vllm_steer.server.tenants import PolicyError, TenantPolicy, TenantsFileError

__all__ = [
    "TenantPolicy",
    "PolicyError",
    "TenantsFileError",
    "SteeringPolicyMiddleware",
    "ServingState",
    "attach",
    "make_state",
]
