"""Ray Serve: N steered vLLM replicas behind one OpenAI ingress that enforces the tenant tiers.

Built on Ray Serve LLM (``ray.serve.llm``), not beside it:

* every **replica** is Ray's ``LLMServer`` running vLLM's ``AsyncLLM`` — so requests go through
  vLLM's own OpenAI handlers and input validation, where the ``vllm_steer`` general plugin (loaded in
  every engine process through ``runtime_env.env_vars``) validates ``vllm_xargs`` and steers each row;
* the **ingress** is Ray's ``OpenAiIngress`` FastAPI app with vllm-steer's
  :class:`~vllm_steer.server.middleware.SteeringPolicyMiddleware` and routes (:mod:`vllm_steer.server.routes`) mounted — the very code that guards
  ``vllm serve``, so tiers, statuses and error shapes are the same on both paths.

Why an ingress subclass rather than vLLM's endpoint plugin inside each replica: Ray's default topology
puts a separate ingress deployment in front of the replicas, and vLLM endpoint plugins are mounted only
in Ray's experimental "direct streaming" mode; there, tenant concurrency limits would also be counted
per engine replica instead of at the door.

Fail closed across processes: with a tenants file, every replica's engine refuses requests without a
valid policy stamp (:func:`vllm_steer.core.wire.stamp`: an HMAC over tenant, effective steering and expiry).
On ``vllm serve`` the middleware marks requests in their context instead; here the ingress and the
replicas are different processes, so :func:`build_app` hands both one secret through
``VLLM_STEER_POLICY_SECRET`` (set it yourself to keep it stable across redeploys), which also keys the
tenant-bound prefix-cache salts. Anyone who can read the Serve config can read it — the same people who
can already call the replicas directly.

Profiles come from one directory (a shared volume, or baked into the image), read by the ingress and by
every replica when it starts. Hot reload (``POST /v1/steering/admin/reload`` with an admin key) is
validated at the ingress, then broadcast to every running replica (``DeploymentHandle.broadcast``),
each of which reloads its engine exactly as ``vllm serve`` does (workers first, then its front end);
only when all have answered does the ingress admit requests for the new version. A replica started
later reads the directory as it is then, i.e. the new version.

Gate decisions (docs/methods.md §3.11) reach the client, the counters and the audit log as on ``vllm serve``
(:mod:`vllm_steer.server.decisions`): the middleware puts its request id in the body's ``request_id``, which
Ray's ``LLMServer`` keeps and hands vLLM as ``X-Request-Id`` (so the engine names the request's rows after it,
``cmpl-<id>-<row>``), and :meth:`_RayAdmin.gate_decisions` asks every replica for them — only the one that
served the request has any. That is one control call per replica for each gated request.

Run it with ``vllm-steer serve-ray deploy/serve.yaml`` (or ``serve run deploy/serve.yaml`` on a cluster
with enough logical CPUs/GPUs); the YAML names :func:`build_app` and its :class:`RayAppArgs`.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vllm_steer.core.errors import SteerError, field_and_message
from vllm_steer.core.profile import ModelFingerprint, Profile, load_profile_dir, profile_changes
from vllm_steer.core.settings import PLUGINS_ENV, SteerConfig
from vllm_steer.core.wire import POLICY_SECRET_ENV, deployment_secret
from vllm_steer.server.access import check_admin_options
from vllm_steer.server.audit import AuditLog
from vllm_steer.server.body import body_limit
from vllm_steer.server.tenants import TenantPolicy

__all__ = ["RayAppArgs", "RayAppArgsError", "SteerLLMServer", "build_app"]  # noqa: F822 - SteerLLMServer: module __getattr__

logger = logging.getLogger("vllm_steer.ray")

RAY_VERSION = "2.60.0"
"""The Ray Serve LLM this module was written against (``ray[serve]==2.60.0``)."""
GATE_TIMEOUT_S = 60.0
"""How long a non-streaming gated response waits at most for the replicas' gate decisions (they answer
between engine steps)."""


class RayAppArgsError(SteerError):
    """A bad ``args`` block in the Serve config, naming the field."""

    def __init__(self, field: str, message: str):
        super().__init__(field, message)
        self.args = (f"vllm-steer Ray app args: {field}: {message}",)


class Autoscaling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(16, gt=0)
    """Requests in flight per replica that the autoscaler aims for (each replica batches them)."""

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        return self


class RayAppArgs(SteerConfig):
    """The ``args`` of ``import_path: vllm_steer.server.ray_app:build_app`` in a Serve config.

    The plugin's settings (:class:`~vllm_steer.core.settings.SteerConfig`: ``profiles``, ``tenants``,
    ``max_slots``, ``hook_all_sites``, ``fused_op``; the same fields, validated the same way, which reach
    every replica through :meth:`steer_config`), plus the deployment's below.
    """

    model_config = ConfigDict(extra="forbid")
    model: str = "default"
    """HF model directory or hub id; ``default`` = the embedded SmolLM2-135M-Instruct."""
    model_id: str | None = None
    """The name clients put in ``model`` (default: ``model``)."""
    profiles: str
    """Profile directory, on a path every node sees (required here)."""
    accelerator: Literal["gpu", "cpu"] = "gpu"
    accelerator_type: str | None = None
    """Ray accelerator type for GPU replicas (e.g. ``H100``); ``None`` = any GPU."""
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Passed to vLLM as engine arguments (``enforce_eager``, ``max_model_len``, ``dtype``, …)."""
    env_vars: dict[str, str] = Field(default_factory=dict)
    """More environment for the replicas (e.g. ``VLLM_CPU_KVCACHE_SPACE``)."""
    max_ongoing_requests: int = Field(64, ge=1)
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(60.0, gt=0)
    ingress_replicas: int = Field(1, ge=1)

    @classmethod
    def parse(cls, raw: Any) -> RayAppArgs:
        try:
            return cls.model_validate(raw or {})
        except ValidationError as exc:
            raise RayAppArgsError(*field_and_message(exc, default="args")) from None

    def steer_config(self, profiles: str, tenants: str | None) -> SteerConfig:
        """The replicas' plugin settings: the ones set here, with the profile and tenants paths made absolute."""
        given = self.model_dump(include=set(SteerConfig.model_fields), exclude_unset=True)
        return SteerConfig.parse({**given, "profiles": profiles, "tenants": tenants})


