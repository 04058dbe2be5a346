"""Per-row gates inside the batched engine (docs/methods.md §3.11): a mixed batch where some rows' gates fire and
some do not, with chunked prefill, prefix caching and preemption on.

* a row whose gate did not fire (per the HF reference, which decides with the same gate) is bit-equal to the
  same row in the plugin-off run of the same batch — as are the unsteered and the flag-only rows;
* a row whose gate fired equals the HF reference steering under the same gate rule, or, for a refusing
  profile, is the refusal's tokens and then the end-of-sequence token;
* a row whose prompt shares cached KV blocks with a gated row decides on its own last prompt token;
* the profiles' thresholds are set from these prompts (``build_tiny_gated``), at least 1e-3 from every score,
  so the engine's and the reference's float rounding cannot flip a decision.
"""

from __future__ import annotations

import pytest

from support.mixed_batch import MAX_TOKENS
from vllm_steer.testing.engines import run_engine
from vllm_steer.testing.tiny import TINY_GATED

pytestmark = pytest.mark.engine

SETTINGS = [
    None,
    {"steer_profile": "tiny-gated-addition", "steer_scale": 3.0},
    {"steer_profile": "tiny-gated-addition", "steer_scale": -2.0},
    {"steer_profile": "tiny-gated-selective", "steer_angle": 120.0},
    {"steer_profile": "tiny-gated-ablation"},
    {"steer_profile": "tiny-flag", "steer_scale": 3.0},
    {"steer_profile": "tiny-refuse"},
    # the request's own gate action and refusal text (a tier's override travels the same way)
    {"steer_profile": "tiny-refuse", "steer_gate_action": "flag"},
    {"steer_profile": "tiny-flag", "steer_gate_action": "refuse", "steer_refusal": "No."},
    # a gate-only profile (method null): refuses where either gate fires, or only flags (the request's action)
    {"steer_profile": "tiny-gate-only"},
    {"steer_profile": "tiny-gate-only", "steer_gate_action": "flag"},
    # category routing: each row steered with the vector of the category whose gate fired; an explicit category
    # request of the same profile shares that category's slot
    {"steer_profile": "tiny-routed", "steer_categories": "auto", "steer_scale": 3.0},
    {"steer_profile": "tiny-routed", "steer_categories": ["cat_b"], "steer_scale": -2.0},
]
PAIR_SETTING = SETTINGS[1]
"""The setting of the prefix-sharing pair, whose first gate tells the pair apart (the ``gated`` fixture)."""


def _spec(root, batch_prompts, pair, *, plugin: bool) -> dict:
    mixed = [
        {"prompt_token_ids": ids, "extra_args": s, "max_tokens": MAX_TOKENS} for ids in batch_prompts for s in SETTINGS
    ]
    return {
        "model": str(root / "model"),
        "profiles": str(root / "profiles") if plugin else None,
        "eager": True,
        "max_num_batched_tokens": 32,  # chunked prefill of the long prompts
        "max_num_seqs": 16,
        "block_size": 32,
        "enable_prefix_caching": True,
        "max_model_len": 128,
        "num_gpu_blocks": 8,  # 256 tokens of KV for 16 rows of up to ~110 tokens: the scheduler preempts
        "log_stats": True,
        "phases": [
            mixed,
            [{"prompt_token_ids": pair[0], "extra_args": PAIR_SETTING, "max_tokens": MAX_TOKENS}],
            # the second of the pair hits the first's cached blocks, and decides on its own last token
            [
                {"prompt_token_ids": pair[1], "extra_args": PAIR_SETTING, "max_tokens": MAX_TOKENS},
                {"prompt_token_ids": pair[1], "extra_args": None, "max_tokens": MAX_TOKENS},
            ],
        ],
    }


@pytest.fixture(scope="module")
def gated_runs(gated, tmp_path_factory):
    root, batch_prompts, pair, _ = gated
    on = run_engine(
        _spec(root, batch_prompts, pair, plugin=True), tmp_path_factory.mktemp("gated-on"), plugin=True, key="gates:on"
    )
    off = run_engine(
        _spec(root, batch_prompts, pair, plugin=False),
        tmp_path_factory.mktemp("gated-off"),
        plugin=False,
        key="gates:off",
    )
    return on, off


TRACED_TOL = 1e-4
"""A traced run's rows against the eager run's (tests/engine/test_families.py: vLLM's torch-native layers in the
graph, its CPU kernels in eager mode; measured ≤ 2e-6)."""


