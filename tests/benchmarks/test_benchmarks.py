"""Benchmarks are not tests; these smoke runs only keep the scripts from rotting (no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from support import REPO
from vllm_steer.testing.engines import record_engine_start

BENCH = REPO / "benchmarks"


def _engine_bench(script: str, args: list[str], out, key: str) -> dict:
    """Run one benchmark script that starts an engine (a small KV cache, its start recorded) and return the JSON
    it wrote to ``out``."""
    record_engine_start(key)
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(out.read_text())


def test_op_cost_runs_on_a_minimal_setting(tmp_path):
    out = tmp_path / "op.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "op_cost.py"),
            "--tokens",
            "8",
            "--hidden",
            "64",
            "--slots",
            "4",
            "--reps",
            "2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [r["K"] for r in result["rows"]] == [1, 4]  # K capped at the slots allocated
    assert all(r[k] > 0 for r in result["rows"] for k in ("op_ms", "floor_ms", "layer_ms", "vs_floor", "vs_layer"))
    assert result["meta"]["cuda_graphs"] is False and "| op / floor |" in proc.stdout


def test_op_cost_fused_column(tmp_path):
    out = tmp_path / "op.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "op_cost.py"),
            "--tokens",
            "8",
            "--hidden",
            "64",
            "--slots",
            "2",
            "--ks",
            "1",
            "--reps",
            "2",
            "--fused",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["compiled_ms"] > 0 and row["compiled_vs_floor"] > 0 and "| compiled / floor |" in proc.stdout
    assert "triton_ms" not in row  # CPU: no Triton column


def test_step_overhead_runs_on_a_minimal_setting(tmp_path):
    out = tmp_path / "step.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "step_overhead.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    scenarios = {r["scenario"] for r in result["rows"]}
    assert scenarios == {"plugin-idle", "all:selective", "all:ablation", "mixed:8"}
    assert all(r["ratio_median"] > 0 and r["sites_hooked"] > 0 for r in result["rows"])
    assert "| plugin-idle |" in proc.stdout


@pytest.mark.engine
@pytest.mark.exhaustive  # make test-exhaustive: an engine start each, scripts the benchmark results come from
def test_throughput_runs_on_a_minimal_setting(tmp_path):
    out = tmp_path / "tp.json"
    result = _engine_bench("throughput.py", ["--smoke"], out, "bench:throughput")
    runs = result["runs"]["eager"]
    assert {"unsteered", "plugin-idle", "all:selective", "mixed:1", "mixed:2"} <= set(runs)
    assert all(r["tokens"] == 4 * 4 for r in runs.values()), "every scenario generates the same tokens"
    assert set(result["hf"]) == {"hf:1", "hf:2"} and result["hf"]["hf:2"]["batches"] == 3
    assert out.with_suffix(".md").read_text().count("|") > 10 and out.with_suffix(".png").stat().st_size > 1000


@pytest.mark.engine
def test_load_runs_on_a_minimal_setting(tmp_path, tiny_root):
    import yaml

    from vllm_steer.server.tenants import hash_api_key

    keys = {
        "strict": "load-strict-0123456789",
        "standard": "load-standard-0123456789",
        "research": "load-research-0123456789",
    }
    tiers = {
        # raw prompts (the `completions` control) so the load test counts exact prompt tokens
        "strict": {"forced": {"profile": "tiny-selective", "angle": 120.0}, "allow_controls": ["completions"]},
        "standard": {
            "default": {"profile": "tiny-addition", "scale": 3.0},
            "allow_unsteered": False,
            "profiles": {"tiny-addition": {"scale": [-2.0, 3.0]}},
            "allow_controls": ["completions"],
        },
        "research": {"profiles": "*", "allow_unsteered": True},
    }
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(
        yaml.safe_dump(
            {
                "format_version": 1,
                "tiers": tiers,
                "tenants": [
                    {"name": f"load-{tier}", "tier": tier, "key_hash": hash_api_key(key)} for tier, key in keys.items()
                ],
            }
        )
    )
    mix = [
        {"tier": "research", "key": keys["research"], "xargs": {"steer_profile": "none"}},
        {"tier": "strict", "key": keys["strict"], "xargs": None},
        {"tier": "standard", "key": keys["standard"], "xargs": None},
        {"tier": "standard", "key": keys["standard"], "xargs": {"steer_profile": "tiny-addition", "steer_scale": -2.0}},
    ]
    out = tmp_path / "load.json"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    record_engine_start("bench:load")
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "load.py"),
            "--smoke",
            "--model",
            str(tiny_root / "model"),
            "--profiles",
            str(tiny_root / "profiles"),
            "--tenants",
            str(tenants),
            "--api",
            "completions",
            "--mix",
            json.dumps(mix),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["sweeps"]) == {"mix", "unsteered"} and set(result["ratios"]) == {"1", "2"}
    for levels in result["sweeps"].values():
        assert set(levels) == {"1", "2"}
        for level in levels.values():
            assert level["statuses"] == {"200": 4} and level["server_errors_5xx"] == 0 and level["stream_errors"] == 0
            assert level["output_tokens"] == 4 * 4 and level["usage_missing"] == 0, "tokens come from the usage chunk"
    assert result["server_errors_5xx"] == 0
    assert {e["tier"] for e in result["mix"]} == {"research", "strict", "standard"}
    assert not any(key in out.read_text() for key in keys.values()), "API keys never reach the results"
    assert out.with_suffix(".md").read_text().count("|") > 10 and out.with_suffix(".png").stat().st_size > 1000


@pytest.mark.engine
@pytest.mark.exhaustive  # make test-exhaustive: an engine start each, scripts the benchmark results come from
def test_batch1_latency_runs_on_a_minimal_setting(tmp_path, tiny_root):
    out = tmp_path / "b1.json"
    settings = {"unsteered": None, "selective": {"steer_profile": "tiny-selective", "steer_angle": 90.0}}
    model, profiles = str(tiny_root / "model"), str(tiny_root / "profiles")
    args = ["--model", model, "--profiles", profiles, "--settings", json.dumps(settings), "--reps", "2"]
    result = _engine_bench("batch1_latency.py", [*args, "--max-tokens", "4"], out, "bench:batch1-latency")
    assert [r["setting"] for r in result["rows"]] == ["unsteered", "selective"]
    assert all(len(v) == 2 for v in result["samples_ms"].values())
    assert result["rows"][0]["ratio_to_unsteered_median"] == 1.0


@pytest.mark.engine
@pytest.mark.exhaustive  # make test-exhaustive: an engine start each, scripts the benchmark results come from
def test_plugin_overhead_runs_on_a_minimal_setting(tmp_path):
    out = tmp_path / "overhead.json"
    result = _engine_bench("plugin_overhead.py", ["--smoke"], out, "bench:plugin-overhead")
    assert len(result["runs"]) == 2 and all(
        set(r) == {"unsteered", "plugin-idle", "all:selective", "mixed:8-selective", "all:ablation", "mixed:8"}
        for r in result["runs"]
    )
    assert all(r[name]["tokens"] == 4 * 4 for r in result["runs"] for name in r)
    assert result["summary"]["plugin-idle"]["min_ratio"] > 0


def test_gate_overhead_runs_on_a_minimal_setting(tmp_path):
    out = tmp_path / "gates.json"
    result = _engine_bench("gate_overhead.py", ["--smoke"], out, "bench:gate-overhead")
    (rep,) = result["reps"]
    assert set(rep) == {"ungated", "gated:fires", "gated:never", "category", "routed:fires"}
    assert all(run["tokens"] == 4 * 4 for run in rep.values())
    assert result["summary"]["ungated"]["median_ratio"] == 1.0 and result["never_fired_rows_stable"]
    assert result["summary"]["routed:fires"]["baseline"] == "category"


def test_gate_overhead_runs_the_chosen_scenarios_with_their_baselines():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gate_overhead", BENCH / "gate_overhead.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.scenario_names(None) == list(module.SCENARIOS)
    assert module.scenario_names("routed:fires") == ["category", "routed:fires"]
    assert module.scenario_names("gated:never, category") == ["ungated", "gated:never", "category"]
    with pytest.raises(SystemExit, match="--scenarios: unknown \\['routed'\\]"):
        module.scenario_names("routed")


@pytest.mark.engine
@pytest.mark.exhaustive  # make test-exhaustive: an engine start, the script the routing rates come from
def test_gate_rates_reads_back_routing_decisions_and_categories(tmp_path):
    out = tmp_path / "rates.json"
    profile = REPO / "profiles" / "smollm2-category-routed"
    result = _engine_bench("gate_rates.py", ["--profile", str(profile), "--n", "4"], out, "bench:gate-rates")
    assert result["rows"] == 17, "4 prompts per source (2 fit, 1 select, 1 test) of 17 sources"
    assert set(result["engine_routed_to_own"]) == set(result["calibration_routed_to_own"])
    assert all(0.0 <= v <= 1.0 for v in result["engine_routed_to_own"].values())


def test_gate_tradeoff_reproduces_the_shipped_gates_test_rates(tmp_path):
    """The shipped harm gate on its own XSTest test parts: the rates the README and report/gate.md give."""
    out = tmp_path / "tradeoff.json"
    command = [sys.executable, str(BENCH / "gate_tradeoff.py"), "--sources", "xstest-unsafe,xstest-safe"]
    proc = subprocess.run(
        [*command, "--recalls", "0.95", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    shipped, point = result["points"]
    assert result["sizes"] == {"xstest-unsafe": 60, "xstest-safe": 75}
    assert (round(shipped["xstest-unsafe"], 3), round(shipped["xstest-safe"], 3)) == (0.717, 0.08)
    assert point["xstest-unsafe"] >= 0.95 - 1e-6 and point["threshold"] < shipped["threshold"]
