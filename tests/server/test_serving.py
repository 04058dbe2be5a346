"""The real server: `vllm-steer serve --plugin vllm_steer` on 127.0.0.1 with three tenant tiers.

Each tenant's outputs must equal the offline engine's rows for the same effective settings (the
`eager_on` run of the mixed batch, tests/conftest.py), the strict tier's forced profile applies whatever the client
sends, and every bad request gets the right status with the field named while the server keeps serving.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from support import DATA
from support.mixed_batch import MAX_TOKENS, SETTINGS
from support.server import (
    ADMIN_KEY,
    ADMITTED,
    KEYS,
    REFUSED,
    Server,
    complete,
    free_port,
    offline_rows,
    restore_profiles,
    server_env,
    tokens_and_logprobs,
    vllm_args,
)
from vllm_steer.core.profile import save_profile
from vllm_steer.testing.synthetic import random_profile
from vllm_steer.testing.tiny import TINY

pytestmark = pytest.mark.engine


def test_three_tenants_concurrently_get_their_effective_steering(server, eager_on, prompt_ids, tiny_root):
    offline = offline_rows(eager_on, prompt_ids)
    jobs = [(tier, sent, index, ids) for ids in prompt_ids for tier, sent, index in ADMITTED]
    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(lambda job: complete(server, job[3], job[1], KEYS[job[0]]), jobs))
    for (tier, sent, index, ids), response in zip(jobs, responses, strict=True):
        got = tokens_and_logprobs(response)
        want = offline[(tuple(ids), json.dumps(SETTINGS[index]))]
        assert got["tokens"] == want["tokens"], (tier, sent, SETTINGS[index])
        assert max(abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"], strict=True)) < 2e-3, (tier, sent)
    # The research tier's layer override is served too (a subset of the profile's layers steers differently).
    full = tokens_and_logprobs(
        complete(server, prompt_ids[0], {"steer_profile": "tiny-selective", "steer_angle": 120.0}, KEYS["research"])
    )
    part = tokens_and_logprobs(
        complete(
            server,
            prompt_ids[0],
            {"steer_profile": "tiny-selective", "steer_angle": 120.0, "steer_layers": [2]},
            KEYS["research"],
        )
    )
    assert full["logprobs"] != part["logprobs"]


def test_refusals_name_the_field_and_the_server_keeps_serving(server, prompt_ids, tiny_root):
    for tier, xargs, status, param in REFUSED:
        response = complete(server, prompt_ids[0], xargs, KEYS[tier])
        assert response.status_code == status, (tier, xargs, response.text)
        error = response.json()["error"]
        assert error["param"] == param and error["code"] == status and error["message"], (tier, xargs, error)
    base = {"model": server.model, "prompt": "hello", "max_tokens": 2}
    raw = [
        (None, base, 401, "authorization"),
        ("not-a-key", base, 401, "authorization"),
        (KEYS["research"], {**base, "steer_profile": "tiny-selective"}, 400, "steer_profile"),
        (KEYS["research"], {**base, "vllm_xargs": ["tiny-selective"]}, 400, "vllm_xargs"),
        (
            KEYS["research"],
            (
                '{"model": "m", "prompt": "x", "vllm_xargs": {"steer_profile": "tiny-ablation"}, '
                '"vllm_xargs": {"steer_profile": "none"}}'
            ),
            400,
            "vllm_xargs",
        ),
        (KEYS["research"], "{not json", 400, "body"),
    ]
    for key, body, status, param in raw:
        response = server.post("/v1/completions", body, key)
        assert response.status_code == status, (body, response.text)
        assert response.json()["error"]["param"] == param
    assert requests.get(server.url + "/v1/models", timeout=30).status_code == 401
    assert (
        requests.get(
            server.url + "/v1/models", headers={"authorization": f"Bearer {KEYS['strict']}"}, timeout=30
        ).status_code
        == 200
    )
    chat = server.post(
        "/v1/chat/completions",
        {"model": server.model, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]},
        KEYS["strict"],
    )
    assert chat.status_code == 200, chat.text
    assert complete(server, prompt_ids[0], None, KEYS["standard"]).status_code == 200


def test_profiles_route_shows_each_tier_its_own_view(server):
    def ids(tier):
        r = requests.get(
            server.url + "/v1/steering/profiles", headers={"authorization": f"Bearer {KEYS[tier]}"}, timeout=30
        )
        assert r.status_code == 200, r.text
        return {p["id"]: p for p in r.json()["data"]}

    strict, standard, research = ids("strict"), ids("standard"), ids("research")
    assert list(strict) == ["tiny-selective"] and strict["tiny-selective"]["forced"] is True
    assert set(standard) == {"tiny-addition", "tiny-selective"}
    assert (
        standard["tiny-addition"]["scale"] == {"min": -2.0, "max": 3.0} and standard["tiny-addition"]["default"] is True
    )
    assert len(research) == 8
    assert requests.get(server.url + "/v1/steering/profiles", timeout=30).status_code == 401


def _steer_counters(server: Server) -> tuple[str, dict[tuple[str, frozenset], float]]:
    """/metrics as text, and its vllm_steer_* samples by (name, labels)."""
    text = requests.get(server.url + "/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=30).text
    samples = {}
    for line in text.splitlines():
        if line.startswith("vllm_steer_"):
            sample, value = line.rsplit(" ", 1)
            name, _, labels = sample.partition("{")
            pairs = frozenset(tuple(kv.split("=", 1)) for kv in labels.rstrip("}").split(",") if kv)
            samples[(name, frozenset((k, v.strip('"')) for k, v in pairs))] = float(value)
    return text, samples


def test_metrics_count_steered_requests_and_rejections_without_secrets(server, prompt_ids):
    """Counted by this test's own requests (the deltas), whatever other tests sent before."""
    _, before = _steer_counters(server)
    assert complete(server, prompt_ids[0], None, KEYS["strict"]).status_code == 200  # the forced tiny-selective
    over = complete(server, prompt_ids[0], {"steer_profile": "tiny-addition", "steer_scale": 3.5}, KEYS["standard"])
    assert over.status_code == 403
    secret_prompt = "zebra-unicorn-prompt-text-7731"
    chat = server.post(
        "/v1/chat/completions",
        {"model": server.model, "max_tokens": 2, "messages": [{"role": "user", "content": secret_prompt}]},
        KEYS["standard"],
    )
    assert chat.status_code == 200
    refused = server.post(
        "/v1/completions",
        {
            "model": server.model,
            "prompt": secret_prompt,
            "max_tokens": 2,
            "vllm_xargs": {"steer_profile": "tiny-ablation"},
        },
        KEYS["standard"],
    )
    assert refused.status_code == 403
    text, after = _steer_counters(server)

    def delta(name: str, **labels) -> float:
        want = set(labels.items())
        return sum(v - before.get(k, 0.0) for k, v in after.items() if k[0] == name and want <= k[1])

    assert delta("vllm_steer_requests_total", profile="tiny-selective", tier="strict") == 1
    assert delta("vllm_steer_requests_total", profile="tiny-addition", tier="standard") == 1  # the chat, by default
    assert delta("vllm_steer_rejections_total", field="steer_scale", reason="403") == 1
    assert delta("vllm_steer_rejections_total", field="steer_profile", reason="403") == 1
    assert delta("vllm_steer_tokens_total", kind="completion", tier="strict") == MAX_TOKENS
    assert 0 < delta("vllm_steer_tokens_total", kind="completion", tier="standard") <= 2  # the chat may stop early
    assert delta("vllm_steer_tokens_total", kind="prompt", tier="strict") == len(prompt_ids[0])
    log = server.log.read_text()
    assert "tenant tiers enforced" in log
    assert secret_prompt not in log
    for key in KEYS.values():
        assert key not in log and key not in text


