"""Per-request steering settings: parsed from ``SamplingParams.extra_args``, resolved against a profile.

The OpenAI server fills ``extra_args`` from ``vllm_xargs``, which only admits
flat values, so the keys are flat too: ``steer_profile``, ``steer_angle``,
``steer_scale``, ``steer_layers`` (a subset of the profile's layers), ``steer_categories`` (the sum of the named categories' vectors;
without it, the profile's ``generic`` vector if it has one, else all categories; ``"auto"``: the vector of the
category whose gate fires, on a profile whose gates route to categories); for a gated profile
(:mod:`vllm_steer.core.gates`) ``steer_gate_action`` (``steer``, ``refuse`` or ``flag`` instead of the profile's
action) and ``steer_refusal`` (the refusal text, with action ``refuse``). A request without any ``steer_*`` key is
unsteered. Anything malformed is a :class:`SteeringRequestError` naming the
key — never silently dropped, because a dropped safety setting means an
unsteered answer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, field_validator

from vllm_steer.core.errors import SteerError, field_and_message
from vllm_steer.core.gates import GATE_ONLY_ACTIONS, MAX_REFUSAL_CHARS, GateAction
from vllm_steer.core.methods import has_categories, method_label, parameter_of
from vllm_steer.core.profile import Profile
from vllm_steer.core.wire import keyed_digest

__all__ = [
    "STEER_KEYS",
    "MAX_CATEGORIES",
    "MAX_LAYERS",
    "is_steering_key",
    "unknown_steering_key_message",
    "SteeringRequestError",
    "SteeringRequest",
    "ResolvedSteering",
    "parse_steering",
    "resolve_steering",
    "ROUTE",
    "route_targets",
    "cache_salt",
    "admission_keys",
]

STEER_PREFIX = "steer_"
STEER_KEYS = (
    "steer_profile",
    "steer_angle",
    "steer_scale",
    "steer_categories",
    "steer_layers",
    "steer_gate_action",
    "steer_refusal",
)
MAX_CATEGORIES = 256
"""Longest ``steer_categories`` list a request may send (offline and served alike)."""
MAX_LAYERS = 1024
"""Longest ``steer_layers`` list a request may send (offline and served alike)."""


def is_steering_key(key: Any) -> bool:
    """A key that reads as ``steer_*`` however it is spelled (case, stray spaces) is ours.

    So ``STEER_PROFILE: none`` or ``" steer_profile"`` is an error naming the key, not another
    plugin's key passed by silently while the tier's setting applies behind the client's back.
    """
    return isinstance(key, str) and key.strip().casefold().startswith(STEER_PREFIX)


def unknown_steering_key_message(key: str) -> str:
    canonical = key.strip().casefold()
    if canonical in STEER_KEYS:
        return f"keys are case-sensitive: write {canonical!r}"
    return f"unknown steering field (known: {', '.join(STEER_KEYS)})"


class SteeringRequestError(SteerError):
    """Bad steering input for one request; ``field`` is the request key to fix."""

    def __init__(self, field: str, message: str):
        super().__init__(field, message)


Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class SteeringRequest(BaseModel):
    """What a client asked for, type-checked but not yet checked against a profile."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    steer_profile: StrictStr = Field(min_length=1, max_length=128)
    steer_angle: Number | None = None
    steer_scale: Number | None = None
    steer_categories: tuple[StrictStr, ...] | None = Field(default=None, max_length=MAX_CATEGORIES)
    steer_layers: tuple[Annotated[int, Field(strict=True, ge=0)], ...] | None = Field(
        default=None, min_length=1, max_length=MAX_LAYERS
    )
    steer_gate_action: GateAction | None = None
    steer_refusal: StrictStr | None = Field(default=None, min_length=1, max_length=MAX_REFUSAL_CHARS)

    @field_validator("steer_categories", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("steer_layers", mode="before")
    @classmethod
    def _one_layer_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("steer_layers")
    @classmethod
    def _distinct_layers(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is not None and len(set(value)) != len(value):  # malformed whatever the profile: a parse error
            raise ValueError("must not repeat a layer")
        return value


def parse_steering(extra_args: Mapping[str, Any] | None) -> SteeringRequest | None:
    """Read the ``steer_*`` keys of ``extra_args``; ``None`` when the request is unsteered.

    Keys without the ``steer_`` prefix belong to other plugins and are left alone;
    an unknown ``steer_*`` key (a typo such as ``steer_angel``) is an error.
    """
    if not extra_args:
        return None
    if not isinstance(extra_args, Mapping):
        raise SteeringRequestError("extra_args", f"must be a mapping, got {type(extra_args).__name__}")
    ours = {k: v for k, v in extra_args.items() if is_steering_key(k)}
    if not ours:
        return None
    unknown = sorted(set(ours) - set(STEER_KEYS))
    if unknown:
        raise SteeringRequestError(unknown[0], unknown_steering_key_message(unknown[0]))
    if "steer_profile" not in ours:
        raise SteeringRequestError("steer_profile", f"required when {sorted(ours)[0]} is given")
    try:
        return SteeringRequest.model_validate(ours)
    except ValidationError as exc:
        raise SteeringRequestError(*field_and_message(exc, default="steer_profile", depth=1)) from None


@dataclass(frozen=True)
class ResolvedSteering:
    """A request's effective steering: profile, category selection, angle (degrees), scale.

    ``slot_key`` is what the engine shares a slot on (same basis); angle and scale
    are per request and travel with each token instead.
    """

    profile_id: str
    profile_digest: str
    method: str | None
    """The profile's steering method; ``None``: a gate-only profile (the request is only gated)."""
    categories: tuple[str, ...]
    angle: float
    scale: float
    layers: tuple[int, ...] | None = None
    """A subset of the profile's layers (``steer_layers``); ``None`` = all of them."""
    gated: bool = False
    """The profile has gates: what the request gets depends on its own last prompt token."""
    refusal: str | None = None
    """Gate action ``refuse``: the text answered instead when the gate fires (``None``: another action)."""
    gate_action: str | None = None
    """Gated profiles: what a fired gate does (``steer``, ``refuse``, ``flag``); ``None``: ungated."""
    route: tuple[str, ...] = ()
    """``steer_categories: "auto"``: the categories the gates may route to (sorted; ``categories`` is then
    empty). The request is steered with the vector of the category whose gate fired (:func:`route_targets`)."""

    @property
    def slot_key(self) -> tuple[object, ...]:
        key: tuple[object, ...] = (self.profile_id, self.profile_digest, self.categories, self.layers, self.gate_action)
        return (*key, ROUTE, self.route) if self.route else key

    @property
    def cos_sin(self) -> tuple[float, float]:
        t = math.radians(self.angle % 360.0)
        return math.cos(t), math.sin(t)


ROUTE = "auto"
"""``steer_categories``' value that routes a request by its gates (:attr:`ResolvedSteering.route`)."""


def route_targets(resolved: ResolvedSteering) -> list[ResolvedSteering]:
    """A routing request's steering per category it may be routed to: each is the request with that one
    category and action ``steer``, ungated-alike in what it steers (and sharing a slot with such requests)."""
    return [
        dataclasses.replace(resolved, categories=(category,), route=(), refusal=None, gate_action="steer")
        for category in resolved.route
    ]


def resolve_steering(request: SteeringRequest, profiles: Mapping[str, Profile]) -> ResolvedSteering:
    """Check a request against its profile (existence, method fields, allowed ranges) and fill defaults."""
    profile = profiles.get(request.steer_profile)
    if profile is None:
        known = ", ".join(sorted(profiles)) or "none loaded"
        raise SteeringRequestError("steer_profile", f"unknown profile {request.steer_profile!r} (known: {known})")
    spec = profile.spec
    parameter = parameter_of(spec.method)
    by_category = has_categories(spec.method)
    kind = method_label(spec.method)

    for name, value in (("angle", request.steer_angle), ("scale", request.steer_scale)):
        if value is not None and parameter != name:
            raise SteeringRequestError(f"steer_{name}", f"profile {spec.id!r} ({kind}) takes no {name}")
    if request.steer_categories is not None and not by_category:
        raise SteeringRequestError("steer_categories", f"profile {spec.id!r} ({kind}) has no categories")
    if request.steer_layers is not None and spec.gate_only:
        raise SteeringRequestError("steer_layers", f"profile {spec.id!r} ({kind}) has no layers")

    angle = request.steer_angle if request.steer_angle is not None else (spec.defaults.angle or 0.0)
    scale = request.steer_scale if request.steer_scale is not None else (spec.defaults.scale or 0.0)
    for field, value, allowed in (
        ("steer_angle", request.steer_angle, spec.allowed.angle),
        ("steer_scale", request.steer_scale, spec.allowed.scale),
    ):
        if value is not None and allowed is not None and value not in allowed:
            raise SteeringRequestError(
                field, f"{value} is outside the range [{allowed.min}, {allowed.max}] profile {spec.id!r} allows"
            )

    gating = spec.gating
    categories: tuple[str, ...] = ()
    route: tuple[str, ...] = ()
    if by_category and request.steer_categories == (ROUTE,) and ROUTE not in spec.categories:
        route = gating.routes if gating is not None else ()
        if not route:
            raise SteeringRequestError(
                "steer_categories", f"'{ROUTE}' needs gates that route to categories; profile {spec.id!r} has none"
            )
        action = request.steer_gate_action or (gating.action if gating is not None else None)
        if action != "steer":
            raise SteeringRequestError(
                "steer_categories",
                f"'{ROUTE}' steers by the gate that fires: only with gate action 'steer' (not {action!r})",
            )
    elif by_category:
        default = ("generic",) if "generic" in spec.categories else tuple(spec.categories)
        chosen = request.steer_categories if request.steer_categories is not None else default
        if not chosen:
            raise SteeringRequestError("steer_categories", "must name at least one category")
        unknown = [c for c in chosen if c not in spec.categories]
        if unknown:
            raise SteeringRequestError(
                "steer_categories", f"unknown categories {unknown} (profile {spec.id!r} has {spec.categories})"
            )
        if len(set(chosen)) != len(chosen):
            raise SteeringRequestError("steer_categories", "must not repeat a category")
        categories = tuple(sorted(chosen))

    if gating is None:
        for key in ("steer_gate_action", "steer_refusal"):
            if getattr(request, key) is not None:
                raise SteeringRequestError(key, f"profile {spec.id!r} has no gates")
    action = None if gating is None else (request.steer_gate_action or gating.action)
    if spec.gate_only and action not in GATE_ONLY_ACTIONS:
        raise SteeringRequestError(
            "steer_gate_action", f"profile {spec.id!r} is gate-only: its gates refuse or flag, they cannot {action!r}"
        )
    if request.steer_refusal is not None and action != "refuse":
        raise SteeringRequestError("steer_refusal", f"only with gate action 'refuse' (this request's is {action!r})")
    refusal = None
    if gating is not None and action == "refuse":
        refusal = request.steer_refusal if request.steer_refusal is not None else gating.refusal

    layers = None
    if request.steer_layers is not None:
        chosen_layers = request.steer_layers
        outside = sorted(set(chosen_layers) - set(spec.layers))
        if outside:
            raise SteeringRequestError(
                "steer_layers", f"{outside} are not layers of profile {spec.id!r} ({spec.layers})"
            )
        layers = tuple(sorted(chosen_layers))
        if layers == tuple(spec.layers):
            layers = None  # the same as not overriding: share the slot and the prefix cache

    return ResolvedSteering(
        profile_id=spec.id,
        profile_digest=profile.digest,
        method=spec.method,
        categories=categories,
        angle=float(angle),
        scale=float(scale),
        layers=layers,
        gated=gating is not None,
        refusal=refusal,
        gate_action=action,
        route=route,
    )


def cache_salt(
    resolved: ResolvedSteering | None,
    client_salt: str | None,
    tenant: str | None = None,
    prompt_len: int | None = None,
) -> str | None:
    """The prefix-cache salt the engine gives a request: derived by the server, never the client's own.

    Steering at layer L changes the KV of every later layer, so two requests may share KV blocks only if
    their steering is identical; and under tenant tiers, only if they are the same tenant's (so one tenant
    can neither plant unsteered blocks under another tier's salt nor learn from cache hits what another
    tenant sent). vLLM mixes the salt into block hashes. The salt is an HMAC under the server's secret
    (:func:`vllm_steer.core.wire.keyed_digest`) of (tenant, steering, the client's own salt): no value a
    client sends as ``cache_salt`` can equal a derived one, since every salted request gets a derived one.
    ``None`` (vLLM's shared cache) only for an unsteered request without a tenant or a client salt.

    A gated request's KV depends on where its prompt ends (its last prompt token and what follows are
    steered if its gate fired; :mod:`vllm_steer.engine.gating`), so its salt also holds ``prompt_len``: a
    longer prompt that extends a gated request's prompt and answer never reuses that answer's blocks.
    """
    if resolved is None and tenant is None and client_salt is None:
        return None
    steering: list[object] | None = None
    if resolved is not None:
        steering = [
            resolved.profile_id,
            resolved.profile_digest,
            resolved.categories,
            repr(resolved.angle),
            repr(resolved.scale),
            resolved.layers,
        ]
        if resolved.gated:
            if prompt_len is None:
                raise ValueError("a gated request's cache salt needs its prompt length")
            steering += [prompt_len, resolved.gate_action]
        if resolved.route:
            steering += [ROUTE, resolved.route]
    return "vllm-steer:" + keyed_digest("prefix-cache-salt", [tenant, steering, client_salt])[:40]


def admission_keys(
    extra_args: Mapping[str, Any] | None, digest_key: str, route_key: str | None = None
) -> tuple[tuple[Any, ...], ...]:
    """The steering slots the scheduler counts for a request it has not resolved: one key per slot.

    The scheduler never sees resolved settings (only ``extra_args``), so a key is the request's own
    spelling, normalized: profile, the version the front end stamped under ``digest_key``, sorted
    categories and layers, gate action. A routing request (``steer_categories: "auto"``) holds one slot
    more per category it may be routed to, which the front end stamps under ``route_key``. Two requests
    that the worker would put in one slot may get two keys here (e.g. categories omitted vs. spelled out as
    the default): the gate then admits fewer at once, never more. ``()`` for an unsteered request; a
    request that does not parse gets a key of its own (the worker refuses it anyway).
    """
    try:
        request = parse_steering(extra_args)
    except SteeringRequestError as exc:
        return (("unparsed", str(exc)),)
    if request is None or extra_args is None:
        return ()
    categories = tuple(sorted(set(request.steer_categories))) if request.steer_categories is not None else None
    layers = tuple(sorted(set(request.steer_layers))) if request.steer_layers is not None else None
    digest = extra_args.get(digest_key)
    keys: list[tuple[Any, ...]] = [(request.steer_profile, digest, categories, layers, request.steer_gate_action)]
    routes = extra_args.get(route_key) if route_key is not None else None
    if isinstance(routes, (list, tuple)):
        keys += [(request.steer_profile, digest, (str(c),), layers, "steer") for c in routes]
    return tuple(keys)
