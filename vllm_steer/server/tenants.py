"""Multi-tenant steering policy: which API key may steer with what.

Why this exists: ``steer_*`` keys come from clients (``vllm_xargs``). Left to
the engine alone, any client may pick any loaded profile at any strength, or
none at all, which undoes a safety profile (angle 0, scale 0, ``"none"``, or
just leaving the keys out). A *tenants file* maps each API key to a tenant and
a *tier*. The OpenAI front end calls :meth:`TenantPolicy.decide` before a
request reaches the engine and forwards only the *effective* steering the tier
permits. The engine still re-validates every request (:mod:`vllm_steer.core.request`):
defense in depth, so a bug here can at worst weaken a tier, never get an
invalid setting steered.

Tiers (``format_version: 1``):

* ``forced`` -- one setting applied to every request; the client may restate it
  exactly, and anything else (another profile, ``"none"``, another angle or
  scale, categories, layers) is refused. It is never silently replaced.
* ``default`` -- applied when a request names no profile.
* ``profiles`` -- ``"*"`` (every loaded profile, its full ranges) or a mapping
  ``id -> {angle: [lo, hi], scale: [lo, hi], categories: [...]}``.
* ``allow_unsteered`` -- may a client send ``steer_profile: "none"``?
* ``allow_layers_override`` -- may a client send ``steer_layers``?
* ``max_concurrent_steered`` -- steered requests in flight per tenant.

Status codes, as :class:`PolicyError`: 400 when the request is malformed or
invalid for the profile whoever sends it, 401 when the key is missing or unknown,
403 when it is valid but above the caller's tier, 429 over the tier's
concurrency limit, 500 when the tier's own setting cannot be applied.

API keys are random tokens (:func:`generate_api_key`), so the file holds only a
fast salted hash, as GitHub does for tokens:
``sha256$<salt hex>$<hex sha256(salt + key)>`` (``python -m vllm_steer.server.tenants
hash-key``). A lookup hashes and compares against every tenant with
:func:`hmac.compare_digest` and no early exit.
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import hmac
import json
import re
import secrets
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError
from pydantic import field_validator, model_validator

from vllm_steer.core.profile import ANGLE_METHODS, SCALE_METHODS, Profile
from vllm_steer.core.request import (
    STEER_KEYS,
    ResolvedSteering,
    SteeringRequest,
    SteeringRequestError,
    is_steering_key,
    parse_steering,
    resolve_steering,
    unknown_steering_key_message,
)

__all__ = [
    "ALL_PROFILES",
    "KNOWN_STEER_KEYS",
    "MAX_LIST_ITEMS",
    "UNSTEERED",
    "PolicyError",
    "TenantsFileError",
    "ProfileGrant",
    "Setting",
    "Tier",
    "TenantEntry",
    "TenantsFile",
    "AdminEntry",
    "Tenant",
    "SteeringSlot",
    "TenantPolicy",
    "hash_api_key",
    "generate_api_key",
    "bearer_token",
    "load_tenants_file",
]

ALL_PROFILES = "*"
UNSTEERED = "none"
"""The ``steer_profile`` value by which a client asks for no steering."""
KNOWN_STEER_KEYS = STEER_KEYS
MAX_LIST_ITEMS = 256
"""Longest ``steer_categories`` / ``steer_layers`` list a request may send."""
MAX_API_KEY_CHARS = 4096

HASH_SCHEME = "sha256"
_KEY_HASH = re.compile(r"sha256\$((?:[0-9a-f]{2}){8,64})\$([0-9a-f]{64})")
_SUBFIELD = re.compile(r"[A-Za-z_][\w.\-*]*")
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_HASH_COMMAND = "python -m vllm_steer.server.tenants hash-key"


# ---------------------------------------------------------------------- errors


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    429: "rate_limit_error",
    500: "server_error",
}


class PolicyError(Exception):
    """A request the policy refuses; ``status`` is the HTTP status, ``field`` the request key to fix."""

    def __init__(self, status: int, field: str, message: str):
        self.status = status
        self.field = field
        self.message = message
        super().__init__(f"{status} {field}: {message}")

    @property
    def error_type(self) -> str:
        return _ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def to_openai(self) -> dict[str, Any]:
        """The body of an OpenAI-style error response."""
        return {"error": {"message": self.message, "type": self.error_type, "param": self.field, "code": self.status}}


class TenantsFileError(ValueError):
    """A tenants file that cannot be used; the message names the file and the field path."""

    def __init__(self, path: Path | str, field: str, message: str):
        self.path = str(path)
        self.field = field
        super().__init__(f"{path}: {field}: {message}")


def _malformed(field: str, message: str) -> PolicyError:
    return PolicyError(400, field, message)


def _above_tier(field: str, message: str) -> PolicyError:
    return PolicyError(403, field, message)


# ---------------------------------------------------------------------- keys


def generate_api_key() -> str:
    """A new random API key (256 bits, URL-safe)."""
    return "vsk_" + secrets.token_urlsafe(32)


def hash_api_key(key: str, salt: bytes | None = None) -> str:
    """``sha256$<salt hex>$<hex sha256(salt + key)>``: what a tenants file stores instead of the key."""
    if not isinstance(key, str) or not key:
        raise ValueError("an API key is a non-empty string")
    salt = secrets.token_bytes(16) if salt is None else salt
    if not 8 <= len(salt) <= 64:
        raise ValueError("the salt must be 8 to 64 bytes")
    return f"{HASH_SCHEME}${salt.hex()}${hashlib.sha256(salt + key.encode()).hexdigest()}"


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else ``None``."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _check_key_hash(value: str) -> str:
    if not value.startswith(HASH_SCHEME + "$"):
        raise ValueError(
            f"looks like a plain-text API key; store only its hash (run `{_HASH_COMMAND}` and paste its output)"
        )
    if not _KEY_HASH.fullmatch(value):
        raise ValueError(f"malformed key hash; expected sha256$<salt hex>$<64 hex digits>, as `{_HASH_COMMAND}` prints")
    return value


@dataclass(frozen=True, repr=False)
class _Credential:
    salt: bytes
    digest: bytes
    tenant: Tenant

    @classmethod
    def from_hash(cls, key_hash: str, tenant: Tenant) -> _Credential:
        match = _KEY_HASH.fullmatch(key_hash)
        assert match is not None  # TenantEntry validated it
        return cls(bytes.fromhex(match.group(1)), bytes.fromhex(match.group(2)), tenant)

    def __repr__(self) -> str:
        return f"_Credential(tenant={self.tenant.name!r})"


# ---------------------------------------------------------------------- schema


Finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Name = Annotated[str, Field(strict=True, pattern=_NAME)]


def _ordered(bounds: tuple[float, float]) -> tuple[float, float]:
    if bounds[0] > bounds[1]:
        raise ValueError(f"lower bound {bounds[0]} is greater than upper bound {bounds[1]}")
    return bounds


Bounds = Annotated[tuple[Finite, Finite], AfterValidator(_ordered)]


def _no_repeats(values: tuple | None) -> tuple | None:
    if values is not None and len(set(values)) != len(values):
        raise ValueError("must not repeat an entry")
    return values


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProfileGrant(_Schema):
    """One approved profile in a tier, with optional bounds tighter than the profile's own."""

    angle: Bounds | None = None
    scale: Bounds | None = None
    categories: Annotated[tuple[StrictStr, ...] | None, AfterValidator(_no_repeats)] = Field(default=None, min_length=1)


