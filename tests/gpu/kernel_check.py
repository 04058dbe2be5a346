"""The Triton kernel against the torch op on random batches: ``check(device)`` raises on a mismatch.

Shared by tests/unit/test_kernels.py, which runs this file in a fresh process under Triton's interpreter
(TRITON_INTERPRET=1 must be set before Triton is first imported, so not inside the test process),
and tests/gpu/test_cuda.py, which calls ``check("cuda")`` on a GPU. By hand:

    python tests/gpu/kernel_check.py [cpu|cuda]
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

from vllm_steer.core.ops import Method, token_deltas
from vllm_steer.engine import kernels

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for support.ops when run as a script
from support.ops import random_tables


def check(device: str, dims=(16, 24, 100, 128), sizes=(1, 7, 33), seeds=range(3)) -> int:
    """Every case: untouched rows exact zeros (NaN in them or not), others equal to the torch op."""
    cases = 0
    for seed, d, n, dtype in itertools.product(seeds, dims, sizes, (torch.float32, torch.bfloat16, torch.float16)):
        gen = torch.Generator().manual_seed(seed * 1000 + d + n)
        tables = random_tables(d, n, 5, gen, torch.float32)
        bases, methods, gains, thresholds, token_slot, _, c, s, scale = (t.to(device) for t in tables)
        h = (torch.randn(n, d, generator=gen) * 3).to(device, dtype)
        slot = token_slot.clamp(min=0)
        untouched = (token_slot < 0) | (methods[slot] == int(Method.NONE))
        h[untouched, 0] = float("nan")  # an untouched row's own values never leak into its correction
        x = (bases[slot, 0] * h.float()).sum(-1)
        near_gate = (methods[slot] == int(Method.ANGULAR_ADAPTIVE)) & ((x - thresholds[slot]).abs() < 1e-2)
        got = kernels.token_deltas_triton(h, bases, methods, gains, thresholds, token_slot, c, s, scale)
        ref = token_deltas(h, bases, methods, gains, thresholds, token_slot, c, s, scale)
        where = f"seed {seed}, d {d}, n {n}, {dtype}"
        assert got.dtype == dtype and got.shape == h.shape, where
        assert torch.equal(got[untouched], torch.zeros_like(got[untouched])), where
        keep = ~untouched & ~near_gate  # on the adaptive gate's edge round-off may decide either way
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        scale_of = 1 + float(h[keep].float().abs().max()) if bool(keep.any()) else 1.0
        torch.testing.assert_close(got[keep].float(), ref[keep].float(), rtol=tol, atol=tol * scale_of, msg=where)
        cases += 1
    # Rows of a wider tensor (stride 3d) are read in place.
    d, n = 32, 6
    bases, methods, gains, thresholds, token_slot, _, c, s, scale = (
        t.to(device) for t in random_tables(d, n, 3, torch.Generator().manual_seed(1), torch.float32)
    )
    wide = torch.randn(n, 3 * d, device=device)
    h = wide[:, d : 2 * d]
    torch.testing.assert_close(
        kernels.token_deltas_triton(h, bases, methods, gains, thresholds, token_slot, c, s, scale),
        token_deltas(h.contiguous(), bases, methods, gains, thresholds, token_slot, c, s, scale),
        rtol=1e-4,
        atol=1e-4,
    )
    empty = kernels.token_deltas_triton(
        h[:0], bases, methods, gains, thresholds, token_slot[:0], c[:0], s[:0], scale[:0]
    )
    assert empty.shape == (0, d)
    try:
        kernels.token_deltas_triton(h.t().contiguous().t(), bases, methods, gains, thresholds, token_slot, c, s, scale)
    except ValueError as exc:
        assert "unit stride" in str(exc)
    else:
        raise AssertionError("a column-strided h must be refused")
    return cases


if __name__ == "__main__":
    print(f"kernel_check: {check(sys.argv[1] if len(sys.argv) > 1 else 'cpu')} cases passed")
