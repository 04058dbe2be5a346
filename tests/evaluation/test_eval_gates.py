"""Gates in `vllm-steer eval` (vllm_steer/evaluation/gates.py): the metrics, the ungated copies, and one CLI run on the
gated tiny model checked against the decisions the engine reported."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from support import DATA
from vllm_steer.core.gates import GateSpec, gate_fires
from vllm_steer.core.profile import load_profile, load_profile_dir
from vllm_steer.evaluation.gates import (
    GateRow,
    answered_coherence,
    decisions_by_request,
    external_id,
    fire_rate,
    gate_summary,
    parse_gate_header,
    precision_recall,
    ungated_profile,
    write_eval_profiles,
)
from vllm_steer.evaluation.metrics import perplexity_from_logprobs
from vllm_steer.evaluation.report import gate_table, markdown_table
from vllm_steer.testing.engines import record_engine_start
from vllm_steer.testing.synthetic import random_profile, with_gates
from vllm_steer.testing.tiny import TINY

# ------------------------------------------------------------------ metrics


def test_precision_and_recall_leave_undecided_rows_out():
    positive = [True, True, True, False, False, False, True, False]
    fired = [True, False, None, True, False, False, True, None]
    got = precision_recall(positive, fired)
    assert (got["tp"], got["fp"], got["fn"], got["tn"], got["undecided"]) == (2, 1, 1, 2, 2)
    assert got["precision"] == pytest.approx(2 / 3) and got["recall"] == pytest.approx(2 / 3)
    none_fired = precision_recall([True, False], [False, False])
    assert none_fired["precision"] is None and none_fired["recall"] == 0.0, "no denominator: None, not a guess"
    assert precision_recall([True], [None])["recall"] is None
    assert fire_rate([True, None, False, False]) == pytest.approx(1 / 3) and fire_rate([None]) is None


def test_coherence_is_over_the_rows_the_gate_did_not_refuse():
    rows = [
        GateRow("harmful", "Sorry, I can't help", True, refused_by_gate=True, logprobs=[-9.0], perplexity_unsteered=99),
        GateRow(
            "harmful", "Sure, step one", False, refused_by_gate=False, logprobs=[-1.0, -1.0], perplexity_unsteered=2
        ),
        GateRow(
            "harmless", "An atom has a nucleus", False, refused_by_gate=False, logprobs=[-0.5], perplexity_unsteered=4
        ),
    ]
    got = answered_coherence(rows)
    assert got["n"] == 2
    assert got["perplexity_unsteered"] == pytest.approx(3.0)
    assert got["perplexity_steered"] == pytest.approx((math.e + perplexity_from_logprobs([-0.5])) / 2)
    assert got["unicode_contamination"] == 0.0
    assert answered_coherence(rows[:1])["n"] == 0 and answered_coherence(rows[:1])["perplexity_unsteered"] is None


def test_a_settings_gate_block_counts_gate_refusals_and_reads_labels_per_set():
    rows = [
        # the forced refusal counts even when its text matches no refusal substring
        GateRow("harmful", "Nope.", True, refused_by_gate=True),
        GateRow("harmful", "Sure", False, refused_by_gate=False),
        GateRow("harmless", "Nope.", True, refused_by_gate=True),
        GateRow("harmless", "Fine", False, refused_by_gate=False),
        GateRow("over_refusal", "I'm sorry, no", False, refused_by_gate=False),
        GateRow("over_refusal", "Yes", None, refused_by_gate=False),
    ]
    g = gate_summary(rows, action="refuse", gated=True)
    assert (g["precision"], g["recall"], g["undecided"]) == (0.5, 0.5, 1)
    assert g["flag_rate"] == {"harmful": 0.5, "harmless": 0.5, "over_refusal": 0.0}
    assert g["refused_by_gate"] == {"harmful": 1, "harmless": 1, "over_refusal": 0}
    assert (g["refusal_harmful"], g["over_refusal_harmless"], g["over_refusal_set"]) == (0.5, 0.5, 0.5)
    assert g["answered"]["n"] == 2, "harmful and harmless rows the gate did not refuse"
    plain = gate_summary(
        [GateRow(r.group, r.text, None, False) for r in rows], action=None, gated=False, ungated_of="p"
    )
    assert plain["precision"] is None and plain["flag_rate"]["harmful"] is None and plain["ungated_of"] == "p"
    assert plain["refusal_harmful"] == 0.0 and plain["answered"]["n"] == 4


def test_decisions_are_matched_by_request_id_and_read_from_the_header():
    assert external_id("12-0a1b2c3d") == "12" and external_id("12") == "12" and external_id("cmpl-x-0") == "cmpl-x-0"
    per_worker = [
        [{"request": "3-0a1b2c3d", "profile": "p", "action": "flag", "fired": None, "gates": [], "scores": {}}],
        [{"request": "3-0a1b2c3d", "profile": "p", "action": "flag", "fired": True, "gates": ["g"], "scores": {}}],
    ]
    assert decisions_by_request(per_worker)["3-0a1b2c3d"]["fired"] is True, "a decided worker wins"
    assert decisions_by_request(per_worker)["3-0a1b2c3d"]["category"] is None
    routed = [[{**per_worker[1][0], "request": "4-0a1b2c3d", "route_gates": ["c"], "category": "Cyber Crime"}]]
    assert decisions_by_request(routed)["4-0a1b2c3d"]["category"] == "Cyber Crime", "a routing request's category"
    assert parse_gate_header("action=refuse; fired=1") == {
        "action": "refuse",
        "fired": True,
        "gates": None,
        "scores": None,
    }
    assert parse_gate_header("action=steer; fired=0")["fired"] is False
    assert parse_gate_header("action=flag; fired=-")["fired"] is None
    assert parse_gate_header(None) is None


# ------------------------------------------------------------------ the ungated copy


def _gated_profile():
    base = random_profile("gated-add", "addition", TINY, [1, 2], seed=3, vector_norm=8.0, scale=2.0)
    gate = GateSpec(name="g", layer=1, tensor="gate.g", score="cast", threshold=0.1, comparison=">")
    import torch

    return with_gates(base, "refuse", [gate], {"g": torch.randn(TINY.hidden_size)}, "No.")


def test_the_ungated_copy_has_the_same_tensors_and_no_gate(tmp_path):
    gated = _gated_profile()
    src = tmp_path / "src"
    from vllm_steer.core.profile import save_profile

    save_profile(src / "gated-add", gated.spec, gated.vectors, gated.gate_vectors)
    profiles = load_profile_dir(src)
    copies = write_eval_profiles(profiles, ["gated-add"], tmp_path / "served")
    assert set(copies) == {"gated-add"} and copies["gated-add"].id == "gated-add-ungated"
    served = load_profile_dir(tmp_path / "served")
    assert set(served) == {"gated-add", "gated-add-ungated"}
    assert served["gated-add"].digest == profiles["gated-add"].digest, "the evaluated profile is served as it is"
    copy = load_profile(tmp_path / "served" / "gated-add-ungated")
    assert copy.spec.gating is None and copy.gate_vectors == {}
    assert "gating" not in json.loads((tmp_path / "served" / "gated-add-ungated" / "profile.json").read_text())
    assert copy.spec.model_dump(exclude={"id", "gating", "description"}) == gated.spec.model_dump(
        exclude={"id", "gating", "description"}
    )
    assert {
        (layer, role): t.numpy().tobytes() for layer, roles in copy.vectors.items() for role, t in roles.items()
    } == {(layer, role): t.numpy().tobytes() for layer, roles in gated.vectors.items() for role, t in roles.items()}, (
        "the same steering tensors, byte for byte"
    )
    with pytest.raises(ValueError, match="no gates"):
        ungated_profile(copy)


def test_an_evaluated_profile_named_like_a_copy_is_refused(tmp_path):
    gated = _gated_profile()
    clash = gated.spec.model_copy(update={"id": "gated-add-ungated", "gating": None})
    from vllm_steer.core.profile import save_profile

    save_profile(tmp_path / "src" / "gated-add", gated.spec, gated.vectors, gated.gate_vectors)
    save_profile(tmp_path / "src" / "clash", clash, gated.vectors)
    with pytest.raises(ValueError, match="clash"):
        write_eval_profiles(load_profile_dir(tmp_path / "src"), ["gated-add", "gated-add-ungated"], tmp_path / "out")


def test_the_reports_gate_table_puts_ungated_rows_next_to_gated_ones():
    def point(profile, gate, value=None, method="addition"):
        return {
            "profile": profile,
            "method": method if profile else None,
            "value": value,
            "n_harmful": 1,
            "n_harmless": 1,
            "refusal_harmful": 0.0,
            "attack_success": 1.0,
            "refusal_harmless": 0.0,
            "refusal_over_refusal_set": 0.0,
            "perplexity_unsteered": 2.0,
            "perplexity_steered": 2.0,
            "unicode_contamination": 0.0,
            "compression_ratio": 1.0,
            "ngram_repetition": 0.0,
            "gate": gate,
        }

    rows = [GateRow("harmful", "x", True, True), GateRow("harmless", "y", False, False)]
    result = {
        "data": {"over_refusal": "xstest-safe"},
        "points": [
            point(None, None),
            point("p", gate_summary(rows, action="refuse", gated=True), 3.0),
            point("p-ungated", gate_summary(rows, action=None, gated=False, ungated_of="p"), 3.0),
            point("guard", gate_summary(rows, action="refuse", gated=True), method=None),
        ],
    }
    table = gate_table(result).splitlines()
    assert "gate precision" in table[0] and "over-refusal (xstest-safe)" in table[0]
    first = [line.split(" | ")[0] for line in table[2:]]
    assert first == ["| unsteered", "| p ×3", "| p-ungated ×3 (no gate)", "| guard (gate-only)"]
    assert "| refuse | 1.00 | 1.00 | 0 |" in table[3]
    assert "over-refusal (xstest-safe)" in markdown_table(result)
    assert gate_table({"points": [point(None, None)]}) == ""


# ------------------------------------------------------------------ end to end


@pytest.mark.engine
def test_eval_cli_reports_gates_consistent_with_the_engines_decisions(gated, tmp_path):
    root = gated[0]
    out = tmp_path / "eval"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("VLLM_PLUGINS", None)
    n = 3
    cmd = [
        sys.executable,
        "-m",
        "vllm_steer.cli",
        "eval",
        "--model",
        str(root / "model"),
        "--profiles",
        str(root / "profiles"),
        "--compare",
        "tiny-refuse",
        "tiny-gated-addition",
        "tiny-flag",
        "tiny-gate-only",
        "--data",
        str(DATA / "harmful.csv"),
        "--harmless",
        str(DATA / "harmless.jsonl"),
        "--over-refusal",
        "xstest-safe",
        "--n",
        str(n),
        "--offset",
        "0",
        "--max-tokens",
        "8",
        "--capability-n",
        "2",
        "--out",
        str(out),
    ]
    record_engine_start("cli:eval-gates")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    labels = [(p["profile"], p["value"], p["ungated_of"]) for p in result["points"]]
    assert labels == [
        (None, None, None),
        ("tiny-refuse", 3.0, None),
        ("tiny-refuse-ungated", 3.0, "tiny-refuse"),
        ("tiny-gated-addition", 3.0, None),
        ("tiny-gated-addition-ungated", 3.0, "tiny-gated-addition"),
        ("tiny-flag", 3.0, None),
        ("tiny-flag-ungated", 3.0, "tiny-flag"),
        ("tiny-gate-only", None, None),
    ], "each gated profile next to its ungated copy at the same (default) strength; a gate-only one has none"
    assert result["served_in_one_mixed_batch"] is True and result["data"]["over_refusal"] == "xstest-safe"
    assert "tiny-refuse-ungated@3" in result["capability"]

    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == result["rows"]
    profiles = load_profile_dir(root / "profiles")
    fired_anywhere: set[bool] = set()
    for pi, point in enumerate(result["points"]):
        mine = [g for g in gens if g["meta"].get("point") == pi and g["group"] != "capability"]
        assert [g["group"] for g in mine] == ["harmful"] * n + ["harmless"] * n + ["over_refusal"] * n
        assert point["n_over_refusal_set"] == n
        unsteered = [g for g in gens if g["meta"].get("point") == 0 and g["group"] != "capability"]
        gate = point["gate"]
        if point["profile"] is None:
            assert gate is None and all(g["gate"] is None for g in mine)
            continue
        if point["ungated_of"]:
            assert gate["gated"] is False and gate["precision"] is None and gate["flag_rate"]["harmful"] is None
            assert all(g["gate"] is None for g in mine), "an ungated copy is not gated"
            assert gate["answered"]["n"] == 2 * n
            continue
        spec = profiles[point["profile"]].spec
        assert gate["gated"] is True and gate["action"] == spec.gating.action
        assert all(g["gate"] is not None for g in mine), "every gated row's decision came back"
        fired = [g["gate"]["fired"] for g in mine]
        assert None not in fired and gate["undecided"] == 0
        fired_anywhere.update(fired)
        for g in mine:  # the decision is the OR of the gates on the reported scores
            scores = g["gate"]["scores"]
            expect = any(gate_fires(scores[s.name], s.threshold, s.comparison) for s in spec.gating.gates)
            assert g["gate"]["fired"] is bool(expect), g
        labels_ = [g["group"] == "harmful" for g in mine]
        assert {k: gate[k] for k in ("precision", "recall", "tp", "fp", "fn", "tn", "undecided")} == precision_recall(
            labels_, fired
        )
        for name in ("harmful", "harmless", "over_refusal"):
            assert gate["flag_rate"][name] == fire_rate([g["gate"]["fired"] for g in mine if g["group"] == name])
        refused = [g["text"].startswith(spec.gating.refusal[:5]) for g in mine]
        if spec.gating.action == "refuse":
            assert refused == fired, "refused rows are exactly the rows whose gate fired"
            assert sum(gate["refused_by_gate"].values()) == sum(fired)
            assert gate["answered"]["n"] == sum(not f for f in fired[: 2 * n])
            assert gate["refusal_harmful"] >= sum(fired[:n]) / n
        else:
            assert sum(gate["refused_by_gate"].values()) == 0 and gate["answered"]["n"] == 2 * n
        for g, base, f in zip(mine, unsteered, fired, strict=True):
            if spec.gating.action == "flag" or not f:  # generation unchanged: flag rows and rows not gated
                assert g["text"] == base["text"], (point["profile"], g, base)
    assert fired_anywhere, "the run decided rows"

    readme = (out / "README.md").read_text()
    assert "## Gates" in readme and "gate precision" in readme and "over-refusal (xstest-safe)" in readme
    assert "| tiny-refuse-ungated ×3 (no gate) |" in readme and "| tiny-gate-only (gate-only) | refuse |" in readme
    assert (out / "gates.png").stat().st_size > 1000
