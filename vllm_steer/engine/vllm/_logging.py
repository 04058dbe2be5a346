"""vLLM's request logger (``--enable-log-requests``): the server's own ``extra_args`` keys never reach a log.

vLLM logs each request's sampling parameters (``extra_args`` included) and, at DEBUG, its JSON body
(``vllm_xargs`` included) before the engine's front end has dropped the policy stamp and the tenant
(:mod:`vllm_steer.core.wire`). Both log calls get a redacted copy instead.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from vllm_steer.core.wire import RESERVED_XARGS_PREFIX
from vllm_steer.engine.vllm._common import PATCHED_ATTR

__all__ = ["REDACTED", "patch_request_logger", "redacted_xargs"]

REDACTED = "<redacted>"
_PARAMS_INDEX = 4
"""``RequestLogger.log_inputs(request_id, prompt, prompt_token_ids, prompt_embeds, params, lora_request)``."""


def redacted_xargs(extra_args: Any) -> Any:
    """``extra_args`` with the values of the server's own keys replaced (a copy; anything else as is)."""
    if not isinstance(extra_args, dict) or not any(
        isinstance(k, str) and k.startswith(RESERVED_XARGS_PREFIX) for k in extra_args
    ):
        return extra_args
    return {
        k: REDACTED if isinstance(k, str) and k.startswith(RESERVED_XARGS_PREFIX) else v for k, v in extra_args.items()
    }


def _redacted_params(params: Any) -> Any:
    extra_args = getattr(params, "extra_args", None)
    redacted = redacted_xargs(extra_args)
    if redacted is extra_args:
        return params
    params = copy.copy(params)
    params.extra_args = redacted
    return params


def _redacted_request(request: Any) -> Any:
    xargs = getattr(request, "vllm_xargs", None)
    redacted = redacted_xargs(xargs)
    if redacted is xargs:
        return request
    return request.model_copy(update={"vllm_xargs": redacted})


def patch_request_logger() -> None:
    from vllm.entrypoints.serve.utils.request_logger import RequestLogger

    log_inputs = RequestLogger.log_inputs
    if getattr(log_inputs, PATCHED_ATTR, False):
        return
    log_request_body = RequestLogger.log_request_body

    @functools.wraps(log_inputs)
    def patched_log_inputs(self: Any, *args: Any, **kwargs: Any) -> Any:
        if "params" in kwargs:
            kwargs["params"] = _redacted_params(kwargs["params"])
        elif len(args) > _PARAMS_INDEX:
            args = (*args[:_PARAMS_INDEX], _redacted_params(args[_PARAMS_INDEX]), *args[_PARAMS_INDEX + 1 :])
        return log_inputs(self, *args, **kwargs)

    @functools.wraps(log_request_body)
    def patched_log_request_body(self: Any, request: Any) -> Any:
        return log_request_body(self, _redacted_request(request))

    setattr(patched_log_inputs, PATCHED_ATTR, True)
    RequestLogger.log_inputs = patched_log_inputs
    RequestLogger.log_request_body = patched_log_request_body
