"""Profiles from data: activation statistics, the per-method pipeline (``vllm-steer calibrate``), angle and
scale sweeps through the engine, reports, and import/export of vectors made elsewhere (GGUF, safetensors, SAE).
"""

from __future__ import annotations

from vllm_steer.calibration.interop import VectorImportError, export_gguf, export_vectors, import_vectors
from vllm_steer.calibration.pipeline import CalibrationConfig, CalibrationError, calibrate_profile
from vllm_steer.calibration.stats import PROMPT_FORMATS
from vllm_steer.calibration.sweep import SweepPoint, parse_grid

__all__ = [
    "CalibrationConfig",
    "CalibrationError",
    "calibrate_profile",
    "PROMPT_FORMATS",
    "SweepPoint",
    "parse_grid",
    "VectorImportError",
    "import_vectors",
    "export_vectors",
    "export_gguf",
]
