"""Front end (``InputProcessor.process_inputs``): validate each request's steering, stamp its profile
version, derive its prefix-cache salt.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from vllm_steer.core.request import (
    ResolvedSteering,
    SteeringRequestError,
    parse_steering,
    resolve_steering,
    steering_cache_salt,
)
from vllm_steer.core.settings import SteerConfig
from vllm_steer.core.wire import DIGEST_KEY, check_policy_token
from vllm_steer.engine.vllm._common import PATCHED_ATTR
from vllm_steer.engine.vllm._profiles import FRONT_END_REQUESTS, current_profiles

if TYPE_CHECKING:
    from vllm.pooling_params import PoolingParams
    from vllm.v1.engine import EngineCoreRequest

__all__ = ["patch_input_processor"]


def _validate_request(vllm_config: Any, extra_args: Any) -> ResolvedSteering | None:
    """Parse and resolve one request's steering; raise vLLM's validation error naming the field."""
    from vllm.exceptions import VLLMValidationError

    try:
        config = SteerConfig.resolve(vllm_config.additional_config)
        if config.tenants is not None and not check_policy_token(extra_args):
            raise SteeringRequestError(
                "vllm_xargs",
                "this server enforces tenant tiers but the request did not pass the vllm-steer "
                "policy: tiers cover POST /v1/completions and /v1/chat/completions only, and the endpoint "
                "plugin must be loaded (VLLM_PLUGINS=vllm_steer)",
            )
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
        return resolve_steering(request, current_profiles(config, vllm_config))
    except SteeringRequestError as exc:
        raise VLLMValidationError(str(exc), parameter=exc.field) from None


def patch_input_processor() -> None:
    from vllm.sampling_params import SamplingParams
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
        steering = None
        if isinstance(params, SamplingParams):
            extra_args = params.extra_args
            if isinstance(extra_args, dict):
                extra_args.pop(DIGEST_KEY, None)  # only this process may say which version to use
            steering = _validate_request(self.vllm_config, extra_args)
            if steering is not None:
                assert extra_args is not None  # the steering was read from it
                extra_args[DIGEST_KEY] = steering.profile_digest
        engine_request = original(self, request_id, prompt, params, *args, **kwargs)
        FRONT_END_REQUESTS[0] += 1
        if steering is not None:
            engine_request.cache_salt = steering_cache_salt(steering, engine_request.cache_salt)
        return engine_request

    setattr(process_inputs, PATCHED_ATTR, True)
    InputProcessor.process_inputs = process_inputs
