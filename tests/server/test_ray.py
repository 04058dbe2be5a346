"""Ray Serve: two steered replicas of the tiny model behind the tenant-policy ingress, on 127.0.0.1.

Started the documented way (``vllm-steer serve-ray CONFIG``) from a Serve config written here. Mixed
requests of several tenants are spread over both replicas and equal the single-engine rows; the tiers
hold through the Ray path; hot reload reaches every replica; a gated request's decisions reach the client
(``x-vllm-steer-gate``) and the audit log, whichever replica served it; a replica killed mid-load is replaced,
and every request sent meanwhile either completes or gets an error the client can see and retry.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml

# tenants_file comes from tests/server/conftest.py; profiles_dir (this module's own copy) is overridden below.
from support.mixed_batch import MAX_TOKENS, SETTINGS
from support.server import (
    ADMIN_KEY,
    ADMITTED,
    KEYS,
    REFUSED,
    completion_body,
    free_port,
    offline_rows,
    restore_profiles,
    tokens_and_logprobs,
)
from vllm_steer.core.profile import save_profile
from vllm_steer.testing.engines import record_engine_start
from vllm_steer.testing.synthetic import random_profile
from vllm_steer.testing.tiny import TINY, TINY_GATED

pytestmark = [pytest.mark.engine, pytest.mark.ray]

MODEL_ID = "tiny"
REFUSE = {"steer_profile": "tiny-refuse"}
GATED_PROFILE = "tiny-refuse"


class RayApp:
    audit: Path
    """The ingress's audit log (set by the fixture)."""

    def __init__(self, config: Path, log: Path):
        self.port = yaml.safe_load(config.read_text())["http_options"]["port"]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "VLLM_CPU_KVCACHE_SPACE": "1"}
        for key in ("VLLM_PLUGINS", "VLLM_STEER_PROFILES", "VLLM_STEER_TENANTS", "VLLM_STEER_POLICY_SECRET"):
            env.pop(key, None)
        cmd = [sys.executable, "-m", "vllm_steer.cli", "serve-ray", str(config), "--num-cpus", "8"]
        record_engine_start("ray-two-replicas")
        with open(log, "w") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_for_replicas(2, timeout=900)

    def replicas(self) -> list[dict] | None:
        try:
            r = requests.get(
                self.url + "/v1/steering/admin/status", headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=60
            )
        except requests.RequestException:
            return None
        return r.json()["replicas"] if r.status_code == 200 else None

    def wait_for_replicas(self, n: int, timeout: float, exclude: set[str] = frozenset()) -> list[dict]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve-ray exited with {self.proc.returncode}:\n{self.log.read_text()[-6000:]}")
            replicas = self.replicas()
            if replicas and len(replicas) == n and not exclude & {r["replica"] for r in replicas}:
                return replicas
            time.sleep(3)
        raise AssertionError(f"{n} healthy replicas not reached in {timeout} s:\n{self.log.read_text()[-6000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # the CLI shuts Serve and its Ray cluster down
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)

    def complete(self, ids: list[int], xargs: dict | None, key: str, max_tokens: int = MAX_TOKENS) -> requests.Response:
        body = completion_body(MODEL_ID, ids, xargs, max_tokens)
        return requests.post(
            self.url + "/v1/completions", json=body, timeout=300, headers={"authorization": f"Bearer {key}"}
        )


@pytest.fixture(scope="module")
def ray_profiles(tiny_root, gated, tmp_path_factory) -> Path:
    """What the app serves: the tiny profiles plus the gated refusing one of ``build_tiny_gated`` (whose model is
    ``build_tiny``'s, weight for weight, so the profile fits the served model). The research tier grants ``*``."""
    path = tmp_path_factory.mktemp("ray-profiles") / "profiles"
    shutil.copytree(tiny_root / "profiles", path)
    shutil.copytree(gated[0] / "profiles" / GATED_PROFILE, path / GATED_PROFILE)
    return path


@pytest.fixture(scope="module")
def profiles_dir(ray_profiles, tmp_path_factory) -> Path:
    """This module's served copy of ``ray_profiles``, which the hot-reload test changes (and restores)."""
    path = tmp_path_factory.mktemp("ray-served") / "profiles"
    shutil.copytree(ray_profiles, path)
    return path


