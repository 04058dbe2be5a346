"""Gate calibration (``calibrate --gate``): splits, grid search, thresholds, OR-ed gates, the command end to end.

The pure functions run on synthetic activations where a planted direction separates the classes at one layer;
every rate the calibration claims is recomputed here with the reference formulas of ``vllm_steer.core.gates``.
"""

from __future__ import annotations

import json

import pytest
import torch

from support import DATA
from vllm_steer.calibration.gates import (
    calibrate_gating,
    common_thresholds,
    grid_search,
    layer_scores,
    or_thresholds,
    parse_fpr,
    parse_fractions,
    split_three,
)
from vllm_steer.calibration.pipeline import CalibrationError
from vllm_steer.core.gates import gate_fires, gate_score
from vllm_steer.core.profile import load_profile
from vllm_steer.data import Prompt

L, D = 4, 16
HARMFUL, HARMLESS = ["h1", "h2"], ["n1", "n2"]
SPLIT = {"fit": 24, "select": 30, "test": 30}


def _unit(gen: torch.Generator, orthogonal_to: torch.Tensor | None = None) -> torch.Tensor:
    v = torch.randn(D, generator=gen)
    if orthogonal_to is not None:
        v = v - (v @ orthogonal_to) * orthogonal_to
    return v / v.norm()


