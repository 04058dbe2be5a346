"""Front end (``InputProcessor.process_inputs``): verify the policy stamp (tiers on), validate each request's
steering, stamp its profile version, derive its prefix-cache salt (:func:`vllm_steer.core.request.cache_salt`).
"""

from __future__ import annotations

import copy
import functools
from typing import TYPE_CHECKING, Any

from vllm_steer.core.request import (
    ResolvedSteering,
    SteeringRequestError,
    cache_salt,
    parse_steering,
    resolve_steering,
)
from vllm_steer.core.settings import SteerConfig
from vllm_steer.core.wire import DIGEST_KEY, ROUTE_KEY, StampError, admitted_tenant, without_reserved
from vllm_steer.engine.vllm._common import PATCHED_ATTR
from vllm_steer.engine.vllm._profiles import FRONT_END_REQUESTS, current_profiles

if TYPE_CHECKING:
    from vllm.pooling_params import PoolingParams
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine import EngineCoreRequest

__all__ = ["patch_input_processor"]


def _admitted_tenant(config: SteerConfig, params: Any) -> str | None:
    """The tenant the policy admitted this request for (tiers on), ``None`` without tiers; refuses the rest."""
    if config.tenants is None:
        return None
    from vllm.sampling_params import SamplingParams

    if not isinstance(params, SamplingParams):
        raise SteeringRequestError("vllm_xargs", "this server enforces tenant tiers and admits only generation")
    try:
        return admitted_tenant(params.extra_args)
    except StampError as exc:
        raise SteeringRequestError(
            "vllm_xargs",
            f"this server enforces tenant tiers but the request did not pass the vllm-steer policy ({exc}): "
            "tiers cover POST /v1/completions and /v1/chat/completions only, and the endpoint plugin must be "
            "loaded (VLLM_PLUGINS=vllm_steer)",
        ) from None


def _validate_request(vllm_config: Any, config: SteerConfig, extra_args: Any) -> ResolvedSteering | None:
    """Parse and resolve one request's steering (``extra_args`` without the server's keys)."""
    request = parse_steering(extra_args)
    if request is None:
        return None
    if vllm_config.use_v2_model_runner:
        raise SteeringRequestError(
            "steer_profile", "steering needs vLLM's V1 model runner; unset VLLM_USE_V2_MODEL_RUNNER"
        )
    if not config.enabled:
        raise SteeringRequestError(
            "steer_profile", "this server has no steering profiles loaded (set VLLM_STEER_PROFILES)"
        )
    resolved = resolve_steering(request, current_profiles(config, vllm_config))
    if resolved.refusal is not None and vllm_config.speculative_config is not None:
        raise SteeringRequestError(
            "steer_profile",
            f"profile {resolved.profile_id!r} refuses when its gate fires, which needs vLLM's logits processors; "
            "vLLM has none under speculative decoding",
        )
    return resolved


def _admit(vllm_config: Any, params: Any) -> tuple[Any, ResolvedSteering | None, str | None]:
    """The request's params as the engine may see them (a copy without the server's keys, stamped with
    the profile version; the caller's object and its ``extra_args`` dict are never changed: vLLM hands
    one dict to every prompt of a request), its steering and its tenant. Raises vLLM's validation
    error naming the field, also for a routing request that needs more steering slots at once than the
    scheduler's budget (it would wait forever)."""
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams

    try:
        config = SteerConfig.resolve(vllm_config.additional_config)
        tenant = _admitted_tenant(config, params)
        if not isinstance(params, SamplingParams):
            return params, None, tenant
        extra_args = params.extra_args
        clean = without_reserved(extra_args) if isinstance(extra_args, dict) else extra_args
        steering = _validate_request(vllm_config, config, clean)
        if steering is not None and steering.refusal is not None and params.structured_outputs is not None:
            raise SteeringRequestError(
                "structured_outputs",
                f"profile {steering.profile_id!r} answers a fired gate with a fixed refusal, which a structured-output "
                "constraint (response_format, structured_outputs) would not allow; send one or the other",
            )
        if steering is not None and steering.route:
            budget = config.slot_budget(vllm_config.scheduler_config.max_num_seqs)
            if 1 + len(steering.route) > budget:  # the scheduler would hold it back forever
                raise SteeringRequestError(
                    "steer_categories",
                    f"'auto' on profile {steering.profile_id!r} holds {1 + len(steering.route)} steering slots at once "
                    f"(one, and one per category its gates route to: {list(steering.route)}); this server has "
                    f"{budget} (raise --steer-max-slots or --max-num-seqs, or name the categories)",
                )
    except SteeringRequestError as exc:
        raise VLLMValidationError(str(exc), parameter=exc.field) from None
    if steering is not None:
        assert clean is not None  # the steering was read from it
        clean[DIGEST_KEY] = steering.profile_digest  # only this process may say which version to use
        if steering.route:
            clean[ROUTE_KEY] = list(steering.route)  # the scheduler reserves a slot per category
    if clean is not extra_args:
        params = copy.copy(params)
        params.extra_args = clean or None
    return params, steering, tenant


def patch_input_processor() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor.process_inputs
    if getattr(original, PATCHED_ATTR, False):
        return

    @functools.wraps(original)
    def process_inputs(
        self: InputProcessor,
        request_id: str,
        prompt: Any,
        params: SamplingParams | PoolingParams,
        *args: Any,
        **kwargs: Any,
    ) -> EngineCoreRequest:
        params, steering, tenant = _admit(self.vllm_config, params)
        engine_request = original(self, request_id, prompt, params, *args, **kwargs)
        FRONT_END_REQUESTS[0] += 1
        prompt_len = None
        if steering is not None and steering.gated:
            ids, embeds = engine_request.prompt_token_ids, engine_request.prompt_embeds
            prompt_len = len(ids) if ids is not None else (len(embeds) if embeds is not None else None)
        engine_request.cache_salt = cache_salt(steering, engine_request.cache_salt, tenant, prompt_len)
        return engine_request

    setattr(process_inputs, PATCHED_ATTR, True)
    InputProcessor.process_inputs = process_inputs
