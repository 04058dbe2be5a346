"""vllm-steer: per-request activation steering inside vLLM's batched forward pass.

Installing the package registers :func:`register` under vLLM's
``vllm.general_plugins`` entry point, so every vLLM process (API server,
engine core, workers) patches itself on start. Requests choose their steering
with ``steer_*`` keys in ``SamplingParams.extra_args`` (``vllm_xargs`` over the
OpenAI API); see :mod:`vllm_steer.core.request`.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "register"]


def register() -> None:
    """vLLM plugin entry point; cheap and idempotent (imports the glue lazily)."""
    from vllm_steer.engine.vllm import register as _register

    _register()
