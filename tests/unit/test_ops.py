"""Property tests for the steering operators (docs/methods.md §4, rows 1–5, 8–13, 16–19).

Random data comes from a hypothesis-drawn seed (torch generator), so every
example is reproducible; all exact-arithmetic properties are checked in
float64 with a tolerance scaled by the activation norm.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from support.ops import basis, random_tables, reference_row
from vllm_steer.core import ops
from vllm_steer.core.ops import Method

SETTINGS = settings(max_examples=50, deadline=None)

dims = st.integers(min_value=3, max_value=64)
seeds = st.integers(min_value=0, max_value=2**31 - 1)
angles = st.floats(min_value=-720.0, max_value=720.0, allow_nan=False, allow_infinity=False)
rows = st.integers(min_value=1, max_value=8)

TOL = 1e-10


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _acts(n: int, d: int, gen: torch.Generator, b1: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """Random rows with a clearly nonzero in-plane part."""
    h = torch.randn(n, d, generator=gen, dtype=torch.float64) * 3.0
    psi = torch.rand(n, generator=gen, dtype=torch.float64) * 2 * math.pi
    radius = 0.5 + 2.0 * torch.rand(n, generator=gen, dtype=torch.float64)
    h = h + (radius * torch.cos(psi))[:, None] * b1 + (radius * torch.sin(psi))[:, None] * b2
    return h


def _proj(h, b1, b2):
    return (h @ b1)[..., None] * b1 + (h @ b2)[..., None] * b2


def _close(actual, expected, tol=TOL, scale=None):
    if scale is None:
        scale = 1.0 + float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=tol * scale)


def _setup(d, seed, n):
    gen = _gen(seed)
    b1, b2 = basis(d, gen)
    h = _acts(n, d, gen, b1, b2)
    return gen, b1, b2, h


# ----------------------------------------------------------------- SS (rows 1–5)


@SETTINGS
@given(d=dims, seed=seeds, n=rows, theta=angles)
def test_ss_preserves_norm_and_in_plane_norm(d, seed, n, theta):
    _, b1, b2, h = _setup(d, seed, n)
    out = ops.selective_rotation(h, b1, b2, theta)
    _close(out.norm(dim=-1), h.norm(dim=-1))
    _close(_proj(out, b1, b2).norm(dim=-1), _proj(h, b1, b2).norm(dim=-1))


@SETTINGS
@given(d=dims, seed=seeds, n=rows)
def test_ss_identity_at_0_and_360(d, seed, n):
    _, b1, b2, h = _setup(d, seed, n)
    assert torch.equal(ops.selective_rotation(h, b1, b2, 0.0), h)
    _close(ops.selective_rotation(h, b1, b2, 360.0), h)
    _close(ops.selective_rotation(h, b1, b2, -360.0), h)
    _close(ops.rotation_matrix(b1, b2, 0.0), torch.eye(d, dtype=torch.float64))
    _close(ops.rotation_matrix(b1, b2, 360.0), torch.eye(d, dtype=torch.float64))


@SETTINGS
@given(d=dims, seed=seeds, n=rows, a=angles, b=angles)
def test_ss_composition_and_inverse(d, seed, n, a, b):
    _, b1, b2, h = _setup(d, seed, n)
    composed = ops.selective_rotation(ops.selective_rotation(h, b1, b2, b), b1, b2, a)
    _close(composed, ops.selective_rotation(h, b1, b2, a + b), tol=1e-9)
    back = ops.selective_rotation(ops.selective_rotation(h, b1, b2, a), b1, b2, -a)
    _close(back, h, tol=1e-9)


@SETTINGS
@given(d=dims, seed=seeds, n=rows, theta=angles)
def test_rotation_matrix_orthogonal_det1_and_matches_o_d_form(d, seed, n, theta):
    _, b1, b2, h = _setup(d, seed, n)
    R = ops.rotation_matrix(b1, b2, theta)
    eye = torch.eye(d, dtype=torch.float64)
    assert R.shape == (d, d) and R.dtype == torch.float64
    _close(R @ R.T, eye)
    _close(R.T @ R, eye)
    assert abs(float(torch.linalg.det(R)) - 1.0) < 1e-9
    _close(R.T, ops.rotation_matrix(b1, b2, -theta))
    # Row-vector convention: h @ Rᵀ == R h == the O(d) form.
    _close(h @ R.T, ops.selective_rotation(h, b1, b2, theta))


@SETTINGS
@given(d=dims, seed=seeds, n=rows, theta=angles)
def test_ss_keeps_complement_and_rotates_counter_clockwise(d, seed, n, theta):
    _, b1, b2, h = _setup(d, seed, n)
    out = ops.selective_rotation(h, b1, b2, theta)
    _close(out - _proj(out, b1, b2), h - _proj(h, b1, b2))
    t = math.radians(theta)
    x, y = h @ b1, h @ b2
    _close(out @ b1, x * math.cos(t) - y * math.sin(t))
    _close(out @ b2, x * math.sin(t) + y * math.cos(t))


@SETTINGS
@given(d=dims, seed=seeds, n=rows)
def test_ss_180_negates_in_plane_and_90_turns_b1_into_b2(d, seed, n):
    _, b1, b2, h = _setup(d, seed, n)
    _close(ops.selective_rotation(h, b1, b2, 180.0), h - 2 * _proj(h, b1, b2))
    _close(ops.selective_rotation(b1, b1, b2, 90.0), b2)
    _close(ops.selective_rotation(b2, b1, b2, 90.0), -b1)
    # +b1 turns toward +b2 (not -b2) for small positive angles.
    assert float(ops.selective_rotation(b1, b1, b2, 10.0) @ b2) > 0


# ----------------------------------------------------------------- SAS (rows 8–10)


@SETTINGS
@given(d=dims, seed=seeds, n=rows, theta=angles)
def test_sas_norm_preserving_and_sets_absolute_angle(d, seed, n, theta):
    _, b1, b2, h = _setup(d, seed, n)
    out = ops.angular_standard(h, b1, b2, theta)
    _close(out.norm(dim=-1), h.norm(dim=-1))
    _close(out - _proj(out, b1, b2), h - _proj(h, b1, b2))
    r = torch.sqrt((h @ b1) ** 2 + (h @ b2) ** 2)
    t = math.radians(theta)
    _close(out @ b1, r * math.cos(t))
    _close(out @ b2, r * math.sin(t))


@SETTINGS
@given(d=dims, seed=seeds)
def test_sas_0_is_not_identity(d, seed):
    gen, b1, b2, _ = _setup(d, seed, 1)
    z = torch.randn(d, generator=gen, dtype=torch.float64)
    z = z - _proj(z, b1, b2)  # z ⊥ plane
    h = b2 + z
    out = ops.angular_standard(h, b1, b2, 0.0)
    _close(out, b1 + z)
    assert not torch.allclose(out, h)
    _close(out.norm(), h.norm())


@SETTINGS
@given(d=dims, seed=seeds, n=rows, theta=angles, psi=angles)
def test_sas_ignores_the_tokens_own_angle(d, seed, n, theta, psi):
    _, b1, b2, h = _setup(d, seed, n)
    turned = ops.selective_rotation(h, b1, b2, psi)  # same h_⊥ and r, different φ
    _close(ops.angular_standard(turned, b1, b2, theta), ops.angular_standard(h, b1, b2, theta), tol=1e-9)


@SETTINGS
@given(d=dims, seed=seeds, n=rows, theta=angles)
def test_sas_equals_ss_by_theta_minus_phi(d, seed, n, theta):
    _, b1, b2, h = _setup(d, seed, n)
    out = ops.angular_standard(h, b1, b2, theta)
    for i in range(n):
        phi = math.degrees(math.atan2(float(h[i] @ b2), float(h[i] @ b1)))
        _close(out[i], ops.selective_rotation(h[i], b1, b2, theta - phi), tol=1e-9)


# ----------------------------------------------------------------- AAS (row 11)


@SETTINGS
@given(d=dims, seed=seeds, theta=angles, tau=st.sampled_from([0.0, -0.5, 0.7]))
def test_aas_gates_on_b1_projection(d, seed, theta, tau):
    _, b1, b2, h = _setup(d, seed, 16)
    x = h @ b1
    assume(bool((x <= tau).any()) and bool((x > tau).any()))
    assume(float((x - tau).abs().min()) > 1e-9)
    out = ops.angular_adaptive(h, b1, b2, theta, tau)
    sas = ops.angular_standard(h, b1, b2, theta)
    low = x <= tau
    assert torch.equal(out[low], h[low])
    _close(out[~low], sas[~low])


def test_aas_default_threshold_is_zero():
    _gen, b1, b2, h = _setup(8, 3, 32)
    x = h @ b1
    out = ops.angular_adaptive(h, b1, b2, 45.0)
    assert torch.equal(out[x <= 0], h[x <= 0])
    _close(out[x > 0], ops.angular_standard(h, b1, b2, 45.0)[x > 0])


# ----------------------------------------------------------------- ablation (row 12)


@SETTINGS
@given(d=dims, seed=seeds, n=rows, r_norm=st.floats(min_value=0.5, max_value=20.0))
def test_ablation(d, seed, n, r_norm):
    # r̂ = r / (‖r‖ + 1e-8) as in [RD]: exact up to a relative 1e-8/‖r‖, hence tol 1e-7.
    gen, _, _, h = _setup(d, seed, n)
    r = torch.randn(d, generator=gen, dtype=torch.float64)
    r = r * (r_norm / r.norm())
    r_hat = r / r.norm()
    out = ops.ablate(h, r)
    assert out.dtype == h.dtype and out.shape == h.shape
    _close(out @ r_hat, torch.zeros(n, dtype=torch.float64), scale=1.0 + float(h.abs().max()), tol=1e-7)
    _close(ops.ablate(out, r), out, tol=1e-7)
    _close((out * out).sum(-1), (h * h).sum(-1) - (h @ r_hat) ** 2, tol=1e-7, scale=1.0 + float((h * h).sum(-1).max()))
    perp = h - (h @ r_hat)[:, None] * r_hat
    _close(ops.ablate(perp, r), perp, tol=1e-7)
    # The norm never grows, and strictly drops for tokens with a component along r.
    assert bool((out.norm(dim=-1) <= h.norm(dim=-1) + 1e-9).all())


# ----------------------------------------------------------------- addition / probe (row 13)


@SETTINGS
@given(d=dims, seed=seeds, n=rows, alpha=st.floats(min_value=-50.0, max_value=50.0))
def test_addition(d, seed, n, alpha):
    gen, _, _, h = _setup(d, seed, n)
    v = torch.randn(d, generator=gen, dtype=torch.float64) * 3
    assert torch.equal(ops.add(h, v, 0.0), h)
    out = ops.add(h, v, alpha)
    _close(out - h, (alpha * v).expand_as(h), tol=1e-12, scale=1.0 + float(out.abs().max()))
    expected = (h * h).sum(-1) + 2 * alpha * (h @ v) + alpha**2 * (v @ v)
    _close((out * out).sum(-1), expected, tol=1e-10, scale=1.0 + float(expected.abs().max()))


@SETTINGS
@given(d=dims, seed=seeds, n=rows, lam=st.floats(min_value=-50.0, max_value=50.0))
def test_probe_uses_unit_direction(d, seed, n, lam):
    gen, _, _, h = _setup(d, seed, n)
    v = torch.randn(d, generator=gen, dtype=torch.float64)
    v_unit = v / v.norm()
    assert abs(float(v_unit.norm()) - 1.0) < 1e-12
    _close(ops.probe(h, v_unit, lam), ops.add(h, v_unit, lam))
    # A non-unit vector is normalized first: only its direction matters.
    _close(ops.probe(h, 7.5 * v, lam), h + lam * v_unit)
    assert torch.equal(ops.probe(h, v, 0.0), h)


# ----------------------------------------------------------------- row 16: dtype and row independence


REFERENCE_OPS = {
    "add": lambda h, b1, b2: ops.add(h, b1, 2.0),
    "probe": lambda h, b1, b2: ops.probe(h, b1, -3.0),
    "ablate": lambda h, b1, b2: ops.ablate(h, b1),
    "angular_standard": lambda h, b1, b2: ops.angular_standard(h, b1, b2, 120.0),
    "angular_adaptive": lambda h, b1, b2: ops.angular_adaptive(h, b1, b2, 120.0),
    "selective": lambda h, b1, b2: ops.selective_rotation(h, b1, b2, 120.0),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(REFERENCE_OPS))
def test_reference_ops_keep_dtype_and_act_per_row(name, dtype):
    gen, b1, b2, _ = _setup(12, 7, 1)
    h = torch.randn(2, 3, 12, generator=gen, dtype=torch.float64).to(dtype)
    op = REFERENCE_OPS[name]
    out = op(h, b1.float(), b2.float())
    assert out.dtype == dtype and out.shape == h.shape
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 3e-2)
    for i in range(2):
        for j in range(3):
            row = op(h[i, j], b1.float(), b2.float())
            assert row.dtype == dtype
            torch.testing.assert_close(row.double(), out[i, j].double(), rtol=tol, atol=tol)
    # Changing one token leaves every other token's output alone.
    h2 = h.clone()
    h2[0, 0] = h2[0, 0] * 5 + 1
    out2 = op(h2, b1.float(), b2.float())
    torch.testing.assert_close(out2[1].double(), out[1].double(), rtol=tol, atol=tol)
    torch.testing.assert_close(out2[0, 1:].double(), out[0, 1:].double(), rtol=tol, atol=tol)


# ----------------------------------------------------------------- the batched op


@SETTINGS
@given(d=dims, seed=seeds, n=st.integers(1, 24), n_slots=st.integers(1, 6))
def test_token_deltas_match_reference_loop(d, seed, n, n_slots):
    gen = _gen(seed)
    bases, methods, gains, thresholds, token_slot, theta, c, s, scale = random_tables(d, n, n_slots, gen)
    h = torch.randn(n, d, generator=gen, dtype=torch.float64) * 3
    # Keep adaptive gates away from the threshold, where 1e-16 round-off may flip them.
    for i in range(n):
        slot = int(token_slot[i])
        if slot >= 0:
            x = float(h[i] @ bases[slot, 0])
            assume(abs(x - float(thresholds[slot])) > 1e-9)
    tables = (bases, methods, gains, thresholds, token_slot, c, s, scale)
    delta = ops.token_deltas(h, *tables)
    out = ops.steer_tokens(h, *tables)
    assert delta.dtype == out.dtype == torch.float64 and out.shape == h.shape
    for i in range(n):
        slot = int(token_slot[i])
        if slot < 0:
            expected = h[i]
        else:
            expected = reference_row(
                h[i],
                Method(int(methods[slot])),
                bases[slot, 0],
                bases[slot, 1],
                float(gains[slot]),
                float(thresholds[slot]),
                float(theta[i]),
                float(scale[i]),
            )
        # ops.ablate divides by ‖r‖ + 1e-8 ([RD]); the batched op uses the unit b1 as is.
        tol = 1e-7 if slot >= 0 and int(methods[slot]) == Method.ABLATE else 1e-10
        mag = 1.0 + float(h[i].abs().max()) + float(expected.abs().max())
        _close(out[i], expected, tol=tol, scale=mag)
        _close(delta[i], expected - h[i], tol=tol, scale=mag)


@SETTINGS
@given(seed=seeds, n=st.integers(1, 24), n_slots=st.integers(1, 6))
def test_token_deltas_float32_tables_close_to_float64_reference(seed, n, n_slots):
    """The documented table dtypes (float32) on float32 activations: reference within float32 round-off."""
    d = 32
    gen = _gen(seed)
    bases, methods, gains, thresholds, token_slot, theta, c, s, scale = random_tables(d, n, n_slots, gen)
    h = torch.randn(n, d, generator=gen, dtype=torch.float64) * 3
    for i in range(n):
        slot = int(token_slot[i])
        if slot >= 0:
            assume(abs(float(h[i] @ bases[slot, 0]) - float(thresholds[slot])) > 1e-3)
    f32 = [t.float() for t in (bases, gains, thresholds)]
    out = ops.steer_tokens(h.float(), f32[0], methods, f32[1], f32[2], token_slot, c.float(), s.float(), scale.float())
    assert out.dtype == torch.float32
    for i in range(n):
        slot = int(token_slot[i])
        expected = (
            h[i]
            if slot < 0
            else reference_row(
                h[i],
                Method(int(methods[slot])),
                bases[slot, 0],
                bases[slot, 1],
                float(gains[slot]),
                float(thresholds[slot]),
                float(theta[i]),
                float(scale[i]),
            )
        )
        _close(out[i].double(), expected, tol=1e-5, scale=1.0 + float(expected.abs().max()) + float(h[i].abs().max()))


@SETTINGS
@given(
    seed=seeds,
    n=st.integers(1, 24),
    n_slots=st.integers(1, 6),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]),
)
def test_unsteered_rows_are_bit_identical(seed, n, n_slots, dtype):
    d = 16
    gen = _gen(seed)
    bases, methods, gains, thresholds, token_slot, _, c, s, scale = random_tables(d, n, n_slots, gen, torch.float32)
    methods[0] = Method.NONE  # always have at least one NONE slot
    h = (torch.randn(n, d, generator=gen) * 10).to(dtype)
    tables = (bases, methods, gains, thresholds, token_slot, c, s, scale)
    delta = ops.token_deltas(h, *tables)
    out = ops.steer_tokens(h, *tables)
    assert delta.dtype == dtype and out.dtype == dtype
    untouched = (token_slot < 0) | (methods[token_slot.clamp(min=0)] == Method.NONE)
    assert torch.equal(out[untouched], h[untouched])
    assert torch.equal(delta[untouched], torch.zeros_like(h[untouched]))
    # Bitwise too (torch.equal treats -0.0 == +0.0; random inputs hold no zeros).
    assert torch.equal(out[untouched].view(torch.uint8), h[untouched].view(torch.uint8))


def test_unsteered_rows_ignore_non_finite_neighbours_and_slot_minus_one():
    """A NaN/inf in an unsteered row stays where it is; steered rows next to it are unaffected."""
    d = 8
    gen = _gen(11)
    b1, b2 = basis(d, gen)
    bases = torch.stack([b1, b2])[None].float()
    methods = torch.tensor([int(Method.ROTATE)])
    one = torch.ones(1)
    h = torch.randn(3, d, generator=gen)
    h[0, 2] = float("nan")
    h[2, 1] = float("inf")
    slot = torch.tensor([-1, 0, -1])
    c = torch.full((3,), math.cos(math.radians(30.0)))
    s = torch.full((3,), math.sin(math.radians(30.0)))
    out = ops.steer_tokens(h, bases, methods, one, one * 0, slot, c, s, one.expand(3))
    assert torch.isnan(out[0, 2]) and torch.equal(out[0].nan_to_num(), h[0].nan_to_num())
    assert torch.equal(out[2], h[2])
    _close(out[1].double(), ops.selective_rotation(h[1].double(), b1, b2, 30.0), tol=1e-6)


def test_all_rows_unsteered_gives_exact_zero_delta():
    d, n = 8, 5
    h = torch.randn(n, d).to(torch.bfloat16)
    bases = torch.randn(2, 2, d)
    methods = torch.tensor([int(Method.ADD), int(Method.ROTATE)])
    ones = torch.ones(2)
    delta = ops.token_deltas(
        h, bases, methods, ones, ones, torch.full((n,), -1), torch.ones(n), torch.zeros(n), torch.ones(n)
    )
    assert delta.dtype == torch.bfloat16 and torch.equal(delta, torch.zeros_like(h))


# ----------------------------------------------------------------- the single-method short path


@SETTINGS
@given(
    seed=seeds,
    n=st.integers(1, 24),
    n_slots=st.integers(1, 6),
    method=st.sampled_from([m for m in Method if m != Method.NONE]),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
)
def test_single_method_path_equals_the_general_op(seed, n, n_slots, method, dtype):
    """Same corrections as token_deltas where every slot is ``method`` or NONE (zero basis and gain, as
    the runtime loads a slot at a site its profile skips); untouched rows exact zeros, bit for bit."""
    d = 24
    gen = _gen(seed)
    methods = torch.where(torch.rand(n_slots, generator=gen) < 0.25, int(Method.NONE), int(method)).to(torch.int64)
    bases, methods, gains, thresholds, token_slot, _, c, s, scale = random_tables(
        d, n, n_slots, gen, torch.float32, methods
    )
    none = methods == Method.NONE
    bases[none] = 0.0
    gains[none] = 0.0
    thresholds[none] = 0.0
    h = (torch.randn(n, d, generator=gen) * 3).to(dtype)
    if method == Method.ANGULAR_ADAPTIVE:  # keep gates away from τ, where round-off in the dtype could flip them
        x = (bases[token_slot.clamp(min=0), 0] * h.float()).sum(-1)
        assume(bool(((x - thresholds[token_slot.clamp(min=0)]).abs() > 1e-2).all()))
    general = ops.token_deltas(h, bases, methods, gains, thresholds, token_slot, c, s, scale)
    short = ops.single_method_deltas(Method(method), h, bases, gains, thresholds, token_slot, c, s, scale)
    assert short.dtype == dtype and short.shape == h.shape
    tol = 1e-5 if dtype != torch.bfloat16 else 3e-2
    torch.testing.assert_close(
        short.double(), general.double(), rtol=tol, atol=tol * (1 + float(h.double().abs().max()))
    )
    untouched = (token_slot < 0) | none[token_slot.clamp(min=0)]
    assert torch.equal((h + short)[untouched].view(torch.uint8), h[untouched].view(torch.uint8))


def test_single_method_path_refuses_methods_it_has_no_path_for():
    h = torch.zeros(2, 4)
    tables = (
        torch.zeros(1, 2, 4),
        torch.zeros(1),
        torch.zeros(1),
        torch.zeros(2, dtype=torch.int64),
        torch.ones(2),
        torch.zeros(2),
        torch.zeros(2),
    )
    with pytest.raises(ValueError, match="NONE"):
        ops.single_method_deltas(Method.NONE, h, *tables)


# ----------------------------------------------------------------- under torch.compile


def test_token_deltas_compiles_whole_and_matches_eager():
    """The general op traces as one graph (no breaks), so a fused version of it is a compile away; the
    compiled op gives the eager op's corrections and exact zeros for untouched rows."""
    gen = _gen(5)
    d, n, n_slots = 32, 40, 6
    bases, methods, gains, thresholds, token_slot, _, c, s, scale = random_tables(d, n, n_slots, gen, torch.float32)
    h = torch.randn(n, d, generator=gen) * 3
    compiled = torch.compile(ops.token_deltas, fullgraph=True, dynamic=False)
    got = compiled(h, bases, methods, gains, thresholds, token_slot, c, s, scale)
    eager = ops.token_deltas(h, bases, methods, gains, thresholds, token_slot, c, s, scale)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    untouched = (token_slot < 0) | (methods[token_slot.clamp(min=0)] == int(Method.NONE))
    assert bool(untouched.any()) and torch.equal(got[untouched], torch.zeros_like(got[untouched]))
