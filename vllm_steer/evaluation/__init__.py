"""``vllm-steer eval``: every setting a row of one mixed batch (or a running server), the metrics, judges,
multiple-choice capability retention, and the reports.
"""

from __future__ import annotations

from vllm_steer.evaluation.judges import Judge, make_judge
from vllm_steer.evaluation.metrics import is_refusal
from vllm_steer.evaluation.runner import EvalConfig, EvalError, EvalTarget, run_eval

__all__ = ["EvalConfig", "EvalError", "EvalTarget", "run_eval", "Judge", "make_judge", "is_refusal"]
