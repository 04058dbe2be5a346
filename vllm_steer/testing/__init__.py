"""For tests and benchmarks only (nothing in the product imports it, checked by import-linter): the plain
Hugging Face reference that the engine is proven against, synthetic profiles, the tiny random model the
tests serve, and the engine runner that starts each engine configuration in its own process (and counts
the starts).
"""

from __future__ import annotations

from vllm_steer.testing.engines import ENGINE_STARTS, record_engine_start, run_engine, run_refused_engine
from vllm_steer.testing.hf_reference import reference_op, steered
from vllm_steer.testing.synthetic import random_profile
from vllm_steer.testing.tiny import TINY, TINY_PROFILES, build_tiny

__all__ = [
    "reference_op",
    "steered",
    "random_profile",
    "TINY",
    "TINY_PROFILES",
    "build_tiny",
    "run_engine",
    "run_refused_engine",
    "record_engine_start",
    "ENGINE_STARTS",
]
