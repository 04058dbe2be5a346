"""Engine-area fixtures: the mixed batch without the plugin and under torch.compile, and the HF reference.

(``eager_on``, which the server tests compare against too, is in tests/conftest.py.)"""

from __future__ import annotations

import pytest

from support.mixed_batch import hf_reference_for, run_mixed_batch


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
    """One compile cache shared by the compiled runs: the plugin-off graph is compiled first."""
    return tmp_path_factory.mktemp("vllm_cache")


@pytest.fixture(scope="session")
def eager_off(tiny_root, prompt_ids, tmp_path_factory):
    return run_mixed_batch(tiny_root, prompt_ids, tmp_path_factory, plugin=False, eager=True)


@pytest.fixture(scope="session")
def compiled_off(tiny_root, prompt_ids, tmp_path_factory, compile_cache):
    return run_mixed_batch(tiny_root, prompt_ids, tmp_path_factory, plugin=False, eager=False, cache_root=compile_cache)


@pytest.fixture(scope="session")
def compiled_on(tiny_root, prompt_ids, tmp_path_factory, compile_cache, compiled_off):
    # Depends on compiled_off: the plugin-off graph is already in the shared cache.
    return run_mixed_batch(tiny_root, prompt_ids, tmp_path_factory, plugin=True, eager=False, cache_root=compile_cache)


@pytest.fixture(scope="session")
def compiled_on_fused(tiny_root, prompt_ids, tmp_path_factory, compile_cache, compiled_on):
    # A fused op inside the opaque custom op, itself inside vLLM's compiled graph, as on CUDA. Triton has
    # no CPU backend, so the torch.compile'd variant stands in; the graph is the plugin's, already cached.
    return run_mixed_batch(
        tiny_root,
        prompt_ids,
        tmp_path_factory,
        plugin=True,
        eager=False,
        cache_root=compile_cache,
        env={"VLLM_STEER_FUSED_OP": "compiled"},
        variant="-fused",
    )


@pytest.fixture(scope="session")
def hf_reference(tiny_root):
    """Greedy tokens and per-token logprobs of the plain HF model with hooks, one request at a time."""
    return hf_reference_for(tiny_root)
