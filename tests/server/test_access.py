"""Deny by default (vllm_steer.server.access): the route table, vLLM 0.32's real routes, the server options
that give clients admin powers, the start-up check, and the admin route listing the live app's routes.

vLLM's app is built in-process from its own router code (``build_app``) with no engine: ~10 s, once per
module. Loading our endpoint plugin through vLLM makes the ``vllm_steer`` logger use vLLM's handlers; the
fixtures put it back so other modules' log captures are untouched.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from fastapi import FastAPI, WebSocket
from starlette._utils import get_route_path
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Mount, Route
from starlette.testclient import TestClient

from support.tenants import KEYS, PROFILES, tenants_config
from vllm_steer.core.errors import SteerError
from vllm_steer.server.access import (
    ADMIN_OPTIONS,
    ADMIN_PREFIX,
    ROUTE_TABLE,
    WEBSOCKET,
    Access,
    AdminOptionsError,
    admin_options,
    check_admin_options,
    classify,
    list_routes,
    route_path,
)
from vllm_steer.server.body import MAX_BODY_BYTES
from vllm_steer.server.routes import ROUTES, attach
from vllm_steer.server.state import make_state
from vllm_steer.server.tenants import TenantPolicy, hash_api_key

P, T, A, D = Access.PUBLIC, Access.TENANT, Access.ADMIN, Access.DENIED
ADMIN_KEY = "admin-key-0123"
TENANT_KEY = KEYS["gamma-research"]
DANGEROUS = (
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
    "/scale_elastic_ep",
    "/invocations",
    "/pooling",
    "/v1/responses",
    "/reset_prefix_cache",
    "/collective_rpc",
    "/sleep",
    "/inference/v1/generate",
    "/inference/v1/abort_requests",
    "/start_profile",
    "/fault_tolerance/apply",
    "/v1/chat/completions/batch",
    "/v1/messages",
)
"""Routes the real app serves that no tenant may reach (each must exist in :func:`vllm_apps`)."""


# ---------------------------------------------------------------------------------------- the table


@pytest.mark.parametrize(
    "method, path, expected",
    [
        ("GET", "/health", P),
        ("HEAD", "/health", P),
        ("GET", "/ping", P),
        ("POST", "/ping", P),
        ("POST", "/health", D),
        ("GET", "/metrics", A),
        ("HEAD", "/metrics", A),
        ("POST", "/v1/completions", T),
        ("POST", "/v1/chat/completions", T),
        ("GET", "/v1/models", T),
        ("GET", "/v1/steering/profiles", T),
        ("POST", "/tokenize", T),
        ("POST", "/detokenize", T),
        ("GET", "/version", T),
        ("GET", "/openapi.json", T),
        ("GET", "/docs", T),
        ("GET", "/docs/oauth2-redirect", T),
        ("GET", "/redoc", T),
        ("GET", ADMIN_PREFIX + "/status", A),
        ("POST", ADMIN_PREFIX + "/reload", A),
        ("DELETE", ADMIN_PREFIX + "/profiles/sel", A),
        ("GET", ADMIN_PREFIX + "/routes", A),
        ("PUT", ADMIN_PREFIX + "/anything/else", A),  # unknown admin paths 404 in our router, after the key check
        # wrong method on an allowed path
        ("GET", "/v1/completions", D),
        ("GET", "/tokenize", D),
        ("POST", "/v1/models", D),
        ("DELETE", "/v1/steering/profiles", D),
        ("post", "/v1/completions", D),
        ("Get", "/health", D),
        # other spellings: Starlette would redirect or 404 them; never more open than the route serving them
        ("POST", "/v1/completions/", D),
        ("POST", "//v1/completions", D),
        ("POST", "/v1//completions", D),
        ("POST", "/v1/./completions", D),
        ("POST", "/v1/x/../completions", D),
        ("POST", "/V1/completions", D),
        ("POST", "/v1/completions ", D),
        ("POST", "v1/completions", D),
        ("POST", "/v1/completions?x=1", D),
        ("GET", "/health/", D),
        ("GET", "", D),
        ("GET", "/", D),
        ("GET", "/metrics/", D),  # vLLM's /metrics mount would serve these: classified tighter, never looser
        ("GET", "/metricsx", D),
        ("POST", "/metrics", D),
        ("GET", ADMIN_PREFIX, D),
        ("GET", ADMIN_PREFIX + "/", D),
        ("GET", ADMIN_PREFIX + "//status", D),
        ("GET", ADMIN_PREFIX + "/../../../invocations", D),
        ("GET", ADMIN_PREFIX + "/./status", D),
        ("GET", "/v1/steering/adminx/status", D),
        ("GET", "/v1/models/some-model", D),  # vLLM 0.32 has no /v1/models/{id}
        # OPTIONS: preflights are answered outside the policy (vLLM's CORSMiddleware); mounts answer OPTIONS
        ("OPTIONS", "/v1/completions", D),
        ("OPTIONS", "/metrics", D),
        ("OPTIONS", "/health", D),
        # WebSockets
        (WEBSOCKET, "/v1/realtime", D),
        (WEBSOCKET, ADMIN_PREFIX + "/status", D),
        *(("POST", path, D) for path in DANGEROUS),
        ("GET", "/v1/responses/resp-1", D),
        ("POST", "/v2/rerank", D),
        ("POST", "/score", D),
        ("POST", "/classify", D),
        ("POST", "/rerank", D),
        ("GET", "/load", D),
        ("GET", "/tokenizer_info", D),
        ("GET", "/static/swagger-ui.css", D),
    ],
)
def test_classify(method, path, expected):
    assert classify(method, path) is expected


def test_public_metrics_opens_only_metrics():
    assert classify("GET", "/metrics", public_metrics=True) is P
    assert classify("HEAD", "/metrics", public_metrics=True) is P
    for method, path in [("POST", "/metrics"), ("GET", "/metrics/"), ("OPTIONS", "/metrics")]:
        assert classify(method, path, public_metrics=True) is D
    opened = {
        (method, rule.path)
        for rule in ROUTE_TABLE
        for method in rule.methods
        if classify(method, rule.path, public_metrics=True) is not classify(method, rule.path)
    }
    assert opened == {("GET", "/metrics"), ("HEAD", "/metrics")}


def test_table_is_canonical_and_enumerable():
    assert len({rule.path for rule in ROUTE_TABLE}) == len(ROUTE_TABLE), "one rule per path"
    for rule in ROUTE_TABLE:
        assert rule.why and rule.methods and "OPTIONS" not in rule.methods and WEBSOCKET not in rule.methods
        for method in rule.methods:
            assert classify(method, rule.path) is rule.access
        assert rule.access is not D, "the table lists only what is allowed"
    assert {rule.path for rule in ROUTE_TABLE if rule.access is P} == {"/health", "/ping"}


@pytest.mark.parametrize(
    "path, root_path",
    [
        ("/v1/completions", ""),
        ("/api/v1/completions", "/api"),
        ("/api", "/api"),
        ("/apiv1/completions", "/api"),  # not a whole segment: left as it is
        ("/v1/completions", "/api"),  # Starlette routes a path outside root_path as it is
        ("/api/", "/api"),
    ],
)
def test_route_path_is_starlettes(path, root_path):
    scope = {"type": "http", "path": path, "root_path": root_path}
    assert route_path(scope) == get_route_path(scope)


# ---------------------------------------------------------------------------------------- vLLM's real app


@contextlib.contextmanager
def _steer_logger_kept() -> Iterator[None]:
    logger = logging.getLogger("vllm_steer")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    try:
        yield
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


def _build(argv: list[str], tasks: tuple[str, ...], env: dict[str, str]) -> Any:
    import vllm.envs as envs
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", "m", *argv])
    cached = envs._is_envs_cache_enabled()
    envs.disable_envs_cache()  # an engine started earlier in this process freezes vLLM's env vars
    try:
        with pytest.MonkeyPatch.context() as mp, _steer_logger_kept():
            for name in ("VLLM_SERVER_DEV_MODE", "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "VLLM_PLUGINS"):
                mp.delenv(name, raising=False)
            for name, value in env.items():
                mp.setenv(name, value)
            return build_app(args, tasks)
    finally:
        if cached:
            envs.enable_envs_cache()


def _with_pooling_routes(app: Any) -> Any:
    """vLLM registers the pooling routers only with a pooling model's config: include them as they are."""
    from vllm.entrypoints.pooling.classify.api_router import router as classify_router
    from vllm.entrypoints.pooling.embed.api_router import router as embed_router
    from vllm.entrypoints.pooling.pooling.api_router import router as pooling_router
    from vllm.entrypoints.pooling.scoring.api_router import router as scoring_router

    for router in (pooling_router, classify_router, embed_router, scoring_router):
        app.include_router(router)
    return app


