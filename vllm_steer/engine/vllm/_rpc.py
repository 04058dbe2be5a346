"""Control operations on a running engine: the workers' RPCs (``vllm_steer_status``, ``vllm_steer_reload``)
and what ``vllm serve`` and the Ray replicas call on them (status, hot reload, unload, shutdown).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from vllm_steer import __version__
from vllm_steer.core.profile import Profile, profile_changes
from vllm_steer.engine.vllm._common import logger
from vllm_steer.engine.vllm._profiles import FRONT_END_REQUESTS, load_served, profiles_for, profiles_key, set_current

__all__ = [
    "patch_worker_rpcs",
    "engine_status",
    "engine_status_async",
    "gate_decisions_async",
    "apply_reload",
    "unload_profile",
    "shutdown_engine",
]


def patch_worker_rpcs() -> None:
    from vllm.v1.worker.worker_base import WorkerBase

    def vllm_steer_status(self: WorkerBase) -> dict[str, Any]:
        runner = getattr(self, "model_runner", None)
        runtime = getattr(runner, "_vllm_steer_runtime", None)
        return {
            "version": __version__,
            "hooked": runtime is not None,
            "profiles": sorted(runtime.profiles) if runtime else [],
            "sites": len(runtime.sites) if runtime else 0,
            "max_slots": runtime.max_slots if runtime else 0,
            "slots_in_use": runtime.slots_in_use if runtime else 0,
            "gate_rows_in_use": runtime.gates.rows_in_use if runtime else 0,
            "steps_steered": runtime.steps_steered if runtime else 0,
            "fused_op": runtime.fused if runtime else None,
            "fused_compiled_for": sorted({str(kind[0]).removeprefix("torch.") for kind in runtime.fused_kinds})
            if runtime
            else [],
            "fused_fallbacks": runtime.fused_fallbacks if runtime else 0,
        }

    def vllm_steer_reload(self: WorkerBase, expected: dict[str, str]) -> dict[str, Any]:
        """Hot reload in this worker: load the profile directory again and make it current.

        ``expected`` maps each id to the digest the front end loaded; a mismatch means the files
        changed between the two reads, and nothing changes here (the front end reports it).
        """
        runner = getattr(self, "model_runner", None)
        runtime = getattr(runner, "_vllm_steer_runtime", None)
        if runner is None or runtime is None:  # (no runner: no runtime either)
            raise RuntimeError("vllm-steer: this engine was started without profiles; nothing to reload")
        config = runner._vllm_steer_config
        loaded = load_served(config, runner.vllm_config)
        found = {pid: p.digest for pid, p in loaded.items()}
        if found != expected:
            raise RuntimeError("vllm-steer: the profile directory changed during the reload; retry")
        runtime.add_profiles(loaded)
        return vllm_steer_status(self)

    def vllm_steer_gate_decisions(self: WorkerBase, match: str) -> list[dict[str, Any]]:
        """The gate decisions of the requests whose id contains ``match`` (bound or recently finished)."""
        runtime = getattr(getattr(self, "model_runner", None), "_vllm_steer_runtime", None)
        return [] if runtime is None else runtime.gate_decisions(match)

    for rpc in (vllm_steer_status, vllm_steer_reload, vllm_steer_gate_decisions):  # collective_rpc calls them by name
        setattr(WorkerBase, rpc.__name__, rpc)


def engine_status(llm: Any) -> list[dict[str, Any]]:
    """Readiness of every worker of an offline ``LLM`` (one dict per worker)."""
    statuses: list[dict[str, Any]] = llm.collective_rpc("vllm_steer_status")
    return statuses


def shutdown_engine(llm: Any) -> None:
    """Stop an offline ``LLM``'s engine core now, while the interpreter is whole.

    Left to vLLM, the engine core process is stopped by a finalizer during interpreter exit; a CLI run
    that had finished and written its results once died there with SIGABRT ("terminate called without
    an active exception"), turning a good run into a failed command. Idempotent; a no-op for clients
    without ``shutdown`` (in-process engines).
    """
    client = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if client is not None and callable(getattr(client, "shutdown", None)):
        client.shutdown()


async def apply_reload(
    engine_client: Any,
    *,
    expected: dict[str, str] | None = None,
    check: Callable[[dict[str, Profile]], None] | None = None,
) -> dict[str, Any]:
    """Hot reload of one engine: re-read the profile directory, then workers first, then this front end.

    Nothing changes if the directory does not load (``ProfileError``), if ``check`` refuses the new set
    (a tier would lose its profile), if its digests differ from ``expected`` (what a Ray ingress validated:
    the files changed in between), or if a worker refuses (a profile needs hooks the engine lacks).
    Requests already admitted keep the version they were validated against.
    """
    vllm_config = engine_client.vllm_config
    config, old = profiles_for(vllm_config)
    if not config.enabled:
        raise ValueError("this server was started without a profile directory")
    key = profiles_key(config, vllm_config)
    new = load_served(config, vllm_config)
    if check is not None:
        check(new)
    found = {pid: p.digest for pid, p in new.items()}
    if expected is not None and found != expected:
        raise RuntimeError("vllm-steer: the profile directory changed during the reload; retry")
    await engine_client.collective_rpc("vllm_steer_reload", args=(found,))
    set_current(key, new)
    changes = profile_changes(old, new)
    logger.info("vllm-steer: profiles reloaded: %s", changes)
    return changes


def unload_profile(
    vllm_config: Any, profile_id: str, check: Callable[[dict[str, Profile]], None] | None = None
) -> dict[str, Any]:
    """Stop admitting ``profile_id`` in this front end (until the next reload); admitted requests finish with it."""
    config, old = profiles_for(vllm_config)
    if profile_id not in old:
        raise KeyError(profile_id)
    new = {pid: p for pid, p in old.items() if pid != profile_id}
    if check is not None:
        check(new)
    set_current(profiles_key(config, vllm_config), new)
    logger.info("vllm-steer: profile %s unloaded (requests already admitted finish with it)", profile_id)
    return {"removed": [profile_id], "profiles": sorted(new)}


async def gate_decisions_async(engine_client: Any, match: str) -> list[dict[str, Any]]:
    """The gate decisions of the requests whose engine id contains ``match`` (the server's request id), as the
    first worker holds them (every tensor-parallel rank decides alike): ``request``, ``profile``, ``action``,
    ``fired``, ``scores``. The workers answer between steps; nothing waits inside one."""
    answers = await engine_client.collective_rpc("vllm_steer_gate_decisions", args=(match,))
    return list(answers[0]) if answers else []


async def engine_status_async(engine_client: Any) -> dict[str, Any]:
    """This engine's steering status: front-end profile versions and request count, every worker's runtime."""
    _, profiles = profiles_for(engine_client.vllm_config)
    return {
        "pid": os.getpid(),
        "requests": FRONT_END_REQUESTS[0],
        "profiles": {pid: p.digest for pid, p in sorted(profiles.items())},
        "workers": await engine_client.collective_rpc("vllm_steer_status"),
    }
