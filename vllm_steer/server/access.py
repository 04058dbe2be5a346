"""Who may use which route of the OpenAI server with a tenants file configured: deny by default.

vLLM's app serves far more than the generation routes the tenant policy understands: tokenization,
SageMaker's ``/invocations``, the Responses, Anthropic and pooling APIs, scale-out and elastic-EP
control, and — depending on server options — LoRA loading, sleep, cache resets and arbitrary worker
RPCs; a later vLLM will add more. So nothing is reachable unless :data:`ROUTE_TABLE` lists it:

* :func:`classify` maps a request's method and route path to an :class:`Access`: the table's entry, any
  route under :data:`ADMIN_PREFIX` (the steering admin routes, which check admin keys themselves), or
  :attr:`Access.DENIED` for everything else.
* :func:`list_routes` walks a live app's routes (mounted sub-apps and routes hidden from the OpenAPI
  schema included) and classifies each: ``GET /v1/steering/admin/routes`` serves it.
* :func:`admin_options` names the server options (environment variables, ``vllm serve`` flags) that
  give clients powers beyond their own request — routes that act on the server, request fields that act
  on other tenants' requests or on the server; :func:`check_admin_options` refuses to start with a
  tenants file while any is set, unless the operator allows it (``VLLM_STEER_ALLOW_ADMIN_OPTIONS``).

**Spelling.** Starlette matches a route's regex against the path as the client sent it (percent-decoded,
nothing else normalized); only when nothing matches does it redirect ``/x/`` to ``/x``. So :func:`classify`
accepts only the exact, canonical spelling of a table entry: ``/v1/completions/``, ``//v1/completions``,
``/v1/./completions`` or ``/V1/completions`` are DENIED (Starlette would only redirect or 404 them), and
no spelling can ever classify more openly than the route that serves it. Methods are exact too (ASGI
methods are upper case; ``get`` is DENIED). The path is the *route path* — the request path without the
app's ``root_path``, as Starlette routes it (:func:`route_path`).

**OPTIONS.** No OPTIONS entry: CORS preflights never reach the policy on vLLM's server, where
``CORSMiddleware`` (added by vLLM after the endpoint plugins, so outside ours) answers every
preflight itself, and without it a preflight gets no CORS headers whatever we do. An OPTIONS that
reaches the policy is a plain request, and mounted apps answer every method — ``OPTIONS /metrics``
serves the metrics — so it is classified like any other method: DENIED.

**WebSockets.** A WebSocket route has no HTTP method; :func:`classify` with method
:data:`WEBSOCKET` is DENIED (vLLM's ``/v1/realtime`` would otherwise bypass the policy).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute

from vllm_steer.core.errors import SteerError
from vllm_steer.core.settings import SteerConfig

__all__ = [
    "ADMIN_OPTIONS",
    "ADMIN_PREFIX",
    "ROUTE_TABLE",
    "WEBSOCKET",
    "Access",
    "AdminOption",
    "AdminOptionsError",
    "Rule",
    "admin_options",
    "check_admin_options",
    "classify",
    "list_routes",
    "route_path",
]


class Access(enum.Enum):
    """Who may use a route (with a tenants file configured; single-tenant mode lets everything through)."""

    PUBLIC = "public"
    """No key needed (liveness probes)."""
    TENANT = "tenant"
    """A valid tenant key."""
    ADMIN = "admin"
    """An admin key (the steering admin routes under :data:`ADMIN_PREFIX` check it themselves)."""
    DENIED = "denied"
    """No tenant may use it: 403 with a valid key, 401 without."""


@dataclass(frozen=True)
class Rule:
    """One allowed route of :data:`ROUTE_TABLE`: its exact path, the methods allowed, for whom, and why."""

    path: str
    methods: frozenset[str]
    access: Access
    why: str


def _rule(path: str, methods: str, access: Access, why: str) -> Rule:
    return Rule(path, frozenset(methods.split()), access, why)


ADMIN_PREFIX = "/v1/steering/admin"
"""Every route under ``ADMIN_PREFIX + "/"`` (any method) is :attr:`Access.ADMIN`; they check admin keys themselves."""
WEBSOCKET = "WEBSOCKET"
"""The method to classify a WebSocket scope with (never allowed)."""

_P, _T, _A = Access.PUBLIC, Access.TENANT, Access.ADMIN
ROUTE_TABLE: tuple[Rule, ...] = (
    _rule("/health", "GET HEAD", _P, "liveness probe (vLLM's engine health check; no body, no key)"),
    _rule("/ping", "GET POST", _P, "SageMaker's liveness probe (the same health check)"),
    _rule("/metrics", "GET HEAD", _A, "Prometheus metrics of every tenant's traffic; PUBLIC with public_metrics"),
    _rule("/v1/completions", "POST", _T, "generation: the policy reads the body and writes the tier's steering"),
    _rule("/v1/chat/completions", "POST", _T, "generation: the policy reads the body and writes the tier's steering"),
    _rule("/v1/models", "GET", _T, "the served model and its adapters (vLLM 0.32 has no /v1/models/{id})"),
    _rule("/v1/steering/profiles", "GET", _T, "the profiles the caller's tier may use"),
    _rule("/tokenize", "POST", _T, "tokenization only; never reaches the engine"),
    _rule("/detokenize", "POST", _T, "detokenization only; never reaches the engine"),
    _rule("/version", "GET", _T, "vLLM's version"),
    _rule("/openapi.json", "GET HEAD", _T, "the API schema"),
    _rule("/docs", "GET HEAD", _T, "Swagger UI"),
    _rule("/docs/oauth2-redirect", "GET HEAD", _T, "Swagger UI's OAuth2 redirect page"),
    _rule("/redoc", "GET HEAD", _T, "ReDoc"),
)
"""Every route a client may use with a tenants file configured; anything else is DENIED (:func:`classify`).

