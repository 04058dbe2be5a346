"""One settings object: every SteerConfig field has one environment variable and one `vllm-steer serve`
option, and the environment it renders reads back as the same config (serve, the Ray replicas, the engine)."""

from __future__ import annotations

import json
import os
import typing

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from vllm_steer.cli import app
from vllm_steer.core.errors import SteerError
from vllm_steer.core.settings import (
    ENV_PREFIX,
    PLUGINS_ENV,
    ConfigError,
    SteerConfig,
    plugins_value,
)
from vllm_steer.core.wire import POLICY_SECRET_ENV


def _serve_params() -> dict:
    serve = get_command(app).commands["serve"]
    return {param.name: param for param in serve.params if param.name.startswith("steer_")}


def test_every_field_has_one_env_var_and_one_serve_option():
    fields = set(SteerConfig.model_fields)
    options = SteerConfig.options()
    assert [option.field for option in options] == list(SteerConfig.model_fields)
    assert {option.env for option in options} == {ENV_PREFIX + name.upper() for name in fields}
    params = _serve_params()
    assert set(params) == {option.param for option in options}, "serve's --steer-* options and SteerConfig drifted"
    for option in options:
        param = params[option.param]
        assert option.flag in param.opts, (option.flag, param.opts)
        annotation = SteerConfig.model_fields[option.field].annotation
        if annotation is bool:
            assert param.secondary_opts == ["--no-" + option.flag[2:]]
        if typing.get_origin(annotation) is typing.Literal:
            assert param.metavar == "[" + "|".join(typing.get_args(annotation)) + "]"
        assert option.help, f"SteerConfig.{option.field} needs a docstring (it is the option's help)"


def test_serve_help_is_the_field_docs_with_their_env_vars():
    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    for option in SteerConfig.options():
        assert option.flag in result.output and option.env in result.output


CONFIGS = [
    SteerConfig(),
    SteerConfig(profiles="/p", tenants="/t.yaml", max_slots=7, hook_all_sites=True, fused_op="compiled"),
    SteerConfig(profiles="relative/p", hook_all_sites=False, fused_op="off"),
    SteerConfig(max_slots=4096, fused_op="auto"),
]


@pytest.mark.parametrize("config", CONFIGS, ids=range(len(CONFIGS)))
def test_to_env_resolves_back_to_the_same_config(config, monkeypatch):
    env = config.to_env()
    assert env[PLUGINS_ENV] == "vllm_steer"
    assert SteerConfig.resolve(None, environ=env) == config
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert SteerConfig.resolve(None) == config, "the engine's reading of the environment"


def test_to_env_carries_only_what_was_set_plus_plugins_and_secret():
    env = SteerConfig(fused_op="off").to_env(plugins="other, vllm_steer,,other", policy_secret="s3cret")
    assert env == {PLUGINS_ENV: "other,vllm_steer", "VLLM_STEER_FUSED_OP": "off", POLICY_SECRET_ENV: "s3cret"}
    assert plugins_value(["a", "b"]) == "a,b,vllm_steer" and plugins_value(None) == "vllm_steer"


def test_additional_config_wins_and_errors_name_the_setting():
    env = {"VLLM_STEER_FUSED_OP": "triton", "VLLM_STEER_MAX_SLOTS": "3"}
    config = SteerConfig.resolve({"vllm_steer": {"fused_op": "off"}}, environ=env)
    assert (config.fused_op, config.max_slots) == ("off", 3)
    with pytest.raises(ConfigError) as err:
        SteerConfig.resolve(None, environ={"VLLM_STEER_MAX_SLOTS": "0"})
    assert isinstance(err.value, SteerError) and err.value.field == "max_slots"
    assert str(err.value).startswith("vllm_steer config: max_slots: ")
    with pytest.raises(ConfigError) as err:
        SteerConfig.resolve({"vllm_steer": ["profiles"]})
    assert err.value.field == "additional_config.vllm_steer"


def test_serve_dry_run_with_every_option_shows_every_env_var(tmp_path, monkeypatch):
    (tmp_path / "profiles").mkdir()
    (tmp_path / "tenants.yaml").write_text("format_version: 1\n")
    monkeypatch.chdir(tmp_path)
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX) or key == PLUGINS_ENV:
            monkeypatch.delenv(key)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    values = {
        "profiles": "profiles",
        "max_slots": "5",
        "tenants": "tenants.yaml",
        "fused_op": "compiled",
        "audit_log": "audit.jsonl",
        "max_body_bytes": "65536",
    }
    switches = [
        "--steer-hook-all-sites",
        "--steer-strict-model-match",
        "--steer-audit-prompts",
        "--steer-allow-admin-options",
        "--steer-public-metrics",
    ]
    args = ["serve", "--dry-run", "--plugin", "other", *switches, "--model", "m", "--enforce-eager"]
    for field, value in values.items():
        args += [SteerConfig.option(field).flag, value]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout.strip().splitlines()[-1])
    expected = {option.env for option in SteerConfig.options()} | {PLUGINS_ENV}
    assert set(shown["env"]) == expected
    assert shown["env"]["VLLM_STEER_PROFILES"] == str(tmp_path / "profiles")  # made absolute
    assert shown["env"][PLUGINS_ENV] == "other,vllm_steer"
    assert shown["cmd"][-3:] == ["--model", "m", "--enforce-eager"]
    assert SteerConfig.resolve(None, environ=shown["env"]) == SteerConfig(
        profiles=str(tmp_path / "profiles"),
        tenants=str(tmp_path / "tenants.yaml"),
        max_slots=5,
        hook_all_sites=True,
        strict_model_match=True,
        fused_op="compiled",
        audit_log="audit.jsonl",
        audit_prompts=True,
        max_body_bytes=65536,
        allow_admin_options=True,
        public_metrics=True,
    )


@pytest.mark.parametrize(
    "flag, value, fragment",
    [
        ("--steer-profiles", "missing-dir", "does not exist"),
        ("--steer-fused-op", "fast", "'compiled'"),
        ("--steer-max-slots", "0", "greater than or equal to 1"),
    ],
)
def test_serve_refuses_a_bad_option_naming_it(flag, value, fragment):
    result = CliRunner().invoke(app, ["serve", "--dry-run", "--model", "m", flag, value])
    assert result.exit_code == 2 and flag in result.output and fragment in result.output, result.output