@pytest.fixture(scope="module")
def ray_app(tiny_root, tenants_file, profiles_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("ray")
    config = work / "serve.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "proxy_location": "HeadOnly",
                "http_options": {"host": "127.0.0.1", "port": free_port()},
                "applications": [
                    {
                        "name": "vllm-steer",
                        "route_prefix": "/",
                        "import_path": "vllm_steer.server.ray_app:build_app",
                        "args": {
                            "model": str(tiny_root / "model"),
                            "model_id": MODEL_ID,
                            "profiles": str(profiles_dir),
                            "tenants": str(tenants_file),
                            "accelerator": "cpu",
                            "autoscaling": {"min_replicas": 2, "max_replicas": 2},
                            "engine_kwargs": {
                                "dtype": "float32",
                                "enforce_eager": True,
                                "max_model_len": 512,
                                "max_num_seqs": 16,
                                "block_size": 32,
                                "seed": 0,
                            },
                            "env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1"},
                            "health_check_period_s": 2,
                            "health_check_timeout_s": 30,
                            "audit_log": str(work / "audit.jsonl"),
                        },
                    }
                ],
            }
        )
    )
    app = RayApp(config, work / "serve-ray.log")
    app.audit = work / "audit.jsonl"
    yield app
    app.stop()


def test_mixed_tenants_spread_over_both_replicas_and_match_the_single_engine(ray_app, eager_on, prompt_ids):
    offline = offline_rows(eager_on, prompt_ids)
    before = {r["replica"]: r["requests"] for r in ray_app.replicas()}
    jobs = [(tier, sent, index, ids) for ids in prompt_ids for tier, sent, index in ADMITTED] * 2
    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(lambda job: ray_app.complete(job[3], job[1], KEYS[job[0]]), jobs))
    for (tier, sent, index, ids), response in zip(jobs, responses, strict=True):
        got = tokens_and_logprobs(response)
        want = offline[(tuple(ids), json.dumps(SETTINGS[index]))]
        assert got["tokens"] == want["tokens"], (tier, sent, SETTINGS[index])
        assert max(abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"], strict=True)) < 2e-3, (tier, sent)
    served = {r["replica"]: r["requests"] - before.get(r["replica"], 0) for r in ray_app.replicas()}
    assert len(served) == 2 and all(n > 0 for n in served.values()), f"both replicas must serve some: {served}"
    assert sum(served.values()) == len(jobs)
    steered = [sum(w["steps_steered"] for w in r["workers"]) for r in ray_app.replicas()]
    assert all(n > 0 for n in steered), steered


def test_tiers_hold_through_the_ray_path(ray_app, prompt_ids):
    for tier, xargs, status, param in REFUSED:
        response = ray_app.complete(prompt_ids[0], xargs, KEYS[tier])
        assert response.status_code == status, (tier, xargs, response.text)
        error = response.json()["error"]
        assert error["param"] == param and error["message"], (tier, xargs, error)
    assert ray_app.complete(prompt_ids[0], None, "not-a-key").status_code == 401
    assert ray_app.complete(prompt_ids[0], None, ADMIN_KEY).status_code == 401, "an admin key is not a tenant key"
    assert requests.get(ray_app.url + "/v1/models", timeout=30).status_code == 401
    listing = requests.get(
        ray_app.url + "/v1/steering/profiles", headers={"authorization": f"Bearer {KEYS['strict']}"}, timeout=30
    )
    assert [p["id"] for p in listing.json()["data"]] == ["tiny-selective"]
    status = requests.get(
        ray_app.url + "/v1/steering/admin/status", headers={"authorization": f"Bearer {KEYS['research']}"}, timeout=30
    )
    assert status.status_code == 403
    # The strict tier's forced profile applies whatever the client leaves out.
    forced = tokens_and_logprobs(ray_app.complete(prompt_ids[0], None, KEYS["strict"]))
    same = tokens_and_logprobs(
        ray_app.complete(prompt_ids[0], {"steer_profile": "tiny-selective", "steer_angle": 120.0}, KEYS["research"])
    )
    assert forced == same


@pytest.fixture
def restore_profiles_after(ray_app, profiles_dir, ray_profiles):
    """The other tests compare against the fixture's profiles: put them back after a test that changes them."""
    yield
    restore_profiles(ray_app.url, profiles_dir, ray_profiles)


@pytest.mark.usefixtures("restore_profiles_after")
def test_hot_reload_reaches_every_replica(ray_app, profiles_dir, prompt_ids):
    add = {"steer_profile": "tiny-addition", "steer_scale": 3.0}
    before = tokens_and_logprobs(ray_app.complete(prompt_ids[0], add, KEYS["research"]))
    new = random_profile("tiny-addition", "addition", TINY, [1, 2], seed=123, vector_norm=8.0)
    save_profile(profiles_dir / "tiny-addition", new.spec, new.vectors)
    response = requests.post(
        ray_app.url + "/v1/steering/admin/reload", headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=300
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["replaced"] == ["tiny-addition"] and len(body["replicas"]) == 2
    replicas = ray_app.replicas()
    digests = {r["replica"]: r["profiles"]["tiny-addition"] for r in replicas}
    assert set(digests.values()) == {new.digest}, digests
    # Every request now gets the new vectors, whichever replica serves it.
    after = [tokens_and_logprobs(ray_app.complete(prompt_ids[0], add, KEYS["research"])) for _ in range(6)]
    assert all(a == after[0] for a in after) and after[0]["logprobs"] != before["logprobs"]


def _gate_lines(ray_app: RayApp) -> dict[str, dict]:
    lines = [json.loads(line) for line in ray_app.audit.read_text().splitlines()]
    return {line["request_id"]: line for line in lines if line["event"] == "gate"}


def _request_id(response_id: str) -> str:
    return re.sub(r"^(chat)?cmpl-", "", response_id)


def _gated_post(ray_app: RayApp, ids: list[int], xargs: dict | None, headers: dict | None = None, **extra):
    body = {"model": MODEL_ID, "prompt": ids, "max_tokens": 24, "temperature": 0.0, "return_token_ids": True}
    if xargs is not None:
        body["vllm_xargs"] = xargs
    auth = {"authorization": f"Bearer {KEYS['research']}", **(headers or {})}
    return requests.post(ray_app.url + "/v1/completions", json={**body, **extra}, headers=auth, timeout=300)


def test_gate_decisions_reach_the_client_and_the_audit_log_through_ray(ray_app, gated):
    """As tests/server/test_gates_served.py on ``vllm-steer serve``: the header per response, the audit line per
    gated request, whichever of the two replicas served it (the ingress asks both)."""
    _, prompts, _, reference = gated
    refusal = TINY_GATED[GATED_PROFILE]["refusal"]
    before = {r["replica"]: r["requests"] for r in ray_app.replicas()}
    jobs = [(ids, xargs) for ids in prompts for xargs in (REFUSE, None)]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda job: _gated_post(ray_app, *job), jobs))
    served = {r["replica"]: r["requests"] - before.get(r["replica"], 0) for r in ray_app.replicas()}
    assert all(n > 0 for n in served.values()), f"both replicas serve some, so both are asked: {served}"
    audit = _gate_lines(ray_app)
    fired = 0
    for i, ids in enumerate(prompts):
        response, plain = responses[2 * i : 2 * i + 2]
        assert response.status_code == 200 and plain.status_code == 200, (response.text, plain.text)
        expected = bool(reference(ids, REFUSE)["fired"])
        fired += expected
        refused, answered = response.json()["choices"][0], plain.json()["choices"][0]
        if expected:
            assert (refused["text"], refused["finish_reason"]) == (refusal, "stop"), refused
        else:
            assert refused["token_ids"] == answered["token_ids"], ("answered unsteered", i)
        assert response.headers.get("x-vllm-steer-gate") == f"action=refuse; fired={int(expected)}", (i, expected)
        assert "x-vllm-steer-gate" not in plain.headers, "an ungated request has no gate header"
        # the engine named the request after the middleware's id: the response's id and the audit line's agree
        line = audit[_request_id(response.json()["id"])]
        assert (line["tenant"], line["tier"]) == ("acme-research", "research"), line
        (row,) = line["rows"]
        assert (row["profile"], row["action"], row["fired"]) == (GATED_PROFILE, "refuse", expected), row
        assert row["gates"] == (["g"] if expected else []) and set(row["scores"]) == {"g"}
    assert 0 < fired < len(prompts), "some rows refused, some answered"


