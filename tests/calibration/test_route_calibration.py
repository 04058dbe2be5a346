"""Routing (``calibrate --gate-route``): a deciding gate meeting the false-positive budgets, and one routing gate per
category of a category profile (a nearest-centroid router), the routing (``fired_gates``, ``route_of``) reported
per category on the test split.

The pure part plants a harm direction every category shares and one direction per category in synthetic
activations; every decision and routing the calibration claims is recomputed with the reference formulas of
``vllm_steer.core.gates``. The command runs end to end on the tiny random model with synthetic labelled prompts
whose categories differ in their last word (``--prompt-format plain``: the gate reads that token).
"""

from __future__ import annotations

import csv
import json

import pytest
import torch

from support import REPO
from vllm_steer.calibration.gates import (
    NO_ROUTE,
    calibrate_gating,
    fit_router,
    load_route_sources,
    recorded_sources,
)
from vllm_steer.calibration.pipeline import CalibrationError
from vllm_steer.calibration.report import write_gate_report
from vllm_steer.core.gates import fired_gates, gate_score, route_of
from vllm_steer.core.profile import load_profile

L, D = 4, 16
ROUTES = {"weapons-arms": "Weapons/Arms", "cyber-crime": "Cyber Crime", "poisoning": "Poisoning"}
HARMLESS = ["n1", "n2"]
SPLIT = {"fit": 24, "select": 30, "test": 30}


def _orthonormal(gen: torch.Generator, k: int) -> list[torch.Tensor]:
    q, _ = torch.linalg.qr(torch.randn(D, k, generator=gen))
    return [q[:, i] for i in range(k)]