def _resolve_paths(args: RayAppArgs) -> tuple[str, str, str | None]:
    """Absolute model/profiles/tenants paths; a bad one fails the deploy, naming the field."""
    model = args.model
    if model == "default":
        from vllm_steer.default_model import ensure_default_model

        model = str(ensure_default_model())
    elif os.path.exists(model):
        model = os.path.abspath(model)
    profiles = os.path.abspath(args.profiles)
    if not os.path.isdir(profiles):
        raise RayAppArgsError("profiles", f"{profiles} is not a directory")
    tenants = os.path.abspath(args.tenants) if args.tenants else None
    if tenants and not os.path.isfile(tenants):
        raise RayAppArgsError("tenants", f"{tenants} does not exist")
    return model, profiles, tenants


def _load_policy(tenants: str | None) -> TenantPolicy:
    return TenantPolicy.from_file(tenants) if tenants else TenantPolicy.single_tenant()


def _replica_env(args: RayAppArgs, profiles: str, tenants: str | None, secret: str) -> dict[str, str]:
    """The replicas' ``runtime_env.env_vars``: ``args.env_vars``, then the plugin's own environment
    (:meth:`SteerConfig.to_env`: the plugin in ``VLLM_PLUGINS``, its settings, the shared policy secret; with a
    tenants file the replicas' engines then refuse requests without the ingress's token)."""
    steer = args.steer_config(profiles, tenants)
    return {
        "VLLM_USE_V2_MODEL_RUNNER": "0",  # before vLLM reads its environment (the plugin would set it later)
        **args.env_vars,
        **steer.to_env(plugins=args.env_vars.get(PLUGINS_ENV), policy_secret=secret),
    }


