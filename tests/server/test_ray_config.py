"""The Ray deployment's configuration: serve.yaml and the KubeRay manifest parse into Ray's own schema, the
builder's args are validated with the field named, and the builder wires the plugin into every replica."""

from __future__ import annotations

import json

import pytest
import yaml

from support import REPO as ROOT
from vllm_steer.core.profile import ProfileError
from vllm_steer.core.wire import POLICY_SECRET_ENV
from vllm_steer.server.ray_app import RayAppArgs, RayAppArgsError, build_app

SERVE_YAML = ROOT / "deploy" / "serve.yaml"
RAYSERVICE = ROOT / "deploy" / "kuberay" / "rayservice.yaml"


def _serve_schema(raw: dict):
    from ray.serve.schema import ServeDeploySchema

    return (
        ServeDeploySchema.model_validate(raw)
        if hasattr(ServeDeploySchema, "model_validate")
        else ServeDeploySchema.parse_obj(raw)
    )


def test_serve_yaml_parses_into_rays_schema_and_our_args():
    schema = _serve_schema(yaml.safe_load(SERVE_YAML.read_text()))
    (app,) = schema.applications
    assert app.import_path == "vllm_steer.server.ray_app:build_app"
    args = RayAppArgs.parse(app.args)
    assert args.accelerator == "cpu" and args.autoscaling.max_replicas >= args.autoscaling.min_replicas
    assert (ROOT / args.profiles).is_dir() and (ROOT / args.tenants).is_file()
    assert schema.http_options.host == "127.0.0.1"  # local runs stay on loopback


def test_kuberay_manifest_has_what_kuberay_requires():
    manifest = yaml.safe_load(RAYSERVICE.read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    assert manifest["metadata"]["name"]
    spec = manifest["spec"]
    cluster = spec["rayClusterConfig"]
    assert cluster["rayVersion"] == "2.60.0" and cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert "rayStartParams" in head and head["template"]["spec"]["containers"][0]["image"]
    (gpu,) = cluster["workerGroupSpecs"]
    assert gpu["groupName"] and "rayStartParams" in gpu
    assert 1 <= gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    worker = gpu["template"]["spec"]["containers"][0]
    assert worker["image"] and worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for container in (head["template"]["spec"]["containers"][0], worker):
        assert any(e["name"] == POLICY_SECRET_ENV for e in container["env"]), "every pod needs the shared policy secret"

    serve = _serve_schema(yaml.safe_load(spec["serveConfigV2"]))  # the embedded Serve config, in Ray's schema
    (app,) = serve.applications
    args = RayAppArgs.parse(app.args)
    assert args.accelerator == "gpu" and args.autoscaling.max_replicas == gpu["maxReplicas"]
    assert args.health_check_period_s > 0 and args.health_check_timeout_s > 0
    assert args.tenants, "a production manifest must enforce tiers"


@pytest.mark.parametrize(
    "raw, field",
    [
        ({}, "profiles"),
        ({"profiles": "p", "replicas": 2}, "replicas"),
        ({"profiles": "p", "autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "autoscaling"),
        ({"profiles": "p", "accelerator": "tpu"}, "accelerator"),
        ({"profiles": "p", "max_slots": 0}, "max_slots"),
        ({"profiles": "p", "autoscaling": {"max_replicas": "many"}}, "autoscaling.max_replicas"),
    ],
)
def test_bad_args_name_the_field(raw, field):
    with pytest.raises(RayAppArgsError) as err:
        RayAppArgs.parse(raw)
    assert err.value.field == field, str(err.value)


def test_builder_refuses_bad_paths_and_profiles_before_deploying(tmp_path, tiny_root):
    with pytest.raises(RayAppArgsError, match="profiles"):
        build_app({"profiles": str(tmp_path / "missing"), "model": str(tiny_root / "model")})
    bad = tmp_path / "bad"
    (bad / "p").mkdir(parents=True)
    (bad / "p" / "profile.json").write_text(json.dumps({"id": "p"}))
    with pytest.raises(ProfileError) as err:
        build_app({"profiles": str(bad), "model": str(tiny_root / "model")})
    assert "profile.json" in str(err.value)


@pytest.fixture
def ray_session(monkeypatch):
    """A Ray session for the builder (Ray Serve LLM's builder reads the session's runtime_env); shut down after."""
    import ray

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=1, include_dashboard=False, object_store_memory=128 * 1024 * 1024)
    yield
    ray.shutdown()


def test_builder_wires_the_plugin_into_every_replica(tiny_root, monkeypatch, ray_session):
    monkeypatch.setenv(POLICY_SECRET_ENV, "s3cret")
    app = build_app(
        {
            "model": str(tiny_root / "model"),
            "model_id": "tiny",
            "profiles": str(tiny_root / "profiles"),
            "accelerator": "cpu",
            "autoscaling": {"min_replicas": 2, "max_replicas": 3},
            "engine_kwargs": {"enforce_eager": True},
            "env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1"},
        }
    )
    ingress = app._bound_deployment
    assert ingress.name == "SteerIngress"
    assert ingress.ray_actor_options["runtime_env"]["env_vars"][POLICY_SECRET_ENV] == "s3cret"
    (llm,) = ingress.init_kwargs["llm_deployments"].values()
    deployment = llm._bound_deployment
    env = deployment.ray_actor_options["runtime_env"]["env_vars"]
    assert env["VLLM_PLUGINS"] == "vllm_steer" and env[POLICY_SECRET_ENV] == "s3cret"
    assert env["VLLM_STEER_PROFILES"] == str(tiny_root / "profiles") and env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert deployment._deployment_config.autoscaling_config.min_replicas == 2
    assert deployment._deployment_config.autoscaling_config.max_replicas == 3
    assert deployment.func_or_class.__name__.endswith("SteerLLMServer") or "SteerLLMServer" in repr(
        deployment.func_or_class
    )
