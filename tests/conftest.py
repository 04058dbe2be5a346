"""Fixtures shared across test areas: the tiny model, its tokenizer and prompts, the plugin's eager engine run.

vLLM engines take 30-100 s to start here, so each engine *configuration* runs once per session, in its
own process (``vllm_steer.testing.engine_driver``): that keeps "plugin not loaded" runs truly clean of
the plugin, and a crashed engine from failing one test. Area-only fixtures live in the areas'
conftest.py files (tests/engine, tests/server); plain helpers and constants in tests/support.

Every engine or server start is counted by configuration (``vllm_steer.testing.engines.ENGINE_STARTS``):
the session ends with a summary line of the counts, and fails if a configuration started twice.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from support.mixed_batch import LONG, PROMPTS, hf_reference_for, run_mixed_batch
from vllm_steer.testing.engines import ENGINE_STARTS
from vllm_steer.testing.tiny import build_tiny, build_tiny_gated

GATED_EXTRA_PROMPTS = ["Tell me a story about a dragon", "How do I bake bread?", "Write a poem", "What is 2+2?"]


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """A random 4-layer Llama in ``model/`` and one profile per method in ``profiles/`` (vllm_steer.testing.tiny)."""
    return build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tokenizer(tiny_root):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_root / "model")


@pytest.fixture(scope="session")
def prompt_ids(tokenizer):
    ids = [tokenizer(p).input_ids for p in PROMPTS]
    assert len(ids[LONG]) > 2 * 32, "the long prompt must span several KV blocks and prefill chunks"
    return ids


@pytest.fixture(scope="session")
def eager_on(tiny_root, prompt_ids, tmp_path_factory):
    """The mixed batch in an eager engine with the plugin: the rows the server tests must reproduce."""
    return run_mixed_batch(tiny_root, prompt_ids, tmp_path_factory, plugin=True, eager=True)


# ----------------------------------------------------------------- engine starts, once per configuration


@pytest.fixture(scope="session")
def gated(prompt_ids, tokenizer, tmp_path_factory):
    """The tiny Llama with gated profiles (``build_tiny_gated``), the prompts their thresholds were set from —
    the mixed batch's, four more, and a *pair* — and the HF reference: ``(root, batch prompts, pair, reference)``.

    The pair: two prompts of the same length sharing the long prompt's KV blocks and ending in different tokens
    (the same length gives them the same cache salt, so the second can hit the first's blocks), which the first
    gate of ``tiny-gated-addition`` tells apart (tests/engine/test_gates.py, tests/server/test_gates_served.py)."""
    extra = [tokenizer(p).input_ids for p in GATED_EXTRA_PROMPTS]
    long = prompt_ids[LONG]
    candidates = [tokenizer(w, add_special_tokens=False).input_ids for w in (" sea", " storm", " harbour", " ship")]
    ends = [c[0] for c in candidates if len(c) == 1]
    batch_prompts = [*prompt_ids, *extra]
    for a, b in ((x, y) for i, x in enumerate(ends) for y in ends[i + 1 :]):
        pair = [[*long, a], [*long, b]]
        split = (len(batch_prompts), len(batch_prompts) + 1)
        try:
            root = build_tiny_gated(tmp_path_factory.mktemp("gated"), [*batch_prompts, *pair], split=split)
        except ValueError:  # the pair scores too close on the first gate: try other endings
            continue
        return root, batch_prompts, pair, hf_reference_for(root)
    raise AssertionError("no pair of endings that the first gate tells apart")


@pytest.fixture(scope="session")
def family_eager(prompt_ids, tmp_path_factory):
    """``family -> (root, plugin-on run, plain run, HF reference)``: a family's tiny model and its eager mixed
    batch with and without the plugin, built and run once per session (tests/engine/test_families.py, the
    single-rank baseline of tests/engine/test_parallel.py, the rows tests/server/test_families_served.py serves)."""
    cache: dict = {}

    def get(family: str):
        if family not in cache:
            root = build_tiny(tmp_path_factory.mktemp(f"tiny-{family}"), family)
            run = {"plugin": True, "eager": True, "variant": f"-{family}"}
            on = run_mixed_batch(root, prompt_ids, tmp_path_factory, **run)
            off = run_mixed_batch(root, prompt_ids, tmp_path_factory, **{**run, "plugin": False})
            cache[family] = root, on, off, hf_reference_for(root, eager_attention=family.startswith("gemma"))
        return cache[family]

    return get


def _repeated() -> dict[str, int]:
    return {key: n for key, n in ENGINE_STARTS.items() if n > 1}


def pytest_sessionfinish(session, exitstatus):
    if _repeated() and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not ENGINE_STARTS:
        return
    counts = ", ".join(f"{key} {n}" for key, n in sorted(ENGINE_STARTS.items()))
    terminalreporter.write_sep("-", "engine starts")
    terminalreporter.write_line(f"engine starts: {counts}")
    repeated = _repeated()
    if repeated:
        terminalreporter.write_line(
            f"ERROR: engine configurations started more than once: {repeated} (each must start once per "
            "session; is a session fixture defined in, or imported into, more than one module?)",
            red=True,
            bold=True,
        )
