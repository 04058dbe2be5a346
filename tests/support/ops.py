"""Random steering tables and the per-row reference for the batched op (unit, kernel and GPU tests)."""

from __future__ import annotations

import torch

from vllm_steer.core import ops
from vllm_steer.core.ops import Method


def basis(d: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal b1, b2 (QR of a random d×2 matrix), float64."""
    q, _ = torch.linalg.qr(torch.randn(d, 2, generator=gen, dtype=torch.float64))
    return q[:, 0].clone(), q[:, 1].clone()


def reference_row(h, method, b1, b2, gain, tau, theta, scale):
    """The per-method reference function for one token, as the batched op's docstring maps them."""
    if method == Method.NONE:
        return h
    if method == Method.ADD:
        return ops.add(h, gain * b1, scale)
    if method == Method.ABLATE:
        return ops.ablate(h, b1)
    if method == Method.ANGULAR_STANDARD:
        return ops.angular_standard(h, b1, b2, theta)
    if method == Method.ANGULAR_ADAPTIVE:
        return ops.angular_adaptive(h, b1, b2, theta, tau)
    if method == Method.ROTATE:
        return ops.selective_rotation(h, b1, b2, theta)
    raise AssertionError(method)


def random_tables(d, n, n_slots, gen, dtype=torch.float64, methods=None):
    bases = torch.zeros(n_slots, 2, d, dtype=dtype)
    if methods is None:
        methods = torch.randint(0, len(Method), (n_slots,), generator=gen)
    for s in range(n_slots):
        b1, b2 = basis(d, gen)
        bases[s, 0] = b1
        if int(methods[s]) in (Method.ANGULAR_STANDARD, Method.ANGULAR_ADAPTIVE, Method.ROTATE):
            bases[s, 1] = b2  # rank-1 methods keep b2 = 0, as the runtime loads them
    gains = (torch.rand(n_slots, generator=gen, dtype=torch.float64) * 8).to(dtype)
    thresholds = (torch.randn(n_slots, generator=gen, dtype=torch.float64) * 0.5).to(dtype)
    token_slot = torch.randint(-1, n_slots, (n,), generator=gen)
    theta = torch.rand(n, generator=gen, dtype=torch.float64) * 720 - 360
    token_cos = torch.cos(torch.deg2rad(theta)).to(dtype)
    token_sin = torch.sin(torch.deg2rad(theta)).to(dtype)
    token_scale = (torch.randn(n, generator=gen, dtype=torch.float64) * 4).to(dtype)
    return bases, methods, gains, thresholds, token_slot, theta, token_cos, token_sin, token_scale
