"""Every family of the layout table, proven by the mixed batch (issue 18): one tiny random model per family.

For each family (vllm_steer.testing.tiny.TINY_FAMILIES, a member of each entry of vllm_steer.core.layout),
the mixed batch of tests/engine/test_engine.py — unsteered rows and rows of every method in one
``generate`` call, chunked prefill forced, prefix caching on — runs twice in vLLM (eager): with the plugin,
and without it. Unsteered rows must be bit-equal to the plugin-off run; steered rows must equal a plain
Hugging Face run of the same model with hooks at the sites the table names for its HF tree. The engine
and the reference find their sites independently (vLLM's tree and HF's), so a wrong entry on either side
shows up as a mismatch (the tiny models' norm weights are random, so a site on the wrong side of a norm
does not act like the right one). The Llama family's full proof (compiled too) is tests/engine/test_engine.py.
"""

from __future__ import annotations

import pytest

from support.mixed_batch import (
    LONG,
    NEW_STEERING,
    PROMPTS,
    SETTINGS,
    hf_reference_for,
    mixed_rows,
    run_mixed_batch,
)
from vllm_steer.core.layout import ARCHITECTURES, FAMILIES, family_of
from vllm_steer.testing.engines import run_engine
from vllm_steer.testing.tiny import TINY_FAMILIES, build_tiny

pytestmark = pytest.mark.engine

FAMILY_MODELS = [name for name in TINY_FAMILIES if name != "llama"]


def _architecture(model_type: str) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]


def test_every_family_and_architecture_of_the_table_has_a_tiny_model():
    built = {_architecture(settings["model_type"]) for settings in TINY_FAMILIES.values()}
    assert built == set(ARCHITECTURES), "an architecture of the layout table without a tiny model (or one too many)"
    assert {family_of(arch) for arch in built} == set(FAMILIES)


def _check_rows(family: str, on: dict, off: dict, reference, prompt_ids) -> None:
    """Unsteered rows bit-equal to the plugin-off run; steered rows equal to the HF reference; every setting acts."""
    (status,) = on["status"]
    assert status["hooked"] is True and len(status["profiles"]) == 8
    unsteered = 0
    mismatches = []
    for row, base, (ids, setting) in zip(on["phases"][0], off["phases"][0], mixed_rows(prompt_ids), strict=True):
        if setting is None:
            assert (row["tokens"], row["logprobs"]) == (base["tokens"], base["logprobs"]), "unsteered must be bit-equal"
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
    assert on["phases"][2] == off["phases"][2]
    # not a vacuous proof: every setting moves some row (its logprobs; a weak one need not flip a token)
    rows = on["phases"][0]
    n = len(SETTINGS)
    for j, setting in enumerate(SETTINGS[1:], start=1):
        moved = max(
            abs(a - b)
            for i in range(len(PROMPTS))
            for a, b in zip(rows[i * n + j]["logprobs"], rows[i * n]["logprobs"], strict=True)
        )
        assert moved > 1e-3, (family, setting, moved)


@pytest.mark.parametrize("family", FAMILY_MODELS)
def test_family_mixed_batch(family, prompt_ids, tmp_path_factory):
    root = build_tiny(tmp_path_factory.mktemp(f"tiny-{family}"), family)
    on = run_mixed_batch(root, prompt_ids, tmp_path_factory, plugin=True, eager=True, variant=f"-{family}")
    off = run_mixed_batch(root, prompt_ids, tmp_path_factory, plugin=False, eager=True, variant=f"-{family}")
    _check_rows(family, on, off, hf_reference_for(root, eager_attention=family.startswith("gemma")), prompt_ids)


COMPILED_FAMILIES = ["gemma2"]
"""Families also proven under torch.compile (besides Llama, tests/engine/test_engine.py): the tree least like
Llama's. Each costs two compiled engine starts (~2 min each on two cores)."""


@pytest.mark.parametrize("family", COMPILED_FAMILIES)
def test_family_mixed_batch_compiled(family, prompt_ids, tmp_path_factory):
    root = build_tiny(tmp_path_factory.mktemp(f"tiny-{family}-compiled"), family)
    cache = tmp_path_factory.mktemp(f"vllm_cache-{family}")
    run = {"cache_root": cache, "eager": False, "variant": f"-{family}"}
    off = run_mixed_batch(root, prompt_ids, tmp_path_factory, plugin=False, **run)  # the plain graph first
    on = run_mixed_batch(root, prompt_ids, tmp_path_factory, plugin=True, **run)
    _check_rows(family, on, off, hf_reference_for(root, eager_attention=family.startswith("gemma")), prompt_ids)


def test_an_architecture_outside_the_table_stops_the_engine_naming_it(prompt_ids, tmp_path_factory):
    """OLMo 2 runs on vLLM's generic Transformers backend: refused at start, never hooked on look-alike names."""
    root = build_tiny(tmp_path_factory.mktemp("tiny-olmo2"), "olmo2")
    spec = {
        "model": str(root / "model"),
        "profiles": str(root / "profiles"),
        "eager": True,
        "phases": [[{"prompt_token_ids": prompt_ids[0], "extra_args": {"steer_profile": "tiny-selective"}}]],
    }
    workdir = tmp_path_factory.mktemp("olmo2_run")
    with pytest.raises(AssertionError, match="engine run failed"):
        run_engine(spec, workdir, plugin=True, key="refused-architecture:olmo2", timeout=300)
    log = (workdir / "engine.log").read_text()
    assert "UnsupportedArchitecture" in log and "cannot steer Olmo2ForCausalLM" in log
    assert "Supported architectures (served natively): Gemma2ForCausalLM" in log
    assert not (workdir / "result.json").exists(), "no request may have been served"