class Setting(_Schema):
    """A steering setting chosen by the operator (a tier's ``forced`` or ``default``)."""

    profile: StrictStr = Field(min_length=1, max_length=128)
    angle: Finite | None = None
    scale: Finite | None = None
    categories: Annotated[tuple[StrictStr, ...] | None, AfterValidator(_no_repeats)] = Field(default=None, min_length=1)
    layers: Annotated[
        tuple[Annotated[int, Field(strict=True, ge=0)], ...] | None, AfterValidator(_no_repeats)
    ] = Field(default=None, min_length=1)

    def steer_keys(self) -> dict[str, Any]:
        """The ``steer_*`` keys (all but layers) that express this setting."""
        keys: dict[str, Any] = {"steer_profile": self.profile}
        for name in ("angle", "scale", "categories"):
            value = getattr(self, name)
            if value is not None:
                keys[f"steer_{name}"] = list(value) if isinstance(value, tuple) else value
        return keys


class Tier(_Schema):
    """What the tenants of one tier may do; see the module docstring."""

    profiles: dict[StrictStr, ProfileGrant] = {}
    forced: Setting | None = None
    default: Setting | None = None
    allow_unsteered: StrictBool
    allow_layers_override: StrictBool = False
    max_concurrent_steered: Annotated[int, Field(strict=True, ge=1)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _unsteered_default(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "allow_unsteered" not in data:
            operator_chosen = data.get("forced") is not None or data.get("default") is not None
            data = {**data, "allow_unsteered": not operator_chosen}
        return data

    @field_validator("profiles", mode="before")
    @classmethod
    def _star_means_all(cls, value: Any) -> Any:
        if value == ALL_PROFILES:
            return {ALL_PROFILES: {}}
        if isinstance(value, str):
            raise ValueError(f"must be {ALL_PROFILES!r} or a mapping of profile id to bounds")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Tier:
        if ALL_PROFILES in self.profiles and (len(self.profiles) > 1 or self.profiles[ALL_PROFILES] != ProfileGrant()):
            raise ValueError(f"profiles: {ALL_PROFILES!r} stands alone (write profiles: {ALL_PROFILES!r})")
        if self.forced is not None:
            self._check_forced_alone()
        if self.default is not None and self.grant_for(self.default.profile) is None:
            raise ValueError(f"default.profile: {self.default.profile!r} is not among this tier's approved profiles")
        return self

    def _check_forced_alone(self) -> None:
        if self.default is not None:
            raise ValueError("default: forced and default are mutually exclusive (forced applies to every request)")
        if self.profiles:
            raise ValueError("profiles: a forced tier steers only with its forced profile; leave profiles out")
        if self.allow_unsteered:
            raise ValueError("allow_unsteered: a forced tier cannot let clients opt out")
        if self.allow_layers_override:
            raise ValueError("allow_layers_override: a forced tier cannot let clients change layers")

    @property
    def approves_all(self) -> bool:
        return ALL_PROFILES in self.profiles

    def grant_for(self, profile_id: str) -> ProfileGrant | None:
        """The tier's bounds for ``profile_id`` (exact, case-sensitive id); ``None`` if not approved."""
        if self.forced is not None:
            return None
        if self.approves_all:
            return _UNBOUNDED
        return self.profiles.get(profile_id)


_UNBOUNDED = ProfileGrant()


class _KeyHolder(_Schema):
    """A named key holder; ``key_hash`` is a salted hash and never appears in a repr."""

    name: Name
    key_hash: StrictStr = Field(repr=False)

    @field_validator("key_hash")
    @classmethod
    def _hashed(cls, value: str) -> str:
        return _check_key_hash(value)


class TenantEntry(_KeyHolder):
    """One tenant line of the file."""

    tier: StrictStr


class AdminEntry(_KeyHolder):
    """An operator allowed on the admin endpoints (hot reload); never a tenant."""


class TenantsFile(_Schema):
    """The validated content of a tenants file."""

    format_version: Literal[1]
    tiers: dict[Name, Tier] = Field(min_length=1)
    tenants: list[TenantEntry] = Field(min_length=1)
    admins: list[AdminEntry] = []

    @model_validator(mode="after")
    def _consistent(self) -> TenantsFile:
        names: dict[str, int] = {}
        hashes: dict[str, str] = {}
        for i, tenant in enumerate(self.tenants):
            if tenant.tier not in self.tiers:
                known = ", ".join(sorted(self.tiers))
                raise ValueError(f"tenants.{i}.tier: unknown tier {tenant.tier!r} (tiers: {known})")
            if tenant.name in names:
                first = names[tenant.name]
                raise ValueError(f"tenants.{i}.name: duplicate tenant name {tenant.name!r} (also tenants.{first})")
            if tenant.key_hash in hashes:
                raise ValueError(f"tenants.{i}.key_hash: same key hash as tenant {hashes[tenant.key_hash]!r}")
            names[tenant.name] = i
            hashes[tenant.key_hash] = tenant.name
        for i, admin in enumerate(self.admins):
            if admin.key_hash in hashes:
                raise ValueError(f"admins.{i}.key_hash: same key hash as {hashes[admin.key_hash]!r}; an admin key "
                                 "is never a tenant key")
            hashes[admin.key_hash] = admin.name
        return self


# ---------------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a repeated key: a second ``standard:`` tier must not silently win."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict:
    loader.flatten_mapping(node)
    pairs = loader.construct_pairs(node, deep=True)
    seen = set()
    for (key, _), (key_node, _) in zip(pairs, node.value):
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return dict(pairs)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _json_unique(pairs: list[tuple[str, Any]]) -> dict:
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ValueError(f"duplicate key {repeated[0]!r}")
    return dict(pairs)


def _read_document(path: Path) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise TenantsFileError(path, "<file>", "not found") from None
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text, object_pairs_hook=_json_unique)
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except (yaml.YAMLError, ValueError) as exc:
        raise TenantsFileError(path, "<syntax>", str(exc)) from None


def _field_and_message(err: ValidationError) -> tuple[str, str]:
    errors = err.errors(include_input=False)
    first = errors[0]
    loc = [str(part) for part in first["loc"]]
    msg = first["msg"].removeprefix("Value error, ")
    sub, sep, rest = msg.partition(": ")
    if sep and _SUBFIELD.fullmatch(sub):  # a cross-field check names its field first
        loc.append(sub)
        msg = rest
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return ".".join(loc) or "<root>", msg


def load_tenants_file(data: Any, source: Path | str = "<mapping>") -> TenantsFile:
    """Validate a parsed tenants document; raise :class:`TenantsFileError` naming the field path."""
    if not isinstance(data, Mapping):
        raise TenantsFileError(source, "<root>", "a tenants file is a mapping with format_version, tiers and tenants")
    try:
        return TenantsFile.model_validate(data)
    except ValidationError as exc:
        field_path, message = _field_and_message(exc)
        raise TenantsFileError(source, field_path, message) from None


# ---------------------------------------------------------------------- runtime objects


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


@dataclass(frozen=True)
class _ClientSteering:
    """A request's ``steer_*`` keys, type-checked."""

    request: SteeringRequest
    layers: tuple[int, ...] | None
    opts_out: bool


@dataclass(frozen=True)
class _Effective:
    """Steering the policy lets through: resolved against its profile, plus a layer override if any."""

    resolved: ResolvedSteering
    layers: tuple[int, ...] | None

    def steer_keys(self) -> dict[str, Any]:
        """Explicit keys for the engine, defaults filled in, so it steers with exactly what was checked."""
        r = self.resolved
        keys: dict[str, Any] = {"steer_profile": r.profile_id}
        if r.method in ANGLE_METHODS:
            keys["steer_angle"] = r.angle
        if r.method in SCALE_METHODS:
            keys["steer_scale"] = r.scale
        if r.method == "category":
            keys["steer_categories"] = list(r.categories)
        if self.layers is not None:
            keys["steer_layers"] = list(self.layers)
        return keys


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


# ---------------------------------------------------------------------- request checks


def _split_extra_args(extra_args: Mapping[str, Any] | None) -> tuple[dict[Any, Any], dict[str, Any]]:
    """(keys of other plugins, untouched; ``steer_*`` keys)."""
    if extra_args is None:
        return {}, {}
    if not isinstance(extra_args, Mapping):
        raise _malformed("extra_args", f"must be a mapping, got {type(extra_args).__name__}")
    steer = {k: v for k, v in extra_args.items() if is_steering_key(k)}
    others = {k: v for k, v in extra_args.items() if k not in steer}
    return others, steer


def _check_known_keys(steer: Mapping[str, Any]) -> None:
    unknown = sorted(set(steer) - set(KNOWN_STEER_KEYS))
    if unknown:
        raise _malformed(unknown[0], unknown_steering_key_message(unknown[0]))


def _check_list_lengths(steer: Mapping[str, Any]) -> None:
    for key in ("steer_categories", "steer_layers"):
        value = steer.get(key)
        if isinstance(value, (list, tuple)) and len(value) > MAX_LIST_ITEMS:
            raise _malformed(key, f"at most {MAX_LIST_ITEMS} entries, got {len(value)}")


def _parse_layers(value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise _malformed("steer_layers", "must be a non-empty list of layer indices")
    if not all(isinstance(layer, int) and not isinstance(layer, bool) and layer >= 0 for layer in value):
        raise _malformed("steer_layers", "every entry must be an integer layer index >= 0")
    if len(set(value)) != len(value):
        raise _malformed("steer_layers", "must not repeat a layer")
    return tuple(sorted(value))


def _parse_client_steering(steer: dict[str, Any]) -> _ClientSteering | None:
    """Type-check the request's ``steer_*`` keys (400 on anything malformed); ``None`` when it sent none."""
    if not steer:
        return None
    _check_known_keys(steer)
    _check_list_lengths(steer)
    layers = _parse_layers(steer["steer_layers"]) if "steer_layers" in steer else None
    rest = {k: v for k, v in steer.items() if k != "steer_layers"}
    if "steer_profile" not in rest:
        raise _malformed("steer_profile", f"required when {sorted(steer)[0]} is given")
    try:
        request = parse_steering(rest)
    except SteeringRequestError as exc:
        raise _malformed(exc.field, str(exc).removeprefix(f"{exc.field}: ")) from None
    assert request is not None
    opts_out = request.steer_profile == UNSTEERED
    if opts_out and (len(rest) > 1 or layers is not None):
        other = sorted(k for k in steer if k != "steer_profile")[0]
        raise _malformed(other, f"not allowed with steer_profile {UNSTEERED!r}")
    return _ClientSteering(request, layers, opts_out)


def _check_profile_loaded(profile_id: str, profiles: Mapping[str, Profile]) -> None:
    if profile_id not in profiles:
        raise SteeringRequestError("steer_profile", f"unknown profile {profile_id!r}")


def _check_layers_subset(layers: tuple[int, ...] | None, profile: Profile) -> None:
    if layers is None:
        return
    outside = [layer for layer in layers if layer not in profile.spec.layers]
    if outside:
        raise SteeringRequestError(
            "steer_layers",
            f"layers {outside} are not steered by profile {profile.id!r} (its layers: {profile.spec.layers})",
        )


def _resolve(request: SteeringRequest, layers: tuple[int, ...] | None, profiles: Mapping[str, Profile]) -> _Effective:
    """Resolve against the profile (raises :class:`SteeringRequestError`)."""
    _check_profile_loaded(request.steer_profile, profiles)
    resolved = resolve_steering(request, profiles)
    _check_layers_subset(layers, profiles[resolved.profile_id])
    return _Effective(resolved, layers)


def _resolve_setting(setting: Setting, profiles: Mapping[str, Profile]) -> _Effective:
    request = parse_steering(setting.steer_keys())
    assert request is not None
    layers = tuple(sorted(setting.layers)) if setting.layers is not None else None
    return _resolve(request, layers, profiles)


def _resolve_operator_setting(
    tier_name: str, which: str, setting: Setting, profiles: Mapping[str, Profile]
) -> _Effective:
    """A tier's forced/default setting; one that no longer resolves is the operator's error (500)."""
    try:
        return _resolve_setting(setting, profiles)
    except SteeringRequestError as exc:
        message = f"the {which} steering of tier {tier_name!r} cannot be applied ({exc})"
        raise PolicyError(500, exc.field, message) from None


def _resolve_client(client: _ClientSteering, profiles: Mapping[str, Profile]) -> _Effective:
    try:
        return _resolve(client.request, client.layers, profiles)
    except SteeringRequestError as exc:
        raise _malformed(exc.field, str(exc).removeprefix(f"{exc.field}: ")) from None


def _refuse_departures_from_forced(client: _ClientSteering, forced: _Effective, profile: Profile) -> None:
    """403 on the first field where the request differs from the forced setting; restating it is fine."""
    request, r = client.request, forced.resolved
    if client.opts_out:
        raise _above_tier("steer_profile", f"this tier always steers with {r.profile_id!r}; it cannot opt out")
    if request.steer_profile != r.profile_id:
        raise _above_tier(
            "steer_profile", f"this tier always steers with {r.profile_id!r}, not {request.steer_profile!r}"
        )
    fixed = {
        "steer_angle": (request.steer_angle, r.angle if r.method in ANGLE_METHODS else None),
        "steer_scale": (request.steer_scale, r.scale if r.method in SCALE_METHODS else None),
        "steer_categories": (
            _sorted_or_none(request.steer_categories),
            r.categories if r.method == "category" else None,
        ),
        "steer_layers": (client.layers, forced.layers or tuple(profile.spec.layers)),
    }
    for key, (asked, forced_value) in fixed.items():
        if asked is not None and asked != forced_value:
            shown = "not settable" if forced_value is None else f"fixed at {_show(forced_value)}"
            raise _above_tier(key, f"{key} is {shown} for this tier (asked for {_show(asked)})")


def _sorted_or_none(values: tuple[str, ...] | None) -> tuple[str, ...] | None:
    return None if values is None else tuple(sorted(values))


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return json.dumps(list(value))
    return repr(value)


def _check_within_grant(grant: ProfileGrant, request: SteeringRequest, effective: _Effective) -> None:
    """403 when the effective angle, scale or categories fall outside the tier's bounds for this profile."""
    r = effective.resolved
    ranged = (
        ("steer_angle", r.angle, request.steer_angle, grant.angle, r.method in ANGLE_METHODS),
        ("steer_scale", r.scale, request.steer_scale, grant.scale, r.method in SCALE_METHODS),
    )
    for key, value, asked, bounds, applies in ranged:
        if applies and bounds is not None and not bounds[0] <= value <= bounds[1]:
            origin = "" if asked is not None else f" (the profile's default, used because the request set no {key})"
            span = f"[{bounds[0]:g}, {bounds[1]:g}]"
            allows = f"the range this tier allows for {r.profile_id!r}"
            raise _above_tier(key, f"{value:g}{origin} is outside {span}, {allows}")
    if r.method == "category" and grant.categories is not None:
        outside = [c for c in r.categories if c not in grant.categories]
        if outside:
            origin = "" if request.steer_categories is not None else " (the profile's default categories)"
            raise _above_tier(
                "steer_categories", f"{outside}{origin} not approved for this tier (approved: {list(grant.categories)})"
            )


def _merge(others: dict[Any, Any], effective: _Effective | None) -> dict[Any, Any] | None:
    merged = dict(others)
    if effective is not None:
        merged.update(effective.steer_keys())
    return merged or None


# ---------------------------------------------------------------------- policy


class TenantPolicy:
    """Authenticates API keys and decides each request's effective steering; see the module docstring.

    ``TenantPolicy.single_tenant()`` builds a policy without a tenants file; on an
    instance, ``policy.single_tenant`` is then ``True`` (everything passes through
    to the engine unchanged, which the server should log loudly).
    """

    def __init__(self, config: TenantsFile | None, source: str = "<memory>"):
        self.source = source
        self.single_tenant = config is None  # shadows the classmethod on instances, on purpose
        self._config = config
        self._credentials: list[_Credential] = []
        if config is not None:
            for entry in config.tenants:
                tenant = Tenant(entry.name, entry.tier, config.tiers[entry.tier])
                self._credentials.append(_Credential.from_hash(entry.key_hash, tenant))
        self._admins: list[tuple[bytes, bytes, str]] = []
        if config is not None:
            for admin in config.admins:
                _, salt_hex, digest_hex = admin.key_hash.split("$")
                self._admins.append((bytes.fromhex(salt_hex), bytes.fromhex(digest_hex), admin.name))
        self._in_flight: dict[str, int] = {}
        self._lock = threading.Lock()

    # --------------------------------------------------------------- construction

    @classmethod
    def from_file(cls, path: str | Path) -> TenantPolicy:
        """Load a YAML (or ``.json``) tenants file; :class:`TenantsFileError` names the field to fix."""
        path = Path(path)
        return cls(load_tenants_file(_read_document(path), path), source=str(path))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "<mapping>") -> TenantPolicy:
        return cls(load_tenants_file(data, source), source=source)

    @classmethod
    def single_tenant(cls) -> TenantPolicy:
        """No tenants file: any caller is one anonymous tenant, steering passes through unchanged."""
        return cls(None, source="<single tenant>")

    def __repr__(self) -> str:
        if self._config is None:
            return "TenantPolicy(single_tenant)"
        tiers = sorted(self._config.tiers)
        return f"TenantPolicy(source={self.source!r}, tenants={len(self._credentials)}, tiers={tiers})"

    @property
    def tenants(self) -> list[Tenant]:
        return [credential.tenant for credential in self._credentials]

    @property
    def tiers(self) -> Mapping[str, Tier]:
        return {} if self._config is None else dict(self._config.tiers)

    # --------------------------------------------------------------- authentication

    def authenticate(self, api_key: str | None) -> Tenant:
        """The tenant whose key this is; 401 when missing or unknown. Every tenant is compared."""
        if self._config is None:
            return _ANONYMOUS
        if not isinstance(api_key, str) or not api_key or len(api_key) > MAX_API_KEY_CHARS:
            raise PolicyError(401, "authorization", "missing API key (send Authorization: Bearer <key>)")
        candidate = api_key.encode("utf-8", "surrogatepass")
        matched: Tenant | None = None
        for credential in self._credentials:  # no early exit: the time does not depend on which tenant matches
            digest = hashlib.sha256(credential.salt + candidate).digest()
            if hmac.compare_digest(digest, credential.digest):
                matched = credential.tenant
        if matched is None:
            raise PolicyError(401, "authorization", "invalid API key")
        return matched

    def authenticate_admin(self, api_key: str | None) -> str:
        """The admin's name; 403 for a tenant key or without configured admins, 401 for an unknown key."""
        if self._config is None or not self._admins:
            raise PolicyError(403, "authorization", "admin endpoints are disabled: list admins in the tenants file")
        if not isinstance(api_key, str) or not api_key or len(api_key) > MAX_API_KEY_CHARS:
            raise PolicyError(401, "authorization", "missing API key (send Authorization: Bearer <key>)")
        candidate = api_key.encode("utf-8", "surrogatepass")
        admin: str | None = None
        for salt, digest, name in self._admins:  # no early exit, as for tenants
            if hmac.compare_digest(hashlib.sha256(salt + candidate).digest(), digest):
                admin = name
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
        others, steer = _split_extra_args(extra_args)
        if self._config is None:
            return _merge({**others, **steer}, None)
        client = _parse_client_steering(steer)
        tier = tenant.tier
        if tier.forced is not None:
            effective = self._forced_steering(tenant, client, profiles)
        else:
            effective = self._steering_within_tier(tenant, client, profiles)
        return _merge(others, effective)

    def _forced_steering(
        self, tenant: Tenant, client: _ClientSteering | None, profiles: Mapping[str, Profile]
    ) -> _Effective:
        assert tenant.tier.forced is not None
        forced = _resolve_operator_setting(tenant.tier_name, "forced", tenant.tier.forced, profiles)
        if client is not None:
            _refuse_departures_from_forced(client, forced, profiles[forced.resolved.profile_id])
        return forced

    def _steering_within_tier(
        self, tenant: Tenant, client: _ClientSteering | None, profiles: Mapping[str, Profile]
    ) -> _Effective | None:
        tier = tenant.tier
        if client is None:
            if tier.default is None:
                return None
            return _resolve_operator_setting(tenant.tier_name, "default", tier.default, profiles)
        if client.opts_out:
            if tier.allow_unsteered:
                return None
            raise _above_tier("steer_profile", f"this tier does not allow unsteered requests ({UNSTEERED!r})")
        grant = tier.grant_for(client.request.steer_profile)
        if grant is None:
            approved = ", ".join(sorted(tier.profiles)) or "none"
            asked = client.request.steer_profile
            message = f"profile {asked!r} is not approved for this tier (approved: {approved})"
            raise _above_tier("steer_profile", message)
        if client.layers is not None and not tier.allow_layers_override:
            raise _above_tier("steer_layers", "this tier may not override a profile's layers")
        effective = _resolve_client(client, profiles)
        _check_within_grant(grant, client.request, effective)
        return effective

    # --------------------------------------------------------------- discovery

    def visible_profiles(self, tenant: Tenant, profiles: Mapping[str, Profile]) -> list[dict[str, Any]]:
        """What ``GET /v1/steering/profiles`` shows this caller: the profiles its tier may use, with its ranges."""
        tier = tenant.tier
        if tier.forced is not None:
            try:
                forced = _resolve_setting(tier.forced, profiles)
            except SteeringRequestError:
                return []
            return [_describe_forced(profiles[forced.resolved.profile_id], forced)]
        ids = sorted(profiles) if tier.approves_all else sorted(pid for pid in tier.profiles if pid in profiles)
        default_id = tier.default.profile if tier.default is not None else None
        described = []
        for pid in ids:
            grant = tier.grant_for(pid)
            if grant is None:
                continue
            default = self._visible_default(tier, pid, profiles)
            described.append(
                _describe(profiles[pid], grant, default, tier.allow_layers_override, is_default=pid == default_id)
            )
        return described

    @staticmethod
    def _visible_default(tier: Tier, profile_id: str, profiles: Mapping[str, Profile]) -> _Effective | None:
        is_default = tier.default is not None and tier.default.profile == profile_id
        setting = tier.default if is_default else Setting(profile=profile_id)
        try:
            return _resolve_setting(setting, profiles)
        except SteeringRequestError:
            return None

    # --------------------------------------------------------------- concurrency

    def acquire(self, tenant: Tenant) -> SteeringSlot:
        """Count one steered request in flight for ``tenant``; 429 over its tier's ``max_concurrent_steered``."""
        limit = tenant.tier.max_concurrent_steered
        with self._lock:
            in_flight = self._in_flight.get(tenant.name, 0)
            if limit is not None and in_flight >= limit:
                message = f"{in_flight} steered requests already in flight; this tier allows {limit} at a time"
                raise PolicyError(429, "steer_profile", message)
            self._in_flight[tenant.name] = in_flight + 1
        return SteeringSlot(lambda: self._release(tenant.name))

    def _release(self, tenant_name: str) -> None:
        with self._lock:
            self._in_flight[tenant_name] = max(0, self._in_flight.get(tenant_name, 0) - 1)

    def in_flight(self, tenant: Tenant) -> int:
        with self._lock:
            return self._in_flight.get(tenant.name, 0)

    # --------------------------------------------------------------- start-up check

    def check_profiles(self, profiles: Mapping[str, Profile]) -> None:
        """Check the tiers against the loaded profiles at start-up; :class:`TenantsFileError` on the first problem.

        Catches what the file alone cannot show: approved or forced profiles that
        are not loaded, bounds on a parameter the method does not take or disjoint
        from the profile's own range, unknown categories, forced/default settings
        that do not resolve, a default outside its own tier's bounds.
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
    for name, bounds, methods in (("angle", grant.angle, ANGLE_METHODS), ("scale", grant.scale, SCALE_METHODS)):
        if bounds is None:
            continue
        if spec.method not in methods:
            raise TenantsFileError(source, f"{path}.{name}", f"method {spec.method!r} takes no {name}")
        if _intersect(bounds, getattr(spec.allowed, name)) is None:
            raise TenantsFileError(source, f"{path}.{name}", f"does not overlap the profile's allowed {name} range")
    if grant.categories is not None:
        unknown = [c for c in grant.categories if c not in spec.categories]
        if spec.method != "category" or unknown:
            message = f"not categories of profile {spec.id!r}: {unknown or list(grant.categories)}"
            raise TenantsFileError(source, f"{path}.categories", message)


def _check_setting(source: str, path: str, tier: Tier, setting: Setting, profiles: Mapping[str, Profile]) -> None:
    try:
        effective = _resolve_setting(setting, profiles)
    except SteeringRequestError as exc:
        field_name = exc.field.removeprefix("steer_") if exc.field != "steer_profile" else "profile"
        raise TenantsFileError(source, f"{path}.{field_name}", str(exc).removeprefix(f"{exc.field}: ")) from None
    grant = tier.grant_for(setting.profile)
    if grant is not None:
        request = parse_steering(setting.steer_keys())
        assert request is not None
        try:
            _check_within_grant(grant, request, effective)
        except PolicyError as exc:
            raise TenantsFileError(source, f"{path}.{exc.field.removeprefix('steer_')}", exc.message) from None


# ---------------------------------------------------------------------- discovery helpers


def _intersect(bounds: tuple[float, float] | None, allowed: Any) -> tuple[float | None, float | None] | None:
    """Tier bounds intersected with a profile's allowed range (``None`` sides unbounded); ``None`` if empty."""
    lows = [b[0] for b in (bounds,) if b is not None] + [a.min for a in (allowed,) if a is not None]
    highs = [b[1] for b in (bounds,) if b is not None] + [a.max for a in (allowed,) if a is not None]
    lo, hi = max(lows, default=None), min(highs, default=None)
    if lo is not None and hi is not None and lo > hi:
        return None
    return lo, hi


def _range_dict(lo_hi: tuple[float | None, float | None] | None) -> dict[str, float | None] | None:
    return None if lo_hi is None else {"min": lo_hi[0], "max": lo_hi[1]}


def _defaults_dict(effective: _Effective | None) -> dict[str, Any]:
    if effective is None:
        return {}
    keys = effective.steer_keys()
    return {key.removeprefix("steer_"): value for key, value in keys.items() if key != "steer_profile"}


def _describe(
    profile: Profile, grant: ProfileGrant, default: _Effective | None, layers_override: bool, *, is_default: bool
) -> dict[str, Any]:
    spec = profile.spec
    categories = [c for c in spec.categories if grant.categories is None or c in grant.categories]
    return {
        "id": spec.id,
        "method": spec.method,
        "description": spec.description,
        "layers": list(spec.layers),
        "layers_override": layers_override,
        "categories": categories,
        "angle": _range_dict(_intersect(grant.angle, spec.allowed.angle)) if spec.method in ANGLE_METHODS else None,
        "scale": _range_dict(_intersect(grant.scale, spec.allowed.scale)) if spec.method in SCALE_METHODS else None,
        "defaults": _defaults_dict(default),
        "forced": False,
        "default": is_default,
    }


def _describe_forced(profile: Profile, forced: _Effective) -> dict[str, Any]:
    spec, r = profile.spec, forced.resolved
    return {
        "id": spec.id,
        "method": spec.method,
        "description": spec.description,
        "layers": list(forced.layers or spec.layers),
        "layers_override": False,
        "categories": list(r.categories),
        "angle": {"min": r.angle, "max": r.angle} if spec.method in ANGLE_METHODS else None,
        "scale": {"min": r.scale, "max": r.scale} if spec.method in SCALE_METHODS else None,
        "defaults": _defaults_dict(forced),
        "forced": True,
        "default": False,
    }


# ---------------------------------------------------------------------- command line


def _read_key_from_user() -> str:
    if sys.stdin.isatty():
        return getpass.getpass("API key (not echoed): ")
    return sys.stdin.readline().strip()


def main(argv: list[str] | None = None) -> int:
    """``hash-key`` (key on stdin, never in argv) or ``new-key`` (a fresh key and its hash)."""
    parser = argparse.ArgumentParser(prog="python -m vllm_steer.server.tenants", description="API keys for a tenants file")
    parser.add_argument("command", choices=["hash-key", "new-key"])
    args = parser.parse_args(argv)
    if args.command == "new-key":
        key = generate_api_key()
        print(f"key (give to the tenant, store nowhere): {key}")
    else:
        key = _read_key_from_user()
        if not key:
            parser.error("no key given on stdin")
    print(f"key_hash: {hash_api_key(key)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
