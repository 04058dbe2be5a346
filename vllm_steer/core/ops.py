"""Steering operators, in pure torch (no vLLM import anywhere in this module).

Two layers live here, on purpose:

* One small *reference* function per method, written as the formula in
  ``docs/methods.md`` §3 reads (``h + a·v``, ``h − (h·r̂)r̂``, ...). They are slow and
  obvious; tests and the Hugging Face reference path use them.
* :func:`steer_tokens`, the *batched* operator the engine runs. Every method is
  an edit of a token's activation inside a rank-≤2 subspace ``span{b1, b2}``,
  so one op serves every method and every profile at once: it reads each
  token's in-plane coordinates ``p = (h·b1, h·b2)``, computes the method's new
  coordinates ``q``, and writes back ``h + U (q − p)``. Per-slot data (basis,
  method, gain, threshold) and per-token data (slot, cos θ, sin θ, scale) are
  plain tensors, so the op has static shapes and its cost does not depend on
  how many distinct profiles a batch holds.

Conventions (``docs/methods.md`` §1): activations are rows ``[..., d]``; angles are
DEGREES at the API and radians nowhere else; rotations are counter-clockwise,
turning ``+b1`` toward ``+b2``.
"""

from __future__ import annotations

import enum
import math

import torch

__all__ = [
    "Method",
    "add",
    "probe",
    "ablate",
    "angular_standard",
    "angular_adaptive",
    "selective_rotation",
    "rotation_matrix",
    "token_deltas",
    "single_method_deltas",
    "steer_tokens",
]


class Method(enum.IntEnum):
    """What the batched op does to a token's in-plane coordinates ``p = (x, y)``.

    The integer values are stored in per-slot buffers, so they are part of the
    op's contract: never renumber them.
    """

    NONE = 0
    """Leave the token untouched (unsteered rows, layers a profile skips)."""
    ADD = 1
    """``q = (x + scale·gain, y)``: activation addition, category and probe vectors."""
    ABLATE = 2
    """``q = (0, y)``: remove the ``b1`` component (directional ablation)."""
    ANGULAR_STANDARD = 3
    """``q = r (cos θ, sin θ)``: snap the in-plane part to the absolute angle θ."""
    ANGULAR_ADAPTIVE = 4
    """Standard angular steering, only for tokens with ``x > threshold``."""
    ROTATE = 5
    """``q = R(θ) p``: Selective Steering's norm-preserving relative rotation."""


# --------------------------------------------------------------------------
# Reference operators: one formula each, straight from docs/methods.md §3.
# --------------------------------------------------------------------------


def add(h: torch.Tensor, v: torch.Tensor, alpha: float) -> torch.Tensor:
    """Activation addition / category vectors: ``h + α·v`` (docs/methods.md §3.6, §3.8)."""
    return h + alpha * v.to(h.dtype)


def probe(h: torch.Tensor, v: torch.Tensor, lam: float) -> torch.Tensor:
    """Probe steering ``h + λ·v̂`` (docs/methods.md §3.9); ``λ < 0`` steers away from the probe's class."""
    v_hat = v / v.norm()
    out: torch.Tensor = h + lam * v_hat.to(h.dtype)
    return out


