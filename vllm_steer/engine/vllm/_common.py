"""Shared by the glue modules: the logger, the patched-method marker, vLLM version checks, logging."""

from __future__ import annotations

import logging
import os

from vllm_steer import __version__

logger = logging.getLogger("vllm_steer")

PATCHED_ATTR = "__vllm_steer_patched__"
"""Set on every function that replaces a vLLM method, so patching twice is a no-op."""

SUPPORTED_VLLM = ((0, 32), (0, 33))
"""Minor versions whose internals this module was written against (0.32.0) or checked on."""


def check_vllm_version() -> str:
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    parts = version.split(".")
    try:
        minor = (int(parts[0]), int(parts[1]))
    except (ValueError, IndexError):
        minor = None
    if minor not in SUPPORTED_VLLM:
        supported = ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED_VLLM)
        raise RuntimeError(
            f"vllm-steer {__version__} supports vLLM {supported}; this is vLLM {version}. "
            "Install a supported vLLM, or a vllm-steer release made for yours."
        )
    return version


def prefer_v1_runner() -> None:
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") is None:
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        logger.info("vllm-steer: using vLLM's V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0); steering hooks into it")


def share_vllm_log_handlers() -> None:
    """Log through vLLM's handlers and format, so the plugin's lines appear where vLLM's do."""
    ours, theirs = logging.getLogger("vllm_steer"), logging.getLogger("vllm")
    if not ours.handlers and theirs.handlers:
        for handler in theirs.handlers:
            ours.addHandler(handler)
        ours.setLevel(theirs.level or logging.INFO)
        ours.propagate = False
