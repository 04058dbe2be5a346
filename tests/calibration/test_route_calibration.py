"""Routing gates (``calibrate --gate-route``): one gate per category of a category profile, the OR meeting the
false-positive budgets, and the routing (``route_of``) reported per category on the test split.

The pure part plants one direction per category (plus a harm direction they share, so that several gates fire
and the margin decides) in synthetic activations; every routing the calibration claims is recomputed with the
reference formulas of ``vllm_steer.core.gates``. The command runs end to end on the tiny random model with
synthetic labelled prompts whose categories differ in their last word (``--prompt-format plain``: the gate
reads that token).
"""

from __future__ import annotations

import csv
import json

import pytest
import torch

from vllm_steer.calibration.gates import NO_ROUTE, calibrate_gating, load_route_sources
from vllm_steer.calibration.pipeline import CalibrationError
from vllm_steer.core.gates import gate_fires, gate_score, route_of
from vllm_steer.core.profile import load_profile

L, D = 4, 16
ROUTES = {"weapons-arms": "Weapons/Arms", "cyber-crime": "Cyber Crime", "poisoning": "Poisoning"}
HARMLESS = ["n1", "n2"]
SPLIT = {"fit": 24, "select": 30, "test": 30}


def _orthonormal(gen: torch.Generator, k: int) -> list[torch.Tensor]:
    q, _ = torch.linalg.qr(torch.randn(D, k, generator=gen))
    return [q[:, i] for i in range(k)]


