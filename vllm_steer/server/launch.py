"""What ``vllm-steer serve`` starts: vLLM's OpenAI server, with the plugin's environment, sized for the machine.

vLLM parses its command line before it loads plugins, so the plugin's settings reach vLLM's processes
as environment variables: :meth:`~vllm_steer.core.settings.SteerConfig.to_env` (``VLLM_PLUGINS`` and one
``VLLM_STEER_*`` variable per setting). On CPU, the KV cache is sized here too (:func:`cpu_kv_cache_gib`):
vLLM CPU's default reserves a fraction of *all* memory and refuses to start unless that much is free.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_steer.core.settings import PLUGINS_ENV, ConfigError, SteerConfig
from vllm_steer.server.access import AdminOptionsError, check_admin_options

logger = logging.getLogger("vllm_steer.server.launch")

__all__ = [
    "KV_CACHE_ENV",
    "KV_CACHE_SHARE",
    "KV_CACHE_MIN_GIB",
    "KV_CACHE_MAX_GIB",
    "Launch",
    "cpu_kv_cache_gib",
    "mem_available_bytes",
    "prepare",
]

KV_CACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"
"""vLLM CPU's KV-cache size in GiB (whole numbers); when set, its memory-fraction check is skipped."""
KV_CACHE_SHARE = 0.25
KV_CACHE_MIN_GIB = 1
KV_CACHE_MAX_GIB = 8
_GIB = 1024**3
_MEMORY_FLAGS = ("--kv-cache-memory-bytes", "--gpu-memory-utilization")
"""vLLM options by which the user sizes the KV cache: then ``serve`` leaves it alone."""


def cpu_kv_cache_gib(available_bytes: int | None) -> int:
    """The KV cache for a CPU server: a quarter of the memory available now, in whole GiB, within [1, 8].

    A quarter leaves room for the weights, activations and whatever else runs; 8 GiB is ample for the
    small models a CPU serves (SmolLM2-135M: ~1.5 million tokens). Unknown memory: the minimum, 1 GiB.
    """
    if not available_bytes or available_bytes <= 0:
        return KV_CACHE_MIN_GIB
    return max(KV_CACHE_MIN_GIB, min(KV_CACHE_MAX_GIB, int(available_bytes * KV_CACHE_SHARE // _GIB)))


def mem_available_bytes(meminfo: str | Path = "/proc/meminfo") -> int | None:
    """``MemAvailable`` (Linux), else free physical pages (other POSIX systems), else ``None``."""
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _on_cpu() -> bool:
    """Whether vLLM will run on the CPU here (no CUDA or XPU device visible)."""
    import torch

    xpu = getattr(torch, "xpu", None)
    return not torch.cuda.is_available() and not (xpu is not None and xpu.is_available())


@dataclass
class Launch:
    """The vLLM server command and its environment."""

    cmd: list[str]
    env: dict[str, str]
    shown: dict[str, str]
    """The variables ``serve`` set or chose (what ``--dry-run`` prints; never the policy secret)."""
    notes: list[str] = field(default_factory=list)
    """Choices made for the user, to print (e.g. the KV-cache size)."""


def _uses_flag(args: Iterable[str], flags: Iterable[str]) -> bool:
    return any(arg == flag or arg.startswith(flag + "=") for arg in args for flag in flags)


def prepare(
    options: Mapping[str, Any],
    plugins: Iterable[str],
    vllm_args: list[str],
    environ: Mapping[str, str],
    *,
    default_model: Any = None,
    on_cpu: Any = _on_cpu,
    available: Any = mem_available_bytes,
) -> Launch:
    """The command and environment for ``vllm-steer serve``.

    ``options`` are the ``--steer-*`` values given (by field; ``None`` = not given), on top of the
    ``VLLM_STEER_*`` variables already in ``environ``. Raises :class:`ConfigError` naming the setting.
    """
    config = SteerConfig.parse(
        {**SteerConfig.env_values(environ), **{name: value for name, value in options.items() if value is not None}}
    )
    absolute = {}
    for option in SteerConfig.options():
        value = getattr(config, option.field)
        if option.path and value is not None:
            if not Path(value).exists():
                raise ConfigError(option.field, f"{value} does not exist")
            absolute[option.field] = str(Path(value).resolve())
    if absolute:
        config = SteerConfig.parse({**config.model_dump(exclude_unset=True), **absolute})
    if config.tenants is not None and not config.allow_admin_options:
        # the environment's admin options, refused before vLLM starts (the endpoint plugin checks the rest)
        try:
            check_admin_options(environ, argparse.Namespace(), allow=False, logger=logger)
        except AdminOptionsError as err:
            raise ConfigError("allow_admin_options", err.message) from None
    names = [*(environ.get(PLUGINS_ENV) or "").split(","), *plugins]
    shown = config.to_env(plugins=names)
    notes = []
    if KV_CACHE_ENV not in environ and not _uses_flag(vllm_args, _MEMORY_FLAGS) and on_cpu():
        free = available()
        gib = cpu_kv_cache_gib(free)
        shown[KV_CACHE_ENV] = str(gib)
        seen = "unknown memory available" if not free else f"{free / _GIB:.1f} GiB available"
        notes.append(
            f"{KV_CACHE_ENV}={gib}: a {gib} GiB KV cache ({seen}; a quarter of it, within "
            f"[{KV_CACHE_MIN_GIB}, {KV_CACHE_MAX_GIB}] GiB). Set {KV_CACHE_ENV} or pass "
            f"--kv-cache-memory-bytes to choose."
        )
    rest = list(vllm_args)
    if rest and not rest[0].startswith("-"):
        rest = ["--model", *rest]
    if not _uses_flag(rest, ("--model",)):
        if default_model is None:
            from vllm_steer.default_model import ensure_default_model

            default_model = ensure_default_model()
        rest = ["--model", str(default_model), *rest]
    # `python -m vllm.entrypoints.openai.api_server` is `vllm serve` without the console script, which
    # fails under the vllm-cpu distribution (PackageNotFoundError: vllm).
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *rest]
    return Launch(cmd=cmd, env={**environ, **shown}, shown=shown, notes=notes)