def _synthetic(plant, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """source → split → ``[n, L, D]``: noise around a shared offset; ``plant(source, x, gen)`` edits a source's rows."""
    gen = torch.Generator().manual_seed(seed)
    offset = 2.0 * torch.randn(D, generator=gen)
    acts: dict[str, dict[str, torch.Tensor]] = {}
    for source in [*HARMFUL, *HARMLESS]:
        acts[source] = {}
        for split, n in SPLIT.items():
            x = 0.5 * torch.randn(n, L, D, generator=gen) + offset
            plant(source, x, gen)
            acts[source][split] = x
    return acts


def _fires(acts: torch.Tensor, gating, vectors) -> torch.Tensor:
    """Per row: does any gate fire? (the reference formulas, on the stored thresholds and directions)"""
    fired = torch.zeros(len(acts), dtype=torch.bool)
    for gate in gating.gates:
        scores = gate_score(acts[:, gate.layer], vectors[gate.name], gate.score)
        fired |= torch.as_tensor(gate_fires(scores, gate.threshold, gate.comparison))
    return fired


def test_split_three_is_disjoint_seeded_per_source_and_covers_every_prompt():
    prompts = [Prompt(f"p{i}") for i in range(20)]
    fit, select, test = split_three(prompts, (0.4, 0.3, 0.3), seed=3, name="a")
    assert (len(fit), len(select), len(test)) == (8, 6, 6)
    assert sorted(p.text for p in fit + select + test) == sorted(p.text for p in prompts)
    assert not {p.text for p in fit} & ({p.text for p in select} | {p.text for p in test})
    assert not {p.text for p in select} & {p.text for p in test}
    assert split_three(prompts, (0.4, 0.3, 0.3), seed=3, name="a") == (fit, select, test), "reproducible"
    assert split_three(prompts, (0.4, 0.3, 0.3), seed=3, name="b") != (fit, select, test), "sources shuffle apart"
    assert all(len(part) == 1 for part in split_three(prompts[:3], (0.8, 0.1, 0.1), 0, "a")), "every part gets one"
    with pytest.raises(CalibrationError, match="gate_n: tiny: 2 prompt"):
        split_three(prompts[:2], (0.4, 0.3, 0.3), 0, "tiny")


def test_options_parse_and_refuse_naming_the_option():
    assert parse_fpr("0.01", ["alpaca", "xstest-safe"]) == {"alpaca": 0.01, "xstest-safe": 0.01}
    assert parse_fpr("0.01,xstest-safe=0.2", ["alpaca", "xstest-safe"]) == {"alpaca": 0.01, "xstest-safe": 0.2}
    with pytest.raises(CalibrationError, match="gate_fpr: 'advbench' is not a harmless source"):
        parse_fpr("0.01,advbench=0.2", ["alpaca"])
    with pytest.raises(CalibrationError, match=r"gate_fpr: no rate for \['alpaca'\]"):
        parse_fpr("xstest-safe=0.2", ["alpaca", "xstest-safe"])
    with pytest.raises(CalibrationError, match=r"gate_fpr: '1\.5'"):
        parse_fpr("1.5", ["alpaca"])
    assert parse_fractions("0.5,0.25,0.25") == (0.5, 0.25, 0.25)
    with pytest.raises(CalibrationError, match="gate_split"):
        parse_fractions("0.5,0.5")


def test_grid_search_finds_the_planted_layer_and_the_signed_score():
    """Harmful rows sit at +3u and harmless at -3u on layer 2: the projection separates them, the sign-blind
    cast score cannot; no other layer carries anything."""
    gen = torch.Generator().manual_seed(1)
    u = _unit(gen)

    def plant(source, x, g):  # the component along u: +-3 (plus noise), whatever the offset holds
        along = (3.0 if source in HARMFUL else -3.0) + 0.3 * torch.randn(len(x), generator=g)
        x[:, 2] += (along - x[:, 2] @ u)[:, None] * u

    acts = _synthetic(plant)
    budgets = {"n1": 0.05, "n2": 0.05}
    result = calibrate_gating(acts, HARMFUL, HARMLESS, budgets)
    assert result.report["chosen"] == "mean", "one pooled gate ties the OR-ed ones on recall and AUC: fewer gates win"
    (gate,) = result.gating.gates
    assert (gate.layer, gate.score, gate.comparison) == (2, "projection", ">")
    assert float(result.directions[gate.name] @ u) > 0.95
    assert result.gating.action == "refuse"
    for source in HARMLESS:  # the threshold meets the budget on the select split (reference formulas)
        assert float(_fires(acts[source]["select"], result.gating, result.directions).double().mean()) <= 0.05
    assert result.report["operating_point"]["select"]["recall_mean"] == 1.0
    # the test split is reported per source, and it is what the stored gating does to the test rows
    test = result.report["test"]
    assert set(test["flag_rate"]) == {*HARMFUL, *HARMLESS}
    for source in [*HARMFUL, *HARMLESS]:
        rate = float(_fires(acts[source]["test"], result.gating, result.directions).double().mean())
        assert test["flag_rate"][source] == pytest.approx(rate)
        assert test["n"][source] == SPLIT["test"]
    assert test["flag_rate"]["h1"] == 1.0 and test["flag_rate"]["n1"] <= 0.1
    rows = {
        (r["layer"], r["score"], r["comparison"]): r for r in result.report["grid"] if r["direction"] == "mean:harmful"
    }
    assert rows[(2, "projection", ">")]["auc"] == 1.0
    assert rows[(2, "cast", ">")]["auc"] < 0.8, "cast is sign-blind: both classes lie along u"
    assert max(rows[(layer, "projection", ">")]["auc"] for layer in (0, 1, 3)) < 0.8
    assert {"precision", "recall", "threshold", "recall_by_source", "fpr_by_source"} <= set(
        rows[(2, "projection", ">")]
    )


def test_grid_search_prefers_cast_where_harm_lies_along_the_direction_either_way():
    """Harmful rows lie along ±3u on layer 1 (mostly +): cast (sign-blind) flags them all, projection only the + ones."""
    gen = torch.Generator().manual_seed(2)
    u = _unit(gen)

    def plant(source, x, g):
        if source in HARMFUL:
            signs = torch.where(torch.rand(len(x), generator=g) < 0.75, 1.0, -1.0)
            x[:, 1] += 3.0 * signs[:, None] * u

    acts = _synthetic(plant, seed=3)
    directions = {"u": torch.stack([u] * L)}
    budgets = {"n1": 0.05, "n2": 0.05}
    rows = []
    for score in ("cast", "projection"):
        select = {s: layer_scores(parts["select"], directions["u"], score) for s, parts in acts.items()}
        rows += grid_search(select, "u", score, HARMFUL, HARMLESS, budgets)
    best = max(rows, key=lambda r: r.key())
    assert (best.layer, best.score, best.comparison) == (1, "cast", ">")
    assert best.recall > 0.95
    projection = max((r for r in rows if r.score == "projection" and r.layer == 1), key=lambda r: r.key())
    assert projection.recall < 0.9
    assert all(r.fpr_by_source[s] <= 0.05 for r in rows for s in HARMLESS)


def test_or_gates_share_the_false_positive_budget():
    gen = torch.Generator().manual_seed(4)
    negative = {"n": torch.randn(2000, 2, generator=gen)}  # two independent gates' harmless scores
    tau, k = common_thresholds(negative, {"n": 0.05})
    combined = float((negative["n"] > tau).any(-1).double().mean())
    assert 0.045 <= combined <= 0.05
    alone = torch.stack([common_thresholds({"n": negative["n"][:, [g]]}, {"n": 0.05})[0][0] for g in range(2)])
    assert float((negative["n"] > alone).any(-1).double().mean()) > 0.08, "each gate alone at 5 % would overshoot"
    positive = {"p": torch.stack([torch.randn(500, generator=gen) + 3, torch.randn(500, generator=gen)], 1)}
    tau2, levels = or_thresholds(negative, positive, {"n": 0.05})
    assert float((negative["n"] > tau2).any(-1).double().mean()) <= 0.05
    assert float((positive["p"] > tau2).any(-1).double().mean()) >= float((positive["p"] > tau).any(-1).double().mean())
    assert levels[0] >= k, "the useful gate takes the budget the useless one does not need"


def test_or_of_per_source_gates_when_harm_lives_in_two_places():
    """h1 is separated at layer 1 along u, h2 at layer 3 along v: no single gate catches both; the OR does, and its
    combined false-positive rate (any gate firing) meets the budget on the select split."""
    gen = torch.Generator().manual_seed(5)
    u = _unit(gen)
    v = _unit(gen, orthogonal_to=u)

    def plant(source, x, g):
        if source == "h1":
            x[:, 1] += 3.0 * u
        elif source == "h2":
            x[:, 3] += 3.0 * v

    acts = _synthetic(plant, seed=6)
    budgets = {"n1": 0.1, "n2": 0.1}
    result = calibrate_gating(acts, HARMFUL, HARMLESS, budgets, action="flag")
    report = result.report
    assert report["chosen"] in ("per-source", "pooled+per-source")
    assert report["candidates"]["mean"]["select"]["recall_mean"] < 0.8
    assert {g.layer for g in result.gating.gates} >= {1, 3}
    assert report["operating_point"]["select"]["recall_mean"] > 0.95
    for source in HARMLESS:
        fired = _fires(acts[source]["select"], result.gating, result.directions)
        assert float(fired.double().mean()) <= 0.1
        assert report["operating_point"]["select"]["flag_rate"][source] == pytest.approx(float(fired.double().mean()))
    per_gate = report["operating_point"]["select"]["per_gate"]
    assert set(per_gate) == {g.name for g in result.gating.gates}
    assert result.gating.action == "flag"
    with pytest.raises(CalibrationError, match="gate_action: unknown 'block'"):
        calibrate_gating(acts, HARMFUL, HARMLESS, budgets, action="block")
    with pytest.raises(CalibrationError, match="gate_fpr: no false-positive target"):
        calibrate_gating(acts, HARMFUL, HARMLESS, {"n1": 0.1})


def test_probe_directions_recover_the_planted_direction():
    pytest.importorskip("sklearn")
    gen = torch.Generator().manual_seed(7)
    u = _unit(gen)

    def plant(source, x, g):
        x[:, 2] += (1.5 if source in HARMFUL else -1.5) * u

    acts = _synthetic(plant, seed=8)
    result = calibrate_gating(acts, HARMFUL, HARMLESS, {"n1": 0.05, "n2": 0.05}, probe_c=(1.0,))
    grid = result.report["grid"]
    assert {r["direction"] for r in grid} >= {"probe-c1:harmful", "probe-c1:h1", "mean:h2"}
    probe = max((r for r in grid if r["direction"] == "probe-c1:harmful"), key=lambda r: (r["recall"], r["auc"]))
    assert probe["layer"] == 2 and probe["auc"] > 0.99
    assert "probe" in result.report["candidates"]


def _invoke(args):
    from typer.testing import CliRunner

    from vllm_steer.cli import app

    return CliRunner().invoke(app, args, env={"COLUMNS": "400"})


def test_calibrate_gate_cli_writes_a_gated_profile_and_its_report(tiny_root, tmp_path):
    model = str(tiny_root / "model")
    out = tmp_path / "gated"
    gate = ["--gate-n", "8", "--gate-probe-c", "none", "--gate-fpr", "0.0,xstest-safe=0.5"]
    args = ["calibrate", model, "--method", "addition", "--layers", "1", "--out", str(out), "--n", "6"]
    args += ["--harmful", str(DATA / "harmful.csv"), "--harmless", str(DATA / "harmless.jsonl"), "--sweep", "none"]
    result = _invoke([*args, "--gate", *gate])
    assert result.exit_code == 0, result.output
    profile = load_profile(out)
    gating = profile.spec.gating
    assert gating is not None and gating.action == "refuse"
    assert set(profile.gate_vectors) == {g.name for g in gating.gates}
    assert all(0 <= g.layer < 4 for g in gating.gates)
    record = profile.spec.calibration["gating"]
    assert record["target_fpr"] == {"alpaca": 0.0, "xstest-safe": 0.5}
    assert record["sizes"]["advbench"] == {"fit": 3, "select": 2, "test": 3}
    assert set(record["test_flag_rate"]) == {"advbench", "harmbench", "catqa", "xstest-unsafe", "alpaca", "xstest-safe"}
    report = out / "report"
    for name in ("gate.json", "gate.md", "gate_roc.png", "README.md"):
        assert (report / name).stat().st_size > 100, name
    saved = json.loads((report / "gate.json").read_text())
    assert saved["chosen"] == record["chosen"] and saved["split"]["seed"] == 0
    assert "Flag rate per source" in (report / "gate.md").read_text()
    assert "gate.md" in (report / "README.md").read_text()

    # --gate-into: replace the gating of an existing profile, keep its steering and its report/
    vectors = profile.vectors
    file = DATA / "harmless.jsonl"  # a file source, labelled by its stem; --gate-fpr may name it by its path
    into = ["calibrate", model, "--gate-into", str(out), "--gate-action", "flag", "--gate-n", "8", "--no-report"]
    into += ["--gate-probe-c", "0.1", "--gate-fpr", f"0.0,{file}=0.5"]
    into += ["--gate-harmful", "advbench,catqa", "--gate-harmless", f"alpaca,{file}"]
    result = _invoke(into)
    assert result.exit_code == 0, result.output
    again = load_profile(out)
    assert again.spec.gating is not None and again.spec.gating.action == "flag"
    assert again.spec.calibration["gating"]["sources"] == {
        "harmful": ["advbench", "catqa"],
        "harmless": ["alpaca", "harmless"],
    }
    assert again.spec.calibration["gating"]["target_fpr"] == {"alpaca": 0.0, "harmless": 0.5}
    assert torch.equal(again.vectors[1]["vector"], vectors[1]["vector"])
    assert (report / "gate_roc.png").exists() and (report / "README.md").exists()

    # usage errors name the option, before any model runs
    bad = _invoke(["calibrate", model, "--gate-into", str(out), "--method", "addition"])
    assert bad.exit_code == 2 and "--method" in bad.output
    bad = _invoke([*args, "--gate", "--gate-fpr", "0.01,advbench=0.5"])
    assert bad.exit_code == 2 and "--gate-fpr" in bad.output and "not a harmless source" in bad.output
    bad = _invoke(["calibrate", model, "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--method" in bad.output
    bad = _invoke(["calibrate", model, "--gate-into", str(tmp_path / "missing"), "--no-report"])
    assert bad.exit_code == 1 and "gate calibration failed" in bad.output


def test_calibrate_gate_only_cli_writes_a_gate_only_profile(tiny_root, tmp_path):
    """``--gate-only``: a profile of gates and nothing that steers (method null), loadable by the server, with the
    gate report; then ``--gate-into`` it recalibrates its gates (refuse or flag only); usage errors name the
    option before any model runs."""
    model = str(tiny_root / "model")
    out = tmp_path / "gates"
    gate = ["--gate-n", "8", "--gate-probe-c", "none", "--gate-fpr", "0.0,xstest-safe=0.5"]
    result = _invoke(["calibrate", model, "--gate-only", "--out", str(out), "--id", "tiny-gates", *gate])
    assert result.exit_code == 0, result.output
    profile = load_profile(out)
    spec = profile.spec
    assert (spec.id, spec.method, spec.layers, spec.tensors, profile.vectors) == ("tiny-gates", None, [], {}, {})
    assert spec.gating is not None and spec.gating.action == "refuse" and not spec.gating.routes
    assert set(profile.gate_vectors) == {g.name for g in spec.gating.gates}
    assert set(spec.calibration) == {"gating"} and spec.calibration["gating"]["report"] == "report/gate.md"
    assert spec.model.name == "model" and spec.model.num_layers == 4
    assert (out / "report" / "gate.md").stat().st_size > 100 and (out / "report" / "gate_roc.png").exists()
    assert "gate-only" in result.output and "tiny-gates" in result.output

    into = ["calibrate", model, "--gate-into", str(out), "--gate-action", "flag", "--no-report", *gate]
    result = _invoke(into)
    assert result.exit_code == 0, result.output
    again = load_profile(out)
    assert again.spec.method is None and again.spec.gating is not None and again.spec.gating.action == "flag"

    default_id = _invoke(["calibrate", model, "--gate-only", "--out", str(tmp_path / "d"), "--no-report", *gate])
    assert default_id.exit_code == 0, default_id.output
    assert load_profile(tmp_path / "d").id == "model-gates"
    listed = _invoke(["profiles", "list", str(tmp_path)])
    assert listed.exit_code == 0 and "gate-only (flag)" in listed.output and "gate-only (refuse)" in listed.output

    for args, option in (
        (["--gate-only", "--out", str(tmp_path / "x"), "--method", "addition"], "--method"),
        (["--gate-only"], "--out"),
        (["--gate-only", "--out", str(tmp_path / "x"), "--gate-action", "steer"], "--gate-action"),
        (["--gate-only", "--out", str(tmp_path / "x"), "--gate-route"], "--gate-route"),
        (["--gate-only", "--out", str(tmp_path / "x"), "--gate-into", str(out)], "--gate-into"),
        (["--gate-only", "--out", str(tmp_path / "x"), "--id", "Bad Id"], "--id"),
        (["--gate-into", str(out), "--gate-action", "steer"], "--gate-action"),
    ):
        bad = _invoke(["calibrate", model, *args])
        assert bad.exit_code == 2 and option in bad.output, (args, bad.output)
    assert not (tmp_path / "x").exists()
