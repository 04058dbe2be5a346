"""This process's loaded profiles, per (directory, model), and the served model's fingerprint.

Hot reload swaps a directory's dict as a whole; requests keep the version they were validated against
(the front end stamps its digest, see :data:`vllm_steer.core.wire.DIGEST_KEY`).
"""

from __future__ import annotations

import os
import threading
from typing import Any

from vllm_steer.core.fingerprint import fingerprint_from_config, model_identity
from vllm_steer.core.profile import ModelFingerprint, Profile, load_profile_dir
from vllm_steer.core.settings import SteerConfig

__all__ = [
    "fingerprint_of",
    "load_served",
    "profiles_key",
    "current_profiles",
    "profiles_for",
    "set_current",
    "FRONT_END_REQUESTS",
]


def fingerprint_of(vllm_config: Any) -> ModelFingerprint:
    """The served model's fingerprint: the one fingerprint function on the HF config vLLM resolved and the
    model's files (the same on every rank and process; cached per model)."""
    model_config = vllm_config.model_config
    model = getattr(model_config, "model", None)
    identity = (
        model_identity(str(model), getattr(model_config, "tokenizer", None), getattr(model_config, "revision", None))
        if model
        else None
    )
    return fingerprint_from_config(model_config.hf_config, text_config=model_config.hf_text_config, identity=identity)


def load_served(config: SteerConfig, vllm_config: Any) -> dict[str, Profile]:
    """Read ``config``'s profile directory for the served model (its fingerprint, strict or not)."""
    if config.profiles is None:
        raise ValueError("vllm-steer: no profile directory configured")
    return load_profile_dir(
        os.path.abspath(config.profiles), fingerprint_of(vllm_config), strict=config.strict_model_match
    )


_CURRENT: dict[tuple[str, str], dict[str, Profile]] = {}
"""This process's current profiles per (directory, model); hot reload swaps the dict as a whole."""

_CURRENT_LOCK = threading.Lock()

FRONT_END_REQUESTS = [0]
"""Requests this process's front end admitted to its engine (reported by the admin status route)."""


def profiles_key(config: SteerConfig, vllm_config: Any) -> tuple[str, str]:
    if config.profiles is None:
        raise ValueError("vllm-steer: no profile directory configured")
    return os.path.abspath(config.profiles), fingerprint_of(vllm_config).model_dump_json()


def current_profiles(config: SteerConfig, vllm_config: Any) -> dict[str, Profile]:
    """This process's current profiles for an enabled ``config``, loaded on first use."""
    key = profiles_key(config, vllm_config)
    with _CURRENT_LOCK:
        if key not in _CURRENT:
            _CURRENT[key] = load_served(config, vllm_config)
        return _CURRENT[key]


def profiles_for(vllm_config: Any) -> tuple[SteerConfig, dict[str, Profile]]:
    config = SteerConfig.resolve(vllm_config.additional_config)
    return config, (current_profiles(config, vllm_config) if config.enabled else {})


def set_current(key: tuple[str, str], profiles: dict[str, Profile]) -> None:
    """Make ``profiles`` this process's current set for ``key`` (hot reload, unload)."""
    with _CURRENT_LOCK:
        _CURRENT[key] = profiles
