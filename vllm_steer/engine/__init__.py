"""The steering engine: the per-process runtime (slots, static buffers, token map, custom op), the fused op
and its Triton kernel, and the vLLM glue (:mod:`vllm_steer.engine.vllm`, the only code that touches vLLM
internals) behind one cheap, idempotent :func:`register`.

Imports ``core`` only; never ``server``, ``calibration``, ``evaluation`` or ``testing``.
"""

from __future__ import annotations

from vllm_steer.engine.runtime import Site, SlotGate, SteeringRuntime, every_site, sites_for_profiles
from vllm_steer.engine.vllm import (
    SUPPORTED_VLLM,
    apply_reload,
    engine_status,
    engine_status_async,
    fingerprint_of,
    gate_decisions_async,
    offline_engine,
    register,
    shutdown_engine,
    unload_profile,
)

__all__ = [
    "register",
    "SUPPORTED_VLLM",
    "SteeringRuntime",
    "SlotGate",
    "Site",
    "sites_for_profiles",
    "every_site",
    "fingerprint_of",
    "engine_status",
    "engine_status_async",
    "gate_decisions_async",
    "apply_reload",
    "unload_profile",
    "shutdown_engine",
    "offline_engine",
]
