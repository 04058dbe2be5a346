"""Write ``report.md`` for a ``benchmarks/gpu_e2e.sh`` run: one file with every step, its status and numbers.

    python benchmarks/gpu_e2e_report.py REPORT_DIR

Reads what gpu_e2e.sh left in REPORT_DIR — ``steps.tsv`` (one line per step: id, title, status, exit
status, seconds, log, note, command), ``env.json`` (the machine and versions), the pytest steps' JUnit XML
(``<step>.xml``) and the benchmarks' JSON — and writes ``REPORT_DIR/report.md``. Standard library only.
A file that is missing (a step that timed out, was not selected, or failed before writing) is reported as
missing, never an error here.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

FIELDS = ("id", "title", "status", "rc", "seconds", "log", "note", "command")
FAMILY_ORDER = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "mixtral", "qwen3_moe", "olmoe")
# test_engine.py: the Llama proof, by mode
LLAMA_EAGER = ("test_eager_unsteered_rows_bit_equal_plugin_not_loaded", "test_eager_steered_rows_match_hf_reference")
LLAMA_COMPILED = (
    "test_compiled_unsteered_rows_bit_equal_plugin_not_loaded",
    "test_compiled_steered_rows_match_hf_reference",
)
LLAMA_FUSED = ("test_fused_op_inside_the_compiled_engine",)


def _steps(out: Path) -> list[dict]:
    path = out / "steps.tsv"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            values = line.split("\t")
            rows.append(dict(zip(FIELDS, values + [""] * (len(FIELDS) - len(values)), strict=True)))
    return rows


def _junit(path: Path) -> dict | None:
    """{"counts": {...}, "cases": {(file, name): (outcome, message)}} of one pytest run, or None."""
    if not path.exists():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return None
    cases: dict[tuple[str, str], tuple[str, str]] = {}
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for case in root.iter("testcase"):
        module = (case.get("classname") or "").split(".")
        file = next((part for part in reversed(module) if part.startswith("test_")), module[-1])
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            child = case.find(tag)
            if child is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (child.get("message") or (child.text or "")).strip().splitlines()
                message = message[0][:240] if message else ""
                break
        counts[outcome] += 1
        cases[(file, case.get("name") or "?")] = (outcome, message)
    return {"counts": counts, "cases": cases}


def _fmt_seconds(value: str) -> str:
    try:
        s = int(float(value))
    except ValueError:
        return "–"
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


def _outcome(cases: dict, file: str, names) -> str:
    found = [cases.get((file, name)) for name in names]
    if not any(found):
        return "not run"
    if any(f is None for f in found):
        return "partial"
    outcomes = {f[0] for f in found if f}
    if outcomes == {"passed"}:
        return "pass"
    if outcomes <= {"skipped"}:
        return "skipped"
    return "FAIL"


def _family_table(junits: dict) -> list[str]:
    engine = (junits.get("engine-llama") or {}).get("cases", {})
    families = (junits.get("engine-families") or {}).get("cases", {})
    if not engine and not families:
        return ["(neither mixed-batch step left results)"]
    names = {name.split("[", 1)[1].rstrip("]") for (_, name) in families if "[" in name}
    order = [f for f in FAMILY_ORDER if f in names] + sorted(names - set(FAMILY_ORDER))
    lines = [
        "| family (tiny random model) | eager (`enforce_eager`) | compiled (torch.compile + CUDA graphs) |",
        "|---|---|---|",
    ]
    if engine:
        eager = _outcome(engine, "test_engine", LLAMA_EAGER)
        compiled = _outcome(engine, "test_engine", LLAMA_COMPILED)
        fused = _outcome(engine, "test_engine", LLAMA_FUSED)
        lines.append(f"| llama (`test_engine.py`) | {eager} | {compiled}; fused op `compiled` variant: {fused} |")
    for fam in order:
        eager = _outcome(families, "test_families", [f"test_family_mixed_batch[{fam}]"])
        compiled = _outcome(families, "test_families", [f"test_family_mixed_batch_compiled[{fam}]"])
        lines.append(f"| {fam} | {eager} | {'not parametrized' if compiled == 'not run' else compiled} |")
    refused = _outcome(families, "test_families", ["test_an_architecture_outside_the_table_stops_the_engine_naming_it"])
    lines.append(f"| olmo2 (outside the table: must be refused at start) | {refused} | |")
    return lines


def _throughput(out: Path) -> list[str]:
    path = out / "throughput_cuda.json"
    if not path.exists():
        return ["`throughput_cuda.json` missing (the step failed or did not run; see its log)."]
    result = json.loads(path.read_text())
    lines = [f"Batch {result['batch']}, {result['max_tokens']} new tokens per row, model {Path(result['model']).name}."]
    for mode, runs in result.get("runs", {}).items():
        base = runs["unsteered"]["tok_s"]
        ratios = {name: r["tok_s"] / base for name, r in runs.items()}
        methods = [v for k, v in ratios.items() if k.startswith("all:")]
        mixed = {k: v for k, v in ratios.items() if k.startswith("mixed:")}
        lines.append(
            f"- {mode}: unsteered {base:.0f} tok/s; plugin idle {ratios.get('plugin-idle', float('nan')):.3f}; "
            + (f"every row one method {min(methods):.3f}–{max(methods):.3f}; " if methods else "")
            + ", ".join(f"{k} {v:.3f}" for k, v in mixed.items())
            + " (ratios to unsteered, single runs)"
        )
    table = path.with_suffix(".md")
    if table.exists():
        lines += ["", table.read_text().strip()]
    return lines


def _overhead(out: Path) -> list[str]:
    paths = sorted(out.glob("plugin_overhead_cuda_*.json"))
    if not paths:
        return ["`plugin_overhead_cuda_*.json` missing (the step failed or did not run; see its log)."]
    lines: list[str] = []
    for path in paths:
        result = json.loads(path.read_text())
        config, summary = result["config"], result["summary"]
        lines += [
            (
                f"{config['mode']}, batch {config['batch']}, {config['max_tokens']} new tokens, "
                f"{config['reps']} interleaved repetitions (`{path.name}`):"
            ),
            "",
            "| scenario | tok/s (median) | vs plugin off, same repetition: median (min–max) |",
            "|---|---|---|",
            f"| unsteered (plugin not loaded) | {summary['unsteered']['median_tok_s']:.1f} | 1 |",
        ]
        for name, s in summary.items():
            if name != "unsteered":
                lines.append(
                    f"| {name} | {s['median_tok_s']:.1f} | {s['median_ratio']:.3f} "
                    f"({s['min_ratio']:.3f}–{s['max_ratio']:.3f}) |"
                )
        lines.append("")
    return lines


def _environment(out: Path) -> list[str]:
    path = out / "env.json"
    if not path.exists():
        return ["(env.json missing)"]
    env = json.loads(path.read_text())
    lines = [f"- {key}: {value}" for key, value in env.items() if not isinstance(value, (dict, list))]
    for gpu in env.get("gpus", []):
        lines.append(f"- GPU: {gpu}")
    variables = env.get("env") or {}
    if variables:
        lines.append("- environment: " + ", ".join(f"`{k}={v}`" for k, v in sorted(variables.items())))
    return lines


def main(out: Path) -> int:
    steps = _steps(out)
    junits = {step["id"]: _junit(out / f"{step['id']}.xml") for step in steps}
    failed = [s for s in steps if s["status"] == "fail"]
    verdict = "**FAILED** (" + ", ".join(s["id"] for s in failed) + ")" if failed else "every step that ran passed"
    lines = [
        "# vllm-steer inside CUDA vLLM: end-to-end report",
        "",
        f"`bash benchmarks/gpu_e2e.sh` — report directory `{out}`. Result: {verdict}.",
        "",
        "## Machine",
        "",
        *_environment(out),
        "",
        "## Steps",
        "",
        "| step | what | status | duration | tests: passed / failed / errors / skipped | log |",
        "|---|---|---|---|---|---|",
    ]
    for s in steps:
        junit = junits.get(s["id"])
        counts = "{passed} / {failed} / {error} / {skipped}".format(**junit["counts"]) if junit else "–"
        status = {"pass": "pass", "fail": "**FAIL**", "skip": "not run"}.get(s["status"], s["status"])
        if s["status"] == "pass" and junit and junit["counts"]["passed"] == 0:
            status = "pass (every test skipped)"
        note = f" — {s['note']}" if s["note"] and s["note"] != "-" else ""
        log = f"`{Path(s['log']).name}`" if s["log"] and s["log"] != "-" else "–"
        took = _fmt_seconds(s["seconds"]) if s["rc"] not in ("", "-") else "–"
        lines.append(f"| {s['id']} | {s['title']}{note} | {status} | {took} | {counts} | {log} |")
    lines += ["", "Commands:", ""]
    lines += [f"- {s['id']}: `{s['command']}`" for s in steps if s["command"] and s["command"] != "-"]
    lines += ["", "## Mixed-batch equivalence per family (CUDA vLLM)", ""]
    lines += [
        (
            "Each cell: unsteered rows bit-equal to the plugin-off run and steered rows equal to the Hugging Face "
            "reference (`tests/engine/test_engine.py`, `tests/engine/test_families.py`)."
        ),
        "",
        *_family_table(junits),
    ]
    failures = [
        (step_id, file, name, message)
        for step_id, junit in junits.items()
        if junit
        for (file, name), (outcome, message) in sorted(junit["cases"].items())
        if outcome in ("failed", "error")
    ]
    if failures:
        lines += ["", "## Failed tests", ""]
        lines += [f"- {step_id}: `{file}::{name}` — {message}" for step_id, file, name, message in failures]
    lines += ["", "## Throughput (`benchmarks/throughput.py`)", "", *_throughput(out)]
    lines += ["", "## Plugin on vs off, interleaved (`benchmarks/plugin_overhead.py`)", "", *_overhead(out)]
    report = out / "report.md"
    report.write_text("\n".join(lines).rstrip() + "\n")
    print(report.read_text())
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/gpu_e2e_report.py REPORT_DIR")
    sys.exit(main(Path(sys.argv[1])))
