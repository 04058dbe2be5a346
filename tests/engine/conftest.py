"""Engine-area fixtures: the mixed batch without the plugin and under torch.compile, and the HF reference.

(``eager_on``, which the server tests compare against too, is in tests/conftest.py.)"""

from __future__ import annotations

import pytest
import torch

from support.mixed_batch import MAX_TOKENS, run_mixed_batch
from vllm_steer.core.profile import load_profile_dir
from vllm_steer.core.request import parse_steering, resolve_steering
from vllm_steer.testing.hf_reference import steered


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
def hf_reference(tiny_root, prompt_ids):
    """Greedy tokens and per-token logprobs of the plain HF model with hooks, one request at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_root / "model", dtype=torch.float32).eval()
    profiles = load_profile_dir(tiny_root / "profiles")
    cache = {}

    def reference(ids: list[int], setting: dict | None):
        key = (tuple(ids), repr(setting))
        if key not in cache:
            request = parse_steering(setting)
            resolved = resolve_steering(request, profiles) if request else None
            profile = profiles[resolved.profile_id] if resolved else None
            with torch.no_grad(), steered(model, profile, resolved):
                out = model.generate(
                    torch.tensor([ids]),
                    max_new_tokens=MAX_TOKENS,
                    min_new_tokens=MAX_TOKENS,
                    do_sample=False,
                    output_logits=True,
                    return_dict_in_generate=True,
                    pad_token_id=0,
                )
            tokens = out.sequences[0, len(ids) :].tolist()
            logprobs = [
                torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens, strict=True)
            ]
            cache[key] = {"tokens": tokens, "logprobs": logprobs}
        return cache[key]

    return reference