@pytest.fixture(scope="module")
def gated_traced(gated, tmp_path_factory):
    """The same batch under vLLM's compilation (Dynamo and the piecewise split, ``eager`` backend): the gates run
    inside the opaque op, between the graph's pieces."""
    root, batch_prompts, pair, _ = gated
    spec = {**_spec(root, batch_prompts, pair, plugin=True), "eager": False, "compile_backend": "eager"}
    env = {"VLLM_CACHE_ROOT": str(tmp_path_factory.mktemp("vllm_cache-gates"))}
    return run_engine(spec, tmp_path_factory.mktemp("gated-traced"), plugin=True, key="gates:traced", env=env)


def _close(row: dict, ref: dict) -> bool:
    return row["tokens"] == ref["tokens"] and all(
        abs(a - b) < 2e-3 for a, b in zip(row["logprobs"], ref["logprobs"], strict=True)
    )


def _action(setting: dict) -> str:
    return setting.get("steer_gate_action") or TINY_GATED[setting["steer_profile"]]["action"]


def _forced(tokenizer, setting: dict) -> list[int]:
    """A refused row's tokens: the refusal, its EOS, then EOS again (the driver ignores EOS) up to MAX_TOKENS."""
    text = setting.get("steer_refusal") or TINY_GATED[setting["steer_profile"]]["refusal"]
    refusal = [*tokenizer(text, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
    return refusal + [tokenizer.eos_token_id] * (MAX_TOKENS - len(refusal))


def test_gated_rows_match_the_reference_and_ungated_rows_are_untouched(gated, gated_runs, tokenizer):
    _, batch_prompts, _, reference = gated
    on, off = gated_runs
    rows = [(ids, s) for ids in batch_prompts for s in SETTINGS]
    outcomes: dict[str, set[bool]] = {}
    routed: set[str | None] = set()
    for row, base, (ids, setting) in zip(on["phases"][0], off["phases"][0], rows, strict=True):
        ref = reference(ids, setting)
        where = (setting, len(ids))
        if setting is None or _action(setting) == "flag" or not ref["fired"]:
            assert (row["tokens"], row["logprobs"]) == (base["tokens"], base["logprobs"]), ("bit-equal", where, ref)
        elif _action(setting) == "refuse":
            assert row["tokens"] == _forced(tokenizer, setting), ("the refusal, token by token", where, row["tokens"])
        else:
            assert _close(row, ref), ("steered like the reference", where, row, ref)
            assert row["logprobs"] != base["logprobs"], ("a fired gate steers", where)
        if setting is not None and setting.get("steer_categories") == "auto":
            routed.add(ref["category"])
            assert (ref["category"] is None) == (not ref["fired"]), where
        if setting is not None:
            outcomes.setdefault(setting["steer_profile"], set()).add(bool(ref["fired"]))
            # the thresholds sit in gaps of these prompts' scores: no decision is a matter of rounding
            assert ref["scores"], where
    assert all(seen == {True, False} for seen in outcomes.values()), ("every gate fires on some rows only", outcomes)
    assert len(routed - {None}) >= 2, ("routed rows steer with different categories", routed)


def test_a_row_sharing_a_gated_rows_cached_prefix_decides_on_its_own_last_token(gated, gated_runs):
    _, _, pair, reference = gated
    on, off = gated_runs
    first, second = reference(pair[0], PAIR_SETTING), reference(pair[1], PAIR_SETTING)
    assert first["fired"] != second["fired"], "the pair is told apart by the gate"
    assert _close(on["phases"][1][0], first)
    (row, unsteered), (_, base) = on["phases"][2], off["phases"][2]
    assert (unsteered["tokens"], unsteered["logprobs"]) == (base["tokens"], base["logprobs"])
    if second["fired"]:
        assert _close(row, second)
    else:
        assert (row["tokens"], row["logprobs"]) == (unsteered["tokens"], unsteered["logprobs"])


def test_gates_under_vllms_compilation_decide_and_steer_as_in_eager_mode(gated_runs, gated_traced):
    on, _ = gated_runs
    for phase_traced, phase_eager in zip(gated_traced["phases"], on["phases"], strict=True):
        for traced, eager in zip(phase_traced, phase_eager, strict=True):
            assert traced["tokens"] == eager["tokens"]
            assert max(abs(a - b) for a, b in zip(traced["logprobs"], eager["logprobs"], strict=True)) < TRACED_TOL


def test_the_gated_batch_ran_under_pressure(gated_runs):
    on, _ = gated_runs
    assert on["counters"].get("vllm:num_preemptions", 0) > 0, on["counters"]
    (status,) = on["status_after"]
    assert status["slots_in_use"] == 0 and status["steps_steered"] > 0
    assert status["gate_rows_in_use"] == 0, "finished requests give their decision rows back"
