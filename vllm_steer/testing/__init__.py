"""For tests and benchmarks only (nothing in the product imports it): the plain Hugging Face reference that
the engine is proven against, and synthetic profiles.
"""

from __future__ import annotations

from vllm_steer.testing.hf_reference import reference_op, steered
from vllm_steer.testing.synthetic import random_profile

__all__ = ["reference_op", "steered", "random_profile"]
