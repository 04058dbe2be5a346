"""Random, well-formed profiles for any model shape: for tests and benchmarks, not for steering.

Real profiles come from calibration; these only need to be valid (unit,
orthonormal where required) and strong enough to change a model's tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vllm_steer.core.gates import GateSpec, GatingSpec
from vllm_steer.core.methods import METHODS
from vllm_steer.core.profile import ModelFingerprint, Profile, ProfileSpec

__all__ = ["random_profile", "with_gates", "gate_only_profile"]

_ALLOWED = {"angle": {"min": 0.0, "max": 360.0}, "scale": {"min": -64.0, "max": 64.0}}


def _orthonormal_pair(d: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    q, _ = torch.linalg.qr(torch.randn(d, 2, generator=gen, dtype=torch.float64))
    return q[:, 0].float(), q[:, 1].float()


def random_profile(
    profile_id: str,
    method: str,
    model: ModelFingerprint,
    layers: Sequence[int],
    *,
    seed: int = 0,
    vector_norm: float = 4.0,
    categories: Sequence[str] = ("cat_a", "cat_b", "cat_c"),
    angle: float = 90.0,
    scale: float = 1.0,
    shared_plane: bool = True,
) -> Profile:
    """A profile of ``method`` with random directions on ``layers`` of ``model``.

    Vectors are unit where the method requires it, else of length ``vector_norm``; the method's
    parameter defaults to ``angle`` or ``scale`` and may range over a wide interval."""
    entry = METHODS[method]
    gen = torch.Generator().manual_seed(seed)
    d = model.hidden_size
    layers = sorted(layers)
    vectors: dict[int, dict[str, torch.Tensor]] = {}
    tensors: dict[int, dict[str, str]] = {}
    plane = _orthonormal_pair(d, gen)
    for layer in layers:
        if entry.roles == "plane":
            b1, b2 = plane if shared_plane else _orthonormal_pair(d, gen)
            vectors[layer] = {"b1": b1, "b2": b2}
            tensors[layer] = {"b1": "b1", "b2": "b2"} if shared_plane else {"b1": f"b1.{layer}", "b2": f"b2.{layer}"}
        elif entry.roles == "categories":
            vectors[layer] = {c: vector_norm * _unit(d, gen) for c in categories}
            tensors[layer] = {c: f"category.{i}.{layer}" for i, c in enumerate(categories)}
        else:
            v = _unit(d, gen)
            vectors[layer] = {"vector": v if entry.norm == "unit" else vector_norm * v}
            tensors[layer] = {"vector": f"vector.{layer}"}
    spec = ProfileSpec(
        format_version=1,
        id=profile_id,
        method=method,
        description=f"synthetic {method} profile (random directions, seed {seed})",
        model=model,
        layers=layers,
        tensors=tensors,
        defaults={
            "angle": angle if entry.parameter == "angle" else None,
            "scale": scale if entry.parameter == "scale" else None,
        },
        allowed={name: bounds if entry.parameter == name else None for name, bounds in _ALLOWED.items()},
        categories=list(categories) if entry.roles == "categories" else [],
    )
    return Profile(spec, vectors, source=f"<synthetic {profile_id}>")


def _unit(d: int, gen: torch.Generator) -> torch.Tensor:
    v = torch.randn(d, generator=gen)
    return v / v.norm()


def with_gates(
    profile: Profile,
    action: str,
    gates: Sequence[GateSpec],
    directions: dict[str, torch.Tensor],
    refusal: str | None = None,
) -> Profile:
    """``profile`` with a ``gating`` block: ``gates`` (OR-ed), ``action``, each gate's direction by name, and the
    ``refusal`` text (default: the format's)."""
    raw = profile.spec.model_dump()
    raw["gating"] = _gating(action, gates, refusal).model_dump()
    return Profile(ProfileSpec.model_validate(raw), profile.vectors, profile.source, gate_vectors=_units(directions))


def gate_only_profile(
    profile_id: str,
    model: ModelFingerprint,
    action: str,
    gates: Sequence[GateSpec],
    directions: dict[str, torch.Tensor],
    refusal: str | None = None,
) -> Profile:
    """A gate-only profile (``method: null``): ``gates`` (OR-ed) with ``action`` (``refuse`` or ``flag``), each
    gate's direction by name, and the ``refusal`` text (default: the format's); nothing that steers."""
    spec = ProfileSpec(
        format_version=1,
        id=profile_id,
        method=None,
        description="synthetic gate-only profile",
        model=model,
        layers=[],
        tensors={},
        gating=_gating(action, gates, refusal),
    )
    return Profile(spec, {}, source=f"<synthetic {profile_id}>", gate_vectors=_units(directions))


def _gating(action: str, gates: Sequence[GateSpec], refusal: str | None) -> GatingSpec:
    """The ``gating`` block: ``gates`` OR-ed, ``action``, and ``refusal`` (default: the format's)."""
    block: dict = {"action": action, "gates": [g.model_dump() for g in gates]}
    if refusal is not None:
        block["refusal"] = refusal
    return GatingSpec.model_validate(block)


def _units(directions: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: d.float() / d.float().norm() for name, d in directions.items()}
