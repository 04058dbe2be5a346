"""The OpenAI server's steering front door: tenant tiers (:mod:`vllm_steer.server.tenants`), the policy
middleware and routes, vLLM's endpoint plugin, and the Ray Serve application.

Requests are checked here, then resolved by :mod:`vllm_steer.core` and steered by :mod:`vllm_steer.engine`.
"""

from __future__ import annotations

from vllm_steer.server.middleware import ServingState, SteeringPolicyMiddleware, attach, make_state
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