Reviewed against vLLM 0.32's app (``vllm/entrypoints/launchers/api_server/routers.py``). Deliberately
absent, so DENIED: ``/invocations`` (SageMaker: any request type, unpoliced), ``/v1/responses``,
``/v1/messages``, ``/v1/chat/completions/batch``, ``/generative_scoring``, ``/v1/systemone``,
``/cohere/...`` and the pooling and audio APIs (generation or engine use the policy does not read),
the render and ``/inference/v1/...`` scale-out routes, ``/scale_elastic_ep``, ``/load``,
``/kv_event_sources``, ``/tokenizer_info``, and every route a server option adds (:data:`ADMIN_OPTIONS`)."""

_INDEX: dict[tuple[str, str], Access] = {
    (method, rule.path): rule.access for rule in ROUTE_TABLE for method in rule.methods
}


def _canonical(path: str) -> bool:
    """``/a/b``: one leading slash, no empty, ``.`` or ``..`` segment, no trailing slash."""
    if not path.startswith("/") or path == "/":
        return False
    return all(part not in ("", ".", "..") for part in path[1:].split("/"))


def classify(method: str, path: str, *, public_metrics: bool = False) -> Access:
    """Who may send ``method`` to the route path ``path``: :data:`ROUTE_TABLE`'s entry, ADMIN under
    :data:`ADMIN_PREFIX`, else DENIED. Exact spellings only (see the module docstring). ``/metrics``
    is PUBLIC with ``public_metrics``, else ADMIN."""
    if not _canonical(path):
        return Access.DENIED
    access = _INDEX.get((method, path))
    if access is not None:
        return Access.PUBLIC if public_metrics and path == "/metrics" else access
    if path.startswith(ADMIN_PREFIX + "/") and method != WEBSOCKET:
        return Access.ADMIN
    return Access.DENIED


def route_path(scope: Mapping[str, Any]) -> str:
    """The path Starlette routes: ``scope["path"]`` without the app's ``root_path`` (as Starlette's own
    ``get_route_path``: only a whole leading segment is removed; another path is left as it is)."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "") or ""
    if not root_path or not path.startswith(root_path):
        return path
    if path == root_path:
        return ""
    return path[len(root_path) :] if path[len(root_path)] == "/" else path


