"""Optional dependencies (the package's extras): a clear error naming the extra when one is missing."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingExtraError", "require"]


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message says which extra installs it."""


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import ``module`` and return it, or raise :class:`MissingExtraError` naming the extra that installs it:
    ``<what> needs <module>: pip install 'vllm-steer[<extra>]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(f"{what} needs {module}: pip install 'vllm-steer[{extra}]'", name=module) from e
