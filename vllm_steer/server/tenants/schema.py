"""The tenants file (``format_version: 1``): tiers, tenants and admins, validated with the field path named.

What a file alone can show is checked here; what needs the loaded profiles (approved profiles loaded,
bounds that overlap the profile's own range, forced/default settings that resolve) is checked by
:meth:`~vllm_steer.server.tenants.TenantPolicy.check_profiles` at start-up and on every reload.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    field_validator,
    model_validator,
)

from vllm_steer.core.gates import MAX_REFUSAL_CHARS, GateAction
from vllm_steer.server.tenants.controls import ALL_CONTROLS, CONTROL_NAMES
from vllm_steer.server.tenants.keys import check_key_hash

__all__ = [
    "ALL_PROFILES",
    "ProfileGrant",
    "Setting",
    "Tier",
    "TenantEntry",
    "AdminEntry",
    "TenantsFile",
]

ALL_PROFILES = "*"
"""``profiles: "*"``: every loaded profile, with its own full ranges."""
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"

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


def _known_controls(values: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [name for name in values if name not in CONTROL_NAMES]
    if unknown:
        known = ", ".join(CONTROL_NAMES)
        raise ValueError(f"unknown control {unknown[0]!r} (controls: {known}, or {ALL_CONTROLS!r} for all)")
    return tuple(name for name in CONTROL_NAMES if name in values)  # table order


Controls = Annotated[tuple[StrictStr, ...], AfterValidator(_no_repeats), AfterValidator(_known_controls)]


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProfileGrant(_Schema):
    """One approved profile in a tier, with optional bounds tighter than the profile's own."""

    angle: Bounds | None = None
    scale: Bounds | None = None
    categories: Annotated[tuple[StrictStr, ...] | None, AfterValidator(_no_repeats)] = Field(default=None, min_length=1)
    gate_actions: Annotated[tuple[GateAction, ...] | None, AfterValidator(_no_repeats)] = Field(
        default=None, min_length=1
    )
    """Gated profiles: the gate actions a client may ask for (``steer_gate_action``) besides the profile's own;
    none by default. A client never sets the refusal text (``steer_refusal``) unless the tier approves every
    profile (``profiles: "*"``)."""


class Setting(_Schema):
    """A steering setting chosen by the operator (a tier's ``forced`` or ``default``)."""

    profile: StrictStr = Field(min_length=1, max_length=128)
    angle: Finite | None = None
    scale: Finite | None = None
    categories: Annotated[tuple[StrictStr, ...] | None, AfterValidator(_no_repeats)] = Field(default=None, min_length=1)
    layers: Annotated[tuple[Annotated[int, Field(strict=True, ge=0)], ...] | None, AfterValidator(_no_repeats)] = Field(
        default=None, min_length=1
    )
    gate_action: GateAction | None = None
    """Gated profiles: what a fired gate does for this tier (default: the profile's action)."""
    refusal: StrictStr | None = Field(default=None, min_length=1, max_length=MAX_REFUSAL_CHARS)
    """Gate action ``refuse``: this tier's refusal text (default: the profile's)."""

    def steer_keys(self) -> dict[str, Any]:
        """The ``steer_*`` keys that express this setting, as a client would send them."""
        keys: dict[str, Any] = {"steer_profile": self.profile}
        for name in ("angle", "scale", "categories", "layers", "gate_action", "refusal"):
            value = getattr(self, name)
            if value is not None:
                keys[f"steer_{name}"] = list(value) if isinstance(value, tuple) else value
        return keys


class Tier(_Schema):
    """What the tenants of one tier may do; see :mod:`vllm_steer.server.tenants`."""

    profiles: dict[StrictStr, ProfileGrant] = {}
    forced: Setting | None = None
    default: Setting | None = None
    allow_unsteered: StrictBool
    allow_layers_override: StrictBool = False
    max_concurrent_steered: Annotated[int, Field(strict=True, ge=1)] | None = None
    allow_controls: Controls = ()  # never used as is: _unsteered_default always fills it in
    """The request fields outside ``vllm_xargs`` that can counteract steering (:data:`CONTROLS
    <vllm_steer.server.tenants.controls.CONTROLS>`) which this tier's clients may use, in table order;
    ``"*"`` in the file: all. Default: all when clients may opt out of steering, none otherwise."""

    @model_validator(mode="before")
    @classmethod
    def _unsteered_default(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "allow_unsteered" not in data:
            operator_chosen = data.get("forced") is not None or data.get("default") is not None
            data = {**data, "allow_unsteered": not operator_chosen}
        if isinstance(data, Mapping) and "allow_controls" not in data:
            data = {**data, "allow_controls": ALL_CONTROLS if data.get("allow_unsteered") is True else ()}
        return data

    @field_validator("allow_controls", mode="before")
    @classmethod
    def _star_means_all_controls(cls, value: Any) -> Any:
        if value == ALL_CONTROLS:
            return CONTROL_NAMES
        if isinstance(value, str):
            raise ValueError(
                f"must be {ALL_CONTROLS!r} or a list of control names (controls: {', '.join(CONTROL_NAMES)})"
            )
        if isinstance(value, (list, tuple)) and ALL_CONTROLS in value:
            raise ValueError(f"{ALL_CONTROLS!r} stands alone (write allow_controls: {ALL_CONTROLS!r})")
        return value

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

    def permits(self, control: str) -> bool:
        """Whether this tier's clients may use ``control`` (a name in :data:`CONTROL_NAMES
        <vllm_steer.server.tenants.controls.CONTROL_NAMES>`)."""
        return control in self.allow_controls

    def grant_for(self, profile_id: str) -> ProfileGrant | None:
        """The tier's bounds for ``profile_id`` (exact, case-sensitive id); ``None`` if not approved."""
        if self.forced is not None:
            return None
        if self.approves_all:
            return _UNBOUNDED
        return self.profiles.get(profile_id)

    def profile_ids(self, loaded: Mapping[str, Any]) -> list[str]:
        """The loaded profiles this tier's clients may name (or, for a forced tier, get), sorted."""
        if self.forced is not None:
            ids: Any = [self.forced.profile]
        elif self.approves_all:
            ids = loaded
        else:
            ids = self.profiles
        return sorted(pid for pid in ids if pid in loaded)


_UNBOUNDED = ProfileGrant()


class _KeyHolder(_Schema):
    """A named key holder; ``key_hash`` is a salted hash and never appears in a repr."""

    name: Name
    key_hash: StrictStr = Field(repr=False)

    @field_validator("key_hash")
    @classmethod
    def _hashed(cls, value: str) -> str:
        return check_key_hash(value)


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
                raise ValueError(
                    f"admins.{i}.key_hash: same key hash as {hashes[admin.key_hash]!r}; an admin key "
                    "is never a tenant key"
                )
            hashes[admin.key_hash] = admin.name
        return self