def build_app(args: dict[str, Any] | None = None):
    """Serve application builder (``import_path: vllm_steer.server.ray_app:build_app``).

    Validates everything it can before anything starts: the args (naming the field), the profile
    directory (naming the file and field), the tenants file, and that every tier's profiles exist.
    """
    import ray
    from ray import serve
    from ray.serve.llm import LLMConfig, build_llm_deployment

    if ray.__version__.split(".")[:2] != RAY_VERSION.split(".")[:2]:
        logger.warning(
            "vllm-steer: written against Ray %s (it uses a few Ray Serve LLM internals: the ingress app "
            "factory, the engine client, the response generator); this is Ray %s",
            RAY_VERSION,
            ray.__version__,
        )
    cfg = RayAppArgs.parse(args)
    model, profiles, tenants = _resolve_paths(cfg)
    fingerprint = _fingerprint(model)
    # ProfileError (file and field named) / TenantsFileError: nothing is deployed.
    _load_policy(tenants).check_profiles(load_profile_dir(profiles, fingerprint, strict=cfg.strict_model_match))
    if tenants:  # engine options that give clients admin powers: nothing is deployed (unless allowed, loudly)
        check_admin_options(
            {**os.environ, **cfg.env_vars},
            argparse.Namespace(**cfg.engine_kwargs),
            allow=cfg.allow_admin_options,
            logger=logger,
        )
    secret = deployment_secret()
    model_id = cfg.model_id or cfg.model
    env = _replica_env(cfg, profiles, tenants, secret)

    llm_config = LLMConfig(
        model_loading_config={"model_id": model_id, "model_source": model},
        engine_kwargs=dict(cfg.engine_kwargs),
        accelerator_config={"kind": cfg.accelerator},
        accelerator_type=cfg.accelerator_type if cfg.accelerator == "gpu" else None,
        runtime_env={"env_vars": env},
        server_cls=_server_class(),
        deployment_config={
            "autoscaling_config": cfg.autoscaling.model_dump(exclude_none=True),
            "max_ongoing_requests": cfg.max_ongoing_requests,
            "health_check_period_s": cfg.health_check_period_s,
            "health_check_timeout_s": cfg.health_check_timeout_s,
        },
    )
    llm = build_llm_deployment(llm_config)

    ingress_cls = _ingress_class()
    options = ingress_cls.get_deployment_options([llm_config])
    options.pop("autoscaling_config", None)
    options["num_replicas"] = cfg.ingress_replicas
    options["ray_actor_options"] = {"num_cpus": 0.5, "runtime_env": {"env_vars": {POLICY_SECRET_ENV: secret}}}
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata

    return serve.deployment(ingress_cls, name="SteerIngress", **options).bind(  # type: ignore[attr-defined]
        llm_deployments={model_id: llm},
        model_cards={model_id: to_model_metadata(model_id, llm_config)},
        steering={
            "profiles": profiles,
            "tenants": tenants,
            "fingerprint": fingerprint.model_dump() if fingerprint else None,
            "strict_model_match": cfg.strict_model_match,
            "base_models": [model_id],
            "max_body_bytes": body_limit(cfg.engine_kwargs.get("max_model_len"), cfg.max_body_bytes),
            "public_metrics": cfg.public_metrics,
            "audit_log": cfg.audit_log,
            "audit_prompts": cfg.audit_prompts,
        },
    )


def _fingerprint(model: str) -> ModelFingerprint | None:
    """The model's fingerprint from its HF config, so the ingress refuses profiles made for another model.

    ``None`` if the config cannot be read here (e.g. a hub id on an offline head node): then only the
    replicas check, and a mismatching profile fails their start or reload instead of the deploy.
    """
    from vllm_steer.core.fingerprint import fingerprint_from_dir

    try:
        return fingerprint_from_dir(model)
    except Exception as exc:  # noqa: BLE001 - any failure to read a config means "cannot check here"
        logger.warning(
            "vllm-steer: cannot read %s's config at the ingress (%s); profiles are checked by the replicas", model, exc
        )
        return None


# ------------------------------------------------------------------ replicas


class _ServerMixin:
    """The steering control methods a replica answers (called by the ingress's broadcasts)."""

    engine: Any

    def _engine_client(self) -> Any:
        client = getattr(self.engine, "_engine_client", None)  # Ray 2.60's VLLMEngine; checked by the tests
        if client is None:
            raise RuntimeError("vllm-steer: this replica's engine is not running yet")
        return client

    async def vllm_steer_reload(self, expected: dict[str, str]) -> dict[str, Any]:
        from vllm_steer.engine import apply_reload

        return {"replica": _replica_name(), **await apply_reload(self._engine_client(), expected=expected)}

    async def vllm_steer_unload(self, profile_id: str) -> dict[str, Any]:
        from vllm_steer.engine import unload_profile

        return {"replica": _replica_name(), **unload_profile(self._engine_client().vllm_config, profile_id)}

    async def vllm_steer_status(self) -> dict[str, Any]:
        from vllm_steer.engine import engine_status_async

        return {"replica": _replica_name(), **await engine_status_async(self._engine_client())}

    async def vllm_steer_gate_decisions(self, request_id: str) -> list[dict[str, Any]]:
        """The gate decisions this replica's engine holds for the requests whose engine id contains
        ``request_id`` (none unless this replica served it)."""
        from vllm_steer.engine import gate_decisions_async

        return await gate_decisions_async(self._engine_client(), request_id)


def _replica_name() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a replica (unit tests)
        return f"pid-{os.getpid()}"


