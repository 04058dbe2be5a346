"""Two vLLM engines on one GPU, for ``benchmarks/plugin_overhead.py`` under ``benchmarks/gpu_e2e.sh``.

plugin_overhead.py keeps two engines alive side by side (plugin off, plugin on). On CUDA each ``LLM``
reserves ``gpu_memory_utilization`` (vLLM's default 0.92) of the whole GPU, so the second one cannot
start. gpu_e2e.sh puts this directory on ``PYTHONPATH`` for that step only and sets
``VLLM_STEER_BENCH_GPU_MEMORY_UTILIZATION`` (e.g. 0.4): every ``vllm.LLM(...)`` in the benchmark's
processes that does not pass ``gpu_memory_utilization`` itself gets that value. Nothing else changes;
without the variable this file does nothing but load the next ``sitecustomize`` on the path, if any.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path

_VAR = "VLLM_STEER_BENCH_GPU_MEMORY_UTILIZATION"
_TARGET = "vllm.entrypoints.llm"  # where vllm.LLM is defined (vllm/__init__.py imports it lazily)


def _patch(module) -> None:
    llm = module.LLM
    init = llm.__init__
    value = float(os.environ[_VAR])

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("gpu_memory_utilization", value)
        init(self, *args, **kwargs)

    llm.__init__ = __init__


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of ``vllm.entrypoints.llm`` so the patch follows its import."""

    def find_spec(self, name, path=None, target=None):
        if name != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


def _load_next_sitecustomize() -> None:
    """This file shadows any other sitecustomize (a distribution's); run that one too."""
    here = Path(__file__).resolve().parent
    rest = [p for p in sys.path if p and Path(p).resolve() != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None and spec.origin != __file__:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


if os.environ.get(_VAR):
    sys.meta_path.insert(0, _Finder())
_load_next_sitecustomize()
