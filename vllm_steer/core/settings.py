"""Plugin settings: where the profiles are, the tenants file, how many slots to keep, which hooks and op.

:class:`SteerConfig` is the one place they are written down. Each field has one environment variable
(``VLLM_STEER_<FIELD>``, :meth:`SteerConfig.options`), which reaches every vLLM process (API server,
engine core, workers), and one ``vllm-steer serve`` option (``--steer-<field>``). The engine reads them
with :meth:`SteerConfig.resolve` (vLLM's ``additional_config={"vllm_steer": {...}}``, which also enters
vLLM's config hash, wins over the environment); ``vllm-steer serve`` and the Ray replicas get their
environment from :meth:`SteerConfig.to_env`, which also names the plugin in ``VLLM_PLUGINS`` and, for
deployments of several processes, carries the shared policy secret (:data:`~vllm_steer.core.wire.POLICY_SECRET_ENV`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vllm_steer.core.errors import SteerError, field_and_message
from vllm_steer.core.wire import POLICY_SECRET_ENV

__all__ = [
    "SteerConfig",
    "ConfigError",
    "Option",
    "ADDITIONAL_CONFIG_KEY",
    "ENV_PREFIX",
    "PLUGIN_NAME",
    "PLUGINS_ENV",
    "FusedChoice",
    "plugins_value",
]

ADDITIONAL_CONFIG_KEY = "vllm_steer"
ENV_PREFIX = "VLLM_STEER_"
"""Every setting's environment variable is ``ENV_PREFIX + FIELD`` (``VLLM_STEER_PROFILES``, ...)."""
PLUGIN_NAME = "vllm_steer"
"""The name of the plugin in vLLM's entry points (general and endpoint plugin)."""
PLUGINS_ENV = "VLLM_PLUGINS"
"""vLLM loads only the plugins this comma-separated variable names (all when unset)."""
FusedChoice = Literal["auto", "off", "triton", "compiled"]
"""Which fused op serves the general steering op (see :mod:`vllm_steer.engine.fused`)."""


class _IsPath:
    """Field metadata: the setting names a file or directory."""


_PATH = _IsPath()


class ConfigError(SteerError):
    """A plugin setting that cannot be used; ``field`` is the setting (``fused_op``, ``additional_config.vllm_steer``)."""

    def __init__(self, field: str, message: str):
        super().__init__(field, message)
        self.args = (f"vllm_steer config: {field}: {message}",)


@dataclass(frozen=True)
class Option:
    """One setting as the outside world spells it: its environment variable and its ``serve`` option."""

    field: str
    help: str
    """The field's documentation, as plain text (the ``serve`` option's help)."""
    path: bool
    """A file or directory: ``serve`` makes it absolute and checks that it exists."""

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.field.upper()

    @property
    def flag(self) -> str:
        return "--steer-" + self.field.replace("_", "-")

    @property
    def param(self) -> str:
        """The ``serve`` function's parameter name."""
        return "steer_" + self.field

    @staticmethod
    def render(value: Any) -> str:
        """The value as its environment variable holds it (what :meth:`SteerConfig.resolve` reads back)."""
        if isinstance(value, bool):
            return "1" if value else "0"
        return str(value)