# ---------------------------------------------------------------------------------------- live routes

_OPENNESS = (Access.PUBLIC, Access.TENANT, Access.ADMIN, Access.DENIED)
_ANY_METHOD = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _route_access(path: str, methods: Iterable[str], public_metrics: bool) -> Access:
    """The most open access any of ``methods`` has on ``path`` (what an audit must see)."""
    found = [classify(method, path, public_metrics=public_metrics) for method in methods] or [Access.DENIED]
    return min(found, key=_OPENNESS.index)


def list_routes(routes: Iterable[BaseRoute], *, public_metrics: bool = False, prefix: str = "") -> list[dict[str, Any]]:
    """Every route of ``routes`` (an app's ``app.routes``), mounted sub-apps' routes included, as
    ``{"path", "methods", "access", "kind"}``; ``access`` is the most open of its methods' (lower case).

    ``kind``: ``route`` (HTTP; ``methods: ["*"]`` when it takes any), ``websocket`` (``methods:
    ["WEBSOCKET"]``), ``mount`` (a mounted app without routes of its own, e.g. ``/metrics``: it answers
    every method under its path, ``methods: ["*"]``) or ``other`` (a route without a path: DENIED).
    """
    listed: list[dict[str, Any]] = []

    def add(path: str | None, methods: list[str], access: Access, kind: str) -> None:
        listed.append({"path": path, "methods": methods, "access": access.value, "kind": kind})

    for route in routes:
        path = getattr(route, "path", None)
        sub = getattr(route, "routes", None) or []
        if isinstance(route, Mount) or (path is None and sub):  # a Host or a lazily included router: no prefix
            full = prefix + (path or "")
            if sub:
                listed.extend(list_routes(sub, public_metrics=public_metrics, prefix=full))
            else:
                add(full, ["*"], _route_access(full, _ANY_METHOD, public_metrics), "mount")
        elif path is None:
            add(None, [], Access.DENIED, "other")
        elif isinstance(route, WebSocketRoute):
            add(prefix + path, [WEBSOCKET], Access.DENIED, "websocket")
        elif isinstance(route, Route) and route.methods:
            methods = sorted(route.methods)
            add(prefix + path, methods, _route_access(prefix + path, methods, public_metrics), "route")
        else:  # an HTTP route taking any method, or a route of a kind unknown here
            add(prefix + path, ["*"], _route_access(prefix + path, _ANY_METHOD, public_metrics), "route")
    return listed


# ---------------------------------------------------------------------------------------- server options


@dataclass(frozen=True)
class AdminOption:
    """A server option that gives clients powers beyond their own request, and how to see it set."""

    name: str
    """The environment variable or ``vllm serve`` flag the operator sets."""
    why: str
    """What clients can then do (completes "clients can ...")."""
    where: str
    """Where vLLM 0.32 reads it (``vllm/...``)."""
    is_set: Callable[[Mapping[str, str], Any, Any], bool]
    """``(environ, args, vllm_config) -> bool``; ``vllm_config`` may be ``None``."""


_OFF = frozenset({"", "0", "false", "no", "off"})


def _env_on(name: str) -> Callable[[Mapping[str, str], Any, Any], bool]:
    """Set unless unset or plainly off (a value vLLM might read as on counts as on)."""
    return lambda environ, args, vllm_config: (environ.get(name) or "").strip().lower() not in _OFF


def _get(obj: Any, *names: str) -> Any:
    """``obj.a.b`` (or ``obj["a"]["b"]``), ``None`` when any part is missing."""
    for name in names:
        if obj is None:
            return None
        obj = obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)
    return obj


