"""Forced refusals (gate action ``refuse``): a vLLM V1 logits processor that hands the step's logits to the
runtime (:meth:`~vllm_steer.engine.runtime.SteeringRuntime.force_refusals`), and the model runner's
tokenizer for refusal texts.

vLLM builds a runner's logits processors once, in the runner's constructor (``build_logitsprocs``); the plugin
adds its processor there when steering is on, after vLLM's built-in ones (min tokens, logit bias, min-p), so a
refusing row's forced token is what the sampler sees. The processor keeps no state of its own: the runtime's
per-step map (built in ``_prepare_inputs``, in the same batch order as the logits) says which rows refuse and
with which token; the device says whether their gate fired.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from vllm_steer.core.settings import SteerConfig
from vllm_steer.engine.runtime import get_runtime
from vllm_steer.engine.vllm._common import PATCHED_ATTR

__all__ = ["patch_logits_processors", "refusal_processor_class", "ModelTokenizer"]


@functools.cache
def refusal_processor_class() -> type:
    """The logits processor class (built on first use: vLLM's interface is imported lazily)."""
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

    class RefusalLogitsProcessor(LogitsProcessor):
        """Forces the refusal of each refusing request whose gate fired; every other row is untouched."""

        def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
            pass

        def is_argmax_invariant(self) -> bool:
            return False  # it decides the token

        def update_state(self, batch_update: BatchUpdate | None) -> None:
            pass  # the runtime's step map already holds what apply needs

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            runtime = get_runtime()
            return logits if runtime is None else runtime.force_refusals(logits)

    return RefusalLogitsProcessor


def patch_logits_processors() -> None:
    """Add the refusal processor to every model runner built while steering is on (no speculative decoding:
    vLLM refuses custom logits processors with it, and the front end refuses refusals then)."""
    import vllm.v1.worker.gpu_model_runner as runner_module

    original = runner_module.build_logitsprocs
    if getattr(original, PATCHED_ATTR, False):
        return

    @functools.wraps(original)
    def build_logitsprocs(
        vllm_config: Any,
        device: torch.device,
        is_pin_memory: bool,
        is_pooling_model: bool,
        custom_logitsprocs: Sequence[Any] = (),
    ) -> Any:
        extra: tuple[Any, ...] = ()
        enabled = SteerConfig.resolve(vllm_config.additional_config).enabled
        if enabled and not is_pooling_model and not vllm_config.speculative_config:
            extra = (refusal_processor_class(),)
        return original(vllm_config, device, is_pin_memory, is_pooling_model, (*custom_logitsprocs, *extra))

    setattr(build_logitsprocs, PATCHED_ATTR, True)
    runner_module.build_logitsprocs = build_logitsprocs


class ModelTokenizer:
    """The served model's tokenizer, loaded on first use: refusal texts to ids, and its end-of-sequence token."""

    def __init__(self, vllm_config: Any) -> None:
        self._config = vllm_config.model_config

    @functools.cached_property
    def _tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(
            self._config.tokenizer,
            revision=self._config.tokenizer_revision,
            trust_remote_code=self._config.trust_remote_code,
        )

    def encode(self, text: str) -> Sequence[int]:
        """``text`` as token ids, no special tokens."""
        ids: list[int] = self._tokenizer(text, add_special_tokens=False).input_ids
        return ids

    def eos_for(self, sampling_params: Any) -> int | None:
        """The request's end-of-sequence token: vLLM's (which it leaves unset under ``ignore_eos``), else the
        tokenizer's, which is where vLLM takes it from."""
        eos = getattr(sampling_params, "eos_token_id", None)
        if eos is None:
            eos = self._tokenizer.eos_token_id
        return None if eos is None else int(eos)
