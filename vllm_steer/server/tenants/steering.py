"""A request's ``steer_*`` keys under a tier: what the tier lets through, and what it refuses.

Parsing and validation belong to :mod:`vllm_steer.core.request` — the same code, limits and messages
as the engine's, so a request gets the same verdict offline and served (400 here). What is added here
is only what a tier means: the ``"none"`` opt-out, the operator's forced and default settings, the
approved profiles and their bounds (403), and the 500 for a tier setting that no longer resolves.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vllm_steer.core.methods import has_categories, parameter_of
from vllm_steer.core.profile import Profile
from vllm_steer.core.request import (
    ROUTE,
    ResolvedSteering,
    SteeringRequest,
    SteeringRequestError,
    is_steering_key,
    parse_steering,
    resolve_steering,
)
from vllm_steer.server.tenants.errors import PolicyError, above_tier, malformed
from vllm_steer.server.tenants.schema import ProfileGrant, Setting, Tier

__all__ = [
    "UNSTEERED",
    "Effective",
    "split_extra_args",
    "parse_client",
    "resolve_client",
    "resolve_setting",
    "resolve_operator_setting",
    "refuse_departures_from_forced",
    "check_within_grant",
    "chosen_categories",
    "merge",
]

UNSTEERED = "none"
"""The ``steer_profile`` value by which a client asks for no steering (where its tier allows it)."""


def chosen_categories(resolved: ResolvedSteering) -> tuple[str, ...]:
    """The categories a setting chose, as compared with a request's: ``("auto",)`` for a routing one."""
    return (ROUTE,) if resolved.route else resolved.categories


@dataclass(frozen=True)
class Effective:
    """Steering the policy lets through: resolved against its profile, plus the layers asked for, if any."""

    resolved: ResolvedSteering
    layers: tuple[int, ...] | None

    def steer_keys(self) -> dict[str, Any]:
        """Explicit keys for the engine, defaults filled in, so it steers with exactly what was checked."""
        r = self.resolved
        parameter = parameter_of(r.method)
        keys: dict[str, Any] = {"steer_profile": r.profile_id}
        if parameter is not None:
            keys[f"steer_{parameter}"] = getattr(r, parameter)
        if r.route:
            keys["steer_categories"] = ROUTE  # routed by its gates: the categories are the fired gate's
        elif has_categories(r.method):
            keys["steer_categories"] = list(r.categories)
        if self.layers is not None:
            keys["steer_layers"] = list(self.layers)
        if r.gate_action is not None:
            keys["steer_gate_action"] = r.gate_action
        if r.refusal is not None:
            keys["steer_refusal"] = r.refusal
        return keys


def _message(exc: SteeringRequestError) -> str:
    return str(exc).removeprefix(f"{exc.field}: ")


def split_extra_args(extra_args: Mapping[str, Any] | None) -> tuple[dict[Any, Any], dict[str, Any]]:
    """(keys of other plugins, untouched; ``steer_*`` keys however spelled)."""
    if extra_args is None:
        return {}, {}
    if not isinstance(extra_args, Mapping):
        raise malformed("extra_args", f"must be a mapping, got {type(extra_args).__name__}")
    steer = {k: v for k, v in extra_args.items() if is_steering_key(k)}
    others = {k: v for k, v in extra_args.items() if k not in steer}
    return others, steer


def parse_client(steer: Mapping[str, Any]) -> SteeringRequest | None:
    """The request's ``steer_*`` keys, parsed by core (400 on anything malformed); ``None`` when it sent none.

    ``steer_profile: "none"`` (the opt-out) parses like any profile id; it stands alone.
    """
    try:
        request = parse_steering(steer)
    except SteeringRequestError as exc:
        raise malformed(exc.field, _message(exc)) from None
    if request is not None and request.steer_profile == UNSTEERED:
        others = sorted(k for k in steer if k != "steer_profile")
        if others:
            raise malformed(others[0], f"not allowed with steer_profile {UNSTEERED!r}")
    return request


def _layers(request: SteeringRequest) -> tuple[int, ...] | None:
    return None if request.steer_layers is None else tuple(sorted(request.steer_layers))


def _visible(tier: Tier, profiles: Mapping[str, Profile]) -> dict[str, Profile]:
    """What core resolves a tier's request against: an unknown-profile error lists only these."""
    return {pid: profiles[pid] for pid in tier.profile_ids(profiles)}


def _resolve(request: SteeringRequest, profiles: Mapping[str, Profile]) -> Effective:
    return Effective(resolve_steering(request, profiles), _layers(request))


def resolve_client(request: SteeringRequest, tier: Tier, profiles: Mapping[str, Profile]) -> Effective:
    """Resolve a client's request against the profiles its tier may name; 400 when core refuses it."""
    try:
        return _resolve(request, _visible(tier, profiles))
    except SteeringRequestError as exc:
        raise malformed(exc.field, _message(exc)) from None


def resolve_setting(setting: Setting, profiles: Mapping[str, Profile]) -> Effective:
    """An operator's setting, resolved by core (raises :class:`SteeringRequestError`)."""
    request = parse_steering(setting.steer_keys())
    assert request is not None
    return _resolve(request, profiles)


