"""The server and `vllm-steer eval` on a family other than Llama (issue 18): OLMo 2, the tree least like the
others (vLLM serves it through its Transformers backend; the engine hooks the HF tree inside it).

Only the engine's hooks, the HF reference and calibration know a model's family (the layout table); the
server and eval see profiles, fingerprints and requests. So one family unlike Llama's, served by the README's
command, shows they run unchanged: every row of the family's mixed batch, sent through the OpenAI API, equals
the offline engine's row (tests/engine/test_families.py proves those rows against the HF reference), a bad
request is refused naming the field; and `vllm-steer eval` runs on it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from support import DATA
from support.mixed_batch import mixed_rows
from support.server import Server, complete, free_port, serve_command, server_env, tokens_and_logprobs
from vllm_steer.testing.engines import record_engine_start

pytestmark = pytest.mark.engine

FAMILY = "olmo2"


@pytest.fixture(scope="module")
def family_server(family_eager, tmp_path_factory):
    root, on, _, _ = family_eager(FAMILY)
    port = free_port()
    cmd = serve_command(root, port, root / "profiles")
    log = tmp_path_factory.mktemp(f"server-{FAMILY}") / "server.log"
    srv = Server(cmd, server_env(), log, str(root / "model"), root / "profiles", key=f"server:{FAMILY}")
    yield srv, on
    srv.stop()


def test_every_row_of_the_mixed_batch_is_served_as_the_offline_engine_computes_it(family_server, prompt_ids):
    server, offline = family_server
    rows = mixed_rows(prompt_ids)
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda row: complete(server, row[0], row[1], None), rows))
    for (_, setting), response, want in zip(rows, responses, offline["phases"][0], strict=True):
        got = tokens_and_logprobs(response)
        assert got["tokens"] == want["tokens"], (FAMILY, json.dumps(setting))
        assert max(abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"], strict=True)) < 2e-3, setting


def test_a_bad_request_is_refused_naming_the_field(family_server, prompt_ids):
    server, _ = family_server
    response = complete(server, prompt_ids[0], {"steer_profile": "tiny-selective", "steer_layers": [0]}, None)
    assert response.status_code == 400 and "steer_layers" in response.text, response.text


def test_eval_runs_on_the_family(family_eager, tmp_path):
    """`vllm-steer eval` (its own engine, every setting a row of one mixed batch) on the family's model."""
    root, _, _, _ = family_eager(FAMILY)
    out = tmp_path / "eval"
    cmd = [
        sys.executable,
        "-m",
        "vllm_steer.cli",
        "eval",
        "--model",
        str(root / "model"),
        "--profiles",
        str(root / "profiles"),
        "--profile",
        "tiny-selective",
        "--angles",
        "0,120",
        "--compare",
        "tiny-addition",
        "--data",
        str(DATA / "harmful.csv"),
        "--harmless",
        str(DATA / "harmless.jsonl"),
        "--n",
        "2",
        "--offset",
        "0",
        "--max-tokens",
        "5",
        "--capability-n",
        "3",
        "--judge",
        "substring",
        "--out",
        str(out),
    ]
    record_engine_start(f"cli:eval-{FAMILY}")
    proc = subprocess.run(cmd, env=server_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["served_in_one_mixed_batch"] is True
    base, zero, steered, added = result["points"]
    assert zero["example_harmful"] == base["example_harmful"], "Selective Steering at 0 degrees is the identity"
    assert steered["perplexity_unsteered"] != pytest.approx(base["perplexity_unsteered"], rel=1e-4)
    assert added["profile"] == "tiny-addition"
