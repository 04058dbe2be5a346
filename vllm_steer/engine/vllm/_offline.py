"""An offline vLLM engine with vllm-steer loaded: what the demo, the sweeps and ``eval`` run their mixed batches on."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from vllm_steer.core.settings import ADDITIONAL_CONFIG_KEY

if TYPE_CHECKING:
    from vllm import LLM

__all__ = ["offline_engine"]


def offline_engine(
    model: str,
    profiles: str,
    *,
    eager: bool = True,
    max_num_seqs: int = 64,
    max_model_len: int | None = 1024,
    kv_cache_gib: int = 2,
    **engine_kwargs: Any,
) -> LLM:
    """``vllm.LLM`` on ``model`` steering with the profile directory ``profiles``.

    float32 and seed 0, so runs are reproducible and comparable with the Hugging Face reference; on CPU the
    KV cache is ``kv_cache_gib`` GiB unless ``VLLM_CPU_KVCACHE_SPACE`` is set (vLLM's default wants most of
    the RAM). ``max_model_len=None`` keeps the model's own. Stop it with :func:`shutdown_engine`.
    """
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    from vllm import LLM

    kwargs: dict[str, Any] = {
        "model": model,
        "dtype": "float32",
        "max_num_seqs": max_num_seqs,
        "seed": 0,
        "enforce_eager": eager,
        "additional_config": {ADDITIONAL_CONFIG_KEY: {"profiles": profiles}},
    }
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    kwargs.update(engine_kwargs)
    return LLM(**kwargs)