def _stream_tokens(server: Server, ids: list[int], xargs: dict, key: str, on_first_chunk) -> list[int]:
    body = {
        "model": server.model,
        "prompt": ids,
        "max_tokens": 300,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "return_token_ids": True,
        "vllm_xargs": xargs,
    }
    tokens: list[int] = []
    with requests.post(
        server.url + "/v1/completions",
        data=json.dumps(body),
        stream=True,
        timeout=300,
        headers={"content-type": "application/json", "authorization": f"Bearer {key}"},
    ) as response:
        assert response.status_code == 200, response.text
        for line in response.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            tokens += json.loads(line[6:])["choices"][0].get("token_ids") or []
            _stream_tokens.last_chunk_at = time.time()
            if on_first_chunk is not None:
                on_first_chunk()
                on_first_chunk = None
    return tokens


@pytest.fixture
def restore_profiles_after(server, profiles_dir, tiny_root):
    """The other tests compare against the fixture's profiles: put them back after a test that changes them."""
    yield
    restore_profiles(server.url, profiles_dir, tiny_root / "profiles")


@pytest.mark.usefixtures("restore_profiles_after")
def test_hot_reload_is_admin_only_validated_first_and_changes_only_new_requests(server, profiles_dir, prompt_ids):
    def admin(method, path, key=ADMIN_KEY):
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return requests.request(method, server.url + "/v1/steering/admin" + path, headers=headers, timeout=120)

    assert admin("POST", "/reload", key=None).status_code == 401
    assert admin("POST", "/reload", key=KEYS["research"]).status_code == 403
    assert admin("POST", "/reload", key="nobody").status_code == 401
    assert complete(server, prompt_ids[0], None, ADMIN_KEY).status_code == 401, "an admin key is not a tenant key"

    add = {"steer_profile": "tiny-addition", "steer_scale": 3.0}
    sel = {"steer_profile": "tiny-selective", "steer_angle": 30.0}
    before, before_sel = (tokens_and_logprobs(complete(server, prompt_ids[0], x, KEYS["research"])) for x in (add, sel))
    # New tiny-addition vectors on disk: nothing changes until an admin reloads.
    new = random_profile("tiny-addition", "addition", TINY, [1, 2], seed=99, vector_norm=8.0)
    save_profile(profiles_dir / "tiny-addition", new.spec, new.vectors)
    assert tokens_and_logprobs(complete(server, prompt_ids[0], add, KEYS["research"])) == before

    # A long request in flight when the reload lands keeps the version it started with.
    reloaded = {}

    def reload_now():
        reloaded["response"] = admin("POST", "/reload")
        reloaded["at"] = time.time()

    # First the old version's full output for the long request, so the in-flight one can be compared.
    old_long = _stream_tokens(server, prompt_ids[2], add, KEYS["research"], None)
    in_flight = _stream_tokens(server, prompt_ids[2], add, KEYS["research"], reload_now)
    response = reloaded["response"]
    assert response.status_code == 200, response.text
    assert response.json()["replaced"] == ["tiny-addition"] and response.json()["added"] == []
    assert in_flight == old_long, "a request admitted before the reload finishes with its version"
    assert reloaded["at"] < _stream_tokens.last_chunk_at, "the reload landed while the request was streaming"

    after = tokens_and_logprobs(complete(server, prompt_ids[0], add, KEYS["research"]))
    assert after["logprobs"] != before["logprobs"], "new requests get the new vectors"
    assert tokens_and_logprobs(complete(server, prompt_ids[0], sel, KEYS["research"])) == before_sel

    # A bad file is refused with its file and field named, and the loaded profiles stay as they were.
    bad = random_profile("tiny-bad", "addition", TINY, [1], seed=5)
    save_profile(profiles_dir / "tiny-bad", bad.spec, bad.vectors)
    spec = json.loads((profiles_dir / "tiny-bad" / "profile.json").read_text())
    spec["model"]["hidden_size"] = 64
    (profiles_dir / "tiny-bad" / "profile.json").write_text(json.dumps(spec))
    response = admin("POST", "/reload")
    assert response.status_code == 400 and "tiny-bad" in response.json()["error"]["message"], response.text
    shutil.rmtree(profiles_dir / "tiny-bad")
    # A profile that needs hooks the engine was not started with: 409, nothing changes.
    deep = random_profile("tiny-deep", "addition", TINY, [3], seed=6)
    save_profile(profiles_dir / "tiny-deep", deep.spec, deep.vectors)
    response = admin("POST", "/reload")
    assert response.status_code == 409 and "3.layer_output" in response.json()["error"]["message"], response.text
    assert complete(server, prompt_ids[0], {"steer_profile": "tiny-deep"}, KEYS["research"]).status_code == 400
    shutil.rmtree(profiles_dir / "tiny-deep")
    assert tokens_and_logprobs(complete(server, prompt_ids[0], add, KEYS["research"])) == after

    # Unloading: refused while a tier forces the profile; otherwise new requests no longer find it.
    assert admin("DELETE", "/profiles/tiny-selective").status_code == 409
    assert admin("DELETE", "/profiles/no-such").status_code == 404
    assert admin("DELETE", "/profiles/tiny-probe").status_code == 200
    gone = complete(server, prompt_ids[0], {"steer_profile": "tiny-probe"}, KEYS["research"])
    assert gone.status_code == 400 and gone.json()["error"]["param"] == "steer_profile"
    assert admin("POST", "/reload").json()["added"] == ["tiny-probe"], "the next reload reads the directory again"

    # Status: which profile versions the engine holds (the same route reports every replica under Ray).
    assert admin("GET", "/status", key=KEYS["research"]).status_code == 403
    status = admin("GET", "/status").json()
    (replica,) = status["replicas"]
    assert status["profiles"]["tiny-addition"] == new.digest == replica["profiles"]["tiny-addition"]
    assert replica["requests"] > 0 and replica["workers"][0]["hooked"] is True


