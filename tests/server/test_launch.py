"""`vllm-steer serve`'s launch: the KV cache sized from the machine on CPU, the user's choice left alone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vllm_steer.server.launch import (
    KV_CACHE_ENV,
    KV_CACHE_MAX_GIB,
    KV_CACHE_MIN_GIB,
    cpu_kv_cache_gib,
    mem_available_bytes,
    prepare,
)

GIB = 1024**3


@pytest.mark.parametrize(
    "available, gib",
    [
        (None, KV_CACHE_MIN_GIB),  # unknown: the minimum
        (0, KV_CACHE_MIN_GIB),
        (2 * GIB, 1),  # a quarter is 0.5 GiB: at least 1
        (4 * GIB, 1),
        (7.9 * GIB, 1),
        (8 * GIB, 2),
        (20.5 * GIB, 5),  # a quarter, rounded down to whole GiB (what vLLM reads)
        (32 * GIB, 8),
        (512 * GIB, KV_CACHE_MAX_GIB),  # a big machine: at most 8
    ],
)
def test_kv_cache_is_a_quarter_of_available_memory_within_1_and_8_gib(available, gib):
    assert cpu_kv_cache_gib(None if available is None else int(available)) == gib


def test_mem_available_reads_proc_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24684084 kB\nMemFree:        17581908 kB\nMemAvailable:   20493136 kB\n")
    assert mem_available_bytes(meminfo) == 20493136 * 1024
    fallback = mem_available_bytes(tmp_path / "missing")  # sysconf where there is no /proc
    assert fallback is None or fallback > 0


def _prepare(environ=None, args=("--model", "m"), on_cpu=True, available=20 * GIB):
    return prepare(
        {}, [], list(args), environ or {}, default_model="m", on_cpu=lambda: on_cpu, available=lambda: available
    )


def test_serve_sizes_the_kv_cache_on_cpu_and_says_so():
    launch = _prepare()
    assert launch.env[KV_CACHE_ENV] == launch.shown[KV_CACHE_ENV] == "5"
    (note,) = launch.notes
    assert f"{KV_CACHE_ENV}=5" in note and "20.0 GiB available" in note


@pytest.mark.parametrize(
    "environ, args, on_cpu",
    [
        ({KV_CACHE_ENV: "3"}, ("--model", "m"), True),  # the user's own size
        ({}, ("--model", "m", "--kv-cache-memory-bytes", "1000000"), True),
        ({}, ("--model", "m", "--gpu-memory-utilization=0.5"), True),
        ({}, ("--model", "m"), False),  # a GPU: vLLM sizes its cache from the device
    ],
)
def test_serve_leaves_the_kv_cache_to_the_user_or_the_gpu(environ, args, on_cpu):
    launch = _prepare(environ, args, on_cpu)
    assert KV_CACHE_ENV not in launch.shown and not launch.notes
    assert launch.env.get(KV_CACHE_ENV) == environ.get(KV_CACHE_ENV)


def test_model_argument_and_environment():
    launch = _prepare({"VLLM_PLUGINS": "x", "VLLM_STEER_MAX_SLOTS": "9", "OTHER": "kept"}, ("MODEL", "--port", "1"))
    assert launch.cmd[-4:] == ["--model", "MODEL", "--port", "1"]
    assert launch.shown["VLLM_PLUGINS"] == "x,vllm_steer" and launch.shown["VLLM_STEER_MAX_SLOTS"] == "9"
    assert launch.env["OTHER"] == "kept"
    assert _prepare(args=("--port", "1")).cmd[-4:] == ["--model", "m", "--port", "1"]  # the default model


@pytest.mark.parametrize("variable", ["VLLM_SERVER_DEV_MODE", "VLLM_ALLOW_RUNTIME_LORA_UPDATING"])
def test_serve_refuses_admin_options_with_tenants_before_vllm_starts(tmp_path, monkeypatch, variable):
    """`vllm-steer serve` (the real command, no engine): a tenants file plus an option that opens admin
    powers to clients is refused at once, naming it; the override starts it (here: a dry run)."""
    (tmp_path / "tenants.yaml").write_text("format_version: 1\n")
    env = {**os.environ, variable: "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [sys.executable, "-m", "vllm_steer.cli", "serve", "--steer-tenants", str(tmp_path / "tenants.yaml")]
    refused = subprocess.run([*cmd, "--model", "m"], env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and variable in refused.stdout and "--steer-allow-admin-options" in refused.stdout
    allowed = subprocess.run(
        [*cmd, "--steer-allow-admin-options", "--dry-run", "--model", "m"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
