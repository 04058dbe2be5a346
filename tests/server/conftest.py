"""Server-area fixtures: the tenants file, a module's own copy of the tiny profiles, and the server on them.

Module-scoped on purpose: each module that uses ``server`` (test_serving.py, test_hardening.py) gets a
server of its own, so hot reloads, fuzzing and faults in one module never reach another's; test_ray.py
serves its own copy of the profiles too. The engine-start count keys them by module.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from support.server import ADMIN_KEY, KEYS, TIERS, Server, free_port, serve_command, server_env
from vllm_steer.server.tenants import hash_api_key


@pytest.fixture(scope="module")
def tenants_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tenants") / "tenants.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "format_version": 1,
                "tiers": TIERS,
                "tenants": [
                    {"name": f"acme-{tier}", "tier": tier, "key_hash": hash_api_key(key)} for tier, key in KEYS.items()
                ],
                "admins": [{"name": "ops", "key_hash": hash_api_key(ADMIN_KEY)}],
            }
        )
    )
    return path


@pytest.fixture(scope="module")
def profiles_dir(tiny_root, tmp_path_factory) -> Path:
    """A copy of the tiny profiles that this module's hot-reload tests may change."""
    path = tmp_path_factory.mktemp("served") / "profiles"
    shutil.copytree(tiny_root / "profiles", path)
    return path


@pytest.fixture(scope="module")
def server(request, tiny_root, tenants_file, profiles_dir, tmp_path_factory):
    """The README's command: vllm-steer serve MODEL --plugin vllm_steer --steer-profiles ... --steer-tenants ..."""
    port = free_port()
    audit_log = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    cmd = [
        *serve_command(
            tiny_root, port, profiles_dir, "--steer-tenants", str(tenants_file), "--steer-audit-log", str(audit_log)
        ),
        "--enable-log-requests",
        "--enable-prompt-tokens-details",
    ]
    module = request.module.__name__.rpartition(".")[2]
    srv = Server(
        cmd,
        server_env(),
        tmp_path_factory.mktemp("server") / "server.log",
        str(tiny_root / "model"),
        profiles_dir,
        key=f"server-tiers:{module}",
    )
    srv.audit_log = audit_log
    yield srv
    srv.stop()
