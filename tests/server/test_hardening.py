"""Hardening, against the real server (`vllm-steer serve`, three tiers, 127.0.0.1).

* **Fuzzing**: hostile ``vllm_xargs`` (hypothesis) and schema-generated requests (schemathesis, from the
  server's own OpenAPI document): every answer is 200 or a 4xx naming the field, never a 5xx, and the
  server answers normally afterwards.
* **Escalation**: every way we know for a tenant to lift its tier is refused, or served exactly as the
  tier's forced setting.
* **Profile files**: each kind of bad file, written over the loaded profile's own files, is refused at
  reload naming the file and the field, and requests keep the loaded version.
* **Faults under load**: 1,200 mixed requests while profiles are hot-reloaded, added and removed and
  clients drop streams: no 5xx, the engine never restarts, no steering slot leaks.
* **Fail closed**: a profile removed while requests that use it are queued (they finish steered with the
  version they were admitted with, never unsteered); the profile directory vanishing at run time; and
  a worker that cannot set up the plugin (missing directory, injected exception): the server refuses
  to start instead of serving unsteered.

Case counts are printed (``pytest -s``) for the record.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# The server fixture (tests/server/conftest.py) starts a server of this module's own.
from support.server import (
    ADMIN_KEY,
    KEYS,
    complete,
    free_port,
    serve_command,
    server_env,
    tokens_and_logprobs,
    vllm_args,
)
from vllm_steer.core.profile import save_profile
from vllm_steer.core.request import STEER_KEYS
from vllm_steer.core.wire import POLICY_TOKEN_KEY
from vllm_steer.testing.engines import record_engine_start
from vllm_steer.testing.synthetic import random_profile
from vllm_steer.testing.tiny import TINY

pytestmark = [pytest.mark.engine, pytest.mark.hardening]

FORCED = {"steer_profile": "tiny-selective", "steer_angle": 120.0}  # the strict tier's (see support.server.TIERS)
STANDARD_DEFAULT = {"steer_profile": "tiny-addition", "steer_scale": 3.0}
PROFILE_IDS = [
    "tiny-addition",
    "tiny-probe",
    "tiny-category",
    "tiny-ablation",
    "tiny-angular-standard",
    "tiny-angular-adaptive",
    "tiny-selective",
    "tiny-selective-b",
]


def _post(server, path: str, body: dict | str, key: str | None, timeout: float = 120) -> requests.Response:
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    data = body if isinstance(body, str) else json.dumps(body)
    return requests.post(
        server.url + path, data=data.encode("utf-8", "surrogatepass"), headers=headers, timeout=timeout
    )


def _still_serving(server, prompt_ids) -> None:
    assert server.proc.poll() is None, "the server process is gone"
    assert requests.get(server.url + "/health", timeout=30).status_code == 200
    assert complete(server, prompt_ids[0], None, KEYS["strict"]).status_code == 200


def _named_error(response: requests.Response, sent: dict) -> str:
    """The refused field, checked to be one the client sent (or the container / a steering field)."""
    assert 400 <= response.status_code < 500, (sent, response.status_code, response.text[:500])
    error = response.json()["error"]
    param = error.get("param")
    assert param and error.get("message"), (sent, error)
    assert param in sent or param in STEER_KEYS or param.startswith("vllm_xargs"), (sent, error)
    return param


# ---------------------------------------------------------------------------------------------- fuzzing

_hostile_text = st.sampled_from(
    [
        "../tiny-selective",
        "/etc/passwd",
        "tiny-selective/../tiny-addition",
        "..",
        ".",
        "TINY-SELECTIVE",
        " tiny-selective",
        "tiny-selective\x00",
        "tiny-selective\u200b",
        "tіny-selective",
        "ｔｉｎｙ-selective",
        "x" * 5000,
        "NaN",
        "Infinity",
        "none",
        "None",
        "",
        "\ud800",
        "tiny-category",
        "cat_a",
        *PROFILE_IDS,
    ]
)
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=20), _hostile_text
)
_values = st.one_of(
    _scalars,
    st.lists(_scalars, max_size=4),
    st.dictionaries(st.text(max_size=4), _scalars, max_size=2),
    st.lists(st.integers(0, 5), min_size=1000, max_size=3000),
)
_keys = st.one_of(
    st.sampled_from(
        [
            *STEER_KEYS,
            "steer_angel",
            "STEER_PROFILE",
            "steer_profile ",
            "steer_",
            POLICY_TOKEN_KEY,
            "vllm_steer_digest",
            "other_plugin",
        ]
    ),
    st.text(max_size=12),
)
# Mostly well-formed requests with one or two hostile changes, so the fuzz reaches the profile checks too.
_valid = st.fixed_dictionaries(
    {"steer_profile": st.sampled_from(PROFILE_IDS)},
    optional={
        "steer_angle": st.floats(-720, 720),
        "steer_scale": st.floats(-10, 10),
        "steer_layers": st.lists(st.integers(0, 5), min_size=1, max_size=3),
        "steer_categories": st.lists(st.sampled_from(["cat_a", "cat_b", "cat_c", "x"]), max_size=3),
    },
)
_xargs = st.one_of(
    st.dictionaries(_keys, _values, max_size=5),
    st.tuples(_valid, st.dictionaries(_keys, _values, max_size=2)).map(lambda t: {**t[0], **t[1]}),
    _valid,
)

FUZZ_CASES: Counter = Counter()


def test_fuzzed_vllm_xargs_get_200_or_a_4xx_naming_the_field(server, prompt_ids):
    @settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(xargs=_xargs, tier=st.sampled_from(sorted(KEYS)), chat=st.booleans())
    def one(xargs, tier, chat):
        body = {"model": server.model, "max_tokens": 1, "vllm_xargs": xargs}
        if chat:
            body["messages"] = [{"role": "user", "content": "hi"}]
        else:
            body["prompt"] = prompt_ids[0]
        response = _post(server, "/v1/chat/completions" if chat else "/v1/completions", body, KEYS[tier])
        FUZZ_CASES[response.status_code] += 1
        if response.status_code != 200:
            _named_error(response, {**body, **xargs})  # a field it sent (locked: `prompt`, the raw route)

    one()
    _still_serving(server, prompt_ids)
    print(f"\nfuzzed vllm_xargs: {sum(FUZZ_CASES.values())} requests, by status {dict(sorted(FUZZ_CASES.items()))}")
    assert sum(FUZZ_CASES.values()) >= 400 and FUZZ_CASES[200] > 0 and FUZZ_CASES[400] > 0 and FUZZ_CASES[403] > 0


GRAMMAR_DEFECT = "grammar rejected tokens"
"""vLLM 0.32's scheduler with xgrammar: a structured-output constraint whose every continuation the grammar's
token mask excludes (seen: ``structured_outputs.choice == ["\\x16"]``, a control character the tiny
model's vocabulary does not spell as its grammar expects) ends the request with "Unexpected: grammar rejected
tokens [0] ... Terminating request" and the API answers 500. A defect of vLLM's, inside a control a tier
must permit (``structured_outputs``; the strict and standard tiers of the example tenants file do not);
counted and printed here, not failed, so every other 5xx still fails the test."""


def _known_vllm_grammar_defect(body: object, log_tail: str) -> bool:
    return isinstance(body, dict) and bool(body.get("structured_outputs")) and GRAMMAR_DEFECT in log_tail


def test_schema_generated_requests_never_get_a_5xx(server, prompt_ids):
    """schemathesis draws requests from the server's OpenAPI document (vLLM's schema plus our routes); the one
    known vLLM defect is :data:`GRAMMAR_DEFECT`."""
    import schemathesis

    schema = schemathesis.openapi.from_url(  # the document, like every route, needs a key
        server.url + "/openapi.json", headers={"authorization": f"Bearer {KEYS['research']}"}
    )
    statuses: Counter = Counter()
    refused_for: Counter = Counter()
    known_defects: Counter = Counter()
    operations = [
        ("/v1/completions", "POST", 200),
        ("/v1/chat/completions", "POST", 250),
        ("/v1/steering/profiles", "GET", 10),
        ("/v1/steering/admin/reload", "POST", 10),
        ("/v1/steering/admin/profiles/{profile_id}", "DELETE", 20),
        ("/v1/steering/admin/status", "GET", 10),
    ]
    for path, method, examples in operations:
        operation = schema[path][method]

        @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(), tier=st.sampled_from(sorted(KEYS)), real_prompt=st.booleans())
        def one(case, tier, real_prompt):
            if isinstance(case.body, dict):  # the checks are what is fuzzed: keep generation to two tokens
                case.body["model"] = server.model
                if path == "/v1/completions" and (
                    real_prompt or not case.body.get("prompt")
                ):  # else mostly refused first
                    case.body["prompt"] = prompt_ids[0]
                    case.body.pop("prompt_embeds", None)
                if path == "/v1/chat/completions" and (real_prompt or not case.body.get("messages")):
                    case.body["messages"] = [{"role": "user", "content": "Say hello."}]
                case.body.update({k: 2 for k in ("max_tokens", "max_completion_tokens") if k in case.body})
                case.body.setdefault("max_tokens", 2)
                case.body.update(n=1, stream=False)
                case.body.pop("best_of", None)
            response = case.call(base_url=server.url, headers={"authorization": f"Bearer {KEYS[tier]}"}, timeout=120)
            statuses[(path, response.status_code)] += 1
            if (
                response.status_code >= 500
            ):  # everything needed to replay it (the server logs the stack: --log-error-stack)
                if _known_vllm_grammar_defect(case.body, server.log.read_text()[-4000:]):
                    known_defects[path] += 1
                    return
                sent = json.dumps(case.body, default=repr, ensure_ascii=True) if case.body is not None else None
                pytest.fail(
                    f"{response.status_code} on {method} {case.formatted_path} as {tier}: {response.text[:500]}\n"
                    f"body: {sent}\nquery: {case.query}\nserver log tail:\n{server.log.read_text()[-4000:]}"
                )
            if response.status_code >= 400:
                assert response.json()["error"]["message"], response.text[:500]
                error = response.json()["error"]
                refused_for[(path, error.get("param"), error["message"][:70])] += 1

        one()
    _still_serving(server, prompt_ids)
    print(f"\nschemathesis: {sum(statuses.values())} requests, by (path, status) {dict(sorted(statuses.items()))}")
    print(f"most common refusals (path, field, message): {refused_for.most_common(12)}")
    print(f"vLLM's structured-output grammar defect (500, not ours): {dict(known_defects)}")
    assert sum(statuses.values()) >= 400  # hypothesis stops early on small schemas (profiles, status): ~480 in all


# ------------------------------------------------------------------------------------------- escalation

STRICT_REFUSED = [  # (vllm_xargs the strict tenant sends, status, field)
    ({"steer_profile": "tiny-selective", "steer_angle": 0.0}, 403, "steer_angle"),
    ({"steer_profile": "tiny-selective", "steer_angle": 480.0}, 403, "steer_angle"),  # 120 (mod 360), still a change
    ({"steer_profile": "tiny-selective", "steer_angle": 120.000001}, 403, "steer_angle"),
    ({"steer_profile": "tiny-selective", "steer_angle": "120"}, 400, "steer_angle"),
    ({**FORCED, "steer_layers": [1]}, 403, "steer_layers"),
    ({**FORCED, "steer_scale": 0.0}, 403, "steer_scale"),
    ({"steer_profile": ["tiny-selective", "tiny-addition"]}, 400, "steer_profile"),
    ({"steer_profile": "tiny-selective,tiny-addition"}, 403, "steer_profile"),
    ({"steer_profile": "none"}, 403, "steer_profile"),
    ({"steer_profile": "None"}, 403, "steer_profile"),
    ({"steer_profile": "TINY-SELECTIVE", "steer_angle": 120.0}, 403, "steer_profile"),
    ({"steer_profile": "tіny-selective"}, 403, "steer_profile"),  # Cyrillic i
    ({"steer_profile": "../tiny-selective"}, 403, "steer_profile"),
    ({"STEER_PROFILE": "none"}, 400, "STEER_PROFILE"),
    ({"Steer_Profile": "none"}, 400, "Steer_Profile"),
    ({"steer_profile ": "none"}, 400, "steer_profile "),
    ({POLICY_TOKEN_KEY: "forged"}, 400, POLICY_TOKEN_KEY),
    ({"vllm_steer_digest": "0" * 64}, 400, "vllm_steer_digest"),
]
STANDARD_REFUSED = [
    ({"steer_profile": "none"}, 403, "steer_profile"),
    ({"steer_profile": "tiny-ablation"}, 403, "steer_profile"),
    ({"steer_profile": "tiny-addition", "steer_scale": 3.0000001}, 403, "steer_scale"),
    ({"steer_profile": "tiny-addition", "steer_layers": [1]}, 403, "steer_layers"),
    ({"steer_profile": "Tiny-Addition"}, 403, "steer_profile"),
    ({"steer_profile": "tiny-selective", "steer_angle": 181.0}, 403, "steer_angle"),
    ({"steer_profile": "tiny-selective", "steer_angle": -360.0}, 400, "steer_angle"),  # outside the profile's own range
]


def test_every_escalation_attempt_is_refused_naming_the_field(server, prompt_ids):
    tried = 0
    for tier, cases in (("strict", STRICT_REFUSED), ("standard", STANDARD_REFUSED)):
        for xargs, status, field in cases:
            response = complete(server, prompt_ids[0], xargs, KEYS[tier])
            assert response.status_code == status, (tier, xargs, response.text)
            assert response.json()["error"]["param"] == field, (tier, xargs, response.text)
            tried += 1
    raw = [  # bodies json.dumps cannot write
        '{"model": "M", "prompt": [1, 2], "vllm_xargs": {"steer_profile": "tiny-selective", "steer_profile": "none"}}',
        '{"model": "M", "prompt": [1, 2], "vllm_xargs": {"steer_profile": "none"}, "vllm_xargs": {}}',
        '{"model": "M", "prompt": [1, 2], "steer_profile": "none"}',
    ]
    for body in raw:
        response = _post(server, "/v1/completions", body.replace('"M"', json.dumps(server.model)), KEYS["strict"])
        assert response.status_code == 400 and response.json()["error"]["param"] in ("steer_profile", "vllm_xargs"), (
            response.text
        )
        tried += 1
    # Routes the tier policy does not cover never generate for a tenant: denied by the route table (403
    # naming `route`; the engine would refuse them too: test_serving.py's server without the policy).
    other_routes = [
        ("/v1/responses", {"model": server.model, "input": "hi", "max_output_tokens": 2}),
        ("/v1/messages", {"model": server.model, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}),
        ("/invocations", {"model": server.model, "prompt": "hi", "max_tokens": 2}),
        (
            "/v1/chat/completions/batch",
            {"model": server.model, "max_tokens": 2, "messages": [[{"role": "user", "content": "hi"}]]},
        ),
    ]
    for path, body in other_routes:
        response = _post(server, path, body, KEYS["strict"])
        assert response.status_code == 403 and response.json()["error"]["param"] == "route", (path, response.text)
        tried += 1
    print(f"\nescalation attempts refused: {tried}")


def test_what_a_strict_tenant_may_vary_is_served_exactly_as_its_forced_setting(server, prompt_ids):
    forced = tokens_and_logprobs(complete(server, prompt_ids[0], FORCED, KEYS["research"]))
    unsteered = tokens_and_logprobs(complete(server, prompt_ids[0], None, KEYS["research"]))
    assert forced != unsteered
    for xargs in (None, {}, FORCED, {"other_plugin": "x"}, {"steer_profile": "tiny-selective"}):
        assert tokens_and_logprobs(complete(server, prompt_ids[0], xargs, KEYS["strict"])) == forced, xargs
    # Fields vLLM does not know are ignored by vLLM, and cannot carry steering past the policy.
    body = {
        "model": server.model,
        "prompt": prompt_ids[0],
        "max_tokens": 12,
        "temperature": 0.0,
        "ignore_eos": True,
        "logprobs": 1,
        "return_token_ids": True,
        "extra_args": {"steer_profile": "none"},
        "sampling_params": {"extra_args": {"steer_profile": "none"}},
    }
    assert tokens_and_logprobs(_post(server, "/v1/completions", body, KEYS["strict"])) == forced
    standard = tokens_and_logprobs(complete(server, prompt_ids[0], STANDARD_DEFAULT, KEYS["research"]))
    assert tokens_and_logprobs(complete(server, prompt_ids[0], None, KEYS["standard"])) == standard


# -------------------------------------------------------------------------------------- faults under load

LOAD_REQUESTS = 1200
LOAD_CONCURRENCY = 24
UNLOADED_NOW_AND_THEN = "tiny-probe"


def _load_request(i: int) -> tuple[str, dict | None, bool, bool]:
    """(tier, vllm_xargs, stream and drop it, must succeed) for request ``i``, reproducibly."""
    rng = random.Random(i)
    tier = rng.choice(["strict", "standard", "standard", "research", "research"])
    stream = rng.random() < 0.1
    pick = rng.random()
    if tier == "strict":
        return tier, None, stream, True
    if tier == "standard":
        return (
            tier,
            rng.choice(
                [
                    None,
                    {"steer_profile": "tiny-addition", "steer_scale": rng.uniform(-2, 3)},
                    {"steer_profile": "tiny-selective", "steer_angle": rng.uniform(0, 180)},
                ]
            ),
            stream,
            True,
        )
    if pick < 0.15:  # the profile the reload thread keeps adding and removing: 200 or a clean 400
        return tier, {"steer_profile": "tiny-extra", "steer_scale": 1.0}, stream, False
    if pick < 0.25:  # invalid on purpose
        return (
            tier,
            rng.choice(
                [
                    {"steer_profile": "tiny-selective", "steer_angle": "NaN"},
                    {"steer_profile": "tiny-nope"},
                    {"steer_angel": 1},
                ]
            ),
            stream,
            False,
        )
    setting = rng.choice(
        [
            None,
            {"steer_profile": rng.choice(PROFILE_IDS)},
            {"steer_profile": "tiny-category", "steer_categories": rng.sample(["cat_a", "cat_b", "cat_c"], 2)},
            {"steer_profile": "tiny-selective", "steer_angle": rng.uniform(0, 360), "steer_layers": [2]},
        ]
    )
    # tiny-probe is unloaded now and then by the reload thread (and back at the next reload): 200 or a clean 400.
    return tier, setting, stream, not (setting and setting["steer_profile"] == UNLOADED_NOW_AND_THEN)


def test_faults_under_load_no_5xx_no_engine_restart_no_slot_leak(server, profiles_dir, prompt_ids):
    health_pid = server.proc.pid
    stop = threading.Event()
    reloads: Counter = Counter()
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}

    def reload_loop():
        n = 0
        while not stop.is_set():
            n += 1
            if n % 3 == 0:
                new = random_profile("tiny-addition", "addition", TINY, [1, 2], seed=100 + n, vector_norm=8.0)
                save_profile(profiles_dir / "tiny-addition", new.spec, new.vectors)
            elif n % 3 == 1:
                extra = random_profile("tiny-extra", "addition", TINY, [1], seed=n)
                save_profile(profiles_dir / "tiny-extra", extra.spec, extra.vectors)
            else:
                shutil.rmtree(profiles_dir / "tiny-extra", ignore_errors=True)
            reloads[
                requests.post(server.url + "/v1/steering/admin/reload", headers=admin, timeout=120).status_code
            ] += 1
            if n % 5 == 0:  # unload, then the next reload brings it back
                reloads[
                    (
                        "unload",
                        requests.delete(
                            server.url + f"/v1/steering/admin/profiles/{UNLOADED_NOW_AND_THEN}",
                            headers=admin,
                            timeout=60,
                        ).status_code,
                    )
                ] += 1
            stop.wait(0.3)

    def one(i: int) -> tuple[int, bool, dict | None, requests.Response | None]:
        tier, xargs, stream, must = _load_request(i)
        body = {
            "model": server.model,
            "prompt": prompt_ids[i % len(prompt_ids)],
            "max_tokens": 3 + i % 6,
            "temperature": 0.0,
        }
        if xargs is not None:
            body["vllm_xargs"] = xargs
        if stream:  # read one chunk, then hang up mid-stream
            body.update(stream=True, max_tokens=200, ignore_eos=True)
            with requests.post(
                server.url + "/v1/completions",
                data=json.dumps(body),
                stream=True,
                timeout=120,
                headers={"content-type": "application/json", "authorization": f"Bearer {KEYS[tier]}"},
            ) as r:
                if r.status_code == 200:
                    next(r.iter_lines())
                    return r.status_code, must, xargs, None
                r.content  # noqa: B018 - read the error body before the connection closes
                return r.status_code, must, xargs, r
        r = _post(server, "/v1/completions", body, KEYS[tier])
        return r.status_code, must, xargs, r

    reloader = threading.Thread(target=reload_loop, daemon=True)
    started = time.time()
    reloader.start()
    try:
        with ThreadPoolExecutor(LOAD_CONCURRENCY) as pool:
            results = list(pool.map(one, range(LOAD_REQUESTS)))
    finally:
        stop.set()
        reloader.join(180)
        # Leave the server as the next tests expect it, pass or fail: no tiny-extra, tiny-probe loaded again.
        shutil.rmtree(profiles_dir / "tiny-extra", ignore_errors=True)
        final_reload = requests.post(server.url + "/v1/steering/admin/reload", headers=admin, timeout=120).status_code
    elapsed = time.time() - started
    statuses = Counter(status for status, *_ in results)
    assert all(status < 500 for status in statuses), statuses
    for status, must, xargs, response in results:
        if must:
            assert status == 200, (xargs, status, response.text if response is not None else "")
        elif status != 200:
            _named_error(response, xargs or {})
    assert set(reloads) <= {200, ("unload", 200), ("unload", 404)} and reloads[200] >= 3, reloads
    # The engine never restarted, and once the dropped streams are aborted no steering slot stays taken.
    assert server.proc.poll() is None and server.proc.pid == health_pid
    deadline = time.time() + 60
    while True:
        status = requests.get(server.url + "/v1/steering/admin/status", headers=admin, timeout=30).json()
        if status["replicas"][0]["workers"][0]["slots_in_use"] == 0 or time.time() > deadline:
            break
        time.sleep(1)
    assert status["replicas"][0]["workers"][0]["slots_in_use"] == 0, status
    log = server.log.read_text()
    assert "EngineDeadError" not in log and "EngineCore encountered" not in log
    assert not any(key in log for key in (*KEYS.values(), ADMIN_KEY)), "API keys never reach the log"
    assert final_reload == 200
    _still_serving(server, prompt_ids)
    print(
        f"\nload: {LOAD_REQUESTS} requests in {elapsed:.0f} s at concurrency {LOAD_CONCURRENCY}, "
        f"statuses {dict(statuses)}, reloads {dict(reloads)}"
    )


# ------------------------------------------------------------------------------------------- fail closed


def _waiting(server) -> float:
    text = requests.get(server.url + "/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=30).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("vllm:num_requests_waiting")
    )


def test_a_profile_removed_while_its_requests_are_queued_still_steers_them(server, profiles_dir, prompt_ids):
    """Admitted before the removal: finished with the version admitted; arriving after: a clean 400."""
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    probe = {"steer_profile": "tiny-probe", "steer_scale": -6.0}
    running_at_once = 16  # the server's --max-num-seqs

    def long(xargs, max_tokens=400):  # long enough that the engine, not the front end, is the bottleneck
        body = {
            "model": server.model,
            "prompt": prompt_ids[2],
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "return_token_ids": True,
            "vllm_xargs": xargs,
        }
        response = _post(server, "/v1/completions", body, KEYS["research"])
        return response.status_code, response.json()

    (_, steered), (_, unsteered) = long(probe), long({"steer_profile": "none"})
    steered, unsteered = steered["choices"][0]["token_ids"], unsteered["choices"][0]["token_ids"]
    assert steered != unsteered
    saved = profiles_dir.parent / "tiny-probe.saved"
    shutil.copytree(profiles_dir / "tiny-probe", saved)
    try:
        with ThreadPoolExecutor(64) as pool:
            futures = [pool.submit(long, probe) for _ in range(64)]
            deadline, waiting = time.time() + 60, 0.0
            while waiting < 1 and time.time() < deadline:
                waiting = _waiting(server)
                time.sleep(0.02)
            assert waiting >= 1, "no request was ever queued in the engine"
            done_before = sum(f.done() for f in futures)
            assert (
                requests.delete(
                    server.url + "/v1/steering/admin/profiles/tiny-probe", headers=admin, timeout=60
                ).status_code
                == 200
            )
            shutil.rmtree(profiles_dir / "tiny-probe")
            reload = requests.post(server.url + "/v1/steering/admin/reload", headers=admin, timeout=120)
            assert reload.status_code == 200 and "tiny-probe" not in reload.json()["profiles"], reload.text
            results = [f.result() for f in futures]
        served = [body["choices"][0]["token_ids"] for status, body in results if status == 200]
        refused = [body for status, body in results if status != 200]
        assert all(out == steered for out in served), (
            "every admitted request finished with the version it was admitted with"
        )
        assert all(body["error"]["param"] == "steer_profile" for body in refused), refused[:3]
        # More served than had finished before the removal plus could run at once: some of them were queued then.
        assert len(served) - done_before > running_at_once, (len(served), done_before, len(refused))
        print(
            f"\nremoval: {len(served)} served steered ({done_before} done before the removal), {len(refused)} clean 400s"
        )
        gone = complete(server, prompt_ids[0], probe, KEYS["research"])
        assert gone.status_code == 400 and gone.json()["error"]["param"] == "steer_profile"
    finally:  # pass or fail, the next tests find tiny-probe as the fixture made it
        if not (profiles_dir / "tiny-probe").exists():
            shutil.copytree(saved, profiles_dir / "tiny-probe")
        restored = requests.post(server.url + "/v1/steering/admin/reload", headers=admin, timeout=120)
    assert restored.status_code == 200 and "tiny-probe" in restored.json()["profiles"], restored.text


def test_the_profile_directory_vanishing_at_run_time_changes_nothing_served(server, profiles_dir, prompt_ids):
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    before = tokens_and_logprobs(complete(server, prompt_ids[0], FORCED, KEYS["research"]))
    moved = profiles_dir.parent / "moved-away"
    profiles_dir.rename(moved)
    try:
        reload = requests.post(server.url + "/v1/steering/admin/reload", headers=admin, timeout=120)
        assert reload.status_code == 400 and str(profiles_dir) in reload.json()["error"]["message"], reload.text
        assert tokens_and_logprobs(complete(server, prompt_ids[0], FORCED, KEYS["research"])) == before
        assert tokens_and_logprobs(complete(server, prompt_ids[0], None, KEYS["strict"])) == before
    finally:
        moved.rename(profiles_dir)


def _corrupt_json(edit):
    def apply(d: Path) -> None:
        spec = json.loads((d / "profile.json").read_text())
        edit(spec)
        (d / "profile.json").write_text(json.dumps(spec))

    return apply


def _corrupt_tensors(edit):
    def apply(d: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(d / "tensors.safetensors")
        edit(tensors)
        save_file(tensors, d / "tensors.safetensors")

    return apply


def _escaping_symlink(d: Path) -> None:
    outside = d.parent.parent / "outside.safetensors"
    shutil.copy(d / "tensors.safetensors", outside)
    (d / "tensors.safetensors").unlink()
    (d / "tensors.safetensors").symlink_to(outside)


BAD_FILES = [  # (what is done to the loaded tiny-addition's own files, file named, field named)
    (
        "corrupt safetensors",
        lambda d: (d / "tensors.safetensors").write_bytes(b"garbage, not safetensors"),
        "tensors.safetensors",
        "<file>",
    ),
    (
        "truncated safetensors",
        lambda d: (d / "tensors.safetensors").write_bytes((d / "tensors.safetensors").read_bytes()[:-9]),
        "tensors.safetensors",
        "<file>",
    ),
    (
        "wrong hidden width",
        _corrupt_tensors(lambda t: t.update({name: t[name][:64] for name in list(t)[:1]})),
        "tensors.safetensors",
        "tensors.",
    ),
    (
        "NaN tensor",
        _corrupt_tensors(lambda t: [v.__setitem__(0, float("nan")) for v in list(t.values())[:1]]),
        "tensors.safetensors",
        "tensors.",
    ),
    (
        "inf tensor",
        _corrupt_tensors(lambda t: [v.__setitem__(3, float("inf")) for v in list(t.values())[:1]]),
        "tensors.safetensors",
        "tensors.",
    ),
    ("wrong layer count", _corrupt_json(lambda s: s["model"].update(num_layers=30)), "profile.json", "model"),
    ("layer beyond the model", _corrupt_json(lambda s: s.update(layers=[1, 7])), "profile.json", "layers"),
    (
        "other model",
        _corrupt_json(lambda s: s["model"].update(architecture="MistralForCausalLM")),
        "profile.json",
        "model",
    ),
    ("missing field", _corrupt_json(lambda s: s.pop("method")), "profile.json", "method"),
    ("extra field", _corrupt_json(lambda s: s.update(strength_boost=10)), "profile.json", "strength_boost"),
    ("not JSON", lambda d: (d / "profile.json").write_text("{nope"), "profile.json", "<json>"),
    ("symlink escaping the directory", _escaping_symlink, "tensors.safetensors", "<path>"),
]


def test_a_bad_file_never_replaces_the_loaded_profile(server, profiles_dir, prompt_ids):
    """Each corruption is written over the *loaded* profile's own files: the reload is refused naming the
    file and the field, and requests keep getting the loaded version."""
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    add = {"steer_profile": "tiny-addition", "steer_scale": 2.0}
    before = tokens_and_logprobs(complete(server, prompt_ids[0], add, KEYS["research"]))
    good = profiles_dir.parent / "tiny-addition.good"
    shutil.copytree(profiles_dir / "tiny-addition", good)
    try:
        for name, corrupt, filename, field in BAD_FILES:
            corrupt(profiles_dir / "tiny-addition")
            response = requests.post(server.url + "/v1/steering/admin/reload", headers=admin, timeout=120)
            message = response.json()["error"]["message"]
            assert response.status_code == 400, (name, response.text)
            assert f"tiny-addition/{filename}" in message and f": {field}" in message, (name, message)
            assert tokens_and_logprobs(complete(server, prompt_ids[0], add, KEYS["research"])) == before, name
            shutil.rmtree(profiles_dir / "tiny-addition")
            shutil.copytree(good, profiles_dir / "tiny-addition")
    finally:
        shutil.rmtree(profiles_dir / "tiny-addition", ignore_errors=True)
        shutil.copytree(good, profiles_dir / "tiny-addition")
    assert requests.post(server.url + "/v1/steering/admin/reload", headers=admin, timeout=120).status_code == 200
    assert tokens_and_logprobs(complete(server, prompt_ids[0], add, KEYS["research"])) == before


def _start_and_expect_refusal(cmd: list[str], env: dict, log: Path, needle: str, *, key: str) -> str:
    record_engine_start(key)
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=400)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            raise AssertionError(f"the server kept running:\n{log.read_text()[-3000:]}") from None
    text = log.read_text()
    assert rc != 0 and needle in text, (rc, text[-4000:])
    return text


def test_a_worker_that_cannot_load_its_profiles_stops_the_server_from_starting(tiny_root, tmp_path):
    """vLLM's own launcher with the plugin pointed at a directory that is not there: no server, not an unsteered one."""
    env = server_env()
    env.update(VLLM_PLUGINS="vllm_steer", VLLM_STEER_PROFILES=str(tmp_path / "gone"))
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", *vllm_args(tiny_root, free_port())]
    _start_and_expect_refusal(
        cmd, env, tmp_path / "server.log", "profile directory does not exist", key="server-refusal:missing-profiles"
    )


def test_an_exception_injected_into_the_workers_set_up_stops_the_server_from_starting(tiny_root, tmp_path):
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import vllm_steer.engine.runtime as runtime\n"
        "def _boom(self, *args, **kwargs):\n"
        "    raise RuntimeError('injected fault in SteeringRuntime set-up')\n"
        "runtime.SteeringRuntime.__init__ = _boom\n"
    )
    env = server_env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(inject), env.get("PYTHONPATH")) if p)
    cmd = serve_command(tiny_root, free_port(), tiny_root / "profiles")
    _start_and_expect_refusal(
        cmd,
        env,
        tmp_path / "server.log",
        "injected fault in SteeringRuntime set-up",
        key="server-refusal:injected-fault",
    )