@pytest.fixture(scope="module")
def vllm_apps() -> dict[str, Any]:
    """``plain``: ``vllm serve`` with our plugin; ``everything``: every option that adds routes, plus the
    pooling and audio routes (a generate + realtime + pooling server)."""
    plain = _build([], ("generate",), {"VLLM_PLUGINS": "vllm_steer"})
    everything = _build(
        [
            "--enable-scale-out",
            "--enable-fault-tolerance",
            "--enable-tokenizer-info-endpoint",
            "--enable-offline-docs",
            "--profiler-config",
            '{"profiler": "torch", "torch_profiler_dir": "/tmp/vllm-steer-profile"}',
        ],
        ("generate", "transcription", "realtime"),
        {"VLLM_SERVER_DEV_MODE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "VLLM_PLUGINS": "vllm_steer"},
    )
    return {"plain": plain, "everything": _with_pooling_routes(everything)}


def _served_by(app: Any, method: str, path: str) -> Any:
    """The route Starlette's router hands ``method path`` to (first full match, else first partial), or None."""
    scope = {"type": "http", "method": method, "path": path, "root_path": ""}
    partial = None
    for route in app.routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return route
        if match is Match.PARTIAL and partial is None:
            partial = route
    return partial


def _steering(route: Any) -> bool:
    return getattr(route, "endpoint", None) in {r.endpoint for r in ROUTES}


def test_the_plugin_is_attached_and_cors_sits_outside_the_policy(vllm_apps):
    from starlette.middleware.cors import CORSMiddleware

    from vllm_steer.server.middleware import SteeringPolicyMiddleware

    for app in vllm_apps.values():
        paths = {getattr(route, "path", None) for route in app.routes}
        assert {route.path for route in ROUTES} <= paths
        order = [middleware.cls for middleware in app.user_middleware]  # outermost first
        assert order.index(CORSMiddleware) < order.index(SteeringPolicyMiddleware), order


@pytest.mark.parametrize("name", ["plain", "everything"])
def test_every_route_vllm_registers_is_classified_and_only_the_table_is_open(vllm_apps, name):
    listed = list_routes(vllm_apps[name].routes)
    assert listed and all(entry["access"] in {"public", "tenant", "admin", "denied"} for entry in listed)
    table = {rule.path: rule for rule in ROUTE_TABLE}
    for entry in listed:
        path = entry["path"]
        if entry["access"] == "denied":
            continue
        if path.startswith(ADMIN_PREFIX + "/"):
            assert entry["access"] == "admin", entry
            continue
        assert path in table, f"{entry} is open but not in the table"
        assert entry["access"] == table[path].access.value, entry
    by_path = {entry["path"]: entry for entry in listed if entry["kind"] != "mount"}
    assert by_path["/metrics"]["access"] == "admin"
    assert {entry["access"] for entry in listed if entry["kind"] == "mount"} <= {"admin", "denied"}


def test_the_dangerous_routes_exist_and_are_denied(vllm_apps):
    listed = list_routes(vllm_apps["everything"].routes)
    denied = {entry["path"] for entry in listed if entry["access"] == "denied"}
    missing = [path for path in DANGEROUS if path not in denied]
    assert not missing, f"not served (or not denied): {missing}"
    assert any(entry["path"] == "/v1/realtime" and entry["kind"] == "websocket" for entry in listed)
    for route in vllm_apps["everything"].routes:
        for method in getattr(route, "methods", None) or ():
            if getattr(route, "path", None) in DANGEROUS:
                assert classify(method, route.path) is D


@pytest.mark.parametrize("name", ["plain", "everything"])
def test_each_allowed_route_is_served_by_the_route_the_table_means(vllm_apps, name):
    """No earlier route (a mount, a path parameter) catches a path the table opens, nor an admin path."""
    app = vllm_apps[name]
    for rule in ROUTE_TABLE:
        for method in rule.methods:
            route = _served_by(app, method, rule.path)
            if route is None:  # /docs and /redoc are absent with --enable-offline-docs ... until mounted
                continue
            assert route.path == rule.path, (method, rule.path, route)
    for path in (ADMIN_PREFIX + "/status", ADMIN_PREFIX + "/x/y/z", ADMIN_PREFIX + "/profiles/p"):
        for method in ("GET", "POST", "DELETE", "PUT"):
            route = _served_by(app, method, path)
            assert route is None or _steering(route), (method, path, route)


def test_concrete_paths_of_vllms_routes_are_denied_unless_in_the_table(vllm_apps):
    allowed = {rule.path for rule in ROUTE_TABLE}
    for entry in list_routes(vllm_apps["everything"].routes):
        path = entry["path"]
        if path is None or path in allowed or path.startswith(ADMIN_PREFIX + "/"):
            continue
        concrete = path.replace("{", "").replace("}", "").replace(":path", "")
        for method in entry["methods"]:
            assert classify(method, concrete) is D, (method, concrete)


# ---------------------------------------------------------------------------------------- server options


def _vllm_args(*argv: str) -> argparse.Namespace:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", "m", *argv])


def test_defaults_open_nothing():
    assert admin_options({}, _vllm_args()) == []
    assert admin_options({}, argparse.Namespace()) == []
    assert admin_options({}, object(), vllm_config=object()) == []
    off = {"VLLM_SERVER_DEV_MODE": "0", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "false"}
    assert admin_options(off, _vllm_args("--scheduling-policy", "fcfs", "--allowed-local-media-path", "")) == []


ADMIN_CASES = [
    ([], {"VLLM_SERVER_DEV_MODE": "1"}, "VLLM_SERVER_DEV_MODE"),
    ([], {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}, "VLLM_ALLOW_RUNTIME_LORA_UPDATING"),
    (["--enable-scale-out"], {}, "--enable-scale-out"),
    (["--tokens-only"], {}, "--tokens-only"),
    (["--enable-elastic-ep"], {}, "--enable-elastic-ep"),
    (["--profiler-config", '{"profiler": "torch", "torch_profiler_dir": "/tmp/p"}'], {}, "--profiler-config"),
    (["--enable-fault-tolerance"], {}, "--enable-fault-tolerance"),
    (["--kv-transfer-config", '{"kv_connector": "NixlConnector", "kv_role": "kv_both"}'], {}, "--kv-transfer-config"),
    (["--scheduling-policy", "priority"], {}, "--scheduling-policy"),
    (["--enable-prompt-embeds"], {}, "--enable-prompt-embeds"),
    (["--allowed-local-media-path", "/srv/media"], {}, "--allowed-local-media-path"),
    (["--trust-request-chat-template"], {}, "--trust-request-chat-template"),
    (["--trust-request-mm-kwargs"], {}, "--trust-request-mm-kwargs"),
]
"""One vLLM command line (or environment) per admin option, parsed by vLLM's own parser."""


@pytest.mark.parametrize("argv, env, name", ADMIN_CASES)
def test_each_admin_option_is_found_from_vllms_own_parser(argv, env, name):
    found = admin_options(env, _vllm_args(*argv))
    assert [option for option, _ in found] == [name]
    assert found[0][1].strip()


def test_every_admin_option_is_tested():
    assert len({option.name for option in ADMIN_OPTIONS}) == len(ADMIN_OPTIONS)
    assert {option.name for option in ADMIN_OPTIONS} == {name for _, _, name in ADMIN_CASES}


@pytest.mark.parametrize(
    "vllm_config, name",
    [
        (SimpleNamespace(scheduler_config=SimpleNamespace(policy="priority")), "--scheduling-policy"),
        (
            SimpleNamespace(kv_transfer_config=SimpleNamespace(kv_connector="LMCacheConnectorV1")),
            "--kv-transfer-config",
        ),
        (SimpleNamespace(parallel_config=SimpleNamespace(enable_elastic_ep=True)), "--enable-elastic-ep"),
        (SimpleNamespace(parallel_config=SimpleNamespace(enable_fault_tolerance=True)), "--enable-fault-tolerance"),
        (SimpleNamespace(profiler_config=SimpleNamespace(profiler="cuda")), "--profiler-config"),
        (SimpleNamespace(model_config=SimpleNamespace(enable_prompt_embeds=True)), "--enable-prompt-embeds"),
        (SimpleNamespace(model_config=SimpleNamespace(allowed_local_media_path="/")), "--allowed-local-media-path"),
    ],
)
def test_the_engines_config_is_read_too(vllm_config, name):
    assert [option for option, _ in admin_options({}, argparse.Namespace(), vllm_config)] == [name]


def test_kv_transfer_config_without_a_connector_is_not_set():
    args = argparse.Namespace(kv_transfer_config={"kv_connector": None})
    assert admin_options({}, args) == []
    assert [o for o, _ in admin_options({}, argparse.Namespace(kv_transfer_config={"kv_connector": "X"}))] == [
        "--kv-transfer-config"
    ]


def test_check_refuses_naming_the_first_option_and_the_override():
    args = argparse.Namespace(scheduling_policy="priority", enable_scale_out=True)
    with pytest.raises(AdminOptionsError) as info:
        check_admin_options({"VLLM_SERVER_DEV_MODE": "1"}, args, allow=False, logger=logging.getLogger("t"))
    err = info.value
    assert isinstance(err, SteerError) and err.field == "VLLM_SERVER_DEV_MODE"
    for text in ("VLLM_SERVER_DEV_MODE", "--enable-scale-out", "--scheduling-policy", "VLLM_STEER_ALLOW_ADMIN_OPTIONS"):
        assert text in err.message
    assert "--steer-allow-admin-options" in err.message


def test_check_allowed_logs_one_warning_per_option(caplog):
    args = argparse.Namespace(scheduling_policy="priority", enable_scale_out=True)
    logger = logging.getLogger("test_access.allowed")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        check_admin_options({"VLLM_SERVER_DEV_MODE": "1"}, args, allow=True, logger=logger)
    records = [r for r in caplog.records if r.name == logger.name]
    assert [r.levelno for r in records] == [logging.WARNING] * 3
    for record, name in zip(
        records, ["VLLM_SERVER_DEV_MODE", "--enable-scale-out", "--scheduling-policy"], strict=True
    ):
        message = record.getMessage()
        assert name in message and "clients can" in message
        assert message.endswith("allowed by VLLM_STEER_ALLOW_ADMIN_OPTIONS")


def test_check_without_options_is_silent(caplog):
    with caplog.at_level(logging.DEBUG):
        check_admin_options({}, argparse.Namespace(), allow=False, logger=logging.getLogger("test_access.silent"))
    assert not [r for r in caplog.records if r.name == "test_access.silent"]


# ---------------------------------------------------------------------------------------- the plugin's start


def _tenants_file(tmp_path) -> str:
    config = {
        "format_version": 1,
        "tiers": {"open": {"profiles": "*", "allow_unsteered": True}},
        "tenants": [{"name": "acme", "tier": "open", "key_hash": hash_api_key(TENANT_KEY)}],
    }
    path = tmp_path / "tenants.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _init_state(args: Any) -> Any:
    from vllm_steer.server.plugin import SteeringEndpointPlugin

    plugin = object.__new__(SteeringEndpointPlugin)  # __init__ would hand our logger to vLLM's handlers
    vllm_config = SimpleNamespace(additional_config={}, model_config=SimpleNamespace(served_model_name="fallback"))
    state = SimpleNamespace()
    asyncio.run(plugin.init_state(SimpleNamespace(vllm_config=vllm_config), state, args))
    return state.vllm_steer


@pytest.fixture
def steer_env(monkeypatch):
    from vllm_steer.core.settings import SteerConfig

    for option in SteerConfig.options():
        monkeypatch.delenv(option.env, raising=False)
    monkeypatch.delenv("VLLM_SERVER_DEV_MODE", raising=False)
    return monkeypatch


def test_init_state_refuses_admin_options_with_a_tenants_file(steer_env, tmp_path):
    steer_env.setenv("VLLM_STEER_TENANTS", _tenants_file(tmp_path))
    steer_env.setenv("VLLM_SERVER_DEV_MODE", "1")
    with pytest.raises(AdminOptionsError, match="VLLM_STEER_ALLOW_ADMIN_OPTIONS") as info:
        _init_state(argparse.Namespace(model="m", served_model_name=None))
    assert info.value.field == "VLLM_SERVER_DEV_MODE"


def test_init_state_allowed_and_served_names(steer_env, tmp_path):
    steer_env.setenv("VLLM_STEER_TENANTS", _tenants_file(tmp_path))
    steer_env.setenv("VLLM_SERVER_DEV_MODE", "1")
    steer_env.setenv("VLLM_STEER_ALLOW_ADMIN_OPTIONS", "1")
    steer_env.setenv("VLLM_STEER_PUBLIC_METRICS", "1")
    state = _init_state(argparse.Namespace(model="org/model", served_model_name=["a", "b"]))
    assert state.base_models == ("a", "b") and state.public_metrics
    assert state.max_body_bytes == MAX_BODY_BYTES, "no max_model_len known: the largest cap"


def test_init_state_single_tenant_skips_the_check(steer_env):
    steer_env.setenv("VLLM_SERVER_DEV_MODE", "1")
    state = _init_state(argparse.Namespace(model="org/model", served_model_name=None))
    assert state.base_models == ("org/model",) and not state.public_metrics


def test_served_model_names():
    from vllm_steer.server.plugin import served_model_names

    assert served_model_names(argparse.Namespace(model="m", served_model_name=None)) == ("m",)
    assert served_model_names(argparse.Namespace(model="m", served_model_name="x")) == ("x",)
    assert served_model_names(argparse.Namespace(model="m", served_model_name=["x", "y"])) == ("x", "y")
    config = SimpleNamespace(model_config=SimpleNamespace(served_model_name="from-config"))
    assert served_model_names(argparse.Namespace(), config) == ("from-config",)
    assert served_model_names(argparse.Namespace()) == ()


# ---------------------------------------------------------------------------------------- the admin route


async def _ok(request: Request) -> Response:
    return JSONResponse({"ok": True})


async def _ws(websocket: WebSocket) -> None:
    await websocket.close()


async def _metrics_app(scope, receive, send) -> None:
    await Response(b"metrics")(scope, receive, send)


def _admin_client(*, single_tenant: bool = False, public_metrics: bool = False) -> TestClient:
    app = FastAPI()
    app.add_api_route("/v1/completions", _ok, methods=["POST"])
    app.add_api_route("/invocations", _ok, methods=["POST"], include_in_schema=False)
    app.add_api_websocket_route("/v1/realtime", _ws)
    app.router.routes.append(Mount("/metrics", _metrics_app))
    app.router.routes.append(Mount("/sub", routes=[Route("/inner", _ok, methods=["GET"])]))
    attach(app)
    policy = (
        TenantPolicy.single_tenant()
        if single_tenant
        else TenantPolicy.from_mapping(
            {**tenants_config(), "admins": [{"name": "ops", "key_hash": hash_api_key(ADMIN_KEY)}]}
        )
    )
    app.state.vllm_steer = make_state(policy, lambda: PROFILES, admin=None, public_metrics=public_metrics)
    return TestClient(app)


def _routes(client: TestClient, key: str | None = ADMIN_KEY):
    headers = {} if key is None else {"authorization": f"Bearer {key}"}
    return client.get(ADMIN_PREFIX + "/routes", headers=headers)


def test_admin_routes_lists_the_live_app():
    response = _routes(_admin_client())
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    by_key = {(entry["path"], entry["kind"]): entry for entry in data}
    expected = {
        ("/v1/completions", "route"): (["POST"], "tenant"),
        ("/invocations", "route"): (["POST"], "denied"),
        ("/v1/realtime", "websocket"): ([WEBSOCKET], "denied"),
        ("/metrics", "mount"): (["*"], "admin"),
        ("/sub/inner", "route"): (["GET", "HEAD"], "denied"),
        ("/openapi.json", "route"): (["GET", "HEAD"], "tenant"),
        ("/docs", "route"): (["GET", "HEAD"], "tenant"),
        ("/v1/steering/profiles", "route"): (["GET"], "tenant"),
        (ADMIN_PREFIX + "/routes", "route"): (["GET"], "admin"),
        (ADMIN_PREFIX + "/profiles/{profile_id}", "route"): (["DELETE"], "admin"),
    }
    for key, (methods, access) in expected.items():
        assert key in by_key, (key, sorted(by_key))
        assert (by_key[key]["methods"], by_key[key]["access"]) == (methods, access), by_key[key]
    assert {route.path for route in ROUTES} <= {entry["path"] for entry in data}


def test_admin_routes_reads_public_metrics_from_the_state():
    data = _routes(_admin_client(public_metrics=True)).json()["data"]
    assert [entry["access"] for entry in data if entry["path"] == "/metrics"] == ["public"]


@pytest.mark.parametrize(
    "key, status",
    [(None, 401), ("not-a-key", 401), (TENANT_KEY, 403)],
)
def test_admin_routes_needs_an_admin_key(key, status):
    response = _routes(_admin_client(), key)
    assert response.status_code == status, response.text
    assert "data" not in response.json()


def test_admin_routes_is_off_without_admins():
    response = _routes(_admin_client(single_tenant=True))
    assert response.status_code == 403 and "admin" in response.json()["error"]["message"]
