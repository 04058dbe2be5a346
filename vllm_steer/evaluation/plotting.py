"""Matplotlib without a display, and one way to save a figure (the calibration and eval reports share it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vllm_steer.core.extras import require

__all__ = ["pyplot", "save"]


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (servers and CI have no display)."""
    require("matplotlib", "eval", "plotting the report")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: str | Path, dpi: int = 110) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