def _flag(arg: str, *config: str) -> Callable[[Mapping[str, str], Any, Any], bool]:
    """A truthy ``args.<arg>`` or ``vllm_config.<config...>``."""
    return lambda environ, args, vllm_config: bool(_get(args, arg)) or bool(config and _get(vllm_config, *config))


def _profiler(environ: Mapping[str, str], args: Any, vllm_config: Any) -> bool:
    return bool(_get(args, "profiler_config", "profiler") or _get(vllm_config, "profiler_config", "profiler"))


def _kv_transfer(environ: Mapping[str, str], args: Any, vllm_config: Any) -> bool:
    def active(config: Any) -> bool:
        if config is None:
            return False
        connector = _get(config, "kv_connector")
        has_field = isinstance(config, Mapping) or hasattr(config, "kv_connector")
        return bool(connector) or not has_field  # an unknown shape counts as set

    return active(_get(args, "kv_transfer_config")) or active(_get(vllm_config, "kv_transfer_config"))


def _priority(environ: Mapping[str, str], args: Any, vllm_config: Any) -> bool:
    policies = (_get(args, "scheduling_policy"), _get(vllm_config, "scheduler_config", "policy"))
    return any(str(policy).lower() == "priority" for policy in policies if policy is not None)


ADMIN_OPTIONS: tuple[AdminOption, ...] = (
    AdminOption(
        "VLLM_SERVER_DEV_MODE",
        "call the development routes: put the engine to sleep and wake it, pause it, reset the prefix, "
        "encoder and multimodal caches, abort requests, update weights, read the server info and run any "
        "worker method (/sleep, /pause, /reset_prefix_cache, /collective_rpc, /update_weights, ...)",
        "vllm/entrypoints/launchers/api_server/routers.py (register_vllm_dev_api_routers, register_rl_api_routers)",
        _env_on("VLLM_SERVER_DEV_MODE"),
    ),
    AdminOption(
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING",
        "load and unload LoRA adapters from any path the server can read, for every tenant "
        "(/v1/load_lora_adapter, /v1/unload_lora_adapter, SageMaker's /adapters)",
        "vllm/entrypoints/serve/lora/api_router.py",
        _env_on("VLLM_ALLOW_RUNTIME_LORA_UPDATING"),
    ),
    AdminOption(
        "--enable-scale-out",
        "generate from raw token ids with kv/ec transfer parameters and abort any request "
        "(/inference/v1/generate, /inference/v1/abort_requests, the render routes)",
        "vllm/entrypoints/scale_out/factories.py (register_scale_out_api_routers)",
        _flag("enable_scale_out"),
    ),
    AdminOption(
        "--tokens-only",
        "generate from raw token ids with kv/ec transfer parameters and abort any request "
        "(/inference/v1/generate, /inference/v1/abort_requests, the render routes)",
        "vllm/entrypoints/scale_out/factories.py (register_scale_out_api_routers)",
        _flag("tokens_only"),
    ),
    AdminOption(
        "--enable-elastic-ep",
        "rescale the engine's data-parallel size (/scale_elastic_ep, registered whenever the model generates)",
        "vllm/entrypoints/serve/elastic_ep/api_router.py; vllm/config/parallel.py (enable_elastic_ep)",
        _flag("enable_elastic_ep", "parallel_config", "enable_elastic_ep"),
    ),
    AdminOption(
        "--profiler-config",
        "start and stop the profiler, writing traces on the server (/start_profile, /stop_profile)",
        "vllm/entrypoints/serve/profile/api_router.py (profiler_config.profiler)",
        _profiler,
    ),
    AdminOption(
        "--enable-fault-tolerance",
        "send fault-recovery instructions to the engines (/fault_tolerance/apply)",
        "vllm/entrypoints/serve/fault_tolerance/api_router.py; launchers/api_server/routers.py",
        _flag("enable_fault_tolerance", "parallel_config", "enable_fault_tolerance"),
    ),
    AdminOption(
        "--kv-transfer-config",
        "send kv_transfer_params with a generation request: pull or push KV cache blocks to other hosts "
        "and engines outside their own request",
        "vllm/entrypoints/openai/{chat_completion,completion}/protocol.py (kv_transfer_params)",
        _kv_transfer,
    ),
    AdminOption(
        "--scheduling-policy",
        "choose their requests' priority (set to priority: the priority field or the X-Vllm-Priority header), "
        "jumping ahead of and preempting other tenants' requests",
        "vllm/config/scheduler.py (policy); vllm/v1/core/sched/scheduler.py",
        _priority,
    ),
    AdminOption(
        "--enable-prompt-embeds",
        "send raw prompt embeddings, which vLLM warns may crash the engine for every tenant",
        "vllm/config/model.py (enable_prompt_embeds: 'Only enable this flag for trusted users')",
        _flag("enable_prompt_embeds", "model_config", "enable_prompt_embeds"),
    ),
    AdminOption(
        "--allowed-local-media-path",
        "make the server read local files under that directory into their requests",
        "vllm/config/model.py (allowed_local_media_path: 'This is a security risk')",
        _flag("allowed_local_media_path", "model_config", "allowed_local_media_path"),
    ),
    AdminOption(
        "--trust-request-chat-template",
        "have the server render their own Jinja chat templates",
        "vllm/entrypoints/launchers/cli_args.py (trust_request_chat_template)",
        _flag("trust_request_chat_template"),
    ),
    AdminOption(
        "--trust-request-mm-kwargs",
        "set multimodal preprocessing parameters that change the server's resource use "
        "(mm_processor_kwargs, media_io_kwargs)",
        "vllm/entrypoints/launchers/cli_args.py (trust_request_mm_kwargs: 'Only enable this when API clients "
        "are trusted')",
        _flag("trust_request_mm_kwargs"),
    ),
)
"""The server options that give clients powers beyond their own request (vLLM 0.32), in the order checked.

Not listed, on purpose: options that only add a route :data:`ROUTE_TABLE` denies and that acts on no
other request (``VLLM_ENABLE_COHERE_API``, ``VLLM_ENABLE_RESPONSES_API_STORE``,
``--enable-tokenizer-info-endpoint``, ``--tool-server``: reachable only through the Responses API),
and options that only log or configure the server itself."""


