"""The test server: `vllm-steer serve` (or vLLM's own launcher) on 127.0.0.1, three tenant tiers, and its clients.

Used by tests/server (test_serving.py, test_hardening.py, test_ray.py); the fixtures that start one are in
tests/server/conftest.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from support.mixed_batch import MAX_TOKENS, mixed_rows
from vllm_steer.testing.engines import record_engine_start

KEYS = {
    "strict": "key-strict-0123456789",
    "standard": "key-standard-0123456789",
    "research": "key-research-0123456789",
    "locked": "key-locked-0123456789",
}
ADMIN_KEY = "key-admin-0123456789"
TIERS = {
    # strict and standard keep raw prompts (the `completions` control) so that their rows can be compared
    # token for token with the offline engine's; `locked` is strict as the tenants file defaults it
    "strict": {"forced": {"profile": "tiny-selective", "angle": 120.0}, "allow_controls": ["completions"]},
    "standard": {
        "default": {"profile": "tiny-addition", "scale": 3.0},
        "allow_unsteered": False,
        "profiles": {"tiny-addition": {"scale": [-2.0, 3.0]}, "tiny-selective": {"angle": [0.0, 180.0]}},
        "max_concurrent_steered": 64,
        "allow_controls": ["completions", "n"],
    },
    "research": {"profiles": "*", "allow_unsteered": True, "allow_layers_override": True},
    "locked": {"forced": {"profile": "tiny-selective", "angle": 120.0}},
}
# (tier, what the client sends, the SETTINGS row it must be served as)
ADMITTED = [
    ("strict", None, 9),
    ("strict", {"steer_profile": "tiny-selective", "steer_angle": 120.0}, 9),
    ("standard", None, 1),
    ("standard", {"steer_profile": "tiny-addition", "steer_scale": -2.0}, 2),
    ("standard", {"steer_profile": "tiny-selective", "steer_angle": 30.0}, 10),
    ("research", None, 0),
    ("research", {"steer_profile": "tiny-angular-adaptive", "steer_angle": 200.0}, 8),
    ("research", {"steer_profile": "tiny-category", "steer_categories": ["cat_a", "cat_c"], "steer_scale": 2.0}, 4),
]
REFUSED = [  # (tier, vllm_xargs, status, param)
    ("strict", {"steer_profile": "tiny-addition"}, 403, "steer_profile"),
    ("strict", {"steer_profile": "tiny-selective", "steer_angle": 0.0}, 403, "steer_angle"),
    ("strict", {"steer_profile": "none"}, 403, "steer_profile"),
    ("standard", {"steer_profile": "tiny-addition", "steer_scale": 3.5}, 403, "steer_scale"),
    ("standard", {"steer_profile": "tiny-ablation"}, 403, "steer_profile"),
    ("standard", {"steer_profile": "none"}, 403, "steer_profile"),
    ("standard", {"steer_profile": "TINY-ADDITION"}, 403, "steer_profile"),
    ("standard", {"steer_profile": "tiny-selective", "steer_layers": [1]}, 403, "steer_layers"),
    ("research", {"steer_profile": "tiny-selective", "steer_angle": "NaN"}, 400, "steer_angle"),
    ("research", {"steer_profile": "tiny-selective", "steer_angle": "ninety"}, 400, "steer_angle"),
    ("research", {"steer_profile": "no-such-profile"}, 400, "steer_profile"),
    ("research", {"steer_profile": "tiny-selective", "steer_angel": 90}, 400, "steer_angel"),
    ("research", {"steer_profile": "tiny-selective", "steer_layers": [0]}, 400, "steer_layers"),
    ("research", {"steer_profile": "tiny-addition", "steer_angle": 10}, 400, "steer_angle"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process started from ``cmd``, healthy when constructed; counted as engine start ``key``."""

    def __init__(self, cmd: list[str], env: dict, log: Path, model: str, profiles: Path | None = None, *, key: str):
        record_engine_start(key)
        self.model = model
        self.profiles = profiles
        self.port = int(cmd[cmd.index("--port") + 1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with open(log, "w") as out:  # the child keeps its own copy of the file
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{log.read_text()[-5000:]}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(2)
        self.stop()
        raise AssertionError(f"server not healthy in time:\n{log.read_text()[-5000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)

    def post(self, path: str, body: dict | str, key: str | None) -> requests.Response:
        headers = {"content-type": "application/json"}
        if key is not None:
            headers["authorization"] = f"Bearer {key}"
        data = body if isinstance(body, str) else json.dumps(body)
        return requests.post(self.url + path, data=data, headers=headers, timeout=300)


def server_env() -> dict:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    for key in ("VLLM_PLUGINS", "VLLM_STEER_PROFILES", "VLLM_STEER_TENANTS"):
        env.pop(key, None)
    return env


def serve_command(root: Path, port: int, profiles: Path, *steer_options: str) -> list[str]:
    """The README's command on the tiny model in ``root``: ``vllm-steer serve MODEL --plugin vllm_steer
    --steer-profiles PROFILES [--steer-...]`` with the test server's vLLM arguments."""
    return [
        sys.executable,
        "-m",
        "vllm_steer.cli",
        "serve",
        "--plugin",
        "vllm_steer",
        "--steer-profiles",
        str(profiles),
        *steer_options,
        *vllm_args(root, port),
    ]


def vllm_args(tiny_root: Path, port: int) -> list[str]:
    return [
        str(tiny_root / "model"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        "512",
        "--max-num-seqs",
        "16",
        "--block-size",
        "32",
        "--seed",
        "0",
        "--log-error-stack",
    ]


def completion_body(model: str, ids: list[int], xargs: dict | None, max_tokens: int = MAX_TOKENS) -> dict:
    """A greedy ``/v1/completions`` body on token ids, with logprobs and token ids back (comparable to the offline rows)."""
    body = {
        "model": model,
        "prompt": ids,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "logprobs": 1,
        "return_token_ids": True,
    }
    if xargs is not None:
        body["vllm_xargs"] = xargs
    return body


def complete(server: Server, ids: list[int], xargs: dict | None, key: str | None) -> requests.Response:
    return server.post("/v1/completions", completion_body(server.model, ids, xargs), key)


def offline_rows(eager_on: dict, prompt_ids) -> dict:
    """The offline engine's row for each (prompt ids, setting) of the mixed batch (support.mixed_batch)."""
    return {
        (tuple(ids), json.dumps(s)): row
        for row, (ids, s) in zip(eager_on["phases"][0], mixed_rows(prompt_ids), strict=True)
    }


def tokens_and_logprobs(response: requests.Response) -> dict:
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return {"tokens": choice["token_ids"], "logprobs": choice["logprobs"]["token_logprobs"]}


def restore_profiles(url: str, profiles_dir: Path, original: Path, timeout: float = 300) -> None:
    """Put a served profile directory back as its fixture made it (a copy of ``original``) and reload it
    through the admin route, so that later tests in the module find the profiles they expect."""
    shutil.rmtree(profiles_dir, ignore_errors=True)
    shutil.copytree(original, profiles_dir)
    response = requests.post(
        url + "/v1/steering/admin/reload", headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=timeout
    )
    assert response.status_code == 200, response.text