def test_a_client_cannot_choose_the_engine_request_id_through_ray(ray_app, gated):
    """The client's ``X-Request-Id`` and body ``request_id`` are not the engine's (Ray would pass either on):
    the engine's is the middleware's, so no client names its request into another's gate report."""
    _, prompts, _, reference = gated
    ids = next(ids for ids in prompts if reference(ids, REFUSE)["fired"])
    response = _gated_post(ray_app, ids, REFUSE, headers={"x-request-id": "mine-1"}, request_id="mine-2")
    assert response.status_code == 200, response.text
    request_id = _request_id(response.json()["id"])
    assert request_id.startswith("steer-") and "mine" not in request_id, request_id
    assert response.headers.get("x-vllm-steer-gate") == "action=refuse; fired=1"
    line = _gate_lines(ray_app)[request_id]
    assert line["client_request_id"] == "mine-1" and line["rows"][0]["fired"] is True, line


def test_a_streamed_gated_request_is_audited_when_it_ends(ray_app, gated):
    _, prompts, _, reference = gated
    ids = next(ids for ids in prompts if reference(ids, REFUSE)["fired"])
    with _gated_post(ray_app, ids, REFUSE, stream=True) as response:
        assert response.status_code == 200, response.text
        events = [
            json.loads(line[len(b"data: ") :])
            for line in response.iter_lines()
            if line.startswith(b"data: ") and line != b"data: [DONE]"
        ]
    assert "x-vllm-steer-gate" not in response.headers, "a stream's headers leave before any decision"
    text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    assert text == TINY_GATED[GATED_PROFILE]["refusal"], text
    request_id = _request_id(events[0]["id"])
    deadline = time.time() + 30
    while request_id not in _gate_lines(ray_app) and time.time() < deadline:
        time.sleep(0.2)  # reported in the background once the stream has ended
    assert _gate_lines(ray_app)[request_id]["rows"][0]["fired"] is True


