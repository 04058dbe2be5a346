"""Compile cache (``VllmConfig.compute_hash``): salted with the plugin's version and hook sites, so a graph
compiled without the hooks is never loaded with them (or the reverse).
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

from vllm_steer import __version__
from vllm_steer.engine.runtime import sites_for_profiles
from vllm_steer.engine.vllm._common import PATCHED_ATTR
from vllm_steer.engine.vllm._profiles import profiles_for

__all__ = ["patch_config_hash"]


def _compile_salt(vllm_config: Any) -> str | None:
    try:
        config, profiles = profiles_for(vllm_config)
    except Exception:  # noqa: BLE001 - a broken profile dir fails loudly at load_model instead
        return "vllm-steer-unloadable"
    if not config.enabled:
        return None
    return f"vllm-steer {__version__} sites=" + ",".join(str(s) for s in sites_for_profiles(profiles))


def patch_config_hash() -> None:
    from vllm.config import VllmConfig

    original = VllmConfig.compute_hash
    if getattr(original, PATCHED_ATTR, False):
        return

    def compute_hash(self: VllmConfig, include_version: bool = True) -> str:
        base = original(self, include_version)
        salt = _compile_salt(self)
        if salt is None:
            return base
        return hashlib.sha256(f"{base}|{salt}".encode()).hexdigest()[: len(base)]

    functools.update_wrapper(compute_hash, original)  # not @wraps: its result does not type as a method
    setattr(compute_hash, PATCHED_ATTR, True)
    VllmConfig.compute_hash = compute_hash