def admin_options(environ: Mapping[str, str], args: Any, vllm_config: Any = None) -> list[tuple[str, str]]:
    """``(option, why)`` for each of :data:`ADMIN_OPTIONS` that is set: in ``environ``, in ``args`` (vLLM's
    argparse namespace as endpoint plugins get it; missing attributes are unset) or in ``vllm_config``."""
    return [(option.name, option.why) for option in ADMIN_OPTIONS if option.is_set(environ, args, vllm_config)]


class AdminOptionsError(SteerError):
    """A tenants file with server options that give clients admin powers; ``field`` names the first option."""


def check_admin_options(
    environ: Mapping[str, str], args: Any, *, allow: bool, logger: logging.Logger, vllm_config: Any = None
) -> None:
    """Refuse (:class:`AdminOptionsError`) server options that give clients admin powers, or with ``allow``
    (``VLLM_STEER_ALLOW_ADMIN_OPTIONS``) log one WARNING per option. Call it only with a tenants file."""
    found = admin_options(environ, args, vllm_config)
    override = SteerConfig.option("allow_admin_options")
    if not found:
        return
    if allow:
        for name, why in found:
            logger.warning("vllm-steer: SECURITY: %s is set, so clients can %s; allowed by %s", name, why, override.env)
        return
    listed = "; ".join(f"{name} (clients can {why})" for name, why in found)
    raise AdminOptionsError(
        found[0][0],
        f"a tenants file is configured, but these server options give every client powers beyond its own "
        f"request: {listed}. Unset them, or set {override.env}=1 ({override.flag}) to start anyway.",
    )