def _planted(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Every category at layer 2: a shared harm direction (3h) plus its own (2u_c); harmless rows: neither."""
    gen = torch.Generator().manual_seed(seed)
    h, *us = _orthonormal(gen, 1 + len(ROUTES))
    offset = 2.0 * torch.randn(D, generator=gen)
    acts: dict[str, dict[str, torch.Tensor]] = {}
    for i, source in enumerate([*ROUTES, *HARMLESS]):
        acts[source] = {}
        for split, n in SPLIT.items():
            x = 0.4 * torch.randn(n, L, D, generator=gen) + offset
            if source in ROUTES:
                x[:, 2] += 3.0 * h + 2.0 * us[i]
            acts[source][split] = x
    return acts


def _routed(acts: torch.Tensor, gating, vectors) -> list[str | None]:
    """Per row: the category the reference ``route_of`` picks from reference scores of the stored gates."""
    scores = {g.name: gate_score(acts[:, g.layer], vectors[g.name], g.score) for g in gating.gates}
    return [route_of(gating, {name: float(s[i]) for name, s in scores.items()}) for i in range(len(acts))]


def test_routing_gates_name_their_categories_and_route_the_test_split():
    acts = _planted()
    budgets = {"n1": 0.05, "n2": 0.05}
    harmful = list(ROUTES)
    result = calibrate_gating(acts, harmful, HARMLESS, budgets, action="steer", routes=ROUTES)
    gating = result.gating
    assert gating.action == "steer"
    assert [g.category for g in gating.gates] == list(ROUTES.values())
    assert [g.name for g in gating.gates] == harmful
    assert gating.routes == tuple(sorted(ROUTES.values()))
    assert result.report["chosen"] == "route" and list(result.report["candidates"]) == ["route"]
    assert not any(r["direction"].endswith(":harmful") for r in result.report["grid"]), "no pooled directions"
    assert {g.layer for g in gating.gates} == {2}

    # the OR of all gates meets every harmless budget on the select split (reference formulas)
    for source in HARMLESS:
        fired = torch.zeros(SPLIT["select"], dtype=torch.bool)
        for g in gating.gates:
            s = gate_score(acts[source]["select"][:, g.layer], result.directions[g.name], g.score)
            fired |= torch.as_tensor(gate_fires(s, g.threshold, g.comparison))
        assert float(fired.double().mean()) <= 0.05

    routing = result.report["routing"]["test"]
    assert set(routing["confusion"]) == set(ROUTES.values())
    for label, category in ROUTES.items():
        routed = _routed(acts[label]["test"], gating, result.directions)
        counts = routing["confusion"][category]
        assert list(counts) == [*ROUTES.values(), NO_ROUTE]
        for column, count in counts.items():
            assert count == sum((r or NO_ROUTE) == column for r in routed), (category, column)
        row = routing["per_category"][category]
        assert row["gate"] == label and row["n"] == SPLIT["test"]
        assert row["accuracy"] == pytest.approx(routed.count(category) / SPLIT["test"])
        assert row["recall"] == pytest.approx(result.report["test"]["flag_rate"][label])
        assert row["accuracy"] >= 0.9, (category, counts)
    assert routing["accuracy_mean"] >= 0.9
    for source in HARMLESS:  # false positives: every harmless row routed somewhere
        routed = _routed(acts[source]["test"], gating, result.directions)
        fp = sum(r is not None for r in routed) / SPLIT["test"]
        assert routing["false_positive_rate"][source] == pytest.approx(fp)
        assert routing["false_positive_rate"][source] == pytest.approx(result.report["test"]["flag_rate"][source])
    assert result.report["routing"]["select"]["accuracy_mean"] >= 0.9


def test_routing_with_probe_directions_fits_one_per_category_even_alone():
    pytest.importorskip("sklearn")
    acts = _planted(seed=1)
    one = {"poisoning": "Poisoning"}
    acts = {s: acts[s] for s in [*one, *HARMLESS]}
    result = calibrate_gating(acts, list(one), HARMLESS, {"n1": 0.05, "n2": 0.05}, "steer", probe_c=(1.0,), routes=one)
    assert {r["direction"] for r in result.report["grid"]} == {"mean:poisoning", "probe-c1:poisoning"}
    (gate,) = result.gating.gates
    assert gate.category == "Poisoning" and result.gating.routes == ("Poisoning",)
    assert result.report["routing"]["test"]["per_category"]["Poisoning"]["accuracy"] >= 0.9


def test_routing_refuses_other_actions_and_unrouted_sources():
    acts = _planted()
    budgets = {"n1": 0.05, "n2": 0.05}
    with pytest.raises(CalibrationError, match="gate_action: routing gates steer"):
        calibrate_gating(acts, list(ROUTES), HARMLESS, budgets, action="refuse", routes=ROUTES)
    with pytest.raises(CalibrationError, match="gate_route: no category for the harmful source"):
        calibrate_gating(acts, list(ROUTES), HARMLESS, budgets, action="steer", routes={"poisoning": "Poisoning"})


# ------------------------------------------------------------------------------------------- data, command

CATEGORIES = {"Weapons/Arms": "rifle", "Cyber Crime": "password", "Poisoning": "arsenic"}
OPENINGS = ["Tell me how to get the", "Explain quickly where to find a", "Describe the way to use the", "Where is a"]
HARMLESS_WORDS = ["bread", "garden", "music", "river", "weather", "painting", "chess", "tea", "mountains", "poetry"]


def _write_sets(tmp_path, per_category: int = 15, harmless: int = 30):
    """A labelled harmful CSV (categories differ in the last word, the openings vary) and a harmless JSONL."""
    harmful_file = tmp_path / "labelled.csv"
    with harmful_file.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["category", "question"])
        for category, word in CATEGORIES.items():
            for i in range(per_category):
                writer.writerow([category, f"{OPENINGS[i % len(OPENINGS)]} number {i}: {word} {word} {word}"])
    harmless_file = tmp_path / "plain.jsonl"
    harmless_file.write_text(
        "".join(
            json.dumps(
                {
                    "instruction": f"{OPENINGS[i % len(OPENINGS)]} number {i}: {HARMLESS_WORDS[i % 10]} {HARMLESS_WORDS[i % 10]} {HARMLESS_WORDS[i % 10]}"
                }
            )
            + "\n"
            for i in range(harmless)
        )
    )
    return harmful_file, harmless_file


def test_load_route_sources_groups_by_category_per_n_and_names_safely(tmp_path):
    harmful_file, harmless_file = _write_sets(tmp_path)
    with harmful_file.open("a", newline="") as f:
        csv.writer(f).writerows([["Rare", "only once arsenic"], ["Elsewhere", "not in the profile"]])
    categories = [*CATEGORIES, "Rare", "Missing", "generic"]
    sources, routes = load_route_sources([str(harmful_file)], [str(harmless_file)], categories, n=10, seed=3)
    assert routes == {"weapons-arms": "Weapons/Arms", "cyber-crime": "Cyber Crime", "poisoning": "Poisoning"}
    assert [s.name for s in sources] == [*routes, "plain"]
    assert [s.harmful for s in sources] == [True, True, True, False]
    for source in sources[:3]:
        prompts = [*source.fit, *source.select, *source.test]
        assert len(prompts) == 10, "n counts per category"
        assert all(p.category == routes[source.name] for p in prompts)
    with pytest.raises(CalibrationError, match="gate_route: no category of the profile"):
        load_route_sources([str(harmless_file)], [str(harmless_file)], categories)
    with pytest.raises(CalibrationError, match="gate_route"):
        load_route_sources([str(harmful_file)], [str(harmless_file)], ["Other", "generic"])


def _invoke(args):
    from typer.testing import CliRunner

    from vllm_steer.cli import app

    return CliRunner().invoke(app, args, env={"COLUMNS": "400"})


def test_calibrate_gate_route_cli_writes_a_routed_category_profile(tiny_root, tmp_path):
    model = str(tiny_root / "model")
    harmful_file, harmless_file = _write_sets(tmp_path)
    out = tmp_path / "routed"
    sets = ["--harmful", str(harmful_file), "--harmless", str(harmless_file), "--prompt-format", "plain"]
    base = ["calibrate", model, "--method", "category", "--out", str(out), "--n", "12", "--sweep", "none", *sets]
    gate = ["--gate-harmful", str(harmful_file), "--gate-harmless", str(harmless_file), "--gate-n", "15"]
    gate += ["--gate-probe-c", "none", "--gate-fpr", "0.1", "--gate-split", "0.4,0.3,0.3"]
    result = _invoke([*base, "--gate", "--gate-route", *gate])
    assert result.exit_code == 0, result.output
    assert "routing per category" in result.output

    profile = load_profile(out)
    gating = profile.spec.gating
    assert gating is not None and gating.action == "steer"
    assert gating.routes == tuple(sorted(CATEGORIES)), "every category but generic gets its gate"
    assert all(g.category is not None for g in gating.gates)
    assert {g.name: g.category for g in gating.gates} == {
        "weapons-arms": "Weapons/Arms",
        "cyber-crime": "Cyber Crime",
        "poisoning": "Poisoning",
    }
    assert set(profile.gate_vectors) == {g.name for g in gating.gates}
    record = profile.spec.calibration["gating"]
    assert record["routes"] == {g.name: g.category for g in gating.gates}
    assert set(record["test_routing"]) == set(CATEGORIES)
    assert record["split"]["n_per_category"] == 15

    report = out / "report"
    saved = json.loads((report / "gate.json").read_text())
    test = saved["routing"]["test"]
    for category in CATEGORIES:
        assert test["per_category"][category]["n"] == 5
        assert test["per_category"][category]["accuracy"] >= 0.8, test["confusion"]
    assert test["accuracy_mean"] >= 0.9
    assert set(test["false_positive_rate"]) == {"plain"}
    md = (report / "gate.md").read_text()
    assert "## Routing (test part)" in md and "routing accuracy" in md
    assert "| true → routed | cyber-crime | poisoning | weapons-arms | none |" in md
    assert "False positives per harmless source" in md
    assert "routes to Poisoning" in (report / "README.md").read_text()

    # --gate-into: the same routing onto the existing category profile (its vectors stay)
    into = ["calibrate", model, "--gate-into", str(out), "--gate-route", "--no-report", "--prompt-format", "plain"]
    again = _invoke([*into, *gate, "--seed", "1"])
    assert again.exit_code == 0, again.output
    reloaded = load_profile(out)
    assert reloaded.spec.gating is not None and reloaded.spec.gating.routes == gating.routes
    layer = next(iter(profile.vectors))
    assert torch.equal(reloaded.vectors[layer]["Poisoning"], profile.vectors[layer]["Poisoning"])


def test_gate_route_usage_errors_name_the_option(tiny_root, tmp_path):
    model = str(tiny_root / "model")
    harmful_file, harmless_file = _write_sets(tmp_path)
    sets = ["--harmful", str(harmful_file), "--harmless", str(harmless_file)]
    gate = ["--gate-harmless", str(harmless_file), "--gate-n", "6", "--gate-probe-c", "none"]
    out = ["--out", str(tmp_path / "x"), "--sweep", "none"]

    def usage_error(args, option, text):
        result = _invoke(["calibrate", model, *args])
        assert result.exit_code == 2, result.output
        assert option in result.output and text in result.output, result.output

    # not a category profile: --method, or the profile --gate-into names
    usage_error(["--method", "addition", *out, *sets, "--gate", "--gate-route"], "--gate-route", "category profile")
    addition = tiny_root / "profiles" / "tiny-addition"
    assert load_profile(addition).spec.method == "addition"
    usage_error(["--gate-into", str(addition), "--gate-route", *gate], "--gate-route", "has method 'addition'")
    # no labelled categories in the gate's harmful data
    unlabelled = ["--gate-harmful", str(harmless_file)]
    usage_error(
        ["--method", "category", *out, *sets, "--gate", "--gate-route", *gate, *unlabelled],
        "--gate-route",
        "no category",
    )
    # neither --gate nor --gate-into; another action
    usage_error(["--method", "category", *out, *sets, "--gate-route"], "--gate-route", "--gate or --gate-into")
    usage_error(
        ["--method", "category", *out, *sets, "--gate", "--gate-route", "--gate-action", "refuse"],
        "--gate-action",
        "routing gates steer",
    )
    assert not (tmp_path / "x").exists(), "nothing ran"