class SteerConfig(BaseModel):
    """Validated plugin settings (the field docs are also ``vllm-steer serve --help``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)
    profiles: Annotated[str | None, _PATH] = None
    """Directory of steering profiles (one sub-directory each). Unset: the plugin is loaded but steers nothing."""
    max_slots: int | None = Field(default=None, ge=1, le=4096)
    """Distinct steering settings (profile, categories, layers) in flight at once; default min(max_num_seqs, 64)."""
    tenants: Annotated[str | None, _PATH] = None
    """Tenants file (YAML/JSON) mapping API keys to tiers for the OpenAI server. Unset: single-tenant mode
    (every caller may use every profile, or none)."""
    audit_log: str | None = None
    """File the policy's audit lines are appended to (one JSON object per decision; they also go to the
    ``vllm_steer.audit`` logger). Unset: the logger only."""
    audit_prompts: bool = False
    """Include the prompt or messages in audit lines (off: the audit log never holds prompt text)."""
    strict_model_match: bool = False
    """Load a profile only on the checkpoint it was made on (same tokenizer and embedding hashes, not only
    the same architecture, width and depth); off: another checkpoint of the same shape loads with a warning."""
    hook_all_sites: bool = False
    """Hook every site of every layer at start, so any profile can be hot-loaded later (else only the sites
    of the profiles loaded at start: a hot-loaded profile must fit them)."""
    fused_op: FusedChoice = "auto"
    """The general steering op as one fused op: ``triton`` (one kernel per site, CUDA), ``compiled``
    (torch.compile), ``off``; ``auto`` = Triton on CUDA (else compiled), off on CPU, where the per-method
    short paths are as cheap and a compile would only slow the start. Inside CUDA graphs the eager op
    costs ~8x the fused one (benchmarks/README.md)."""
    max_body_bytes: int | None = Field(default=None, ge=1024)
    """Largest request body the OpenAI server reads, in bytes (413 beyond); default 64 per token of the
    model's context, within [1 MiB, 16 MiB]."""
    allow_admin_options: bool = False
    """Start with a tenants file even when server options open admin powers to clients (logged loudly;
    see ``vllm_steer.server.access.ADMIN_OPTIONS``)."""
    public_metrics: bool = False
    """Serve /metrics without a key (otherwise an admin key is needed)."""

    # ------------------------------------------------------------------ the outside world's spelling

    @classmethod
    @cache
    def options(cls) -> tuple[Option, ...]:
        """One :class:`Option` per field, in field order (a subclass's own fields are not settings)."""
        return tuple(
            Option(name, _plain(info.description or ""), _PATH in info.metadata)
            for name, info in SteerConfig.model_fields.items()
        )

    @classmethod
    def option(cls, field: str) -> Option:
        """The option of ``field`` (a :class:`KeyError` for an unknown one)."""
        for option in cls.options():
            if option.field == field:
                return option
        raise KeyError(field)

    @classmethod
    def env_values(cls, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """The raw settings found in ``environ`` (default: this process's), by field; empty variables are unset."""
        environ = os.environ if environ is None else environ
        return {option.field: environ[option.env] for option in cls.options() if environ.get(option.env)}

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> SteerConfig:
        """Validate raw settings; :class:`ConfigError` names the first bad field."""
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(*field_and_message(exc)) from None

    @classmethod
    def resolve(
        cls, additional_config: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None
    ) -> SteerConfig:
        """The engine's settings: the environment, overridden key by key by ``additional_config["vllm_steer"]``."""
        raw: dict[str, Any] = dict(cls.env_values(environ))
        section = (
            (additional_config or {}).get(ADDITIONAL_CONFIG_KEY) if isinstance(additional_config, Mapping) else None
        )
        if section is not None:
            if not isinstance(section, Mapping):
                raise ConfigError(f"additional_config.{ADDITIONAL_CONFIG_KEY}", "must be a mapping")
            raw.update(section)
        return cls.parse(raw)

    def to_env(self, *, plugins: str | Iterable[str] | None = None, policy_secret: str | None = None) -> dict[str, str]:
        """The environment that loads the plugin with these settings in every vLLM process.

        ``VLLM_PLUGINS`` names ``plugins`` (a comma-separated value or names) and the plugin; each field that
        was set has its variable (:meth:`resolve` reads back the same config); ``policy_secret``, when given,
        is the secret a multi-process deployment shares (never log this environment as it is).
        """
        env = {PLUGINS_ENV: plugins_value(plugins)}
        for option in self.options():
            value = getattr(self, option.field)
            if option.field in self.model_fields_set and value is not None:
                env[option.env] = option.render(value)
        if policy_secret is not None:
            env[POLICY_SECRET_ENV] = policy_secret
        return env

    # ------------------------------------------------------------------ the engine's reading

    @property
    def enabled(self) -> bool:
        return self.profiles is not None

    def slot_budget(self, max_num_seqs: int) -> int:
        """Slots the worker allocates and the scheduler's admission gate counts: the same number in both."""
        return self.max_slots or min(max_num_seqs, 64)


def plugins_value(plugins: str | Iterable[str] | None = None) -> str:
    """A ``VLLM_PLUGINS`` value: ``plugins`` (comma-separated or names, duplicates dropped) and the plugin."""
    names = plugins.split(",") if isinstance(plugins, str) else list(plugins or ())
    names = [name.strip() for name in names if name and name.strip()]
    return ",".join(dict.fromkeys([*names, PLUGIN_NAME]))


def _plain(doc: str) -> str:
    """A field docstring as one line of plain text (no reST literals)."""
    return re.sub(r"\s+", " ", doc.replace("``", "")).strip()
