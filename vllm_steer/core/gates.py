"""Activation gates: read a condition from the prompt's hidden state, then steer, refuse or flag that row.

A profile may carry a ``gating`` block (``profile.json``; tensors in ``tensors.safetensors``). Each gate is
a direction ``c`` read at one decoder layer's output (the residual stream after block ``layer``), a score,
a threshold and a comparison. The gates are OR-ed (CAST's multi-conditioning): a request is *gated* when
any of its profile's *deciding* gates (those without a ``category``) fires on the **last prompt token**. The
action then applies to that request:

* ``steer`` — the profile's steering applies to the request only if it is gated;
* ``refuse`` — the request's answer is a fixed refusal (the engine forces it token by token);
* ``flag`` — generation is unchanged; the decision and the scores are recorded.

*Routing* gates (those naming a ``category``, on category profiles) do not decide: a routing request
(``steer_categories: "auto"``), once gated, steers with the category of its routing gate with the largest
margin, fired or not (:func:`route_of`). A profile with routing gates has at least one deciding gate.

Scores (``docs/methods.md`` §3.11), for ``h`` the hidden state and ``ĉ = c/‖c‖``:

* ``projection``: ``h·ĉ / ‖h‖``, the cosine between ``h`` and the direction;
* ``cast``: ``cos(h, tanh((h·ĉ) ĉ))``, Conditional Activation Steering's similarity (Lee et al., ICLR 2025):
  ``tanh`` of the projection of ``h`` on the direction, compared with ``h``. ``tanh`` is odd, so the score is
  sign-blind: ``h`` and ``-h`` score alike (it measures how much of ``h`` lies along ``ĉ``).

Both are independent of ``c``'s length; ``projection`` also of ``h``'s. This module is pure torch
and pydantic: the reference formulas (:func:`gate_score`), the batched form the engine runs
(:func:`batched_scores`), and the schema of the ``gating`` block.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, field_validator, model_serializer

__all__ = [
    "GateScore",
    "Comparison",
    "GateAction",
    "GATE_ACTIONS",
    "GATE_ONLY_ACTIONS",
    "GATE_SCORES",
    "MAX_GATES",
    "GATE_HOOK",
    "DEFAULT_REFUSAL",
    "MAX_REFUSAL_CHARS",
    "GateSpec",
    "GatingSpec",
    "gate_score",
    "gate_fires",
    "fired_gates",
    "margin",
    "batched_scores",
    "route_of",
    "SCORE_CODES",
]

GateScore = Literal["projection", "cast"]
Comparison = Literal[">", "<"]
GateAction = Literal["steer", "refuse", "flag"]
GATE_SCORES: tuple[str, ...] = ("projection", "cast")
GATE_ACTIONS: tuple[str, ...] = ("steer", "refuse", "flag")
GATE_ONLY_ACTIONS: tuple[str, ...] = ("refuse", "flag")
"""The actions that need no steering method: those a gate-only profile (``method: null``) may take."""
SCORE_CODES: dict[str, int] = {name: i for i, name in enumerate(GATE_SCORES)}
"""The integer the engine's tables store per gate for its score (part of the op's contract)."""
MAX_GATES = 16
"""Most gates one profile may hold (the engine's per-slot gate table has this many columns)."""
GATE_HOOK = "layer_output"
"""The hook kind a gate reads: the residual stream after its layer (:mod:`vllm_steer.core.layout`)."""
DEFAULT_REFUSAL = "I can't help with that."
"""The answer of a refused request when the profile names none."""
MAX_REFUSAL_CHARS = 2000


class GateSpec(BaseModel):
    """One gate: where it reads, which direction, how it scores, and when it fires."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    layer: int = Field(ge=0)
    tensor: str = Field(min_length=1)
    """The direction's name in ``tensors.safetensors`` (a ``(hidden_size,)`` vector; its length is ignored)."""
    score: GateScore = "cast"
    threshold: float = Field(allow_inf_nan=False)
    comparison: Comparison = ">"
    category: str | None = Field(default=None, min_length=1)
    """Category profiles: a *routing* gate, for the category it routes to (``steer_categories: "auto"``). A
    routing gate does not decide (:func:`route_of`); gates without a category do."""

    @model_serializer(mode="wrap")
    def _without_unset_category(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if self.category is None:  # a gate that routes nowhere is written (and digested) as before routing existed
            data.pop("category", None)
        return data


class GatingSpec(BaseModel):
    """A profile's ``gating`` block: the gates (the deciding ones OR-ed; any routing ones) and the action when a
    deciding gate fires."""

    model_config = ConfigDict(extra="forbid")
    action: GateAction
    gates: list[GateSpec] = Field(min_length=1, max_length=MAX_GATES)
    refusal: str = Field(default=DEFAULT_REFUSAL, min_length=1, max_length=MAX_REFUSAL_CHARS)
    """Action ``refuse``: the answer, forced token by token and ended by the end-of-sequence token."""

    @field_validator("gates")
    @classmethod
    def _distinct_names(cls, gates: list[GateSpec]) -> list[GateSpec]:
        names = [g.name for g in gates]
        if len(set(names)) != len(names):
            raise ValueError("gate names must not repeat")
        return gates

    @field_validator("gates")
    @classmethod
    def _routing_needs_a_deciding_gate(cls, gates: list[GateSpec]) -> list[GateSpec]:
        if all(g.category is not None for g in gates):
            raise ValueError(
                "every gate names a category: routing gates only route, add a gate without a category that decides "
                "(vllm-steer calibrate --gate-route writes one)"
            )
        return gates

    @property
    def deciding(self) -> list[GateSpec]:
        """The gates that decide (OR-ed): those without a category."""
        return [g for g in self.gates if g.category is None]

    @property
    def routes(self) -> tuple[str, ...]:
        """The categories the routing gates route to, distinct and sorted (empty: the gates do not route)."""
        return tuple(sorted({g.category for g in self.gates if g.category is not None}))

    @property
    def layers(self) -> tuple[int, ...]:
        """The layers the gates read, sorted."""
        return tuple(sorted({g.layer for g in self.gates}))

    @property
    def decided_after(self) -> int:
        """The deepest gate layer: the decision is final once the last prompt token has passed it."""
        return max(g.layer for g in self.gates)


def gate_score(h: torch.Tensor, c: torch.Tensor, score: str) -> torch.Tensor:
    """The reference score of ``h`` (``[..., d]``) against direction ``c`` (``[d]``), computed in float32."""
    h = h.float()
    c_hat = c.float() / c.float().norm()
    proj = h @ c_hat  # [...]
    h_norm = h.norm(dim=-1)
    if score == "projection":
        out: torch.Tensor = proj / h_norm
        return out
    if score == "cast":
        v = torch.tanh(proj[..., None] * c_hat)  # [..., d]
        cast: torch.Tensor = (h * v).sum(-1) / (h_norm * v.norm(dim=-1))
        return cast
    raise ValueError(f"unknown gate score {score!r} (one of {', '.join(GATE_SCORES)})")


def _past(value: Any, threshold: float, comparison: str) -> Any:
    """How far ``value`` lies past ``threshold`` in the firing direction (``> 0``: it fires; NaN never does)."""
    if comparison == ">":
        return value - threshold
    if comparison == "<":
        return threshold - value
    raise ValueError(f"unknown comparison {comparison!r} (> or <)")


def gate_fires(value: torch.Tensor | float, threshold: float, comparison: str) -> torch.Tensor | bool:
    """Whether a score (or a tensor of them) fires its gate (``>``: above the threshold; ``<``: below)."""
    fires: torch.Tensor | bool = _past(value, threshold, comparison) > 0
    return fires


def batched_scores(h: torch.Tensor, directions: torch.Tensor, score_codes: torch.Tensor) -> torch.Tensor:
    """Every gate's score for a batch of rows, in one pass: what the engine runs at a gate site.

    Args:
        h: ``[k, d]`` one hidden state per deciding row.
        directions: ``[k, G, d]`` float32 unit directions (zeros for a row's unused gates).
        score_codes: ``[k, G]`` :data:`SCORE_CODES` per gate.

    Returns ``[k, G]`` float32 (unused gates score 0: a zero direction projects to 0 and ``tanh(0) = 0``,
    whose cosine the ``clamp`` keeps at 0 instead of NaN). Row norms of 0 (never in a model) give 0 too.
    """
    hf = h.float()
    proj = torch.einsum("kd,kgd->kg", hf, directions)  # [k, G]
    h_norm = hf.norm(dim=-1, keepdim=True).clamp_min(1e-30)  # [k, 1]
    projection = proj / h_norm
    v = torch.tanh(proj.unsqueeze(-1) * directions)  # [k, G, d]
    cast = torch.einsum("kd,kgd->kg", hf, v) / (h_norm * v.norm(dim=-1).clamp_min(1e-30))
    return torch.where(score_codes == SCORE_CODES["cast"], cast, projection)


def margin(gate: GateSpec, value: float) -> float:
    """How far a score lies past its gate's threshold, in the firing direction (``> 0``: it fires)."""
    past: float = _past(value, gate.threshold, gate.comparison)
    return past


def fired_gates(gating: GatingSpec, scores: dict[str, float]) -> list[str]:
    """The deciding gates that fire on ``scores`` (gate name → score; a missing or NaN score never fires), in the
    profile's order: the request is gated when this is not empty."""
    return [g.name for g in gating.deciding if margin(g, scores.get(g.name, math.nan)) > 0]


def route_of(gating: GatingSpec, scores: dict[str, float]) -> str | None:
    """The category a gated routing request steers with: that of the routing gate with the largest
    :func:`margin`, fired or not (ties: the shallower gate, then the profile's order, as the engine reads them);
    ``None`` when the gates do not route or no routing gate has a score. ``scores``: gate name → score (a missing
    or NaN score never routes). Whether the request is gated at all is :func:`fired_gates`' answer."""
    best: tuple[float, str] | None = None
    order = sorted(range(len(gating.gates)), key=lambda j: (gating.gates[j].layer, j))
    for gate in (gating.gates[j] for j in order):
        value = scores.get(gate.name, math.nan)
        if gate.category is None or math.isnan(value):
            continue
        m = margin(gate, value)
        if best is None or m > best[0]:
            best = (m, gate.category)
    return None if best is None else best[1]
