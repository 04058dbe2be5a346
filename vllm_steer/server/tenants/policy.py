"""The tenant policy at run time: who is calling (:meth:`TenantPolicy.authenticate`), what steering their
request gets (:meth:`~TenantPolicy.decide`), which request fields that counteract steering it may use
(:meth:`~TenantPolicy.check_controls`), how many of their steered sequences are in flight
(:meth:`~TenantPolicy.acquire`), and whether the tiers fit the loaded profiles (:meth:`~TenantPolicy.check_profiles`)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

from vllm_steer.core.gates import GATE_ONLY_ACTIONS
from vllm_steer.core.methods import has_categories, method_label, parameter_of
from vllm_steer.core.profile import Profile
from vllm_steer.core.request import ROUTE, SteeringRequest, SteeringRequestError, parse_steering
from vllm_steer.server.tenants.controls import CONTROLS, used_controls
from vllm_steer.server.tenants.discovery import intersect, visible_profiles
from vllm_steer.server.tenants.errors import PolicyError, TenantsFileError, above_tier
from vllm_steer.server.tenants.keys import Credential, match, presented
from vllm_steer.server.tenants.loading import load_tenants_file, read_document
from vllm_steer.server.tenants.schema import ALL_PROFILES, ProfileGrant, Setting, TenantsFile, Tier
from vllm_steer.server.tenants.steering import (
    UNSTEERED,
    Effective,
    check_within_grant,
    merge,
    parse_client,
    refuse_departures_from_forced,
    resolve_client,
    resolve_operator_setting,
    resolve_setting,
    split_extra_args,
)

__all__ = ["Tenant", "SteeringSlot", "TenantPolicy"]


@dataclass(frozen=True, eq=False)
class Tenant:
    """An authenticated caller: its name and its tier (never its key or key hash)."""

    name: str
    tier_name: str
    tier: Tier = field(repr=False)

    def __repr__(self) -> str:
        return f"Tenant(name={self.name!r}, tier={self.tier_name!r})"


_PASSTHROUGH_TIER = Tier(profiles=ALL_PROFILES, allow_unsteered=True, allow_layers_override=True)
_ANONYMOUS = Tenant("default", "single-tenant", _PASSTHROUGH_TIER)


class SteeringSlot:
    """One steered request in flight; release it (or leave the ``with`` block) when the request ends."""

    def __init__(self, release: Callable[[], None] | None = None):
        self._release = release
        self._lock = threading.Lock()

    def release(self) -> None:
        """Idempotent: a second call does nothing."""
        with self._lock:
            release, self._release = self._release, None
        if release is not None:
            release()

    def __enter__(self) -> SteeringSlot:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class _SingleTenant:
    """``TenantPolicy.single_tenant()``: a policy without a tenants file (any caller is one anonymous tenant,
    steering passes through unchanged); ``policy.single_tenant``: whether a policy is one."""

    @overload
    def __get__(self, policy: None, owner: type[TenantPolicy]) -> Callable[[], TenantPolicy]: ...

    @overload
    def __get__(self, policy: TenantPolicy, owner: type[TenantPolicy]) -> bool: ...

    def __get__(self, policy: TenantPolicy | None, owner: type[TenantPolicy]) -> Callable[[], TenantPolicy] | bool:
        if policy is None:
            return lambda: owner(None, source="<single tenant>")
        return policy._config is None


def _missing_key() -> PolicyError:
    return PolicyError(401, "authorization", "missing API key (send Authorization: Bearer <key>)")


class TenantPolicy:
    """Authenticates API keys and decides each request's effective steering; see :mod:`vllm_steer.server.tenants`.

    ``TenantPolicy.single_tenant()`` builds a policy without a tenants file; on an
    instance, ``policy.single_tenant`` is then ``True`` (everything passes through
    to the engine unchanged, which the server should log loudly).
    """

    def __init__(self, config: TenantsFile | None, source: str = "<memory>"):
        self.source = source
        self._config = config
        self._credentials: list[Credential[Tenant]] = []
        self._admins: list[Credential[str]] = []
        if config is not None:
            for entry in config.tenants:
                tenant = Tenant(entry.name, entry.tier, config.tiers[entry.tier])
                self._credentials.append(Credential.from_hash(entry.key_hash, tenant))
            self._admins = [Credential.from_hash(admin.key_hash, admin.name) for admin in config.admins]
        self._in_flight: dict[str, int] = {}
        self._lock = threading.Lock()

    # --------------------------------------------------------------- construction

    @classmethod
    def from_file(cls, path: str | Path) -> TenantPolicy:
        """Load a YAML (or ``.json``) tenants file; :class:`TenantsFileError` names the field to fix."""
        path = Path(path)
        return cls(load_tenants_file(read_document(path), path), source=str(path))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "<mapping>") -> TenantPolicy:
        return cls(load_tenants_file(data, source), source=source)

    single_tenant = _SingleTenant()

    def __repr__(self) -> str:
        if self._config is None:
            return "TenantPolicy(single_tenant)"
        tiers = sorted(self._config.tiers)
        return f"TenantPolicy(source={self.source!r}, tenants={len(self._credentials)}, tiers={tiers})"

    @property
    def tenants(self) -> list[Tenant]:
        return [credential.holder for credential in self._credentials]

    @property
    def tiers(self) -> Mapping[str, Tier]:
        return {} if self._config is None else dict(self._config.tiers)

    # --------------------------------------------------------------- authentication

    def authenticate(self, api_key: str | None) -> Tenant:
        """The tenant whose key this is; 401 when missing or unknown. Every tenant is compared."""
        if self._config is None:
            return _ANONYMOUS
        if not presented(api_key):
            raise _missing_key()
        assert api_key is not None
        tenant = match(self._credentials, api_key)
        if tenant is None:
            raise PolicyError(401, "authorization", "invalid API key")
        return tenant

    def authenticate_admin(self, api_key: str | None) -> str:
        """The admin's name; 403 for a tenant key or without configured admins, 401 for an unknown key."""
        if self._config is None or not self._admins:
            raise PolicyError(403, "authorization", "admin endpoints are disabled: list admins in the tenants file")
        if not presented(api_key):
            raise _missing_key()
        assert api_key is not None
        admin = match(self._admins, api_key)  # every admin compared, as for tenants
        if admin is not None:
            return admin
        try:
            self.authenticate(api_key)
        except PolicyError:
            raise PolicyError(401, "authorization", "invalid API key") from None
        raise PolicyError(403, "authorization", "tenant keys cannot use admin endpoints")

    # --------------------------------------------------------------- decisions

    def decide(
        self, tenant: Tenant, extra_args: Mapping[str, Any] | None, profiles: Mapping[str, Profile]
    ) -> dict[Any, Any] | None:
        """The ``extra_args`` to forward to the engine, or ``None`` when there are none.

        Keys without the ``steer_`` prefix pass through untouched. The ``steer_*``
        keys are replaced by the effective steering, explicit (defaults filled
        in); no ``steer_profile`` in the result means unsteered. Raises
        :class:`PolicyError` (400, 403, or 500 for a tier setting that no longer resolves).
        """
        others, steer = split_extra_args(extra_args)
        if self._config is None:
            return merge({**others, **steer}, None)
        request = parse_client(steer)
        effective: Effective | None
        if tenant.tier.forced is not None:
            effective = self._forced_steering(tenant, request, profiles)
        else:
            effective = self._steering_within_tier(tenant, request, profiles)
        return merge(others, effective)

    @staticmethod
    def _forced_steering(tenant: Tenant, request: SteeringRequest | None, profiles: Mapping[str, Profile]) -> Effective:
        forced = resolve_operator_setting(tenant.tier_name, "forced", tenant.tier, profiles)
        if request is not None:
            refuse_departures_from_forced(request, forced, profiles[forced.resolved.profile_id])
        return forced

    @staticmethod
    def _steering_within_tier(
        tenant: Tenant, request: SteeringRequest | None, profiles: Mapping[str, Profile]
    ) -> Effective | None:
        tier = tenant.tier
        if request is None:
            if tier.default is None:
                return None
            return resolve_operator_setting(tenant.tier_name, "default", tier, profiles)
        if request.steer_profile == UNSTEERED:
            if tier.allow_unsteered:
                return None
            raise above_tier("steer_profile", f"this tier does not allow unsteered requests ({UNSTEERED!r})")
        grant = tier.grant_for(request.steer_profile)
        if grant is None:
            approved = ", ".join(sorted(tier.profiles)) or "none"
            message = f"profile {request.steer_profile!r} is not approved for this tier (approved: {approved})"
            raise above_tier("steer_profile", message)
        if request.steer_layers is not None and not tier.allow_layers_override:
            raise above_tier("steer_layers", "this tier may not override a profile's layers")
        effective = resolve_client(request, tier, profiles)
        check_within_grant(
            grant, request, effective, profiles[effective.resolved.profile_id], every_profile=tier.approves_all
        )
        return effective

    def check_controls(
        self,
        tenant: Tenant,
        body: Mapping[str, Any],
        path: str,
        base_models: Collection[str] = (),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """403 naming the field for the first control (:mod:`~vllm_steer.server.tenants.controls`) the request
        uses that its tier does not permit (``allow_controls``); nothing in single-tenant mode.

        ``path`` is the route (``/v1/completions`` or ``/v1/chat/completions``), ``base_models`` the served
        base model names (empty: unknown, a LoRA adapter in ``model`` is then not detected here), ``headers``
        the request's headers (vLLM also reads the priority from one).
        """
        if self._config is None:
            return
        tier = tenant.tier
        for name, field_name in used_controls(body, path, base_models, headers):
            if not tier.permits(name):
                permits = ", ".join(tier.allow_controls) or "none"
                message = (
                    f"{name} ({CONTROLS[name].description}) is not permitted for this tier (tier permits: {permits})"
                )
                raise above_tier(field_name, message)

    # --------------------------------------------------------------- discovery

    def visible_profiles(self, tenant: Tenant, profiles: Mapping[str, Profile]) -> list[dict[str, Any]]:
        """What ``GET /v1/steering/profiles`` shows this caller: the profiles its tier may use, with its ranges."""
        return visible_profiles(tenant.tier, profiles)

    # --------------------------------------------------------------- concurrency

    def acquire(self, tenant: Tenant, rows: int = 1) -> SteeringSlot:
        """Count a steered request of ``rows`` sequences (:func:`~vllm_steer.server.tenants.controls.rows`) in
        flight for ``tenant``; the slot releases as many.

        Against the tier's ``max_concurrent_steered``: 403 naming ``n`` when ``rows`` alone exceed it (the
        request could never be admitted), 429 when it would fit once requests in flight end.
        """
        rows = max(1, int(rows))
        limit = tenant.tier.max_concurrent_steered
        if limit is not None and rows > limit:
            message = (
                f"this request asks for {rows} steered sequences (n times the prompts); "
                f"this tier allows {limit} at a time"
            )
            raise above_tier("n", message)
        with self._lock:
            in_flight = self._in_flight.get(tenant.name, 0)
            if limit is not None and in_flight + rows > limit:
                message = f"{in_flight} steered sequences already in flight; this tier allows {limit} at a time"
                raise PolicyError(429, "steer_profile", message)
            self._in_flight[tenant.name] = in_flight + rows
        return SteeringSlot(lambda: self._release(tenant.name, rows))

    def _release(self, tenant_name: str, rows: int = 1) -> None:
        with self._lock:
            self._in_flight[tenant_name] = max(0, self._in_flight.get(tenant_name, 0) - rows)

    def in_flight(self, tenant: Tenant) -> int:
        with self._lock:
            return self._in_flight.get(tenant.name, 0)

    # --------------------------------------------------------------- start-up check

    def check_profiles(self, profiles: Mapping[str, Profile]) -> None:
        """Check the tiers against the loaded profiles at start-up; :class:`TenantsFileError` on the first problem.

        Catches what the file alone cannot show: approved or forced profiles that
        are not loaded, bounds on a parameter the method does not take or disjoint
        from the profile's own range, unknown categories, forced/default settings
        that do not resolve (``categories: [auto]`` on a profile whose gates do not route), a default
        outside its own tier's bounds (``auto`` needs every category its gates route to granted).
        """
        if self._config is None:
            return
        if UNSTEERED in profiles:
            message = f"a profile named {UNSTEERED!r} clashes with the opt-out value"
            raise TenantsFileError(self.source, "<profiles>", message)
        for name, tier in self._config.tiers.items():
            for pid, grant in tier.profiles.items():
                if pid != ALL_PROFILES:
                    _check_grant_fits(self.source, f"tiers.{name}.profiles.{pid}", grant, profiles.get(pid))
            for which in ("forced", "default"):
                setting = getattr(tier, which)
                if setting is not None:
                    _check_setting(self.source, f"tiers.{name}.{which}", tier, setting, profiles)


def _check_grant_fits(source: str, path: str, grant: ProfileGrant, profile: Profile | None) -> None:
    if profile is None:
        raise TenantsFileError(source, path, "profile is not loaded on this server")
    spec = profile.spec
    for name, bounds in (("angle", grant.angle), ("scale", grant.scale)):
        if bounds is None:
            continue
        if parameter_of(spec.method) != name:
            message = f"profile {spec.id!r} ({method_label(spec.method)}) takes no {name}"
            raise TenantsFileError(source, f"{path}.{name}", message)
        if intersect(bounds, getattr(spec.allowed, name)) is None:
            raise TenantsFileError(source, f"{path}.{name}", f"does not overlap the profile's allowed {name} range")
    if grant.categories is not None:
        unknown = [c for c in grant.categories if c not in spec.categories]
        if not has_categories(spec.method) or unknown:
            message = f"not categories of profile {spec.id!r}: {unknown or list(grant.categories)}"
            if ROUTE in unknown:
                message += f" ({ROUTE!r} is granted by granting every category the profile's gates route to)"
            raise TenantsFileError(source, f"{path}.categories", message)
    if grant.gate_actions is not None and spec.gating is None:
        raise TenantsFileError(source, f"{path}.gate_actions", f"profile {spec.id!r} has no gates")
    if spec.gate_only and grant.gate_actions is not None:
        steering = sorted(set(grant.gate_actions) - set(GATE_ONLY_ACTIONS))
        if steering:
            raise TenantsFileError(
                source,
                f"{path}.gate_actions",
                f"profile {spec.id!r} is gate-only: its gates cannot {' or '.join(steering)}",
            )


def _check_setting(source: str, path: str, tier: Tier, setting: Setting, profiles: Mapping[str, Profile]) -> None:
    try:
        effective = resolve_setting(setting, profiles)
    except SteeringRequestError as exc:
        field_name = exc.field.removeprefix("steer_") if exc.field != "steer_profile" else "profile"
        raise TenantsFileError(source, f"{path}.{field_name}", str(exc).removeprefix(f"{exc.field}: ")) from None
    grant = tier.grant_for(setting.profile)
    if grant is not None:
        request = parse_steering(setting.steer_keys())
        assert request is not None
        try:
            check_within_grant(grant, request, effective)
        except PolicyError as exc:
            raise TenantsFileError(source, f"{path}.{exc.field.removeprefix('steer_')}", exc.message) from None