@functools.cache
def _server_class() -> type:
    """``SteerLLMServer``, made on first use: importing Ray Serve LLM imports vLLM (seconds)."""
    from ray.serve.llm.deployment import LLMServer

    class SteerLLMServer(_ServerMixin, LLMServer):
        """Ray's ``LLMServer`` plus the steering control methods (reload, unload, status, gate decisions)."""

    SteerLLMServer.__module__, SteerLLMServer.__qualname__ = __name__, "SteerLLMServer"
    return SteerLLMServer


def __getattr__(name: str) -> Any:  # ``vllm_steer.server.ray_app.SteerLLMServer`` resolves (and pickles) by name
    if name == "SteerLLMServer":
        return _server_class()
    raise AttributeError(name)


# ------------------------------------------------------------------ ingress


class _RayAdmin:
    """The ingress's profile view and the admin operations, applied to every replica."""

    def __init__(
        self, profiles_dir: str, fingerprint: ModelFingerprint | None, policy: Any, handle: Any, *, strict: bool = False
    ):
        self.profiles_dir, self.fingerprint, self.policy, self.handle = profiles_dir, fingerprint, policy, handle
        self.strict = strict
        self.current: dict[str, Profile] = self._load()
        self._lock = asyncio.Lock()

    def _load(self) -> dict[str, Profile]:
        return load_profile_dir(self.profiles_dir, self.fingerprint, strict=self.strict)

    def profiles(self) -> dict[str, Profile]:
        return self.current

    async def _ask_every_replica(self, method: str, *args: Any, timeout_s: float = 600) -> list[Any]:
        """Every running replica's answer, or the exception it raised instead."""
        return await self.handle.broadcast(method, *args).results_async(timeout_s=timeout_s, return_exceptions=True)

    async def _broadcast(self, method: str, *args: Any) -> list[dict[str, Any]]:
        results = await self._ask_every_replica(method, *args)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            cause = _cause(failed[0])
            raise RuntimeError(
                f"{len(failed)} of {len(results)} replicas refused ({type(cause).__name__}: {cause}); "
                "the others applied it — fix the cause and retry"
            )
        return results

    async def gate_decisions(self, request_id: str) -> list[dict[str, Any]]:
        """The gate decisions of one answered request (the middleware's request id, which the replica's vLLM
        names the request's rows after): every replica is asked, only the one that served it has any.

        A replica that cannot answer (starting, or just replaced) is ignored when another has the rows; if
        none has them and one failed, that one may have served the request, so it raises (the report is
        then logged and left out rather than told as "no decision")."""
        results = await self._ask_every_replica("vllm_steer_gate_decisions", request_id, timeout_s=GATE_TIMEOUT_S)
        rows = [row for r in results if not isinstance(r, BaseException) for row in r]
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed and not rows:
            cause = _cause(failed[0])
            raise RuntimeError(
                f"{len(failed)} of {len(results)} replicas did not answer for the gate decisions of {request_id} "
                f"({type(cause).__name__}: {cause})"
            )
        return rows

    async def reload(self) -> dict[str, Any]:
        async with self._lock:
            new = self._load()  # ProfileError: nothing changes anywhere
            self.policy.check_profiles(new)  # TenantsFileError: nothing changes anywhere
            expected = {pid: p.digest for pid, p in new.items()}
            replicas = await self._broadcast("vllm_steer_reload", expected)
            old, self.current = self.current, new
            return {**profile_changes(old, new), "replicas": sorted(r["replica"] for r in replicas)}

    async def remove(self, profile_id: str) -> dict[str, Any]:
        async with self._lock:
            if profile_id not in self.current:
                raise KeyError(profile_id)
            new = {pid: p for pid, p in self.current.items() if pid != profile_id}
            self.policy.check_profiles(new)
            self.current = new  # the ingress stops admitting it first, then the replicas forget it
            replicas = await self._broadcast("vllm_steer_unload", profile_id)
            return {
                "removed": [profile_id],
                "profiles": sorted(new),
                "replicas": sorted(r["replica"] for r in replicas),
            }

    async def status(self) -> dict[str, Any]:
        replicas = await self._broadcast("vllm_steer_status")
        return {
            "profiles": {pid: p.digest for pid, p in sorted(self.current.items())},
            "replicas": sorted(replicas, key=lambda r: r["replica"]),
        }


def _cause(error: BaseException) -> BaseException:
    return getattr(error, "cause", None) or error  # Ray wraps the replica's own exception