def resolve_operator_setting(tier_name: str, which: str, tier: Tier, profiles: Mapping[str, Profile]) -> Effective:
    """A tier's forced/default setting; one that no longer resolves is the operator's error (500)."""
    setting = getattr(tier, which)
    try:
        return resolve_setting(setting, _visible(tier, profiles))
    except SteeringRequestError as exc:
        message = f"the {which} steering of tier {tier_name!r} cannot be applied ({exc})"
        raise PolicyError(500, exc.field, message) from None


def refuse_departures_from_forced(request: SteeringRequest, forced: Effective, profile: Profile) -> None:
    """403 on the first field where the request differs from the forced setting; restating it is fine."""
    r = forced.resolved
    if request.steer_profile == UNSTEERED:
        raise above_tier("steer_profile", f"this tier always steers with {r.profile_id!r}; it cannot opt out")
    if request.steer_profile != r.profile_id:
        raise above_tier(
            "steer_profile", f"this tier always steers with {r.profile_id!r}, not {request.steer_profile!r}"
        )
    parameter = parameter_of(r.method)
    fixed = {
        "steer_angle": (request.steer_angle, r.angle if parameter == "angle" else None),
        "steer_scale": (request.steer_scale, r.scale if parameter == "scale" else None),
        "steer_categories": (
            None if request.steer_categories is None else tuple(sorted(request.steer_categories)),
            chosen_categories(r) if has_categories(r.method) else None,
        ),
        "steer_layers": (_layers(request), (forced.layers or tuple(profile.spec.layers)) or None),
        "steer_gate_action": (request.steer_gate_action, r.gate_action),
        "steer_refusal": (request.steer_refusal, r.refusal),
    }
    for key, (asked, forced_value) in fixed.items():
        if asked is not None and asked != forced_value:
            shown = "not settable" if forced_value is None else f"fixed at {_show(forced_value)}"
            raise above_tier(key, f"{key} is {shown} for this tier (asked for {_show(asked)})")


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return json.dumps(list(value))
    return repr(value)


def check_within_grant(
    grant: ProfileGrant,
    request: SteeringRequest,
    effective: Effective,
    profile: Profile | None = None,
    *,
    every_profile: bool = False,
) -> None:
    """403 when the effective angle, scale or categories fall outside the tier's bounds for this profile, or
    the request changes a gate's action or refusal text beyond what the tier grants (``every_profile``: a tier
    approving every profile, which grants every action and its own refusal texts). A routing request
    (``steer_categories: "auto"``) is within the tier's categories only if every category its gates route to is."""
    r = effective.resolved
    parameter = parameter_of(r.method)
    gating = None if every_profile or profile is None else profile.spec.gating
    if gating is not None:
        own = gating.action
        if request.steer_gate_action is not None and request.steer_gate_action != own:
            granted = grant.gate_actions or ()
            if request.steer_gate_action not in granted:
                allowed = ", ".join(sorted({own, *granted}))
                raise above_tier(
                    "steer_gate_action",
                    f"{request.steer_gate_action!r} is not granted for {r.profile_id!r} on this tier (granted: {allowed})",
                )
        if request.steer_refusal is not None:
            raise above_tier("steer_refusal", "this tier's clients may not set the refusal text")
    ranged = (
        ("steer_angle", r.angle, request.steer_angle, grant.angle, parameter == "angle"),
        ("steer_scale", r.scale, request.steer_scale, grant.scale, parameter == "scale"),
    )
    for key, value, asked, bounds, applies in ranged:
        if applies and bounds is not None and not bounds[0] <= value <= bounds[1]:
            origin = "" if asked is not None else f" (the profile's default, used because the request set no {key})"
            span = f"[{bounds[0]:g}, {bounds[1]:g}]"
            allows = f"the range this tier allows for {r.profile_id!r}"
            raise above_tier(key, f"{value:g}{origin} is outside {span}, {allows}")
    if has_categories(r.method) and grant.categories is not None and r.route:
        ungranted = [c for c in r.route if c not in grant.categories]
        if ungranted:  # the gates may pick any of them: every one must be granted
            raise above_tier(
                "steer_categories",
                f"{ROUTE!r} may steer with {ungranted}, not approved for this tier (approved: "
                f"{list(grant.categories)}); name approved categories instead",
            )
    elif has_categories(r.method) and grant.categories is not None:
        outside = [c for c in r.categories if c not in grant.categories]
        if outside:
            origin = "" if request.steer_categories is not None else " (the profile's default categories)"
            raise above_tier(
                "steer_categories", f"{outside}{origin} not approved for this tier (approved: {list(grant.categories)})"
            )


def merge(others: dict[Any, Any], effective: Effective | None) -> dict[Any, Any] | None:
    """The ``extra_args`` for the engine: other plugins' keys, then the effective steering; ``None`` if empty."""
    merged = dict(others)
    if effective is not None:
        merged.update(effective.steer_keys())
    return merged or None
