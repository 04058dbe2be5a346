"""docs/methods.md is in the repo, every `§` the code cites exists there, and its lists match the code."""

from __future__ import annotations

import re
from pathlib import Path

from vllm_steer.core.methods import METHODS
from vllm_steer.core.ops import Method
from vllm_steer.evaluation.metrics import PERPLEXITY_VIOLATION, REFUSAL_SUBSTRINGS

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "methods.md"
CITING = ["vllm_steer", "tests", "benchmarks", "docs", "profiles", "deploy", "README.md"]
_TEXT = {".py", ".md", ".sh", ".yaml", ".yml", ".toml"}
_SKIP = {".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis"}

_NUMBER = r"\d+(?:\.\d+)?"
_CITE = re.compile(rf"§\s?({_NUMBER})(?:\s*[–-]\s*({_NUMBER}))?")
_ROWS = re.compile(r"§4,?\s+rows?\s+(\d+(?:\s*[–,-]\s*\d+)*)")


def _sections(doc: str) -> set[str]:
    """Section numbers of the doc's headings: ``## 2. Calibration`` → 2, ``### 2.4 ...`` → 2.4."""
    return {m.group(1) for m in re.finditer(rf"^#{{2,3}} ({_NUMBER})\.? ", doc, flags=re.M)}


def _section_text(doc: str, number: str) -> str:
    start = re.search(rf"^#{{2,3}} {re.escape(number)}\.? .*$", doc, flags=re.M)
    assert start, f"§{number} missing"
    end = re.search(r"^#{2,3} ", doc[start.end() :], flags=re.M)
    return doc[start.end() : start.end() + end.start()] if end else doc[start.end() :]


def _table_rows(doc: str) -> set[int]:
    return {int(m.group(1)) for m in re.finditer(r"^\| (\d+) \|", _section_text(doc, "4"), flags=re.M)}


def _expand(spec: str) -> list[int]:
    out: list[int] = []
    for part in re.split(r"\s*,\s*", spec.strip()):  # "1–5, 8–13, 16"
        bounds = re.split(r"\s*[–-]\s*", part)
        out += range(int(bounds[0]), int(bounds[-1]) + 1)
    return out


def _unresolved(doc: str, texts: dict[str, str]) -> list[str]:
    """Every `§N.M` (and `§4 rows ...`) in ``texts`` that ``doc`` does not have."""
    sections, rows = _sections(doc), _table_rows(doc)
    bad = []
    for name, text in texts.items():
        for m in _CITE.finditer(text):
            bad += [f"{name}: §{n}" for n in m.groups() if n and n.rstrip(".") not in sections]
        for m in _ROWS.finditer(text):
            bad += [f"{name}: §4 row {r}" for r in _expand(m.group(1)) if r not in rows]
    return bad


def _citing_texts() -> dict[str, str]:
    texts = {}
    for part in CITING:
        top = REPO / part
        for path in [top] if top.is_file() else top.rglob("*"):
            rel = path.relative_to(REPO)
            if path == DOC or not path.is_file() or path.suffix not in _TEXT or _SKIP & set(rel.parts):
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            if "§" in text:
                texts[str(rel)] = text
    return texts


def test_every_cited_section_and_row_exists():
    texts = _citing_texts()
    assert any("docs/methods.md" in t for t in texts.values()), "the code cites the reference"
    assert _unresolved(DOC.read_text(encoding="utf-8"), texts) == []


def test_an_unknown_citation_is_reported():
    doc = "## 1. A\n\n### 1.1 B\n\n## 4. Rows\n\n| # | x |\n| --- | --- |\n| 1 | a |\n| 2 | b |\n"
    cited = {"x.py": "see docs/methods.md §1.1 and §1, §4 rows 1–2, §1.2–1.3; §4 row 7; §2"}
    assert _unresolved(doc, cited) == ["x.py: §1.2", "x.py: §1.3", "x.py: §2", "x.py: §4 row 7"]


def test_every_method_has_its_section():
    headings = "\n".join(re.findall(r"^### 3\.\d+ .*$", DOC.read_text(encoding="utf-8"), flags=re.M))
    assert [name for name in METHODS if f"(`{name}`)" not in headings] == []


def test_op_codes_match_the_batched_op():
    listed = re.findall(r"^\| `(\w+)` \((\d+)\) \|", _section_text(DOC.read_text(encoding="utf-8"), "1.4"), flags=re.M)
    assert {name: int(code) for name, code in listed} == {m.name: int(m) for m in Method}


def test_refusal_substrings_and_violation_threshold_match_the_metrics():
    section = _section_text(DOC.read_text(encoding="utf-8"), "5.2")
    block = re.search(r"```\n(.*?)```", section, flags=re.S)
    assert block, "§5.2 lists the substrings in a code block"
    listed = tuple(s.strip() for s in block.group(1).replace("\n", " ").split("·"))
    assert listed == REFUSAL_SUBSTRINGS
    assert f"exceeds **{PERPLEXITY_VIOLATION}**" in _section_text(DOC.read_text(encoding="utf-8"), "5.3")


def test_the_tests_section_4_names_exist():
    named = set(re.findall(r"`(?:[\w/]+\.py::)?(test_\w+)`", _section_text(DOC.read_text(encoding="utf-8"), "4")))
    assert len(named) > 20
    defined = set()
    for path in (REPO / "tests").rglob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)\(", path.read_text(encoding="utf-8"), flags=re.M))
    assert sorted(named - defined) == []