def _ingress_class():
    """Ray's OpenAI ingress on a FastAPI app that carries vllm-steer's middleware and routes."""
    from ray.llm._internal.serve.core.ingress.ingress import init as ray_ingress_app
    from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress

    from vllm_steer.server.routes import attach
    from vllm_steer.server.state import make_state

    app = ray_ingress_app()
    attach(app)
    base = make_fastapi_ingress(OpenAiIngress, app=app)

    class SteerIngress(base):
        """``OpenAiIngress`` + the tenant policy; its state is set once the app exists in the replica."""

        async def __init__(  # type: ignore[misc]  # Ray Serve awaits an async __init__
            self,
            llm_deployments: dict[str, Any],
            model_cards: dict[str, Any],
            *,
            steering: dict[str, Any],
            **kwargs: Any,
        ):
            await super().__init__(llm_deployments, model_cards, **kwargs)
            policy = _load_policy(steering.get("tenants"))
            (handle,) = llm_deployments.values()
            fingerprint = steering.get("fingerprint")
            admin = _RayAdmin(
                steering["profiles"],
                ModelFingerprint.model_validate(fingerprint) if fingerprint else None,
                policy,
                handle,
                strict=bool(steering.get("strict_model_match")),
            )
            policy.check_profiles(admin.current)
            self.app.state.vllm_steer = make_state(
                policy,
                admin.profiles,
                admin=admin,
                base_models=tuple(steering.get("base_models") or ()),
                max_body_bytes=steering.get("max_body_bytes"),
                public_metrics=bool(steering.get("public_metrics")),
                audit=AuditLog(steering.get("audit_log"), prompts=bool(steering.get("audit_prompts"))),
                stamp_in_body=True,  # the engines are the replicas' processes
            )

        async def _get_response(self, **kwargs: Any):
            """A replica that dies before answering is a 503 the client can retry, not Ray's generic 500.

            (Once a streamed response has started, the stream just ends without its final chunk.)
            """
            from ray.exceptions import ActorDiedError, ActorUnavailableError
            from ray.llm._internal.serve.core.configs.openai_api_models import OpenAIHTTPException

            started = False
            try:
                async for item in super()._get_response(**kwargs):
                    started = True
                    yield item
            except (ActorDiedError, ActorUnavailableError) as err:
                if started:
                    raise
                raise OpenAIHTTPException(
                    503,
                    "the engine replica serving this request died before answering; retry — Ray is replacing it",
                    type="ServiceUnavailableError",
                    internal_message=type(err).__name__,
                ) from None

    return SteerIngress


# ------------------------------------------------------------------ local runner


def run_local(
    config: str | Path,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    address: str | None = None,
    host: str | None = None,
    port: int | None = None,
    log: Any = print,
) -> None:
    """``vllm-steer serve-ray CONFIG``: deploy a Serve config and serve until SIGINT/SIGTERM.

    What ``serve run CONFIG`` does, plus what a small machine needs: the config is checked against Ray's
    schema and every application is *built* (args, profiles, tenants validated) before Ray starts, and
    the local cluster can be given more logical CPUs than cores (each CPU replica reserves 2).
    Without ``address`` it starts a local Ray cluster and shuts it down on exit.
    """
    import signal
    import threading

    import ray
    import yaml
    from ray import serve
    from ray._common.utils import import_attr
    from ray.serve.deployment import Application
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(Path(config).read_text())
    schema = ServeDeploySchema.model_validate(raw)
    http = schema.http_options.model_dump(exclude_unset=True) if schema.http_options else {}
    if host is not None:
        http["host"] = host
    if port is not None:
        http["port"] = port
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    # Ray Serve LLM's builder needs a Ray session (it prepares placement groups), so Ray starts first;
    # a bad config still fails before anything is deployed, and the cluster is shut down again.
    # address="local" always starts a fresh cluster: without it, Ray would try to join whatever
    # /tmp/ray/ray_current_cluster names (even a stale entry) and refuse num_cpus.
    ray.init(
        address=address or "local",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=False,
        **({} if address else {"object_store_memory": 512 * 1024 * 1024}),  # type: ignore[arg-type]
    )
    try:
        built = []
        for spec in schema.applications:
            log(f"building application {spec.name!r} ({spec.import_path})")
            target = import_attr(spec.import_path)
            built.append((spec, target if isinstance(target, Application) else target(spec.args or {})))
        serve.start(http_options=http, proxy_location=schema.proxy_location)
        for spec, app in built:
            log(f"deploying {spec.name!r} (waits until every replica is healthy)")
            serve.run(app, name=spec.name, route_prefix=spec.route_prefix)
        log(
            f"vllm-steer on Ray Serve: http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)} "
            f"({', '.join(s.name for s, _ in built)}); Ctrl-C stops"
        )
        while not stop.wait(1.0):
            pass
    finally:
        log("shutting down Serve and Ray")
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
