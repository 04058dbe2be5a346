"""Every family of the layout table, proven by the mixed batch (issue 18): one tiny random model per family.

For each family (vllm_steer.testing.tiny.TINY_FAMILIES, a member of each entry of vllm_steer.core.layout),
the mixed batch of tests/engine/test_engine.py — unsteered rows and rows of every method in one
``generate`` call, chunked prefill forced, prefix caching on — runs twice in vLLM (eager): with the plugin,
and without it. Unsteered rows must be bit-equal to the plugin-off run; steered rows must equal a plain
Hugging Face run of the same model with hooks at the sites the table names for its HF tree. The engine
and the reference find their sites independently (vLLM's tree and HF's), so a wrong entry on either side
shows up as a mismatch (the tiny models' norm weights are random, so a site on the wrong side of a norm
does not act like the right one). Then again under vLLM's compilation: traced by Dynamo for every family,
and compiled by Inductor for Gemma 2. The default suite runs four families eager and two traced
(:data:`EVERY_COMMIT`); ``make test-exhaustive`` runs them all. The Llama family's full proof (compiled too) is
tests/engine/test_engine.py; tensor parallelism is tests/engine/test_parallel.py, quantized weights
tests/engine/test_quantized.py.
"""

from __future__ import annotations

import pytest

from support.mixed_batch import (
    LONG,
    NEW_STEERING,
    PROMPTS,
    assert_every_setting_moves,
    mixed_rows,
    run_mixed_batch,
)
from vllm_steer.core.layout import ARCHITECTURES, FAMILIES, family_of
from vllm_steer.testing.engines import run_refused_engine
from vllm_steer.testing.tiny import TINY_FAMILIES, build_tiny

pytestmark = pytest.mark.engine

FAMILY_MODELS = [name for name in TINY_FAMILIES if name != "llama"]
EVERY_COMMIT = ("qwen3_moe", "olmo2", "gemma3", "phi3")
"""The families of the default suite (``make test``): a mixture of experts (also the tensor-parallel family of
tests/engine/test_parallel.py), vLLM's Transformers backend (also served, tests/server/test_families_served.py),
the sandwich norms and query/key norms of Gemma 3, fused QKV and gate/up projections. The other families, the
traced runs beyond :data:`TRACED_EVERY_COMMIT` and Gemma 2 under Inductor run in the exhaustive suite
(``make test-exhaustive``, marker ``exhaustive``): each run is an engine start of one to two minutes on a CPU,
two or three per family, more than the CI budget holds for all of them."""
TRACED_EVERY_COMMIT = ("qwen3_moe", "olmo2")


def _tiered(families: list[str], every_commit: tuple[str, ...]) -> list:
    return [f if f in every_commit else pytest.param(f, marks=pytest.mark.exhaustive) for f in families]


def _architecture(model_type: str) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]


def test_every_family_and_architecture_of_the_table_has_a_tiny_model():
    built = {_architecture(settings["model_type"]) for settings in TINY_FAMILIES.values()}
    assert built == set(ARCHITECTURES), "an architecture of the layout table without a tiny model (or one too many)"
    assert {family_of(arch) for arch in built} == set(FAMILIES)


def _same(row: dict, base: dict, tolerance: float | None) -> bool:
    """Bit-equal (``tolerance`` None), or the same tokens and logprobs within ``tolerance``."""
    if tolerance is None:
        return (row["tokens"], row["logprobs"]) == (base["tokens"], base["logprobs"])
    close = all(abs(a - b) < tolerance for a, b in zip(row["logprobs"], base["logprobs"], strict=True))
    return row["tokens"] == base["tokens"] and close


def _check_rows(family: str, on: dict, off: dict, reference, prompt_ids, unsteered_tol: float | None = None) -> None:
    """Unsteered rows bit-equal to the plugin-off run (or within ``unsteered_tol``); steered rows equal to the HF
    reference; every setting acts."""
    (status,) = on["status"]
    assert status["hooked"] is True and len(status["profiles"]) == 8
    unsteered = 0
    mismatches = []
    for row, base, (ids, setting) in zip(on["phases"][0], off["phases"][0], mixed_rows(prompt_ids), strict=True):
        if setting is None:
            assert _same(row, base, unsteered_tol), ("unsteered rows must equal the plugin-off run", row, base)
            assert row["tokens"] == reference(ids, None)["tokens"], "vLLM and HF disagree on the plain model"
            unsteered += 1
            continue
        ref = reference(ids, setting)
        if row["tokens"] != ref["tokens"]:
            mismatches.append((setting, row["tokens"], ref["tokens"]))
            continue
        assert max(abs(a - b) for a, b in zip(row["logprobs"], ref["logprobs"], strict=True)) < 2e-3, setting
    assert unsteered == len(PROMPTS)
    assert not mismatches, f"{family}: {len(mismatches)} steered rows differ from the HF reference: {mismatches[:2]}"
    # the prefix cache: new steering on the cached long prompt recomputes; unsteered still matches
    assert on["phases"][1][0]["tokens"] == reference(prompt_ids[LONG], NEW_STEERING)["tokens"]
    assert _same(on["phases"][2][0], off["phases"][2][0], unsteered_tol)
    assert_every_setting_moves(on["phases"][0], family)


