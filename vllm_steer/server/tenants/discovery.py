"""What ``GET /v1/steering/profiles`` shows a caller: the profiles its tier may use, with its ranges.

A category profile whose gates route (``steer_categories: "auto"``) shows ``"auto": true`` and the categories
its gates may pick (``routes``) where the caller may send ``auto``: its tier grants every one of them (a forced
tier: its forced setting routes). Elsewhere ``"auto": false`` and ``routes: []``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vllm_steer.core.methods import parameter_of
from vllm_steer.core.profile import Profile
from vllm_steer.core.request import SteeringRequestError
from vllm_steer.server.tenants.schema import ProfileGrant, Setting, Tier
from vllm_steer.server.tenants.steering import Effective, resolve_setting

__all__ = ["visible_profiles", "intersect"]


def visible_profiles(tier: Tier, profiles: Mapping[str, Profile]) -> list[dict[str, Any]]:
    """One description per profile ``tier`` may use (a forced tier: its forced setting, pinned)."""
    if tier.forced is not None:
        try:
            forced = resolve_setting(tier.forced, profiles)
        except SteeringRequestError:
            return []
        return [_describe_forced(profiles[forced.resolved.profile_id], forced)]
    default_id = tier.default.profile if tier.default is not None else None
    described = []
    for pid in tier.profile_ids(profiles):
        grant = tier.grant_for(pid)
        if grant is None:
            continue
        default = _visible_default(tier, pid, profiles)
        described.append(
            _describe(
                profiles[pid],
                grant,
                default,
                tier.allow_layers_override,
                is_default=pid == default_id,
                every_action=tier.approves_all,
            )
        )
    return described


def _visible_default(tier: Tier, profile_id: str, profiles: Mapping[str, Profile]) -> Effective | None:
    is_default = tier.default is not None and tier.default.profile == profile_id
    setting = tier.default if is_default else Setting(profile=profile_id)
    assert setting is not None
    try:
        return resolve_setting(setting, profiles)
    except SteeringRequestError:
        return None


def intersect(bounds: tuple[float, float] | None, allowed: Any) -> tuple[float | None, float | None] | None:
    """Tier bounds intersected with a profile's allowed range (``None`` sides unbounded); ``None`` if empty."""
    lows = [b[0] for b in (bounds,) if b is not None] + [a.min for a in (allowed,) if a is not None]
    highs = [b[1] for b in (bounds,) if b is not None] + [a.max for a in (allowed,) if a is not None]
    lo, hi = max(lows, default=None), min(highs, default=None)
    if lo is not None and hi is not None and lo > hi:
        return None
    return lo, hi


def _range_dict(lo_hi: tuple[float | None, float | None] | None) -> dict[str, float | None] | None:
    return None if lo_hi is None else {"min": lo_hi[0], "max": lo_hi[1]}


def _defaults_dict(effective: Effective | None) -> dict[str, Any]:
    if effective is None:
        return {}
    keys = effective.steer_keys()
    return {key.removeprefix("steer_"): value for key, value in keys.items() if key != "steer_profile"}


def _describe(
    profile: Profile,
    grant: ProfileGrant,
    default: Effective | None,
    layers_override: bool,
    *,
    is_default: bool,
    every_action: bool = False,
) -> dict[str, Any]:
    spec = profile.spec
    parameter = parameter_of(spec.method)
    categories = [c for c in spec.categories if grant.categories is None or c in grant.categories]
    gating = spec.gating
    routes = list(gating.routes) if gating is not None else []
    steers = gating is not None and (gating.action == "steer" or every_action or "steer" in (grant.gate_actions or ()))
    if not steers or not all(c in categories for c in routes):
        routes = []  # "auto" steers: not where the tier denies action steer or a category the gates may pick
    return {
        "id": spec.id,
        "method": spec.method,
        "description": spec.description,
        "layers": list(spec.layers),
        "layers_override": layers_override,
        "categories": categories,
        "auto": bool(routes),
        "routes": routes,
        "angle": _range_dict(intersect(grant.angle, spec.allowed.angle)) if parameter == "angle" else None,
        "scale": _range_dict(intersect(grant.scale, spec.allowed.scale)) if parameter == "scale" else None,
        "defaults": _defaults_dict(default),
        "forced": False,
        "default": is_default,
    }


def _describe_forced(profile: Profile, forced: Effective) -> dict[str, Any]:
    spec, r = profile.spec, forced.resolved
    parameter = parameter_of(spec.method)
    return {
        "id": spec.id,
        "method": spec.method,
        "description": spec.description,
        "layers": list(forced.layers or spec.layers),
        "layers_override": False,
        "categories": list(r.categories),
        "auto": bool(r.route),
        "routes": list(r.route),
        "angle": {"min": r.angle, "max": r.angle} if parameter == "angle" else None,
        "scale": {"min": r.scale, "max": r.scale} if parameter == "scale" else None,
        "defaults": _defaults_dict(forced),
        "forced": True,
        "default": False,
    }
