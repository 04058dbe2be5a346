"""Steering profiles, format v1: a directory with ``profile.json`` + ``tensors.safetensors``.

``profile.json`` is validated by :class:`ProfileSpec` (pydantic, unknown
fields refused); the tensors are checked for shape, finiteness and, where the
method needs it, orthonormality. Every refusal is a :class:`ProfileError` that
names the file and the field, because the person reading it is an operator
who has to fix that exact file.

Which tensors a profile holds, and what their lengths must be, depends on its method
(``tensors`` maps a layer index to ``{role: tensor name}``): the method table,
:mod:`vllm_steer.core.methods`, says it per method, and this module checks it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vllm_steer.core.errors import SteerError, field_and_message
from vllm_steer.core.gates import GATE_ONLY_ACTIONS, GatingSpec
from vllm_steer.core.layout import HookKind
from vllm_steer.core.methods import (
    ANGLE_METHODS,
    METHOD_HOOKS,
    METHODS,
    SCALE_METHODS,
    MethodName,
    MethodSpec,
    methods_where,
)

__all__ = [
    "PROFILE_FILE",
    "TENSORS_FILE",
    "PROFILE_ID_PATTERN",
    "MethodName",
    "HookKind",
    "METHOD_HOOKS",
    "ANGLE_METHODS",
    "SCALE_METHODS",
    "ModelFingerprint",
    "ValueRange",
    "ProfileSpec",
    "Profile",
    "ProfileError",
    "load_profile",
    "save_profile",
    "load_profile_dir",
    "profile_changes",
    "GatingSpec",
]

PROFILE_FILE = "profile.json"
TENSORS_FILE = "tensors.safetensors"
FORMAT_VERSION = 1
PROFILE_ID_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,127}$"
"""What a profile id may be: lower-case letters, digits, ``.``, ``_``, ``-``; up to 128 characters."""

# MethodName, HookKind, METHOD_HOOKS, ANGLE_METHODS and SCALE_METHODS are the method table's and the
# layout's (vllm_steer.core.methods, vllm_steer.core.layout), re-exported here where they always were.
_CATEGORY_METHODS = methods_where(lambda m: m.roles == "categories")
_ORTHO_TOL = 1e-3
logger = logging.getLogger(__name__)


class ProfileError(SteerError):
    """A profile that cannot be used; the message names the file and the field."""

    def __init__(self, path: Path | str, field: str, message: str):
        super().__init__(field, message, path)


class ModelFingerprint(BaseModel):
    """What a profile was computed on; checked against the served model at load.

    The shape (architecture, hidden size, layer count) must always match; the identity fields (vocabulary
    size, tokenizer and embedding hashes: :mod:`vllm_steer.core.fingerprint` says how they are computed)
    must match under strict matching, and are reported otherwise. ``None`` means unknown (profiles made
    before the identity fields existed, or a model whose files could not be read).
    """

    model_config = ConfigDict(extra="forbid")
    architecture: str
    hidden_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    name: str | None = None
    vocab_size: int | None = Field(default=None, gt=0)
    tokenizer_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    embedding_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")

    SHAPE: ClassVar[tuple[str, ...]] = ("architecture", "hidden_size", "num_layers")
    IDENTITY: ClassVar[tuple[str, ...]] = ("vocab_size", "tokenizer_sha256", "embedding_sha256")

    def mismatch(self, other: ModelFingerprint, *, strict: bool = False) -> str | None:
        """Why a profile made for ``self`` cannot run on the served model ``other`` (``None``: it can)."""
        for key in self.SHAPE:
            if getattr(self, key) != getattr(other, key):
                return f"{key} is {getattr(self, key)!r} but the served model has {getattr(other, key)!r}"
        if not strict:
            return None
        for key in self.IDENTITY:
            mine, theirs = getattr(self, key), getattr(other, key)
            if mine is None:
                return (
                    f"{key} is not recorded in the profile, and strict model matching needs it "
                    "(calibrate or import the profile again, or turn strict matching off)"
                )
            if theirs is None:
                return f"{key} of the served model could not be computed from its files, and strict matching needs it"
            if mine != theirs:
                return f"{key} is {_short(mine)} but the served model has {_short(theirs)} (another checkpoint)"
        return None

    def identity_differences(self, other: ModelFingerprint) -> list[str]:
        """The identity fields known on both sides that differ (what a non-strict load warns about)."""
        return [
            key
            for key in self.IDENTITY
            if getattr(self, key) is not None
            and getattr(other, key) is not None
            and getattr(self, key) != getattr(other, key)
        ]


def _short(value: object) -> str:
    return repr(value[:12] + "…") if isinstance(value, str) and len(value) > 12 else repr(value)


class ValueRange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min: float = Field(allow_inf_nan=False)
    max: float = Field(allow_inf_nan=False)

    @model_validator(mode="after")
    def _ordered(self) -> ValueRange:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        return self

    def __contains__(self, value: float) -> bool:
        return self.min <= value <= self.max


class Defaults(BaseModel):
    model_config = ConfigDict(extra="forbid")
    angle: float | None = Field(default=None, allow_inf_nan=False)
    scale: float | None = Field(default=None, allow_inf_nan=False)


class Allowed(BaseModel):
    model_config = ConfigDict(extra="forbid")
    angle: ValueRange | None = None
    scale: ValueRange | None = None


class ProfileSpec(BaseModel):
    """The validated content of ``profile.json``."""

    model_config = ConfigDict(extra="forbid")
    format_version: Literal[1]
    id: str = Field(pattern=PROFILE_ID_PATTERN)
    method: MethodName | None
    """The steering method; ``None``: a gate-only profile (no layers, no tensors; gates that refuse or flag)."""
    description: str = ""
    model: ModelFingerprint
    layers: list[int]
    tensors: dict[int, dict[str, str]]
    defaults: Defaults = Defaults()
    allowed: Allowed = Allowed()
    categories: list[str] = []
    threshold: float = Field(default=0.0, allow_inf_nan=False)
    gating: GatingSpec | None = None
    """Gates read from the prompt, and what happens when one fires (:mod:`vllm_steer.core.gates`)."""
    calibration: dict[str, Any] = {}

    @field_validator("layers")
    @classmethod
    def _unique_sorted(cls, layers: list[int]) -> list[int]:
        if len(set(layers)) != len(layers):
            raise ValueError("layers must not repeat")
        if any(layer < 0 for layer in layers):
            raise ValueError("layers must be >= 0")
        return sorted(layers)

    @model_validator(mode="after")
    def _consistent(self) -> ProfileSpec:
        if self.method is None:
            return self._gate_only_consistent()
        if not self.layers:
            raise ValueError(f"layers: a {self.method} profile steers at least one layer")
        too_deep = [layer for layer in self.layers if layer >= self.model.num_layers]
        if too_deep:
            raise ValueError(f"layers: {too_deep} do not exist in a {self.model.num_layers}-layer model")
        if self.gating is not None:
            for i, gate in enumerate(self.gating.gates):
                if gate.layer >= self.model.num_layers:
                    raise ValueError(
                        f"gating.gates.{i}.layer: {gate.layer} does not exist in a {self.model.num_layers}-layer model"
                    )
                if gate.category is not None and gate.category not in self.categories:
                    raise ValueError(
                        f"gating.gates.{i}.category: {gate.category!r} is not a category of this profile "
                        f"({self.categories or 'it has none: only category profiles route'})"
                    )
        if set(self.tensors) != set(self.layers):
            raise ValueError(f"tensors: must have exactly one entry per layer in 'layers' ({self.layers})")
        method = METHODS[self.method]
        if method.roles == "categories":
            if not self.categories:
                raise ValueError(f"categories: a {self.method} profile lists its categories")
            if len(set(self.categories)) != len(self.categories):
                raise ValueError("categories: must not repeat")
        elif self.categories:
            raise ValueError(
                f"categories: only for method {' or '.join(map(repr, _CATEGORY_METHODS))}, not {self.method!r}"
            )
        expected = self.expected_roles()
        for layer, roles in self.tensors.items():
            if set(roles) != set(expected):
                raise ValueError(
                    f"tensors.{layer}: has roles {sorted(roles)}, method {self.method!r} needs {sorted(expected)}"
                )
        if method.parameter is not None and getattr(self.defaults, method.parameter) is None:
            raise ValueError(f"defaults.{method.parameter}: required by method {self.method!r}")
        for name, value in (("angle", self.defaults.angle), ("scale", self.defaults.scale)):
            allowed = getattr(self.allowed, name)
            if value is not None and allowed is not None and value not in allowed:
                raise ValueError(f"defaults.{name}: {value} is outside allowed.{name} [{allowed.min}, {allowed.max}]")
        return self

    def _gate_only_consistent(self) -> ProfileSpec:
        """A gate-only profile (``method: null``): gates that refuse or flag, nothing that steers."""
        for name, value in (
            ("layers", self.layers),
            ("tensors", self.tensors),
            ("categories", self.categories),
            ("defaults.angle", self.defaults.angle),
            ("defaults.scale", self.defaults.scale),
            ("allowed.angle", self.allowed.angle),
            ("allowed.scale", self.allowed.scale),
        ):
            if value:
                raise ValueError(f"{name}: a gate-only profile (method null) steers nothing, so it has none")
        if self.threshold != 0.0:
            raise ValueError("threshold: a gate-only profile (method null) steers nothing, so it has none")
        if self.gating is None:
            raise ValueError("gating: a gate-only profile (method null) is its gates; it needs a gating block")
        if self.gating.action not in GATE_ONLY_ACTIONS:
            raise ValueError(
                f"gating.action: {self.gating.action!r} needs a steering method; a gate-only profile "
                f"does {' or '.join(map(repr, GATE_ONLY_ACTIONS))}"
            )
        for i, gate in enumerate(self.gating.gates):
            if gate.layer >= self.model.num_layers:
                raise ValueError(
                    f"gating.gates.{i}.layer: {gate.layer} does not exist in a {self.model.num_layers}-layer model"
                )
            if gate.category is not None:
                raise ValueError(f"gating.gates.{i}.category: a gate-only profile has no categories to route to")
        return self

    @property
    def gate_only(self) -> bool:
        """No steering method: the profile is its gates (action ``refuse`` or ``flag``)."""
        return self.method is None

    @property
    def method_spec(self) -> MethodSpec:
        """The steering method's table entry; a gate-only profile has none (:class:`ValueError` naming it)."""
        if self.method is None:
            raise ValueError(f"profile {self.id!r} is gate-only (method null): it does not steer")
        return METHODS[self.method]

    def expected_roles(self) -> tuple[str, ...]:
        return () if self.method is None else METHODS[self.method].expected_roles(self.categories)

    def to_json(self, indent: int | None = None) -> str:
        """``profile.json``'s text; a profile without gates is written (and digested) without a ``gating`` key,
        as before gates existed, so its digest and file stay what they were."""
        return self.model_dump_json(indent=indent, exclude={"gating"} if self.gating is None else None)

    @property
    def hooks(self) -> tuple[str, ...]:
        """The hook kinds it edits (none for a gate-only profile)."""
        return () if self.method is None else METHODS[self.method].hooks


