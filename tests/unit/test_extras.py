"""Calibration and evaluation dependencies are extras: without one, the product says which extra to install,
and the commands say it before a long run rather than at its end."""

from __future__ import annotations

import sys

import pytest
import torch
from typer.testing import CliRunner

from vllm_steer.calibration import pipeline
from vllm_steer.calibration.stats import fit_probe
from vllm_steer.cli import app
from vllm_steer.core.extras import MissingExtraError, require
from vllm_steer.evaluation import runner
from vllm_steer.evaluation.plotting import pyplot

CALIBRATE_HINT = "pip install 'vllm-steer[calibrate]'"


def _never(*args: object, **kwargs: object) -> None:
    raise AssertionError("the command should have stopped before starting its run")


def _output(result) -> str:
    return " ".join(result.output.split())  # the console wraps long lines


def test_require_returns_the_module_when_installed():
    assert require("json", "eval", "this test") is sys.modules["json"]


def test_require_names_the_extra_when_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(MissingExtraError) as err:
        require("sklearn", "calibrate", "the probe method")
    assert isinstance(err.value, ImportError)
    assert str(err.value) == f"the probe method needs sklearn: {CALIBRATE_HINT}"
    assert err.value.name == "sklearn"


def test_fit_probe_without_sklearn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    x = torch.randn(4, 8)
    with pytest.raises(MissingExtraError, match=r"needs sklearn: pip install 'vllm-steer\[calibrate\]'"):
        fit_probe(x, -x, torch.empty(0), torch.empty(0))


def test_plots_without_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingExtraError, match=r"needs matplotlib: pip install 'vllm-steer\[eval\]'"):
        pyplot()


@pytest.mark.parametrize(
    ("missing", "args"),
    [
        ("sklearn", ["--method", "probe", "--no-report"]),
        ("matplotlib", ["--method", "selective", "--report"]),
    ],
)
def test_calibrate_stops_before_the_run(monkeypatch, tmp_path, missing, args):
    monkeypatch.setitem(sys.modules, missing, None)
    monkeypatch.setattr(pipeline, "calibrate_profile", _never)
    result = CliRunner().invoke(app, ["calibrate", str(tmp_path / "model"), "--out", str(tmp_path / "p"), *args])
    assert result.exit_code == 1, result.output
    assert f"needs {missing}: {CALIBRATE_HINT}" in _output(result)


def test_calibrate_without_report_needs_no_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)

    def stop(*args: object, **kwargs: object) -> None:
        raise pipeline.CalibrationError("model", "stopped by the test")

    monkeypatch.setattr(pipeline, "calibrate_profile", stop)
    result = CliRunner().invoke(
        app,
        ["calibrate", str(tmp_path / "model"), "--out", str(tmp_path / "p"), "--method", "selective", "--no-report"],
    )
    assert result.exit_code == 1, result.output
    assert "stopped by the test" in _output(result)  # reached the run: nothing asked for matplotlib


def test_eval_stops_before_the_run(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(runner, "run_eval", _never)
    result = CliRunner().invoke(app, ["eval", "--profile", "p", "--profiles", str(tmp_path), "--out", str(tmp_path)])
    assert result.exit_code == 1, result.output
    assert "needs matplotlib: pip install 'vllm-steer[eval]'" in _output(result)