def ablate(h: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Directional ablation ``h − (h·r̂) r̂`` (docs/methods.md §3.5)."""
    r_hat = (r / (r.norm() + 1e-8)).to(h.dtype)
    out: torch.Tensor = h - (h @ r_hat)[..., None] * r_hat
    return out


def _plane(
    h: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    b1 = b1.to(h.dtype)
    b2 = b2.to(h.dtype)
    x = h @ b1
    y = h @ b2
    return b1, b2, x, y


def angular_standard(h: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor, theta_deg: float) -> torch.Tensor:
    """Standard angular steering ``h − Ph + ‖Ph‖ v_θ`` (docs/methods.md §3.2).

    θ is an ABSOLUTE angle: every token's in-plane part is set to it, so no θ
    gives back the unsteered model.
    """
    b1, b2, x, y = _plane(h, b1, b2)
    t = math.radians(theta_deg)
    r = torch.sqrt(x * x + y * y)
    v_theta = math.cos(t) * b1 + math.sin(t) * b2
    in_plane = x[..., None] * b1 + y[..., None] * b2
    out: torch.Tensor = h - in_plane + r[..., None] * v_theta
    return out


def angular_adaptive(
    h: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor, theta_deg: float, threshold: float = 0.0
) -> torch.Tensor:
    """Adaptive angular steering (docs/methods.md §3.3): standard angular steering on tokens with ``h·b1 > τ``."""
    steered = angular_standard(h, b1, b2, theta_deg)
    gate = (h @ b1.to(h.dtype)) > threshold
    return torch.where(gate[..., None], steered, h)


def rotation_matrix(b1: torch.Tensor, b2: torch.Tensor, theta_deg: float) -> torch.Tensor:
    """``R_P^θ = I − P + [b1 b2] R(θ) [b1 b2]ᵀ`` as a dense ``d×d`` matrix (docs/methods.md §3.1)."""
    t = math.radians(theta_deg)
    basis = torch.stack([b1, b2], dim=1)  # d×2
    rot = torch.tensor([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]], dtype=b1.dtype)
    eye = torch.eye(b1.shape[0], dtype=b1.dtype)
    return eye - basis @ basis.T + basis @ rot @ basis.T


def selective_rotation(h: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor, theta_deg: float) -> torch.Tensor:
    """Selective Steering's rotation ``R_P^θ h`` (docs/methods.md §3.1), in its O(d) form.

    Norm-preserving and the identity at θ = 0. Restricting it to the
    discriminative layers is the caller's job (profiles list those layers).
    """
    b1, b2, x, y = _plane(h, b1, b2)
    t = math.radians(theta_deg)
    c, s = math.cos(t), math.sin(t)
    dx = (c - 1.0) * x - s * y
    dy = s * x + (c - 1.0) * y
    out: torch.Tensor = h + dx[..., None] * b1 + dy[..., None] * b2
    return out


# --------------------------------------------------------------------------
# The batched operator the engine runs.
# --------------------------------------------------------------------------


def _in_plane(
    h: torch.Tensor, bases: torch.Tensor, token_slot: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each token's slot basis ``[N, 2, d]`` and in-plane coordinates ``p = [N, 2]``, computed in float32
    (float64 for float64 ``h``), with the steered mask and the clamped slot index. One function for
    both ops, so their ``x`` (which the adaptive gate compares with τ) is the same to the bit."""
    compute_dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    steered = token_slot >= 0
    slot = token_slot.clamp(min=0)
    basis = bases.index_select(0, slot).to(compute_dtype)  # [N, 2, d]: each token's own slot
    p = (basis * h.to(compute_dtype).unsqueeze(1)).sum(-1)  # faster than a batch of tiny matmuls
    return steered, slot, basis, p


def token_deltas(
    h: torch.Tensor,
    bases: torch.Tensor,
    methods: torch.Tensor,
    gains: torch.Tensor,
    thresholds: torch.Tensor,
    token_slot: torch.Tensor,
    token_cos: torch.Tensor,
    token_sin: torch.Tensor,
    token_scale: torch.Tensor,
) -> torch.Tensor:
    """Each token's steering correction ``U (q − p)``, for a whole batch, in one pass.

    Args:
        h: ``[N, d]`` activations, one row per token (any float dtype).
        bases: ``[S, 2, d]`` float32, per slot the orthonormal rows ``b1, b2``
            (``b2 = 0`` for rank-1 methods, all zeros for an empty slot).
        methods: ``[S]`` integer :class:`Method` per slot at this hook site.
        gains: ``[S]`` float32, the length of the added vector (``ADD`` only).
        thresholds: ``[S]`` float32, the gate τ (``ANGULAR_ADAPTIVE`` only).
        token_slot: ``[N]`` int64, each token's slot, ``-1`` = unsteered.
        token_cos, token_sin: ``[N]`` float32, cos θ and sin θ of the token's request.
        token_scale: ``[N]`` float32, the request's strength (``ADD`` only).

    Returns:
        ``[N, d]`` in ``h``'s dtype. Rows whose slot is ``-1`` or whose slot's
        method is ``NONE`` are exact zeros, so ``h + delta`` leaves them
        bit-identical — also when the caller adds the delta to one term of a
        sum (vLLM's fused residual stream).

    Each token gathers only its own slot's basis (``[N, 2, d]``), so the cost is
    the same whether the batch holds one profile or sixty-four, and every shape
    is static (torch.compile / CUDA-graph friendly).
    """
    steered, slot, basis, p = _in_plane(h, bases, token_slot)
    compute_dtype = p.dtype
    method = torch.where(steered, methods[slot].to(torch.int64), torch.zeros_like(slot))
    x, y = p[:, 0], p[:, 1]
    c = token_cos.to(compute_dtype)
    s = token_sin.to(compute_dtype)
    scale = token_scale.to(compute_dtype)
    gain = gains[slot].to(compute_dtype)
    tau = thresholds[slot].to(compute_dtype)
    r = torch.sqrt(x * x + y * y)
    zero = torch.zeros_like(x)

    # New coordinates per method, selected per token (plain ints: torch.compile can trace them; an enum
    # compared with a tensor it cannot).
    qx, qy = x, y
    qx = torch.where(method == int(Method.ADD), x + scale * gain, qx)
    qx = torch.where(method == int(Method.ABLATE), zero, qx)
    snap = (method == int(Method.ANGULAR_STANDARD)) | ((method == int(Method.ANGULAR_ADAPTIVE)) & (x > tau))
    qx = torch.where(snap, r * c, qx)
    qy = torch.where(snap, r * s, qy)
    rotate = method == int(Method.ROTATE)
    qx = torch.where(rotate, x * c - y * s, qx)
    qy = torch.where(rotate, x * s + y * c, qy)

    active = method != int(Method.NONE)
    dq = torch.stack([torch.where(active, qx - x, zero), torch.where(active, qy - y, zero)], dim=1)
    # Inactive rows have dq == 0 exactly and a finite basis, so their delta is exactly 0.
    delta = torch.bmm(dq.unsqueeze(1), basis).squeeze(1)  # [N, d]
    return delta.to(h.dtype)


def single_method_deltas(
    method: Method,
    h: torch.Tensor,
    bases: torch.Tensor,
    gains: torch.Tensor,
    thresholds: torch.Tensor,
    token_slot: torch.Tensor,
    token_cos: torch.Tensor,
    token_sin: torch.Tensor,
    token_scale: torch.Tensor,
) -> torch.Tensor:
    """:func:`token_deltas` for a site where every slot is ``method`` or ``NONE``: the same
    corrections in a third of the kernels.

    The general op evaluates every method's formula for every token and selects per token: ~50
    small kernels, which is what a steered site costs on CPU, where launches dominate at decode
    sizes. When the host knows (it does, per step) that one method is in use at a site, this
    computes only that formula. Rows that are unsteered, or whose slot does nothing here (zero
    basis, gain and threshold, as the runtime loads such a slot), get exact zeros as in
    :func:`token_deltas`. Not for CUDA-graph capture: a
    captured graph must serve any mix, so capture uses the general op.
    """
    if method == Method.NONE:
        raise ValueError(f"no single-method path for {Method(method).name}: NONE steers nothing")
    compute_dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    steered = token_slot >= 0
    slot = token_slot.clamp(min=0)
    if method == Method.ADD:  # q - p = (scale·gain, 0): no projection needed
        coef = torch.where(steered, token_scale.to(compute_dtype) * gains[slot].to(compute_dtype), 0.0)
        b1 = bases[:, 0].index_select(0, slot).to(compute_dtype)
        return (coef.unsqueeze(1) * b1).to(h.dtype)
    if method == Method.ABLATE:  # q - p = (-x, 0)
        b1 = bases[:, 0].index_select(0, slot).to(compute_dtype)
        coef = torch.where(steered, -(b1 * h.to(compute_dtype)).sum(-1), 0.0)
        return (coef.unsqueeze(1) * b1).to(h.dtype)
    _, _, basis, p = _in_plane(h, bases, token_slot)  # the same coordinates as token_deltas
    x, y = p[:, 0], p[:, 1]
    c = token_cos.to(compute_dtype)
    sn = token_sin.to(compute_dtype)
    if method == Method.ROTATE:  # q - p = (R(θ) - I) p
        c1 = c - 1.0
        dq = torch.stack([c1 * x - sn * y, sn * x + c1 * y], dim=1)
    else:  # angular: q - p = r (cos θ, sin θ) - p; adaptive only where x > τ
        r = torch.sqrt(x * x + y * y)
        dq = torch.stack([r * c - x, r * sn - y], dim=1)
        if method == Method.ANGULAR_ADAPTIVE:
            steered = steered & (x > thresholds[slot].to(compute_dtype))
    dq = torch.where(steered.unsqueeze(1), dq, 0.0)
    return torch.bmm(dq.unsqueeze(1), basis).squeeze(1).to(h.dtype)


def steer_tokens(h: torch.Tensor, *tables: torch.Tensor) -> torch.Tensor:
    """``h + token_deltas(h, ...)``: the batched op as a map on activations (same arguments)."""
    return h + token_deltas(h, *tables)
