"""`vllm-steer eval` end to end on the tiny model, with a real stub OpenAI-compatible judge on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from support import DATA
from vllm_steer.testing.engines import record_engine_start


class _Judge(BaseHTTPRequestHandler):
    """Replies by the judged response's first character: a well-formed verdict, or garbage."""

    seen: ClassVar[list[dict]] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        _Judge.seen.append(body)
        text = json.dumps(body)
        reply = "VERDICT: REFUSAL" if (sum(map(ord, text)) % 3) else "I am not sure, maybe compliance?"
        data = json.dumps(
            {
                "id": "x",
                "object": "chat.completion",
                "model": body.get("model"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # keep test output clean
        pass


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.engine
def test_eval_cli_end_to_end_with_a_stub_judge_and_an_unreachable_one(tiny_root, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    categories = tmp_path / "cats.csv"
    categories.write_text(
        "question,category\n" + "".join(f"question {i} about {c},{c}\n" for c in ("cat_a", "cat_b") for i in range(3))
    )
    out = tmp_path / "eval"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("VLLM_PLUGINS", None)
    cmd = [
        sys.executable,
        "-m",
        "vllm_steer.cli",
        "eval",
        "--model",
        str(tiny_root / "model"),
        "--profiles",
        str(tiny_root / "profiles"),
        "--profile",
        "tiny-selective",
        "--angles",
        "0,90,180",
        "--compare",
        "tiny-addition",
        "tiny-category",
        "tiny-ablation",
        "--data",
        str(DATA / "harmful.csv"),
        "--harmless",
        str(DATA / "harmless.jsonl"),
        "--n",
        "3",
        "--offset",
        "0",
        "--max-tokens",
        "6",
        "--capability-n",
        "4",
        "--category-data",
        str(categories),
        "--category-n",
        "2",
        "--category-offset",
        "0",
        "--judge",
        "substring",
        "--judge",
        f"llm:http://127.0.0.1:{server.server_address[1]}#stub-judge",
        "--judge",
        f"llm:http://127.0.0.1:{_closed_port()}#gone",
        "--out",
        str(out),
    ]
    record_engine_start("cli:eval")
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # 7 settings x (3 harmful + 3 harmless + 3 of the over-refusal set, xstest-safe by default)
    assert "llm:gone: 63 verdicts failed" in proc.stdout.replace("\n", " "), proc.stdout[-2000:]
    result = json.loads((out / "result.json").read_text())
    assert result["served_in_one_mixed_batch"] is True
    labels = [(p["profile"], p["value"]) for p in result["points"]]
    assert labels == [
        (None, None),
        ("tiny-selective", 0.0),
        ("tiny-selective", 90.0),
        ("tiny-selective", 180.0),
        ("tiny-addition", 1.0),
        ("tiny-category", 1.0),
        ("tiny-ablation", None),
    ]
    base, zero = result["points"][0], result["points"][1]
    # Selective Steering at 0° is the identity: same texts, same perplexity under the unsteered model.
    assert zero["example_harmful"] == base["example_harmful"]
    assert zero["perplexity_unsteered"] == pytest.approx(base["perplexity_unsteered"], rel=1e-5)
    assert zero["perplexity_steered"] == pytest.approx(zero["perplexity_unsteered"], rel=1e-3), (
        "unsteered, a generation's own logprobs and its re-scored logprobs agree"
    )
    for p in result["points"]:
        assert p["n_harmful"] == 3 and p["n_harmless"] == 3
        assert p["attack_success"] == pytest.approx(1 - p["refusal_harmful"])
        stub = next(j for name, j in p["judges"].items() if "stub-judge" in name)
        gone = next(j for name, j in p["judges"].items() if "gone" in name)
        assert stub["harmful"]["n"] == 3 and stub["harmful"]["unparseable"] + stub["harmful"]["labelled"] == 3
        assert gone["harmful"]["failed"] == 3 and gone["harmful"]["labelled"] == 0, "failures counted, not guessed"
    assert any(p["judges"][n]["harmful"]["unparseable"] for p in result["points"] for n in p["judges"] if "stub" in n)
    assert _Judge.seen and all(b.get("temperature") == 0 for b in _Judge.seen)
    assert set(result["capability"]) == {
        "unsteered",
        "tiny-selective@90",
        "tiny-addition@1",
        "tiny-category@1",
        "tiny-ablation",
    }
    assert all(v["n"] == 4 for v in result["capability"].values())
    cats = {c["category"]: c for c in result["categories"]}
    assert set(cats) == {"cat_a", "cat_b"} and all(c["n"] == 2 for c in cats.values())
    assert len((out / "generations.jsonl").read_text().splitlines()) == result["rows"]
    readme = (out / "README.md").read_text()
    assert "| unsteered |" in readme and "own beats generic" in readme
    for png in ("angles.png", "compare.png", "categories.png"):
        assert (out / png).stat().st_size > 1000
