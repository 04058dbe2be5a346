"""Isolation under pressure: a row's output never depends on what else is in the batch.

Randomized mixed batches (several seeds) of unsteered rows and rows of every method, with
distinct profiles, categories, layer subsets, angles and scales — more distinct settings than
the engine has steering slots — on a KV cache so small that the scheduler must preempt, with
chunked prefill and prefix caching on (prompts share prefixes, and the same prompt comes back
with other steering). Every row must equal the same request run alone in the same engine.
"""

from __future__ import annotations

import json
import random

import pytest

from support.mixed_batch import LONG, SETTINGS
from vllm_steer.testing.engines import run_engine

pytestmark = [pytest.mark.engine, pytest.mark.hardening]

SEEDS = range(4)
ROWS_PER_BATCH = 24
MAX_SLOTS = 3
EXTRA_SETTINGS = [
    {"steer_profile": "tiny-selective", "steer_angle": 120.0, "steer_layers": [2]},
    {"steer_profile": "tiny-addition", "steer_scale": 5.0, "steer_layers": [1]},
    {"steer_profile": "tiny-category", "steer_categories": ["cat_a"], "steer_scale": -3.0},
    {"steer_profile": "tiny-angular-standard", "steer_angle": 300.0},
]


def _prompts(prompt_ids) -> list[list[int]]:
    """The test prompts plus prefix-sharing variants of the long one (several 32-token KV blocks)."""
    long = prompt_ids[LONG]
    return [*prompt_ids, long[:40], long[:70], long + prompt_ids[2], prompt_ids[0] + long[:50]]


def _batches(prompt_ids) -> list[list[dict]]:
    prompts, settings = _prompts(prompt_ids), SETTINGS + EXTRA_SETTINGS
    batches = []
    for seed in SEEDS:
        rng = random.Random(seed)
        batches.append(
            [
                {
                    "prompt_token_ids": rng.choice(prompts),
                    "extra_args": rng.choice(settings),
                    "max_tokens": rng.randint(4, 16),
                }
                for _ in range(ROWS_PER_BATCH)
            ]
        )
    return batches


@pytest.fixture(scope="module")
def isolation_run(tiny_root, prompt_ids, tmp_path_factory):
    batches = _batches(prompt_ids)
    phases = []
    for batch in batches:
        phases.append(batch)
        phases += [[row] for row in batch]  # then each row alone
    spec = {
        "model": str(tiny_root / "model"),
        "profiles": str(tiny_root / "profiles"),
        "eager": True,
        "max_num_batched_tokens": 48,
        "max_num_seqs": 16,
        "block_size": 32,
        "enable_prefix_caching": True,
        "num_gpu_blocks": 20,  # 640 tokens of KV for 16 running rows of up to ~170 tokens: preemption
        "max_slots": MAX_SLOTS,
        "log_stats": True,
        "phases": phases,
    }
    return batches, run_engine(spec, tmp_path_factory.mktemp("isolation"), plugin=True, key="isolation")


def test_every_row_of_a_random_mixed_batch_equals_the_request_alone(isolation_run):
    batches, result = isolation_run
    phases = iter(result["phases"])
    compared = 0
    for seed, batch in zip(SEEDS, batches, strict=True):
        together = next(phases)
        for index, row in enumerate(batch):
            (alone,) = next(phases)
            where = (seed, index, json.dumps(row["extra_args"]), len(row["prompt_token_ids"]))
            assert together[index]["tokens"] == alone["tokens"], where
            assert (
                max(abs(a - b) for a, b in zip(together[index]["logprobs"], alone["logprobs"], strict=True)) < 1e-3
            ), where
            compared += 1
    assert compared == len(SEEDS) * ROWS_PER_BATCH


def test_the_pressure_was_real(isolation_run):
    """The batches held more distinct settings than slots, and the scheduler preempted."""
    batches, result = isolation_run
    distinct = [len({json.dumps(r["extra_args"]) for r in b if r["extra_args"]}) for b in batches]
    assert min(distinct) > MAX_SLOTS, distinct
    assert result["counters"].get("vllm:num_preemptions", 0) > 0, result["counters"]
    assert result["status_after"][0]["max_slots"] == MAX_SLOTS
    assert result["status_after"][0]["slots_in_use"] == 0, "every finished request gave its slot back"
