"""Run one vLLM engine configuration in a fresh process, and count how often each configuration starts.

An engine takes 30-100 s to start on a CPU, so the test suite starts each configuration once per
session and shares its outputs. :func:`run_engine` (offline engines) and the test servers record every
start here under a key naming the configuration; tests/conftest.py prints the counts at the end of the
session and fails it when a key started twice.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

# key -> number of starts in this process (a pytest session runs in one process)
ENGINE_STARTS: Counter[str] = Counter()


def record_engine_start(key: str) -> None:
    """Count one start of the engine configuration ``key`` (an offline engine, a server, a Ray app)."""
    ENGINE_STARTS[key] += 1


def run_engine(
    spec: dict, workdir: Path, *, plugin: bool, key: str, timeout: int = 900, env: dict[str, str] | None = None
) -> dict:
    """Run :mod:`vllm_steer.testing.engine_driver` on ``spec`` in a fresh process; return its JSON result.

    ``plugin=False`` runs vLLM with vllm-steer not loaded at all. ``key`` names the configuration for
    :data:`ENGINE_STARTS`; ``env`` is added to this process's environment for the run. Raises
    ``AssertionError`` with the log's tail when the run fails."""
    record_engine_start(key)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path = workdir / "spec.json"
    out_path = workdir / "result.json"
    spec_path.write_text(json.dumps(spec))
    extra = env or {}
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.pop("VLLM_STEER_PROFILES", None)
    if not plugin:
        env["VLLM_PLUGINS"] = "__no_plugin__"  # an allowlist that matches no plugin: vllm-steer is not loaded
    else:
        env.pop("VLLM_PLUGINS", None)
    env.update(extra)
    log = workdir / "engine.log"
    with open(log, "w") as fh:
        proc = subprocess.run(
            [sys.executable, "-m", "vllm_steer.testing.engine_driver", str(spec_path), str(out_path)],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    if proc.returncode != 0 or not out_path.exists():
        tail = log.read_text()[-6000:]
        raise AssertionError(f"engine run failed (rc={proc.returncode}); log tail:\n{tail}")
    return json.loads(out_path.read_text())


def run_refused_engine(spec: dict, workdir: Path, *, key: str, timeout: int = 300) -> str:
    """Run (with the plugin) an engine configuration that must refuse to start; return its log.

    ``AssertionError`` if the engine ran: a steering engine that cannot steer must not serve a request."""
    workdir = Path(workdir)
    try:
        run_engine(spec, workdir, plugin=True, key=key, timeout=timeout)
    except AssertionError as exc:
        if "engine run failed" not in str(exc):
            raise
    else:
        raise AssertionError(f"{key}: the engine started and served; it had to refuse")
    assert not (workdir / "result.json").exists(), "no request may have been served"
    return (workdir / "engine.log").read_text()
