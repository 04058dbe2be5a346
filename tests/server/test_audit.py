"""The audit log (server/audit.py): one JSON line per decision, client strings bounded, never prompts unless asked."""

from __future__ import annotations

import json
import logging

from vllm_steer.server.audit import MAX_TEXT, AuditLog, printable


def _record(log: AuditLog, **update) -> None:
    fields = {
        "decision": "refused",
        "status": 403,
        "request_id": "steer-1",
        "tenant": "acme",
        "tier": "strict",
        "method": "POST",
        "route": "/v1/chat/completions",
        "field": "logit_bias",
        "reason": "not permitted",
        "body": {"messages": [{"role": "user", "content": "secret prompt"}]},
    }
    log.record(**{**fields, **update})


def test_each_decision_is_one_json_line_in_the_file_and_the_logger(tmp_path, caplog):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path))
    with caplog.at_level(logging.INFO, logger="vllm_steer.audit"):
        _record(log, field="evil\nkey\x00" + "k" * 10_000, client_request_id="id\r\n")
        _record(log, decision="admitted", status=None, steering={"steer_profile": "p"}, field=None)
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and len(caplog.records) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["decision"] == "refused" and first["status"] == 403 and first["tenant"] == "acme"
    assert "\n" not in first["field"] and len(first["field"]) < MAX_TEXT + 20
    assert second["steering"] == {"steer_profile": "p"} and second["status"] is None
    assert "secret prompt" not in path.read_text(), "prompts only when the operator opts in"


def test_prompts_only_when_opted_in(tmp_path):
    path = tmp_path / "audit.jsonl"
    _record(AuditLog(str(path), prompts=True))
    assert json.loads(path.read_text())["messages"][0]["content"] == "secret prompt"


def test_printable_truncates_and_escapes():
    assert printable(None) is None
    assert printable("plain") == "plain"
    assert "\n" not in printable("a\nb") and "\\n" in printable("a\nb")
    assert printable("x" * 1000).startswith("x" * MAX_TEXT) and "(+872)" in printable("x" * 1000)
