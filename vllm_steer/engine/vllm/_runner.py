"""Worker (model runner): build the runtime after the weights load, bind requests to slots, build the
per-step token map.

* ``GPUModelRunner.load_model`` / ``CPUModelRunner.load_model``: before the weights load, refuse what the
  hooks cannot serve (:func:`check_parallelism`); after, and before any compile or warm-up, build the
  :class:`~vllm_steer.engine.runtime.SteeringRuntime` and hook the model. A failure propagates and stops
  the engine: a steering engine that cannot steer must not serve.
* ``GPUModelRunner._update_states``: bind new requests to slots, free finished ones.
* ``GPUModelRunner._prepare_inputs``: the token → slot map, where LoRA builds its token mapping.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vllm_steer import __version__
from vllm_steer.core.request import ResolvedSteering, SteeringRequestError, parse_steering, resolve_steering
from vllm_steer.core.settings import SteerConfig
from vllm_steer.core.wire import DIGEST_KEY
from vllm_steer.engine.runtime import SteeringRuntime, every_site, set_runtime, sites_for_profiles
from vllm_steer.engine.vllm._common import PATCHED_ATTR, logger
from vllm_steer.engine.vllm._hooks import install_hooks
from vllm_steer.engine.vllm._profiles import fingerprint_of, profiles_for
from vllm_steer.engine.vllm._refusal import ModelTokenizer

if TYPE_CHECKING:
    import numpy as np
    from vllm.v1.core.sched.output import SchedulerOutput

__all__ = ["patch_model_runner", "check_parallelism", "UnsupportedParallelism"]


class UnsupportedParallelism(ValueError):
    """A parallel layout the hooks cannot serve: refused at start rather than steering some layers silently."""


def check_parallelism(vllm_config: Any) -> None:
    """Refuse pipeline parallelism when steering is on (:class:`UnsupportedParallelism`, naming the setting).

    Under pipeline parallelism a rank builds only its slice of the decoder; the other layers are
    placeholders that never run, so a profile's hook on one of them would steer nothing, silently. Tensor
    parallelism is served: every hook site sees the all-reduced, replicated tensor on every rank
    (tests/engine/test_parallel.py). Without profiles nothing is hooked, and any layout is accepted.
    """
    if not SteerConfig.resolve(vllm_config.additional_config).enabled:
        return
    pipeline = vllm_config.parallel_config.pipeline_parallel_size
    if pipeline > 1:
        raise UnsupportedParallelism(
            f"vllm-steer cannot steer under pipeline parallelism (pipeline_parallel_size={pipeline}): each rank "
            "holds only its slice of the decoder layers, and a profile's layers on another rank would not be "
            "steered. Serve with pipeline_parallel_size=1 (tensor_parallel_size is supported), or without "
            "steering profiles"
        )


def _install_on_runner(runner: Any) -> None:
    if getattr(runner, "_vllm_steer_runtime", None) is not None:
        return
    vllm_config = runner.vllm_config
    config, profiles = profiles_for(vllm_config)
    runner._vllm_steer_config = config
    if not config.enabled:
        logger.info("vllm-steer: no profiles configured; the model is not hooked")
        runner._vllm_steer_runtime = None
        return
    fingerprint = fingerprint_of(vllm_config)
    sites = every_site(fingerprint.num_layers) if config.hook_all_sites else sites_for_profiles(profiles)
    max_slots = config.slot_budget(vllm_config.scheduler_config.max_num_seqs)
    tokenizer = ModelTokenizer(vllm_config)
    runtime = SteeringRuntime(
        profiles=profiles,
        sites=sites,
        hidden_size=fingerprint.hidden_size,
        max_slots=max_slots,
        max_tokens=runner.max_num_tokens,
        device=runner.device,
        fused=config.fused_op,
        max_requests=vllm_config.scheduler_config.max_num_seqs,
        tokenize=tokenizer.encode,
    )
    model = runner.get_model()
    runner._vllm_steer_hooks = install_hooks(model, sites)
    runner._vllm_steer_runtime = runtime
    runner._vllm_steer_tokenizer = tokenizer
    set_runtime(runtime)
    logger.info(
        "vllm-steer %s: %d profiles, %d hook sites, %d slots, %d-token buffers",
        __version__,
        len(profiles),
        len(sites),
        max_slots,
        runner.max_num_tokens,
    )


def _resolve_in_worker(runtime: SteeringRuntime, req_id: str, sampling_params: Any) -> ResolvedSteering | None:
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


def patch_model_runner() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    runner_classes = [GPUModelRunner]
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        runner_classes.append(CPUModelRunner)
    except Exception:  # noqa: BLE001 - the CPU runner is absent or unimportable on some builds
        pass

    for cls in runner_classes:
        original_load = cls.__dict__.get("load_model")
        if original_load is None or getattr(original_load, PATCHED_ATTR, False):
            continue

        def make_load(original: Callable[..., None]) -> Callable[..., None]:
            @functools.wraps(original)
            def load_model(self: GPUModelRunner, *args: Any, **kwargs: Any) -> None:
                check_parallelism(self.vllm_config)  # before the weights load: a refusal costs nothing
                original(self, *args, **kwargs)
                _install_on_runner(self)

            setattr(load_model, PATCHED_ATTR, True)
            return load_model

        cls.load_model = make_load(original_load)

    original_update = GPUModelRunner._update_states
    if not getattr(original_update, PATCHED_ATTR, False):

        @functools.wraps(original_update)
        def _update_states(self: GPUModelRunner, scheduler_output: SchedulerOutput) -> Callable[..., Any] | None:
            runtime: SteeringRuntime | None = getattr(self, "_vllm_steer_runtime", None)
            if runtime is not None:
                for req_id in scheduler_output.finished_req_ids:
                    runtime.remove_request(req_id)
            result = original_update(self, scheduler_output)
            if runtime is not None:
                for new_req in scheduler_output.scheduled_new_reqs:
                    resolved = _resolve_in_worker(runtime, new_req.req_id, new_req.sampling_params)
                    eos = None
                    if resolved is not None and resolved.refusal is not None:
                        tokenizer: ModelTokenizer = getattr(self, "_vllm_steer_tokenizer")  # noqa: B009 - set by the loader
                        eos = tokenizer.eos_for(new_req.sampling_params)
                    runtime.add_request(new_req.req_id, resolved, eos)
            return result

        setattr(_update_states, PATCHED_ATTR, True)
        GPUModelRunner._update_states = _update_states

    original_prepare = GPUModelRunner._prepare_inputs
    if not getattr(original_prepare, PATCHED_ATTR, False):

        @functools.wraps(original_prepare)
        def _prepare_inputs(
            self: GPUModelRunner,
            scheduler_output: SchedulerOutput,
            num_scheduled_tokens: np.ndarray,
            *args: Any,
            **kwargs: Any,
        ) -> Any:  # vLLM's own tuple, passed through
            result = original_prepare(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
            runtime: SteeringRuntime | None = getattr(self, "_vllm_steer_runtime", None)
            if runtime is not None:
                num_reqs = len(num_scheduled_tokens)
                batch = self.input_batch
                runtime.begin_step(
                    batch.req_ids[:num_reqs],
                    num_scheduled_tokens,
                    batch.num_computed_tokens_cpu[:num_reqs],  # positions before this step (gates need them)
                    batch.num_prompt_tokens[:num_reqs],
                )
            return result

        setattr(_prepare_inputs, PATCHED_ATTR, True)
        GPUModelRunner._prepare_inputs = _prepare_inputs
