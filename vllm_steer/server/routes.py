"""The steering routes on the OpenAI server, and :func:`attach`, which mounts them with the policy middleware.

* ``GET /v1/steering/profiles`` — the profiles the caller's tier may use, with its ranges (tenant key);
* ``POST /v1/steering/admin/reload``, ``DELETE /v1/steering/admin/profiles/{id}``,
  ``GET /v1/steering/admin/status`` — hot reload and engine status (admin key; the operations are the
  :class:`~vllm_steer.server.state.ServingState`'s ``admin``, supplied by the endpoint plugin or the Ray ingress);
* ``GET /v1/steering/admin/routes`` — every route of the live app and who may use it
  (:func:`vllm_steer.server.access.list_routes`; admin key).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from vllm_steer.core.profile import ProfileError
from vllm_steer.server.access import list_routes
from vllm_steer.server.middleware import ADMIN_PREFIX, SteeringPolicyMiddleware, error_response
from vllm_steer.server.state import ServingState, serving_state
from vllm_steer.server.tenants import PolicyError, TenantsFileError, bearer_token

__all__ = [
    "PROFILES_PATH",
    "Route",
    "ROUTES",
    "attach",
    "list_profiles",
    "reload_profiles",
    "remove_profile",
    "admin_status",
    "admin_routes",
]

logger = logging.getLogger("vllm_steer.server.routes")

PROFILES_PATH = "/v1/steering/profiles"


async def list_profiles(request: Request) -> JSONResponse:
    """``GET /v1/steering/profiles``: the profiles this caller's tier may use, with its ranges."""
    state: ServingState = request.app.state.vllm_steer
    tenant = request.scope.get("state", {}).get("vllm_steer_tenant")
    if tenant is None:  # the middleware always sets it; refuse rather than show everything
        return error_response(PolicyError(401, "authorization", "no tenant on this request"))
    return JSONResponse({"object": "list", "data": state.policy.visible_profiles(tenant, state.profiles())})


def _admin(request: Request, *, ops: bool = True) -> tuple[ServingState, str]:
    """The state and the admin's name; 503 before the state (or, with ``ops``, the admin operations) is set."""
    state = serving_state(request.app)
    if state is None or (ops and state.admin is None):
        raise PolicyError(503, "server", "vllm-steer is not initialized yet; retry shortly")
    name = state.policy.authenticate_admin(bearer_token(request.headers.get("authorization")))
    return state, name


async def reload_profiles(request: Request) -> JSONResponse:
    """``POST /v1/steering/admin/reload``: re-read the profile directory; no restart, no recompile.

    Everything is validated before anything changes: a bad file (400, naming file and field), a
    tier that would lose its profile or a profile needing hooks the engine lacks (409) leave the
    loaded profiles as they were. Requests already admitted finish with the version they started with.
    """
    try:
        state, name = _admin(request)
        changes = await state.admin.reload()
    except PolicyError as err:
        return error_response(err)
    except ProfileError as err:
        return error_response(PolicyError(400, err.field, str(err)))
    except (TenantsFileError, ValueError) as err:
        return error_response(PolicyError(409, "profiles", str(err)))
    except Exception as err:  # noqa: BLE001 - the workers' refusal arrives as whatever the RPC layer raises
        return error_response(PolicyError(409, "profiles", f"the engine refused the reload: {err}"))
    logger.info("vllm-steer: admin %s reloaded profiles", name)
    return JSONResponse(changes)


async def remove_profile(request: Request) -> JSONResponse:
    """``DELETE /v1/steering/admin/profiles/{id}``: unload until the next reload (delete its directory to keep it gone)."""
    profile_id = request.path_params["profile_id"]
    try:
        state, name = _admin(request)
        result = await state.admin.remove(profile_id)
    except PolicyError as err:
        return error_response(err)
    except KeyError:
        return error_response(PolicyError(404, "profile_id", f"no loaded profile {profile_id!r}"))
    except TenantsFileError as err:
        return error_response(PolicyError(409, "profile_id", str(err)))
    except RuntimeError as err:  # a Ray replica did not confirm; the ingress no longer admits the profile
        return error_response(PolicyError(409, "profile_id", str(err)))
    logger.info("vllm-steer: admin %s unloaded profile %s", name, profile_id)
    return JSONResponse(result)


async def admin_status(request: Request) -> JSONResponse:
    """``GET /v1/steering/admin/status``: loaded profile versions, and per engine replica its pid, requests
    admitted, profile versions and workers' runtime state (which replicas have which version)."""
    try:
        state, _ = _admin(request)
        return JSONResponse(await state.admin.status())
    except PolicyError as err:
        return error_response(err)
    except Exception as err:  # noqa: BLE001 - an engine replica not answering: say so, do not 500
        return error_response(PolicyError(503, "server", f"engine replicas did not answer: {err}"))


async def admin_routes(request: Request) -> JSONResponse:
    """``GET /v1/steering/admin/routes``: every route of the live app — mounted apps and routes hidden from the
    OpenAPI schema included — with its methods and who may use it (``public``, ``tenant``, ``admin``, ``denied``:
    :func:`vllm_steer.server.access.classify`), so operators see what a tenants file leaves exposed."""
    try:
        state, _ = _admin(request, ops=False)
    except PolicyError as err:
        return error_response(err)
    routes = list_routes(request.app.routes, public_metrics=state.public_metrics)
    return JSONResponse({"object": "list", "data": routes})


@dataclass(frozen=True)
class Route:
    """One steering route: where it is, what answers it, and how the OpenAPI page lists it."""

    path: str
    endpoint: Callable[[Request], Awaitable[JSONResponse]]
    method: str
    tag: str
    summary: str


ROUTES: tuple[Route, ...] = (
    Route(PROFILES_PATH, list_profiles, "GET", "vllm-steer", "Steering profiles the caller may use"),
    Route(ADMIN_PREFIX + "/reload", reload_profiles, "POST", "vllm-steer admin", "Hot-reload the profile directory"),
    Route(ADMIN_PREFIX + "/status", admin_status, "GET", "vllm-steer admin", "Profile versions and engine replicas"),
    Route(ADMIN_PREFIX + "/profiles/{profile_id}", remove_profile, "DELETE", "vllm-steer admin", "Unload a profile"),
    Route(ADMIN_PREFIX + "/routes", admin_routes, "GET", "vllm-steer admin", "Every route and who may use it"),
)
"""Every route :func:`attach` mounts, in order."""


def attach(app: Any) -> None:
    """Mount :data:`ROUTES` and the middleware on a FastAPI app (vLLM's, from the endpoint plugin; Ray's ingress)."""
    for route in ROUTES:
        app.add_api_route(route.path, route.endpoint, methods=[route.method], tags=[route.tag], summary=route.summary)
    app.add_middleware(SteeringPolicyMiddleware)