COMPILED_FAMILIES = ["gemma2"]
"""Families also proven under torch.compile with Inductor (besides Llama, tests/engine/test_engine.py): the
tree least like Llama's. Each costs two compiled engine starts (~2 min each on two cores)."""
TRACED_FAMILIES = [name for name in FAMILY_MODELS if name not in COMPILED_FAMILIES]
TRACED_TOL = 1e-4
"""A traced run's unsteered rows against the eager plugin-off run (measured ≤ 2e-6)."""


@pytest.mark.parametrize("family", _tiered(FAMILY_MODELS, EVERY_COMMIT))
def test_family_mixed_batch(family, family_eager, prompt_ids):
    _, on, off, reference = family_eager(family)
    _check_rows(family, on, off, reference, prompt_ids)


@pytest.mark.parametrize("family", _tiered(TRACED_FAMILIES, TRACED_EVERY_COMMIT))
def test_family_mixed_batch_traced(family, family_eager, prompt_ids, tmp_path_factory):
    """The family under vLLM's compilation (Dynamo traces the hooked model, vLLM splits it into pieces around
    attention) with the ``eager`` backend (no Inductor code generation). What tracing can break (the hooks
    traced into the graph, per-step state not baked in as constants, the op inside the split) is
    family-specific and tested here for every family; what Inductor adds (its lowering of the op) is not, and
    is tested with Inductor on Llama (tests/engine/test_engine.py) and Gemma 2 (below), each against its own
    compiled plugin-off run, bit for bit.

    Here one engine start per family (a compiled start is ~65 s on two cores): the baseline is the eager
    plugin-off run, within :data:`TRACED_TOL` — a traced graph runs vLLM's torch-native layers where eager
    mode calls its CPU kernels (measured: ≤ 2e-6 apart, with or without the plugin)."""
    root, _, off, reference = family_eager(family)
    cache = tmp_path_factory.mktemp(f"vllm_cache-traced-{family}")
    run = {"cache_root": cache, "eager": False, "variant": f"-traced-{family}", "compile_backend": "eager"}
    traced = run_mixed_batch(root, prompt_ids, tmp_path_factory, plugin=True, **run)
    _check_rows(family, traced, off, reference, prompt_ids, unsteered_tol=TRACED_TOL)


@pytest.mark.exhaustive
@pytest.mark.parametrize("family", COMPILED_FAMILIES)
def test_family_mixed_batch_compiled(family, family_eager, prompt_ids, tmp_path_factory):
    root, _, _, reference = family_eager(family)
    cache = tmp_path_factory.mktemp(f"vllm_cache-{family}")
    run = {"cache_root": cache, "eager": False, "variant": f"-{family}"}
    off = run_mixed_batch(root, prompt_ids, tmp_path_factory, plugin=False, **run)  # the plain graph first
    on = run_mixed_batch(root, prompt_ids, tmp_path_factory, plugin=True, **run)
    _check_rows(family, on, off, reference, prompt_ids)


def test_an_architecture_outside_the_table_stops_the_engine_naming_it(prompt_ids, tmp_path_factory):
    """Granite shares Llama's module names (and adds multipliers the hooks would not know): refused at start,
    never hooked on look-alike names."""
    root = build_tiny(tmp_path_factory.mktemp("tiny-granite"), "granite")
    spec = {
        "model": str(root / "model"),
        "profiles": str(root / "profiles"),
        "eager": True,
        "phases": [[{"prompt_token_ids": prompt_ids[0], "extra_args": {"steer_profile": "tiny-selective"}}]],
    }
    log = run_refused_engine(spec, tmp_path_factory.mktemp("granite_run"), key="refused-architecture:granite")
    assert "UnsupportedArchitecture" in log and "cannot steer GraniteForCausalLM" in log
    assert "Supported architectures: Gemma2ForCausalLM" in log