def test_a_replica_killed_mid_load_is_replaced_and_no_request_is_silently_lost(ray_app, eager_on, prompt_ids):
    offline = offline_rows(eager_on, prompt_ids)
    replicas = ray_app.replicas()
    victim = replicas[0]
    jobs = [(KEYS["strict"], None, 9), (KEYS["research"], None, 0)] * 12
    long_tokens = 96

    def send(job):
        try:
            return ray_app.complete(prompt_ids[1], job[1], job[0], max_tokens=long_tokens)
        except requests.RequestException as exc:  # a dropped connection is an error the client sees
            return exc

    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(send, job) for job in jobs]
        time.sleep(2.0)
        os.kill(victim["pid"], signal.SIGKILL)
        outcomes = [f.result() for f in futures]

    completed, failed = 0, 0
    for outcome in outcomes:
        if isinstance(outcome, Exception) or outcome.status_code != 200:
            failed += 1
            if not isinstance(outcome, Exception):
                assert outcome.status_code == 503 and "retry" in outcome.json()["error"]["message"], outcome.text
            continue
        choice = outcome.json()["choices"][0]
        assert len(choice["token_ids"]) == long_tokens and choice["finish_reason"] == "length", "no silent truncation"
        completed += 1
    assert completed + failed == len(jobs) and completed > 0, (completed, failed)
    print(
        f"replica killed mid-load: {completed} completed in full, {failed} got an error, 0 lost "
        f"({sorted({getattr(o, 'status_code', type(o).__name__) for o in outcomes}, key=str)})"
    )

    # Ray replaces the dead replica; afterwards every request succeeds and is served as before.
    replicas = ray_app.wait_for_replicas(2, timeout=600, exclude={victim["replica"]})
    assert victim["pid"] not in {r["pid"] for r in replicas}
    after = [
        ray_app.complete(ids, s, key)
        for ids in prompt_ids
        for key, s, _ in [(KEYS["strict"], None, 9), (KEYS["research"], None, 0)]
    ]
    for response, (ids, index) in zip(after, [(ids, i) for ids in prompt_ids for i in (9, 0)], strict=True):
        got = tokens_and_logprobs(response)
        assert got["tokens"] == offline[(tuple(ids), json.dumps(SETTINGS[index]))]["tokens"]