class Profile:
    """A loaded, validated profile: its spec and its float32 tensors per layer and role."""

    def __init__(
        self,
        spec: ProfileSpec,
        vectors: dict[int, dict[str, torch.Tensor]],
        source: str = "<memory>",
        gate_vectors: Mapping[str, torch.Tensor] | None = None,
    ):
        self.spec = spec
        self.vectors = vectors
        self.source = source
        self.gate_vectors: dict[str, torch.Tensor] = dict(gate_vectors or {})
        """Gate name → its unit direction (float32), one per gate of ``spec.gating``."""
        expected = {g.name for g in spec.gating.gates} if spec.gating is not None else set()
        if set(self.gate_vectors) != expected:
            raise ValueError(f"gate_vectors: has {sorted(self.gate_vectors)}, the spec's gates are {sorted(expected)}")
        self.digest = _digest(spec, vectors, self.gate_vectors)

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def method(self) -> MethodName | None:
        return self.spec.method

    def __repr__(self) -> str:
        return f"Profile(id={self.id!r}, method={self.method!r}, layers={self.spec.layers})"


def _digest(
    spec: ProfileSpec, vectors: Mapping[int, Mapping[str, torch.Tensor]], gates: Mapping[str, torch.Tensor]
) -> str:
    """Content hash: two profiles with the same digest steer (and gate) identically."""
    h = hashlib.sha256(spec.to_json().encode())
    for layer in sorted(vectors):
        for role in sorted(vectors[layer]):
            h.update(f"{layer}/{role}".encode())
            h.update(vectors[layer][role].contiguous().numpy().tobytes())
    for name in sorted(gates):
        h.update(f"gate/{name}".encode())
        h.update(gates[name].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def load_profile(
    directory: str | Path, expected_model: ModelFingerprint | None = None, *, strict: bool = False
) -> Profile:
    """Load and check one profile directory; raise :class:`ProfileError` naming file and field.

    ``expected_model`` is the served model's fingerprint (none: not checked); ``strict`` asks for the same
    checkpoint and tokenizer, not only the same shape (:meth:`ModelFingerprint.mismatch`).
    """
    directory = Path(directory)
    spec_path = directory / PROFILE_FILE
    tensors_path = directory / TENSORS_FILE
    try:
        raw = json.loads(spec_path.read_text())
    except FileNotFoundError:
        raise ProfileError(spec_path, "<file>", "not found") from None
    except json.JSONDecodeError as exc:
        raise ProfileError(spec_path, "<json>", f"not valid JSON ({exc})") from None
    try:
        spec = ProfileSpec.model_validate(raw)
    except ValidationError as exc:
        field, msg = field_and_message(exc)
        raise ProfileError(spec_path, field, msg) from None

    if expected_model is not None:
        problem = spec.model.mismatch(expected_model, strict=strict)
        if problem:
            raise ProfileError(spec_path, "model", f"profile {spec.id!r} was made for another model: {problem}")
        differ = spec.model.identity_differences(expected_model)
        if differ:
            logger.warning(
                "vllm-steer: profile %r (%s) was made on another checkpoint of this model shape (%s differ%s); "
                "loaded because strict model matching is off",
                spec.id,
                spec_path,
                ", ".join(differ),
                "s" if len(differ) == 1 else "",
            )

    try:
        stored = load_file(str(tensors_path))
    except FileNotFoundError:
        raise ProfileError(tensors_path, "<file>", "not found") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise ProfileError(tensors_path, "<file>", f"not a readable safetensors file ({exc})") from None
    vectors = _check_tensors(spec, stored, tensors_path)
    gate_vectors = _check_gate_tensors(spec, stored, tensors_path)
    return Profile(spec, vectors, source=str(directory), gate_vectors=gate_vectors)


def _check_tensors(
    spec: ProfileSpec, stored: Mapping[str, torch.Tensor], path: Path
) -> dict[int, dict[str, torch.Tensor]]:
    d = spec.model.hidden_size
    vectors: dict[int, dict[str, torch.Tensor]] = {}
    if spec.method is None:
        return vectors
    method = METHODS[spec.method]
    for layer in spec.layers:
        vectors[layer] = {}
        for role, name in spec.tensors[layer].items():
            # a category may add nothing; every other vector is a direction
            zero_ok = method.roles == "categories"
            vectors[layer][role] = _stored_vector(stored, name, d, path, f"tensors.{layer}.{role}", zero_ok=zero_ok)
        if method.norm == "orthonormal":
            b1, b2 = vectors[layer]["b1"], vectors[layer]["b2"]
            for role, vec in (("b1", b1), ("b2", b2)):
                if abs(float(vec.norm()) - 1.0) > _ORTHO_TOL:
                    raise ProfileError(
                        path, f"tensors.{layer}.{role}", f"must have unit norm, has {float(vec.norm()):.6f}"
                    )
            if abs(float(b1 @ b2)) > _ORTHO_TOL:
                raise ProfileError(
                    path, f"tensors.{layer}.b2", f"must be orthogonal to b1 (b1·b2 = {float(b1 @ b2):.6f})"
                )
        if method.norm == "unit":
            for role, vec in vectors[layer].items():
                norm = float(vec.norm())
                if abs(norm - 1.0) > _ORTHO_TOL:
                    raise ProfileError(
                        path, f"tensors.{layer}.{role}", f"a {spec.method} direction has unit norm, this one {norm:.6f}"
                    )
    return vectors


def _stored_vector(
    stored: Mapping[str, torch.Tensor], name: str, d: int, path: Path, field: str, *, zero_ok: bool
) -> torch.Tensor:
    """The float32 vector ``name`` of the file: present, ``(d,)``, finite, and not all zeros unless ``zero_ok``."""
    t = stored.get(name)
    if t is None:
        raise ProfileError(path, field, f"tensor {name!r} is not in the file")
    if tuple(t.shape) != (d,):
        raise ProfileError(path, field, f"tensor {name!r} has shape {tuple(t.shape)}, expected ({d},) (hidden_size)")
    t = t.to(torch.float32)
    if not torch.isfinite(t).all():
        raise ProfileError(path, field, f"tensor {name!r} has NaN or inf values")
    if not zero_ok and float(t.norm()) == 0.0:
        raise ProfileError(path, field, f"tensor {name!r} is all zeros")
    return t


def _check_gate_tensors(spec: ProfileSpec, stored: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Each gate's direction: present, ``(hidden_size,)``, finite, not zero; returned with unit length."""
    if spec.gating is None:
        return {}
    d = spec.model.hidden_size
    directions: dict[str, torch.Tensor] = {}
    for i, gate in enumerate(spec.gating.gates):
        t = _stored_vector(stored, gate.tensor, d, path, f"gating.gates.{i}.tensor", zero_ok=False)
        directions[gate.name] = t / t.norm()
    return directions


def save_profile(
    directory: str | Path,
    spec: ProfileSpec,
    vectors: Mapping[int, Mapping[str, torch.Tensor]],
    gate_vectors: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write a profile directory; tensors shared between layers (one plane for all) are stored once.

    ``gate_vectors``: gate name → direction, one per gate of ``spec.gating`` (stored under the gate's
    ``tensor`` name; a name may be shared with a steering tensor holding the same values)."""
    directory = Path(directory)
    stored: dict[str, torch.Tensor] = {}

    def store(name: str, tensor: torch.Tensor, field: str) -> None:
        t = tensor.detach().to(torch.float32).contiguous().clone()
        if name in stored and stored[name].numpy().tobytes() != t.numpy().tobytes():  # bytes: NaN == NaN
            raise ProfileError(directory / TENSORS_FILE, field, f"name {name!r} reused for a different tensor")
        stored[name] = t

    for layer, roles in spec.tensors.items():
        for role, name in roles.items():
            store(name, vectors[layer][role], f"tensors.{layer}.{role}")
    if spec.gating is not None:
        gate_vectors = gate_vectors or {}
        for i, gate in enumerate(spec.gating.gates):
            if gate.name not in gate_vectors:
                raise ProfileError(directory / PROFILE_FILE, f"gating.gates.{i}.tensor", "no direction given for it")
            store(gate.tensor, gate_vectors[gate.name], f"gating.gates.{i}.tensor")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file(stored, str(staging / TENSORS_FILE))
        (staging / PROFILE_FILE).write_text(spec.to_json(indent=2) + "\n")
        load_profile(staging)  # refuse to leave behind a profile that would not load
        if directory.exists():
            for extra in directory.iterdir():  # keep what is not the profile itself (e.g. report/)
                if extra.name not in (PROFILE_FILE, TENSORS_FILE):
                    extra.rename(staging / extra.name)
            shutil.rmtree(directory)
        staging.rename(directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return directory


def load_profile_dir(
    root: str | Path, expected_model: ModelFingerprint | None = None, *, strict: bool = False
) -> dict[str, Profile]:
    """Load every profile under ``root`` (one sub-directory each); ids must be unique (see :func:`load_profile`)."""
    root = Path(root)
    if not root.is_dir():
        raise ProfileError(root, "<dir>", "profile directory does not exist")
    profiles: dict[str, Profile] = {}
    real_root = root.resolve()
    for sub in sorted(p for p in root.iterdir() if not p.name.startswith(".") and (p / PROFILE_FILE).exists()):
        for path in (sub, sub / PROFILE_FILE, sub / TENSORS_FILE):
            if path.exists() and real_root not in path.resolve().parents:
                raise ProfileError(path, "<path>", "symlink points outside the profile directory")
        profile = load_profile(sub, expected_model, strict=strict)
        if profile.id in profiles:
            raise ProfileError(
                sub / PROFILE_FILE, "id", f"duplicate profile id {profile.id!r} (also in {profiles[profile.id].source})"
            )
        profiles[profile.id] = profile
    return profiles


def profile_changes(old: Mapping[str, Profile], new: Mapping[str, Profile]) -> dict[str, list[str]]:
    """What a reload from ``old`` to ``new`` did, by id: added, removed, replaced (new digest), and the new ids."""
    return {
        "added": sorted(set(new) - set(old)),
        "removed": sorted(set(old) - set(new)),
        "replaced": sorted(pid for pid in set(new) & set(old) if new[pid].digest != old[pid].digest),
        "profiles": sorted(new),
    }
