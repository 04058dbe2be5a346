"""Plugin settings: where the profiles are and how many slots to keep.

Read from vLLM's ``additional_config={"vllm_steer": {...}}`` (which also enters
vLLM's config hash) or, key by key, from ``VLLM_STEER_*`` environment
variables, which reach every vLLM process (API server, engine core, workers).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


__all__ = ["SteerConfig", "ConfigError", "ADDITIONAL_CONFIG_KEY", "FusedChoice"]

ADDITIONAL_CONFIG_KEY = "vllm_steer"
FusedChoice = Literal["auto", "off", "triton", "compiled"]
"""Which fused op serves the general steering op (see :mod:`vllm_steer.engine.fused`)."""
_ENV = {
    "profiles": "VLLM_STEER_PROFILES",
    "max_slots": "VLLM_STEER_MAX_SLOTS",
    "tenants": "VLLM_STEER_TENANTS",
    "hook_all_sites": "VLLM_STEER_HOOK_ALL_SITES",
    "fused_op": "VLLM_STEER_FUSED_OP",
}


class ConfigError(ValueError):
    pass


class SteerConfig(BaseModel):
    """Validated plugin settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    profiles: str | None = None
    """Directory of profile sub-directories; ``None`` = the plugin is loaded but steers nothing."""
    max_slots: int | None = Field(default=None, ge=1, le=4096)
    """Distinct (profile, categories) in flight at once; default ``min(max_num_seqs, 64)``."""
    tenants: str | None = None
    """Tenants file (YAML/JSON) for the OpenAI server's tiers; ``None`` = single-tenant mode."""
    hook_all_sites: bool = False
    """Hook every site of every layer at start, so any profile can be hot-loaded later (else only
    the sites of the profiles loaded at start: a hot-loaded profile must fit them)."""
    fused_op: FusedChoice = "auto"
    """The general steering op as one fused op: ``triton`` (one kernel per site, CUDA), ``compiled``
    (torch.compile), ``off``; ``auto`` = Triton on CUDA (else compiled), off on CPU, where the per-method
    short paths are as cheap and a compile would only slow the start. Inside CUDA graphs the eager op
    costs ~8x the fused one (benchmarks/README.md)."""

    @classmethod
    def resolve(cls, additional_config: Mapping[str, Any] | None) -> SteerConfig:
        raw: dict[str, Any] = {}
        for key, env in _ENV.items():
            if os.environ.get(env):
                raw[key] = os.environ[env]
        section = (additional_config or {}).get(ADDITIONAL_CONFIG_KEY) if isinstance(additional_config, Mapping) else None
        if section is not None:
            if not isinstance(section, Mapping):
                raise ConfigError(f"additional_config.{ADDITIONAL_CONFIG_KEY} must be a mapping")
            raw.update(section)
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            raise ConfigError(f"vllm_steer config: {field}: {first['msg']}") from None

    @property
    def enabled(self) -> bool:
        return self.profiles is not None

    def slot_budget(self, max_num_seqs: int) -> int:
        """Slots the worker allocates and the scheduler's admission gate counts: the same number in both."""
        return self.max_slots or min(max_num_seqs, 64)
