"""The server's errors share one base (core.errors.SteerError, carrying the field) and keep their messages;
the API-key command answers under its name and its old one (`python -m vllm_steer.tenants`)."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

from vllm_steer.core.errors import SteerError
from vllm_steer.core.settings import ConfigError
from vllm_steer.server.ray_app import RayAppArgs, RayAppArgsError
from vllm_steer.server.tenants import PolicyError, TenantPolicy, TenantsFileError


@pytest.mark.parametrize(
    "err, field, message, text",
    [
        (PolicyError(403, "steer_angle", "too far"), "steer_angle", "too far", "403 steer_angle: too far"),
        (TenantsFileError("t.yaml", "tiers.x", "bad"), "tiers.x", "bad", "t.yaml: tiers.x: bad"),
        (RayAppArgsError("profiles", "missing"), "profiles", "missing", "vllm-steer Ray app args: profiles: missing"),
        (ConfigError("fused_op", "bad"), "fused_op", "bad", "vllm_steer config: fused_op: bad"),
    ],
)
def test_one_base_carrying_the_field_and_the_same_messages(err, field, message, text):
    assert isinstance(err, SteerError)
    assert (err.field, err.message, str(err)) == (field, message, text)


def test_tenants_file_error_keeps_its_path():
    err = TenantsFileError("t.yaml", "tiers", "bad")
    assert err.path == "t.yaml"
    with pytest.raises(TenantsFileError) as info:
        TenantPolicy.from_mapping({"format_version": 1, "tiers": {}, "tenants": []}, source="here.yaml")
    assert info.value.field == "tiers" and "more problem" in info.value.message  # count_more, as before


@pytest.mark.parametrize(
    "raw, field, fragment",
    [
        ({"profiles": "p", "autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "autoscaling", "above max_replicas"),
        (
            {"profiles": "p", "fused_op": "fast"},
            "fused_op",
            "'compiled'",
        ),  # the plugin's settings, validated as SteerConfig
        ({"profiles": "p", "max_slots": 5000}, "max_slots", "4096"),
    ],
)
def test_ray_args_errors_name_the_field_without_pydantic_prefixes(raw, field, fragment):
    with pytest.raises(RayAppArgsError) as err:
        RayAppArgs.parse(raw)
    assert err.value.field == field and fragment in err.value.message
    assert not err.value.message.startswith("Value error")


def test_ray_args_steer_config_is_the_plugin_settings_with_absolute_paths():
    args = RayAppArgs.parse({"profiles": "p", "max_slots": 3, "fused_op": "off", "accelerator": "cpu"})
    config = args.steer_config("/abs/p", None)
    assert config.to_env(policy_secret="s") == {
        "VLLM_PLUGINS": "vllm_steer",
        "VLLM_STEER_PROFILES": "/abs/p",
        "VLLM_STEER_MAX_SLOTS": "3",
        "VLLM_STEER_FUSED_OP": "off",
        "VLLM_STEER_POLICY_SECRET": "s",
    }


@pytest.mark.parametrize("module", ["vllm_steer.server.tenants", "vllm_steer.tenants"])
def test_hash_key_command_under_both_names(module):
    done = subprocess.run(
        [sys.executable, "-m", module, "hash-key"],
        input="a-key\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    (line,) = done.stdout.splitlines()
    scheme, salt, digest = line.removeprefix("key_hash: ").split("$")
    assert scheme == "sha256" and hashlib.sha256(bytes.fromhex(salt) + b"a-key").hexdigest() == digest


def test_new_key_command():
    new = subprocess.run(
        [sys.executable, "-m", "vllm_steer.server.tenants", "new-key"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "key_hash: sha256$" in new.stdout and "vsk_" in new.stdout