def _planted(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Every category at layer 2: a shared harm direction (3h) plus its own (2u_c); harmless rows: neither.
    Layer 1 carries the harm direction only (it decides, but cannot route)."""
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
                x[:, 1] += 3.0 * h
            acts[source][split] = x
    return acts


def _decided(acts: torch.Tensor, gating, vectors) -> list[tuple[bool, str | None]]:
    """Per row: gated (a deciding gate fires) and the category ``route_of`` picks, from reference scores."""
    scores = {g.name: gate_score(acts[:, g.layer], vectors[g.name], g.score) for g in gating.gates}
    rows = [{name: float(s[i]) for name, s in scores.items()} for i in range(len(acts))]
    return [(bool(fired_gates(gating, r)), route_of(gating, r)) for r in rows]


def test_routing_calibration_writes_a_deciding_gate_and_a_router_and_routes_the_test_split():
    acts = _planted()
    budgets = {"n1": 0.05, "n2": 0.05}
    harmful = list(ROUTES)
    result = calibrate_gating(acts, harmful, HARMLESS, budgets, action="steer", routes=ROUTES)
    gating, report = result.gating, result.report
    assert gating.action == "steer"
    deciding, *routing_gates = gating.gates
    assert deciding.category is None and [g.name for g in gating.deciding] == [deciding.name]
    assert [g.category for g in routing_gates] == list(ROUTES.values())
    assert [g.name for g in routing_gates] == harmful
    assert gating.routes == tuple(sorted(ROUTES.values()))
    assert report["chosen"] == "mean" and list(report["candidates"]) == ["mean"], "pooled candidates only"
    assert all(r["direction"].endswith(":harmful") for r in report["grid"]), "no per-source directions"
    assert report["router"]["layer"] == 2 and {g.layer for g in routing_gates} == {2}
    assert all(g.score == "projection" and g.comparison == ">" for g in routing_gates)
    by_layer = {r["layer"]: r["select"] for r in report["router"]["grid"]}
    assert by_layer[2] == max(by_layer.values()) >= 0.95 and by_layer[1] < 0.6, by_layer

    # the router: one-vs-rest centred directions, thresholds the balanced mean fit score (reference formulas)
    fit_means = torch.stack([acts[s]["fit"][:, 2].double().mean(0) for s in harmful])
    for k, g in enumerate(routing_gates):
        want = fit_means[k] - fit_means.mean(0)
        assert torch.nn.functional.cosine_similarity(result.directions[g.name].double(), want, dim=0) > 0.9999
        centred = torch.stack([gate_score(acts[s]["fit"][:, 2], result.directions[g.name], "projection").mean()
                               for s in harmful]).mean()  # fmt: skip
        assert g.threshold == pytest.approx(float(centred), abs=1e-5)

    # the deciding gate alone meets every harmless budget on the select split
    for source in HARMLESS:
        gated = [d for d, _ in _decided(acts[source]["select"], gating, result.directions)]
        assert sum(gated) / SPLIT["select"] <= 0.05

    routing = report["routing"]["test"]
    assert set(routing["confusion"]) == set(ROUTES.values())
    for label, category in ROUTES.items():
        rows = _decided(acts[label]["test"], gating, result.directions)
        counts = routing["confusion"][category]
        assert list(counts) == [*ROUTES.values(), NO_ROUTE]
        for column, count in counts.items():
            assert count == sum((c if d else NO_ROUTE) == column for d, c in rows), (category, column)
        row = routing["per_category"][category]
        assert row["gate"] == label and row["n"] == SPLIT["test"]
        assert row["recall"] == pytest.approx(sum(d for d, _ in rows) / SPLIT["test"])
        assert row["recall"] == pytest.approx(report["test"]["flag_rate"][label])
        assert row["route_accuracy"] == pytest.approx(sum(c == category for _, c in rows) / SPLIT["test"])
        assert row["accuracy"] == pytest.approx(sum(d and c == category for d, c in rows) / SPLIT["test"])
        assert row["accuracy"] >= 0.9, (category, counts)
    assert routing["accuracy_mean"] >= 0.9 and routing["route_accuracy_mean"] >= 0.95
    for source in HARMLESS:  # false positives: the gated harmless rows
        rows = _decided(acts[source]["test"], gating, result.directions)
        assert routing["false_positive_rate"][source] == pytest.approx(sum(d for d, _ in rows) / SPLIT["test"])
        assert routing["false_positive_rate"][source] == pytest.approx(report["test"]["flag_rate"][source])
    assert report["routing"]["select"]["accuracy_mean"] >= 0.9


def test_routing_with_probe_directions_and_a_restricted_layer_grid():
    pytest.importorskip("sklearn")
    acts = _planted(seed=1)
    budgets = {"n1": 0.05, "n2": 0.05}
    result = calibrate_gating(
        acts, list(ROUTES), HARMLESS, budgets, "steer", layers=[1, 2], probe_c=(1.0,), routes=ROUTES
    )
    assert {r["direction"] for r in result.report["grid"]} == {"mean:harmful", "probe-c1:harmful"}
    assert set(result.report["candidates"]) == {"mean", "probe"}
    assert [r["layer"] for r in result.report["router"]["grid"]] == [1, 2]
    assert {g.layer for g in result.gating.gates} <= {1, 2}


def test_deciding_gates_from_other_sources_are_chosen_as_without_routing_beside_the_router(tmp_path):
    """``--gate-route-from``: the deciding gates learn from harmful sources that are not the categories (here two
    that carry the harm direction at layer 1 only, so one of them is weaker), with the OR candidates, and the
    routing report covers the routing sources, gated by those deciding gates."""
    acts = _planted(seed=2)
    gen = torch.Generator().manual_seed(7)
    harm = acts[next(iter(ROUTES))]["fit"][:, 1].mean(0) - acts["n1"]["fit"][:, 1].mean(0)
    for k, source in enumerate(["d1", "d2"]):
        acts[source] = {}
        for split, n in SPLIT.items():
            x = acts["n1"][split].clone() + 0.1 * torch.randn(n, L, D, generator=gen)
            x[:, 1] += (1.0 - 0.3 * k) * harm
            acts[source][split] = x
    budgets = {"n1": 0.05, "n2": 0.05}
    result = calibrate_gating(acts, ["d1", "d2"], HARMLESS, budgets, action="steer", routes=ROUTES)
    gating, report = result.gating, result.report
    assert set(report["candidates"]) == {"mean", "per-source", "pooled+per-source"}, "OR candidates compete"
    assert report["sources"] == {"harmful": ["d1", "d2"], "harmless": HARMLESS, "routing": list(ROUTES)}
    assert set(report["sizes"]) == {"d1", "d2", *ROUTES, *HARMLESS}
    deciding = [g for g in gating.gates if g.category is None]
    assert deciding == list(gating.deciding) and gating.gates[: len(deciding)] == deciding, "deciding gates first"
    assert [g.name for g in gating.gates[len(deciding) :]] == list(ROUTES)
    assert set(report["test"]["flag_rate"]) == {"d1", "d2", *HARMLESS}
    routing = report["routing"]["test"]
    assert set(routing["per_category"]) == set(ROUTES.values())
    for label, category in ROUTES.items():
        rows = _decided(acts[label]["test"], gating, result.directions)
        row = routing["per_category"][category]
        assert row["recall"] == pytest.approx(sum(d for d, _ in rows) / SPLIT["test"])
        assert row["accuracy"] == pytest.approx(sum(d and c == category for d, c in rows) / SPLIT["test"])
        assert row["route_accuracy"] >= 0.9
    for source in ("d1", "d2"):
        rows = _decided(acts[source]["test"], gating, result.directions)
        assert report["test"]["flag_rate"][source] == pytest.approx(sum(d for d, _ in rows) / SPLIT["test"])
    assert report["test"]["recall_mean"] >= 0.8
    md = (write_gate_report(tmp_path, report, plot=False) / "gate.md").read_text()
    assert "| d1 | harmful | 24 | 30 | 30 |" in md and "| poisoning | routes to Poisoning | 24 | 30 | 30 |" in md


def test_fit_router_is_the_nearest_centroid_rule():
    gen = torch.Generator().manual_seed(4)
    centres = 3.0 * torch.randn(3, D, generator=gen)
    acts = {
        f"c{k}": {split: centres[k] + 0.3 * torch.randn(n, L, D, generator=gen) for split, n in SPLIT.items()}
        for k in range(3)
    }
    router = fit_router(acts, list(acts))
    assert all(r["select"] == 1.0 for r in router.grid) and router.layer == 0, "ties: the shallower layer"
    assert set(router.directions) == {"c0", "c1", "c2"}
    assert all(abs(float(v.norm()) - 1) < 1e-5 for v in router.directions.values())


def test_routing_refuses_other_actions_unrouted_sources_and_a_single_category():
    acts = _planted()
    budgets = {"n1": 0.05, "n2": 0.05}
    with pytest.raises(CalibrationError, match="gate_action: routing gates steer"):
        calibrate_gating(acts, list(ROUTES), HARMLESS, budgets, action="refuse", routes=ROUTES)
    with pytest.raises(CalibrationError, match=r"gate_route: .* overlap in \['poisoning'\]"):
        calibrate_gating(acts, list(ROUTES), HARMLESS, budgets, action="steer", routes={"poisoning": "Poisoning"})
    with pytest.raises(CalibrationError, match=r"gate_route: no activations for the routing source\(s\) \['x'\]"):
        calibrate_gating(acts, ["weapons-arms"], HARMLESS, budgets, action="steer", routes={"x": "X", "poisoning": "P"})
    one = {"poisoning": "Poisoning"}
    with pytest.raises(CalibrationError, match="gate_route: 1 categories: routing needs 2 to 15"):
        calibrate_gating(acts, list(one), HARMLESS, budgets, action="steer", routes=one)


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
    with pytest.raises(
        CalibrationError, match=r"gate_route: 1 categories to route \(\['Poisoning'\]\): routing needs 2"
    ):
        load_route_sources([str(harmful_file)], [str(harmless_file)], ["Poisoning", "Other", "generic"])


def test_load_route_sources_from_other_sets_takes_the_routed_prompts_out_of_the_deciding_sources(tmp_path):
    harmful_file, harmless_file = _write_sets(tmp_path)
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"instruction": f"do harm number {i}"}) + "\n" for i in range(9)))
    harmful, harmless = [str(harmful_file), str(other)], [str(harmless_file)]
    sources, routes = load_route_sources(
        harmful, harmless, list(CATEGORIES), n=20, seed=1, route_from=[str(harmful_file)], route_n=10
    )
    assert [s.name for s in sources] == ["labelled", "other", *routes, "plain"]
    by_name = {s.name: [*s.fit, *s.select, *s.test] for s in sources}
    routed = {p.text for name in routes for p in by_name[name]}
    assert all(len(by_name[name]) == 10 for name in routes), "route_n counts per category"
    assert len(by_name["labelled"]) == 15 and not routed & {p.text for p in by_name["labelled"]}, (
        "the deciding source holds the 5 per category the router does not use, no more"
    )
    assert len(by_name["other"]) == 9 and len(by_name["plain"]) == 20, "n counts per deciding/harmless source"
    with pytest.raises(CalibrationError, match=r"gate_harmful: .*labelled.csv: 0 prompt\(s\) left once the 45"):
        load_route_sources(harmful, harmless, list(CATEGORIES), route_from=[str(harmful_file)])
    with pytest.raises(CalibrationError, match="gate_route_from: no category of the profile"):
        load_route_sources(harmful, harmless, list(CATEGORIES), route_from=[str(other)])


@pytest.mark.parametrize("name", ["smollm2-refusal-gated", "smollm2-category-routed"])
def test_recorded_sources_split_the_shipped_profiles_as_their_calibration_did(name):
    """What the benchmarks rerun (gate_rates.py, gate_tradeoff.py): the same sources, split as recorded."""
    spec = load_profile(REPO / "profiles" / name).spec
    record = spec.calibration["gating"]
    sources, routes = recorded_sources(spec)
    sizes = {s.name: {"fit": len(s.fit), "select": len(s.select), "test": len(s.test)} for s in sources}
    assert sizes == record["sizes"]
    assert routes == record.get("routes", {})
    routed = {p.text for s in sources if s.name in routes for p in (*s.fit, *s.select, *s.test)}
    deciding = {p.text for s in sources if s.harmful and s.name not in routes for p in (*s.fit, *s.select, *s.test)}
    assert not routed & deciding, "no routed prompt among the deciding gates' prompts"
    first = recorded_sources(spec, n=5)[0]
    assert all(len(s.fit) + len(s.select) + len(s.test) == 5 for s in first)
    with pytest.raises(CalibrationError, match="profile: profile 'smollm2-probe' has no calibrated gates"):
        recorded_sources(load_profile(REPO / "profiles" / "smollm2-probe").spec)


def saved_layer(profile_dir) -> int:
    return json.loads((profile_dir / "report" / "gate.json").read_text())["router"]["layer"]


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
    gate += ["--gate-probe-c", "1", "--gate-fpr", "0.1", "--gate-split", "0.4,0.3,0.3"]
    result = _invoke([*base, "--gate", "--gate-route", *gate])
    assert result.exit_code == 0, result.output
    assert "routing per category" in result.output

    profile = load_profile(out)
    gating = profile.spec.gating
    assert gating is not None and gating.action == "steer"
    assert gating.routes == tuple(sorted(CATEGORIES)), "every category but generic gets its gate"
    assert [g.name for g in gating.deciding] == ["harmful"]
    assert {g.name: g.category for g in gating.gates} == {
        "harmful": None,
        "weapons-arms": "Weapons/Arms",
        "cyber-crime": "Cyber Crime",
        "poisoning": "Poisoning",
    }
    assert set(profile.gate_vectors) == {g.name for g in gating.gates}
    record = profile.spec.calibration["gating"]
    assert record["routes"] == {g.name: g.category for g in gating.gates if g.category}
    assert set(record["test_routing"]) == set(CATEGORIES)
    assert record["router_layer"] == saved_layer(out)
    assert record["split"]["n_per_category"] == 15

    report = out / "report"
    saved = json.loads((report / "gate.json").read_text())
    test = saved["routing"]["test"]
    for category in CATEGORIES:
        assert test["per_category"][category]["n"] == 5
        row = test["per_category"][category]
        assert row["route_accuracy"] >= 0.8, test["confusion"]
        assert row["accuracy"] <= min(row["recall"], row["route_accuracy"]), row
    assert test["route_accuracy_mean"] >= 0.9 and test["recall_mean"] >= 0.5, test
    assert set(test["false_positive_rate"]) == {"plain"}
    md = (report / "gate.md").read_text()
    assert "## Routing (test part)" in md and "**gated and routed to it**" in md and "Routing accuracy per layer" in md
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

    # --gate-route-from: the router from 10 prompts per category, the deciding gate from the 5 others
    split = ["--gate-split", "0.4,0.3,0.3", "--gate-fpr", "0.1", "--gate-probe-c", "none"]
    sources = ["--gate-harmful", str(harmful_file), "--gate-harmless", str(harmless_file), *split]
    apart = _invoke([*into, *sources, "--gate-route-from", str(harmful_file), "--gate-route-n", "10"])
    assert apart.exit_code == 0, apart.output
    record = load_profile(out).spec.calibration["gating"]
    assert record["route_sets"] == [str(harmful_file)]
    assert record["sources"]["harmful"] == ["labelled"] and record["sources"]["routing"] == list(record["routes"])
    assert record["sizes"]["labelled"] == {"fit": 6, "select": 4, "test": 5}
    assert all(sum(record["sizes"][r].values()) == 10 for r in record["routes"])
    assert record["split"]["n_per_category"] == 10


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
    usage_error(["--method", "category", *out, *sets, "--gate", "--gate-route-from", "catqa"], "--gate-route-from",
                "needs --gate-route")  # fmt: skip
    usage_error(
        ["--method", "category", *out, *sets, "--gate", "--gate-route", "--gate-route-n", "5"],
        "--gate-route-n",
        "counts the prompts of --gate-route-from",
    )
    usage_error(
        ["--method", "category", *out, *sets, "--gate", "--gate-route", *gate, "--gate-route-from", str(harmless_file)],
        "--gate-route-from",
        "no category",
    )
    assert not (tmp_path / "x").exists(), "nothing ran"
