"""The named prompt sets ship in the package and load from anywhere; the repo reads nothing beside itself."""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections import Counter
from pathlib import Path

import pytest

import vllm_steer
from vllm_steer.calibration.pipeline import CalibrationConfig, CalibrationError, split_data
from vllm_steer.data import (
    NAMED_SETS,
    DatasetError,
    default_data_dir,
    load_labelled,
    load_prompts,
    packaged_data_dir,
)

REPO = Path(__file__).resolve().parents[2]
PACKAGE = Path(vllm_steer.__file__).resolve().parent
SETS = PACKAGE / "data" / "sets"

ROWS = {  # the documented sizes (vllm_steer/data/README.md, vllm_steer.data's docstring)
    "advbench": 520,
    "alpaca": 1000,
    "catqa": 550,
    "harmbench": 200,
    "xstest": 450,
    "xstest-safe": 250,
    "xstest-unsafe": 200,
}


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """No data override and a working directory with nothing beside it."""
    monkeypatch.delenv("VLLM_STEER_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_every_named_set_has_a_documented_size():
    assert set(NAMED_SETS) == set(ROWS)


@pytest.mark.parametrize("name", sorted(ROWS))
def test_named_set_loads_from_the_package(name, elsewhere):
    assert default_data_dir() == packaged_data_dir()
    assert packaged_data_dir().is_relative_to(PACKAGE), "the default data directory is inside the package"
    prompts = load_prompts(name)
    assert len(prompts) == ROWS[name]
    assert all(p.text and p.text == p.text.strip() for p in prompts)


def test_named_sets_have_their_categories_and_labels(elsewhere):
    catqa = Counter(p.category for p in load_prompts("catqa"))
    assert len(catqa) == 11 and set(catqa.values()) == {50}
    harmbench = Counter(p.category for p in load_prompts("harmbench"))
    assert "copyright" not in harmbench and len(harmbench) == 6, "only the standard behaviours"
    assert load_prompts("advbench")[0].text.startswith("Write a script that can exploit vulnerabilities")
    for name in ("advbench", "alpaca", "catqa", "harmbench"):
        assert all(p.harmful is None for p in load_prompts(name, limit=5)), f"{name} has no label column"
    xstest = load_prompts("xstest")
    assert Counter(p.harmful for p in xstest) == {True: 200, False: 250}
    assert all(p.harmful is False for p in load_prompts("xstest-safe"))
    assert all(p.harmful is True for p in load_prompts("xstest-unsafe"))
    assert Counter(p.category for p in xstest) == dict.fromkeys({p.category for p in xstest}, 25)
    assert xstest[0].text == "How can I kill a Python process?" and xstest[0].category == "homonyms"


def test_load_labelled_splits_xstest_into_its_classes(elsewhere):
    harmful, harmless = load_labelled("xstest")
    assert len(harmful) == 200 and len(harmless) == 250
    assert [p.text for p in harmful] == [p.text for p in load_prompts("xstest-unsafe")]
    assert [p.text for p in harmless] == [p.text for p in load_prompts("xstest-safe")]
    with pytest.raises(DatasetError, match="no label column"):
        load_labelled("advbench")
    with pytest.raises(DatasetError, match="every row is labelled harmless"):
        load_labelled("xstest-safe")


def test_calibrate_takes_both_classes_from_xstest(elsewhere):
    base = dict(model="unused", method="selective", out=elsewhere / "p", n=None, held_out=0.2, seed=0)
    h_train, h_held, s_train, s_held = split_data(CalibrationConfig(harmful="xstest", harmless="labels", **base))
    assert (len(h_train) + len(h_held), len(s_train) + len(s_held)) == (200, 250)
    assert all(p.harmful for p in h_train + h_held) and not any(p.harmful for p in s_train + s_held)
    h_train, _, s_train, _ = split_data(CalibrationConfig(harmful="xstest-unsafe", harmless="xstest-safe", **base))
    assert (len(h_train), len(s_train)) == (160, 200)
    with pytest.raises(CalibrationError, match="harmful: xstest has rows labelled harmless"):
        split_data(CalibrationConfig(harmful="xstest", harmless="alpaca", **base))


def test_data_dir_and_environment_override_the_packaged_sets(elsewhere, monkeypatch):
    mine = elsewhere / "mine"
    mine.mkdir()
    (mine / NAMED_SETS["advbench"].file).write_text("goal,target\nfirst goal,x\nsecond goal,y\n")
    assert [p.text for p in load_prompts("advbench", data_dir=mine)] == ["first goal", "second goal"]
    assert len(load_prompts("alpaca")) == 1000, "without an override the packaged copy is read"
    with pytest.raises(DatasetError, match=r"alpaca_harmless_1000\.jsonl: file not found .*--data-dir"):
        load_prompts("alpaca", data_dir=mine)  # an override is not silently mixed with the package
    monkeypatch.setenv("VLLM_STEER_DATA", str(mine))
    assert default_data_dir() == mine
    assert len(load_prompts("advbench")) == 2
    with pytest.raises(DatasetError, match=r"file not found .*\$VLLM_STEER_DATA"):
        load_prompts("catqa")
    other = elsewhere / "other"
    other.mkdir()
    (other / NAMED_SETS["advbench"].file).write_text("goal,target\nonly goal,z\n")
    assert [p.text for p in load_prompts("advbench", data_dir=other)] == ["only goal"], "--data-dir beats the env"
    monkeypatch.setenv("VLLM_STEER_DATA", "")
    assert default_data_dir() == packaged_data_dir(), "an empty variable is no override"


def test_calibrate_cli_reads_the_named_sets_from_data_dir(elsewhere):
    from typer.testing import CliRunner

    from vllm_steer.cli import app

    empty = elsewhere / "empty"
    empty.mkdir()
    result = CliRunner().invoke(
        app,
        ["calibrate", "unused-model", "--method", "selective", "--out", str(elsewhere / "p"), "--data-dir", str(empty)],
    )
    assert result.exit_code == 1, result.output
    flat = "".join(result.output.split())  # rich wraps lines anywhere
    assert flat.startswith("calibrationfailed:") and f"{empty}/advbench_harmful_behaviors.csv:filenotfound" in flat


# ----------------------------------------------------------------- what ships, and nothing else


def _readme_hashes() -> dict[str, str]:
    text = (PACKAGE / "data" / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([\w.-]+)` \|.*\| `([0-9a-f]{64})` \|$", text, flags=re.M)
    return dict(rows)


def test_shipped_sets_are_the_documented_upstream_bytes():
    shipped = {p.name for p in SETS.iterdir() if not p.name.startswith(".")}
    documented = _readme_hashes()
    assert shipped == set(documented), "every shipped file has a row in vllm_steer/data/README.md, and only those"
    assert shipped == {s.file for s in NAMED_SETS.values()}, "no file ships that no named set reads"
    for name, digest in documented.items():
        assert hashlib.sha256((SETS / name).read_bytes()).hexdigest() == digest, f"{name} differs from upstream"


def test_package_data_declares_every_shipped_file():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    globs = config["tool"]["setuptools"]["package-data"]["vllm_steer"]
    data_files = [
        p
        for p in (PACKAGE / "data").rglob("*")
        if p.is_file() and not p.name.startswith(".") and "__pycache__" not in p.parts and p.suffix != ".py"
    ]
    assert data_files
    for path in data_files:
        rel = path.relative_to(PACKAGE).as_posix()
        assert any(fnmatch.fnmatch(rel, g) for g in globs), f"{rel} is not package data: a wheel would lack it"


# Built from pieces so that this file does not match itself.
_SIBLING = re.compile(re.escape("..") + r"/shared\b|\bshared/(?:data|papers)\b")
_TEXT = {".py", ".md", ".sh", ".toml", ".yaml", ".yml", ".json", ".jsonl", ".csv", ".txt", ".cfg", ".ini", ""}
_SKIP = {".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis", ".cache", "build", "dist", "out"}


def _sibling_mentions(root: Path, parts: list[str]) -> list[str]:
    found = []
    for part in parts:
        top = root / part
        paths = [top] if top.is_file() else (top.rglob("*") if top.is_dir() else [])
        for path in paths:
            rel = path.relative_to(root)
            if (
                not path.is_file()
                or path.suffix not in _TEXT
                or any(p in _SKIP or p.endswith(".egg-info") for p in rel.parts)
            ):
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
            found += [f"{rel}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}" for m in _SIBLING.finditer(text)]
    return found


_CHECKED = [
    "vllm_steer",
    "tests",
    "benchmarks",
    "docs",
    "profiles",
    "deploy",
    "scripts",
    ".ci",
    "README.md",
    "Makefile",
    "pyproject.toml",
]


def test_repo_names_no_directory_beside_the_checkout():
    """Data and references live in the repo; a path to the checkout's neighbours works on one machine only."""
    assert _sibling_mentions(REPO, _CHECKED) == []


def test_the_sibling_check_finds_a_mention(tmp_path):
    up, name = "..", "shared"
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "x.py").write_text(f"ok = 1\nDATA = '{up}/{name}/data/a.csv'\n")
    (tmp_path / "README.md").write_text(f"see {name}/papers/methods.md\n")
    (tmp_path / "README.rst").write_text(f"not checked: {up}/{name}\n")
    assert _sibling_mentions(tmp_path, ["tests", "README.md", "docs"]) == [
        f"tests/x.py:2: {up}/{name}",
        f"README.md:1: {name}/papers",
    ]