def test_a_server_without_the_policy_refuses_instead_of_serving_unchecked(
    tiny_root, tenants_file, tmp_path_factory, prompt_ids
):
    """Tenants configured but the endpoint plugin not allowlisted (plain `python -m vllm...api_server`): fail closed."""
    port = free_port()
    env = server_env()
    env.update(VLLM_STEER_PROFILES=str(tiny_root / "profiles"), VLLM_STEER_TENANTS=str(tenants_file))
    args = vllm_args(tiny_root, port)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", *args]
    srv = Server(
        cmd,
        env,
        tmp_path_factory.mktemp("unguarded") / "server.log",
        str(tiny_root / "model"),
        key="server-without-policy",
    )
    try:
        for xargs in (None, {"steer_profile": "none"}, {"steer_profile": "tiny-selective", "steer_angle": 0.0}):
            response = complete(srv, prompt_ids[0], xargs, KEYS["research"])
            assert response.status_code == 400, response.text
            assert response.json()["error"]["param"] == "vllm_xargs"
            assert "VLLM_PLUGINS=vllm_steer" in response.json()["error"]["message"]
        assert requests.get(srv.url + "/health", timeout=10).status_code == 200
    finally:
        srv.stop()


def test_eval_through_the_server_matches_the_offline_engine(server, tmp_path, monkeypatch):
    """`vllm-steer eval --server URL`: the same numbers as the offline engine, through the tenant policy."""
    from vllm_steer.evaluation.runner import EvalConfig, EvalTarget, Row, ServerBackend, run_eval

    monkeypatch.setenv("EVAL_KEY", KEYS["research"])
    cfg = EvalConfig(
        model=server.model,
        profiles=str(server.profiles),
        targets=[EvalTarget("tiny-selective", (0.0, 120.0))],
        out=tmp_path / "eval",
        harmful=str(DATA / "harmful.csv"),
        harmless=str(DATA / "harmless.jsonl"),
        n=2,
        offset=0,
        max_tokens=5,
        capability_n=3,
        server=server.url,
        api_key_env="EVAL_KEY",
    )
    result = run_eval(cfg)
    assert result["served_in_one_mixed_batch"] is False and "server" in result["backend"]
    base, zero, steered = result["points"]
    assert zero["example_harmful"] == base["example_harmful"], "Selective Steering at 0 degrees is the identity"
    assert zero["perplexity_unsteered"] == pytest.approx(base["perplexity_unsteered"], rel=1e-4)
    assert steered["perplexity_unsteered"] != pytest.approx(base["perplexity_unsteered"], rel=1e-4)
    assert result["capability"]["unsteered"]["n"] == 3
    backend = ServerBackend(server.url, server.model, KEYS["strict"])
    with pytest.raises(Exception, match="403"):
        backend.generate([Row("harmful", "hi", {"steer_profile": "tiny-addition"}, max_tokens=2)])
