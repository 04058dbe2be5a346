"""The method table: everything that differs between steering methods, in one entry per method.

The profile format (:mod:`vllm_steer.core.profile`), per-request settings (:mod:`vllm_steer.core.request`),
the engine's runtime, the HF reference, calibration, sweeps and evaluation all read a method's facts
here instead of testing its name. Adding a method is one :class:`MethodSpec` entry in :data:`METHODS`
(plus its name in :data:`MethodName`, which the profile schema validates), and, if no existing
:class:`~vllm_steer.core.ops.Method` code does what it needs, an op.

=====================  =========  ==========================  ====================  ==========  ============
method                 op         roles per layer             hook kinds            parameter   sweep
=====================  =========  ==========================  ====================  ==========  ============
``addition``           ADD        ``vector`` (length = gain)  layer output          scale       0.25 .. 4
``probe``              ADD        ``vector`` (unit)           layer output          scale       ±0.25 .. ±4
``category``           ADD        one per category (gains)    layer output          scale       ±0.25 .. ±4
``ablation``           ABLATE     ``vector`` (direction)      layer input, attn     --          --
                                                              out, MLP out
``angular_standard``   ANGULAR_   ``b1``, ``b2``              input norm,           angle       0:360:10
                       STANDARD   (orthonormal)               post-attn norm
``angular_adaptive``   ANGULAR_   ``b1``, ``b2``              input norm,           angle       0:360:10
                       ADAPTIVE   (orthonormal)               post-attn norm
``selective``          ROTATE     ``b1``, ``b2``              input norm,           angle       0:360:10
                                  (orthonormal)               post-attn norm
=====================  =========  ==========================  ====================  ==========  ============

The formulas are in ``docs/methods.md`` §3; where the hook kinds are in a model, in
:mod:`vllm_steer.core.layout`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, get_args

import torch

from vllm_steer.core import ops
from vllm_steer.core.layout import HOOK_KINDS
from vllm_steer.core.ops import Method

__all__ = [
    "MethodName",
    "MethodSpec",
    "Setting",
    "METHODS",
    "ANGLE_METHODS",
    "SCALE_METHODS",
    "METHOD_HOOKS",
    "method_spec",
    "parameter_of",
    "has_categories",
    "method_label",
    "methods_where",
]

MethodName = Literal["addition", "probe", "category", "ablation", "angular_standard", "angular_adaptive", "selective"]
"""The methods a profile may name (``profile.json``'s ``method``); one :data:`METHODS` entry each."""


@dataclass(frozen=True)
class Setting:
    """What a reference formula reads besides the profile's tensors: the request's and profile's numbers."""

    angle: float = 0.0
    """Degrees (angle methods)."""
    scale: float = 0.0
    """Strength (scale methods)."""
    threshold: float = 0.0
    """The profile's gate τ (``angular_adaptive``)."""
    categories: tuple[str, ...] = ()
    """The categories whose vectors are summed (``category``)."""


Reference = Callable[[torch.Tensor, Mapping[str, torch.Tensor], Setting], torch.Tensor]


@dataclass(frozen=True)
class MethodSpec:
    """One steering method's facts."""

    name: str
    op: Method
    """What the batched op does (:class:`vllm_steer.core.ops.Method`, the per-slot code)."""
    roles: Literal["plane", "vector", "categories"]
    """The tensors per layer: ``plane`` = ``b1``, ``b2``; ``vector`` = one ``vector``; ``categories`` = one
    per category name (the profile lists them)."""
    norm: Literal["orthonormal", "unit", "gain", "direction"]
    """What the tensors' lengths mean, and what the profile check demands: ``orthonormal`` (``b1``, ``b2``
    unit and orthogonal, checked), ``unit`` (checked), ``gain`` (the length is the strength), ``direction``
    (the length is ignored)."""
    hooks: tuple[str, ...]
    """The hook kinds it edits at each of its layers (:mod:`vllm_steer.core.layout`)."""
    parameter: Literal["angle", "scale"] | None
    """The per-request number (``steer_angle``/``steer_scale``), which the profile must default; ``None``: none."""
    sweep: str | None
    """The default grid of ``vllm-steer calibrate``'s sweep (``start:stop:step`` or ``a,b,c``)."""
    sweep_mirrored: bool
    """Sweep grids are mirrored to negative values too (methods that steer away from harm with ``scale < 0``)."""
    reference: Reference
    """The plain formula (``docs/methods.md`` §3): ``(h, tensors of one layer, setting) → steered h``."""

    def expected_roles(self, categories: Sequence[str] = ()) -> tuple[str, ...]:
        """The tensor roles a layer of a profile of this method holds."""
        if self.roles == "plane":
            return ("b1", "b2")
        if self.roles == "categories":
            return tuple(categories)
        return ("vector",)

    @property
    def parameter_key(self) -> str | None:
        """The request key of its parameter (``steer_angle``, ``steer_scale``), ``None`` if it takes none."""
        return None if self.parameter is None else f"steer_{self.parameter}"

    @property
    def constant_addition(self) -> bool:
        """Adds a constant vector (the same for every token): what a GGUF control vector can express."""
        return self.op == Method.ADD

    def basis(
        self, tensors: Mapping[str, torch.Tensor], categories: Sequence[str] = ()
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The op's per-slot data for one layer: ``(b1, b2, gain)``.

        A plane is used as it is (gain 0); a vector (or the sum of the chosen categories' vectors) becomes
        its unit direction ``b1`` with ``b2 = 0`` and its length as the gain (``ADD`` reads the gain).
        """
        if self.roles == "plane":
            return tensors["b1"], tensors["b2"], 0.0
        v = torch.stack([tensors[c] for c in categories]).sum(0) if self.roles == "categories" else tensors["vector"]
        norm = float(v.norm())
        b1 = v / norm if norm > 0 else torch.zeros_like(v)
        return b1, torch.zeros_like(v), norm


# The reference formulas (docs/methods.md §3): (h, one layer's tensors, setting) -> steered h.


def _addition(h: torch.Tensor, t: Mapping[str, torch.Tensor], s: Setting) -> torch.Tensor:
    return ops.add(h, t["vector"], s.scale)


def _probe(h: torch.Tensor, t: Mapping[str, torch.Tensor], s: Setting) -> torch.Tensor:
    return ops.probe(h, t["vector"], s.scale)


def _category(h: torch.Tensor, t: Mapping[str, torch.Tensor], s: Setting) -> torch.Tensor:
    return ops.add(h, torch.stack([t[c] for c in s.categories]).sum(0), s.scale)


def _ablation(h: torch.Tensor, t: Mapping[str, torch.Tensor], s: Setting) -> torch.Tensor:
    return ops.ablate(h, t["vector"])


def _angular_standard(h: torch.Tensor, t: Mapping[str, torch.Tensor], s: Setting) -> torch.Tensor:
    return ops.angular_standard(h, t["b1"], t["b2"], s.angle)


def _angular_adaptive(h: torch.Tensor, t: Mapping[str, torch.Tensor], s: Setting) -> torch.Tensor:
    return ops.angular_adaptive(h, t["b1"], t["b2"], s.angle, s.threshold)


def _selective(h: torch.Tensor, t: Mapping[str, torch.Tensor], s: Setting) -> torch.Tensor:
    return ops.selective_rotation(h, t["b1"], t["b2"], s.angle)


_OUTPUT = ("layer_output",)
_STREAM_AND_BRANCHES = ("layer_input", "attn_output", "mlp_output")
_NORMS = ("input_norm", "post_attn_norm")
_SCALES = "0.25,0.5,1,2,4"
_ANGLES = "0:360:10"

# fmt: off
METHODS: Mapping[str, MethodSpec] = MappingProxyType({spec.name: spec for spec in (
    #          name                op                        roles         norm           hooks                  param    sweep    mirrored  reference
    MethodSpec("addition",         Method.ADD,               "vector",     "gain",        _OUTPUT,               "scale", _SCALES, False,    _addition),
    MethodSpec("probe",            Method.ADD,               "vector",     "unit",        _OUTPUT,               "scale", _SCALES, True,     _probe),
    MethodSpec("category",         Method.ADD,               "categories", "gain",        _OUTPUT,               "scale", _SCALES, True,     _category),
    MethodSpec("ablation",         Method.ABLATE,            "vector",     "direction",   _STREAM_AND_BRANCHES,  None,    None,    False,    _ablation),
    MethodSpec("angular_standard", Method.ANGULAR_STANDARD,  "plane",      "orthonormal", _NORMS,                "angle", _ANGLES, False,    _angular_standard),
    MethodSpec("angular_adaptive", Method.ANGULAR_ADAPTIVE,  "plane",      "orthonormal", _NORMS,                "angle", _ANGLES, False,    _angular_adaptive),
    MethodSpec("selective",        Method.ROTATE,            "plane",      "orthonormal", _NORMS,                "angle", _ANGLES, False,    _selective),
)})
# fmt: on
"""Method name → its facts, in the order the docs list them."""


def _check_table() -> None:
    names = set(get_args(MethodName))
    if names != set(METHODS):
        raise RuntimeError(f"MethodName {sorted(names)} and METHODS {sorted(METHODS)} disagree")
    for spec in METHODS.values():
        bad = sorted(set(spec.hooks) - set(HOOK_KINDS))
        if bad or not spec.hooks:
            raise RuntimeError(f"method {spec.name!r}: hook kinds {list(spec.hooks)} (known: {HOOK_KINDS})")
        if (spec.parameter is None) != (spec.sweep is None):
            raise RuntimeError(f"method {spec.name!r}: a sweep grid exactly when it has a parameter")


_check_table()


def method_spec(name: str) -> MethodSpec:
    """The entry of ``name``; an unknown name is a :class:`KeyError` listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r} (one of {', '.join(METHODS)})") from None


def parameter_of(name: str | None) -> Literal["angle", "scale"] | None:
    """The per-request number (``angle``, ``scale``) method ``name`` takes; ``None`` for none, and for a
    gate-only profile's method (``None``), which steers nothing."""
    return None if name is None else METHODS[name].parameter


def has_categories(name: str | None) -> bool:
    """Method ``name`` steers with named categories (``False`` for a gate-only profile's ``None``)."""
    return name is not None and METHODS[name].roles == "categories"


def method_label(name: str | None) -> str:
    """How messages name a profile's method: ``method 'selective'``, or ``gate-only`` for none."""
    return "gate-only" if name is None else f"method {name!r}"


def methods_where(predicate: Callable[[MethodSpec], bool]) -> tuple[str, ...]:
    """The names of the methods whose entry satisfies ``predicate``, in table order."""
    return tuple(name for name, spec in METHODS.items() if predicate(spec))


ANGLE_METHODS: frozenset[str] = frozenset(methods_where(lambda m: m.parameter == "angle"))
"""Methods a request steers with ``steer_angle``."""
SCALE_METHODS: frozenset[str] = frozenset(methods_where(lambda m: m.parameter == "scale"))
"""Methods a request steers with ``steer_scale``."""
METHOD_HOOKS: Mapping[str, tuple[str, ...]] = MappingProxyType({name: spec.hooks for name, spec in METHODS.items()})
"""Method → the hook kinds it edits (docs/methods.md §1)."""
