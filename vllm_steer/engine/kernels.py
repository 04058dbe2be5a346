"""The batched steering op as one Triton kernel: one program per token, one launch per hook site.

:func:`vllm_steer.core.ops.token_deltas` is ~50 small torch kernels; inside a CUDA graph each still costs a
few microseconds, so a steered site cost ~70 µs on an H100 (benchmarks/README.md). This is the same
op — same arguments, same contract, same per-method formulas — as a single kernel, the way vLLM's
LoRA runs its per-token adapters (punica's Triton kernels): each program reads its token's row, its
slot's basis and per-token angle/scale, computes the in-plane coordinates, the method's new
coordinates, and writes the correction. Unsteered rows (slot ``-1`` or method ``NONE``) get exact
zeros, as from the torch op.

No vLLM import here; Triton is imported lazily (``available()``), and nothing calls this on a
machine without a GPU.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from vllm_steer.core.ops import Method

__all__ = ["available", "token_deltas_triton", "MAX_HIDDEN", "DTYPES"]

MAX_HIDDEN = 16384
"""Widest row one program holds in registers; wider models use the torch op."""
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""Activation dtypes the kernel takes (it computes in float32; float64 stays with the torch op)."""


@functools.cache
def available() -> bool:
    """Triton importable and a CUDA device present (the kernel's only target)."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernel() -> Any:  # a triton.JITFunction (Triton is untyped, and absent without CUDA)
    import triton
    import triton.language as tl

    # The tables are views of the runtime's buffers at a per-site offset: not specializing on their
    # alignment keeps one compiled kernel for every site (a compile inside a CUDA-graph capture breaks it).
    tables = ["bases_ptr", "methods_ptr", "gains_ptr", "thresholds_ptr", "slot_ptr", "cos_ptr", "sin_ptr", "scale_ptr"]

    # Untyped on purpose: Triton reads a kernel's annotations itself (tl.constexpr marks compile-time constants).
    @triton.jit(do_not_specialize_on_alignment=tables)  # type: ignore[untyped-decorator]
    def steer_delta_kernel(  # type: ignore[no-untyped-def]
        h_ptr,
        h_stride,
        out_ptr,
        out_stride,
        bases_ptr,
        methods_ptr,
        gains_ptr,
        thresholds_ptr,
        slot_ptr,
        cos_ptr,
        sin_ptr,
        scale_ptr,
        D,
        ADD: tl.constexpr,
        ABLATE: tl.constexpr,
        SNAP: tl.constexpr,
        GATED_SNAP: tl.constexpr,
        ROTATE: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_D)
        mask = offs < D
        slot = tl.load(slot_ptr + row)
        steered = slot >= 0
        s = tl.maximum(slot, 0)
        method = tl.where(steered, tl.load(methods_ptr + s), 0)
        h = tl.load(h_ptr + row * h_stride + offs, mask=mask, other=0.0).to(tl.float32)
        b1 = tl.load(bases_ptr + s * 2 * D + offs, mask=mask, other=0.0)
        b2 = tl.load(bases_ptr + s * 2 * D + D + offs, mask=mask, other=0.0)
        x = tl.sum(h * b1, axis=0)
        y = tl.sum(h * b2, axis=0)
        c = tl.load(cos_ptr + row)
        sn = tl.load(sin_ptr + row)
        scale = tl.load(scale_ptr + row)
        gain = tl.load(gains_ptr + s)
        tau = tl.load(thresholds_ptr + s)
        r = tl.sqrt(x * x + y * y)
        qx = tl.where(method == ADD, x + scale * gain, x)
        qx = tl.where(method == ABLATE, 0.0, qx)
        snap = (method == SNAP) | ((method == GATED_SNAP) & (x > tau))
        qx = tl.where(snap, r * c, qx)
        qy = tl.where(snap, r * sn, y)
        rotate = method == ROTATE
        qx = tl.where(rotate, x * c - y * sn, qx)
        qy = tl.where(rotate, x * sn + y * c, qy)
        active = method != 0
        dx = tl.where(active, qx - x, 0.0)  # exactly 0 for untouched rows, whatever h holds (NaN too)
        dy = tl.where(active, qy - y, 0.0)
        delta = dx * b1 + dy * b2
        tl.store(out_ptr + row * out_stride + offs, delta.to(out_ptr.dtype.element_ty), mask=mask)

    return steer_delta_kernel


def token_deltas_triton(
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
    """:func:`vllm_steer.core.ops.token_deltas` in one kernel launch (same arguments and result).

    ``h`` is ``[N, d]`` float16/bfloat16/float32 with unit stride along ``d``; the tables are the
    runtime's static buffers (``bases`` float32 ``[S, 2, d]`` contiguous, per-token vectors ``[N]``).
    Computes in float32, so it matches the torch op to float32 round-off, not bit for bit.
    """
    n, d = h.shape
    if d > MAX_HIDDEN:
        raise ValueError(f"hidden size {d} is wider than the kernel's {MAX_HIDDEN}")
    if h.stride(1) != 1 or not bases.is_contiguous():
        raise ValueError("token_deltas_triton needs rows with unit stride and contiguous bases")
    out = torch.empty_like(h, memory_format=torch.contiguous_format)
    if n == 0:
        return out
    block = max(16, 1 << (d - 1).bit_length())
    _kernel()[(n,)](
        h,
        h.stride(0),
        out,
        out.stride(0),
        bases,
        methods,
        gains,
        thresholds,
        token_slot,
        token_cos,
        token_sin,
        token_scale,
        d,
        ADD=int(Method.ADD),
        ABLATE=int(Method.ABLATE),
        SNAP=int(Method.ANGULAR_STANDARD),
        GATED_SNAP=int(Method.ANGULAR_ADAPTIVE),
        ROTATE=int(Method.ROTATE),
        BLOCK_D=block,
        num_warps=4 if block <= 2048 else 8,
    )
    return out
