"""SteeringRuntime on CPU: slots, the per-step token map, delta vs the reference ops, the custom op."""

from __future__ import annotations

import contextlib

import pytest
import torch

import vllm_steer.engine.runtime as runtime_mod
from support.runtime import FP, MIXED, PROFILES, SITES, D, steer
from vllm_steer.core.ops import token_deltas
from vllm_steer.core.profile import METHOD_HOOKS
from vllm_steer.core.request import parse_steering, resolve_steering
from vllm_steer.engine.runtime import (
    Site,
    SlotGate,
    SlotsExhaustedError,
    SteeringRuntime,
    set_runtime,
    sites_for_profiles,
)
from vllm_steer.testing.hf_reference import reference_op
from vllm_steer.testing.synthetic import random_profile


def make_runtime(max_slots=8, max_tokens=64, fused=None) -> SteeringRuntime:
    return SteeringRuntime(PROFILES, SITES, hidden_size=D, max_slots=max_slots, max_tokens=max_tokens, fused=fused)


def slot_of(rt: SteeringRuntime, req_id: str) -> int:
    """The slot a bound request's tokens map to (via the public token map)."""
    rt.begin_step([req_id], [1])
    return int(rt.token_slot[0])


@pytest.fixture
def no_global_runtime():
    set_runtime(None)
    yield
    set_runtime(None)


# ----------------------------------------------------------------- sites


def test_sites_for_profiles():
    assert sorted(set(SITES)) == SITES
    expected = {
        Site(layer, kind) for p in PROFILES.values() for layer in p.spec.layers for kind in METHOD_HOOKS[p.method]
    }
    assert set(SITES) == expected
    only_ss = sites_for_profiles({"ss": PROFILES["ss"]})
    assert only_ss == [
        Site(1, "input_norm"),
        Site(1, "post_attn_norm"),
        Site(2, "input_norm"),
        Site(2, "post_attn_norm"),
    ]
    assert str(Site(2, "mlp_output")) == "layers.2.mlp_output"


def test_profile_without_its_sites_is_refused():
    rt = SteeringRuntime(PROFILES, sites_for_profiles({"ss": PROFILES["ss"]}), hidden_size=D, max_slots=2, max_tokens=8)
    rt.add_request("ok", steer(profile="ss"))
    with pytest.raises(RuntimeError, match="no hook installed"):
        rt.add_request("bad", steer(profile="add"))


# ----------------------------------------------------------------- slots


def test_requests_share_a_slot_per_profile():
    rt = make_runtime(max_slots=4)
    assert rt.slots_in_use == 0
    rt.add_request("a", steer(profile="ss", angle=10.0))
    rt.add_request("b", steer(profile="ss", angle=200.0))
    assert rt.slots_in_use == 1
    rt.begin_step(["a", "b"], [2, 3])
    assert rt.token_slot[:5].unique().numel() == 1 and int(rt.token_slot[0]) >= 0
    # Angles travel per token, not per slot.
    assert torch.allclose(rt.token_cos[:2], torch.tensor(torch.cos(torch.deg2rad(torch.tensor(10.0))).item()))
    assert torch.allclose(rt.token_cos[2:5], torch.tensor(torch.cos(torch.deg2rad(torch.tensor(200.0))).item()))
    rt.add_request("c", steer(profile="add", scale=-2.0))
    assert rt.slots_in_use == 2
    rt.add_request("d", steer(profile="cat", categories=["fraud"]))
    rt.add_request("e", steer(profile="cat", categories=["fraud", "malware"]))
    rt.add_request("f", steer(profile="cat", categories=["malware", "fraud"]))
    assert rt.slots_in_use == 4  # a category selection is part of the slot key
    assert slot_of(rt, "e") == slot_of(rt, "f") != slot_of(rt, "d")


def test_slots_freed_reused_and_exhausted():
    rt = make_runtime(max_slots=2)
    rt.add_request("a", steer(profile="ss"))
    rt.add_request("b", steer(profile="ss", angle=45.0))
    rt.add_request("c", steer(profile="add"))
    ss_slot = slot_of(rt, "a")
    assert rt.slots_in_use == 2
    with pytest.raises(SlotsExhaustedError):
        rt.add_request("d", steer(profile="sas"))
    assert not rt.is_bound("d") and rt.slots_in_use == 2
    rt.remove_request("a")
    assert rt.slots_in_use == 2  # "b" still holds the ss slot
    with pytest.raises(SlotsExhaustedError):
        rt.add_request("d", steer(profile="sas"))
    rt.remove_request("b")
    assert rt.slots_in_use == 1 and not rt.is_bound("b")
    rt.remove_request("b")  # removing twice / unknown ids is a no-op
    rt.remove_request("never-seen")
    assert rt.slots_in_use == 1
    rt.add_request("d", steer(profile="sas"))
    assert rt.slots_in_use == 2 and slot_of(rt, "d") == ss_slot
    # The freed slot now holds "sas": another "ss" request has nowhere to go.
    with pytest.raises(SlotsExhaustedError):
        rt.add_request("e", steer(profile="ss"))


def test_idle_slot_keeps_its_profile_and_never_used_slots_come_first():
    rt = make_runtime(max_slots=3)
    rt.add_request("a", steer(profile="ss"))
    first = slot_of(rt, "a")
    rt.remove_request("a")
    assert rt.slots_in_use == 0
    rt.add_request("b", steer(profile="sas"))
    assert slot_of(rt, "b") != first  # a never-used slot is preferred to the idle "ss" one
    rt.add_request("c", steer(profile="ss"))
    assert slot_of(rt, "c") == first  # the idle slot still holds "ss" and is reused as is
    assert rt.slots_in_use == 2


def test_rebinding_a_request_releases_its_old_slot():
    rt = make_runtime(max_slots=1)
    rt.add_request("a", steer(profile="add"))
    rt.add_request("a", steer(profile="ss"))  # same id, new setting: old binding dropped first
    assert rt.slots_in_use == 1 and rt.is_bound("a")
    rt.add_request("a", None)
    assert rt.slots_in_use == 0 and not rt.is_bound("a")
    rt.add_request("u", None)
    assert not rt.is_bound("u")


# ----------------------------------------------------------------- token map


def test_begin_step_token_map():
    rt = make_runtime(max_tokens=32)
    rt.add_request("a", steer(profile="ss", angle=30.0))
    rt.add_request("b", steer(profile="add", scale=-4.0))
    rt.add_request("z", steer(profile="sas"))  # bound, but schedules no tokens this step
    sa, sb = slot_of(rt, "a"), slot_of(rt, "b")
    before = rt.steps_steered
    rt.begin_step(["a", "unbound", "b", None, "z", "a-typo"], [3, 2, 4, 1, 0, 2])
    assert rt.steps_steered == before + 1
    expected = [sa] * 3 + [-1] * 2 + [sb] * 4 + [-1] + [-1] * 2 + [-1] * (32 - 12)
    assert rt.token_slot.tolist() == expected
    assert torch.allclose(rt.token_cos[:3], torch.full((3,), 0.8660254))
    assert torch.allclose(rt.token_sin[:3], torch.full((3,), 0.5))
    assert torch.equal(rt.token_scale[5:9], torch.full((4,), -4.0))

    # A shorter later step resets the stale tail.
    rt.begin_step(["b"], [2])
    assert rt.token_slot.tolist() == [sb, sb] + [-1] * 30
    rt.begin_step([], [])
    assert rt.token_slot.tolist() == [-1] * 32

    # Steps with no steered token do not count.
    before = rt.steps_steered
    rt.begin_step(["unbound"], [5])
    assert rt.steps_steered == before
    assert rt.token_slot.tolist() == [-1] * 32


def test_removed_request_is_unsteered_in_later_steps():
    rt = make_runtime()
    rt.add_request("a", steer(profile="ss"))
    rt.begin_step(["a"], [4])
    assert (rt.token_slot[:4] >= 0).all()
    rt.remove_request("a")
    rt.begin_step(["a"], [4])
    assert rt.token_slot.tolist() == [-1] * rt.max_tokens


def test_begin_step_refuses_too_many_tokens():
    rt = make_runtime(max_tokens=8)
    with pytest.raises(RuntimeError, match="9 tokens"):
        rt.begin_step(["a", "b"], [5, 4])


# ----------------------------------------------------------------- delta


def _mixed_runtime(fused=None):
    rt = make_runtime(max_slots=8, max_tokens=64, fused=fused)
    resolved = {rid: steer(**kw) for rid, kw in MIXED.items()}
    for rid, r in resolved.items():
        rt.add_request(rid, r)
    order = ["plain", *MIXED, None, "plain2"]
    counts = [2, 3, 1, 4, 2, 5, 3, 2, 1, 3, 1, 2]
    assert len(order) == len(counts)
    rt.begin_step(order, counts)
    return rt, resolved, order, counts


def _expected_delta(h, site: Site, order, counts, resolved):
    expected = torch.zeros_like(h)
    start = 0
    for rid, n in zip(order, counts, strict=True):
        rows = slice(start, start + n)
        start += n
        if rid not in resolved:
            continue
        r = resolved[rid]
        profile = PROFILES[r.profile_id]
        if site.layer in profile.spec.layers and site.kind in METHOD_HOOKS[profile.method]:
            expected[rows] = reference_op(profile, r, site.layer)(h[rows]) - h[rows]
    return expected, start


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_delta_matches_reference_ops(fused):
    rt, resolved, order, counts = _mixed_runtime(fused)
    assert rt.fused == ("compiled" if fused else None)  # CPU: off unless asked for; no Triton on CPU
    gen = torch.Generator().manual_seed(0)
    for i, site in enumerate(rt.sites):
        n = sum(counts) + 5  # plus padding rows past the step's tokens
        h = torch.randn(n, D, generator=gen) * 3
        got = rt.delta(h, i)
        assert got.dtype == h.dtype and got.shape == h.shape
        expected, filled = _expected_delta(h, site, order, counts, resolved)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-5, msg=f"site {site}")
        # Unsteered rows, rows of profiles that skip this site, and padding: exact zeros.
        exact = expected == 0
        assert torch.equal(got[exact.all(dim=1)], torch.zeros_like(got[exact.all(dim=1)]))
        assert torch.equal(got[filled:], torch.zeros_like(got[filled:]))
        assert torch.equal(got[:2], torch.zeros(2, D))  # "plain"


@pytest.mark.parametrize("context", [contextlib.nullcontext, torch.inference_mode], ids=["plain", "inference-mode"])
def test_fused_op_compiles_once_per_kind_for_every_site_and_token_count(context):
    """Once compiled (N dynamic), no site, step size or mix recompiles: inside a
    CUDA-graph capture a compile would break it. (That steps steering nothing compile it too, as vLLM's
    warm-up before a capture does, is a CUDA matter: tests/gpu/test_cuda.py.)"""
    rt, _resolved, _order, _counts = _mixed_runtime(fused=True)
    site = rt.site_ids[Site(1, "input_norm")]  # selective and standard angular share it
    with context():
        rt.begin_step(["plain"], [5])
        assert torch.equal(rt.delta(torch.randn(5, D), site), torch.zeros(5, D))
        assert rt.fused_kinds == frozenset()  # CPU: nothing compiled for a step that steers nothing
        rt.begin_step(["r-ss", "r-sas"], [3, 2])
        rt.delta(torch.randn(5, D), site)  # compiles, N marked dynamic (one token never meets two methods)
        assert {kind[:2] for kind in rt.fused_kinds} == {(torch.float32, False)}
        calls = []
        run = rt._fused.run
        rt._fused.run = lambda args: calls.append(1) or run(args)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for n_tokens in (1, 3, 17, 64):  # selective and standard angular share their sites: the general op
                rt.begin_step(["r-ss", "r-sas"], [n_tokens - n_tokens // 2, n_tokens // 2])
                for site in range(len(rt.sites)):
                    h = torch.randn(n_tokens, D)
                    torch.testing.assert_close(
                        rt.delta(h, site),
                        token_deltas(
                            h,
                            rt.bases[site],
                            rt.methods[site],
                            rt.gains[site],
                            rt.thresholds[site],
                            rt.token_slot[:n_tokens],
                            rt.token_cos[:n_tokens],
                            rt.token_sin[:n_tokens],
                            rt.token_scale[:n_tokens],
                        ),
                        rtol=1e-5,
                        atol=1e-5,
                    )
        assert calls, "the sites both methods share must have run the fused op"


def test_inside_a_capture_the_fused_op_never_compiles_and_falls_back_to_the_eager_op(monkeypatch):
    rt, _resolved, _order, counts = _mixed_runtime(fused=True)
    site = rt.site_ids[Site(2, "input_norm")]
    h = torch.randn(sum(counts), D, generator=torch.Generator().manual_seed(9)) * 3
    expected = rt.delta(h, site)  # outside a capture: compiles for this kind
    monkeypatch.setattr(runtime_mod, "_capturing_cuda_graph", lambda _h: True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        torch.testing.assert_close(rt.delta(h, site), expected, rtol=0, atol=0)  # the compiled code, replayed
        assert rt.fused_fallbacks == 0
        low = h.to(torch.bfloat16)  # a kind never compiled: must not compile here
        got = rt.delta(low, site)
    assert rt.fused_fallbacks == 1
    assert got.dtype == torch.bfloat16 and torch.equal(
        got,
        token_deltas(
            low,
            rt.bases[site],
            rt.methods[site],
            rt.gains[site],
            rt.thresholds[site],
            rt.token_slot[: len(h)],
            rt.token_cos[: len(h)],
            rt.token_sin[: len(h)],
            rt.token_scale[: len(h)],
        ),
    )


def test_delta_sees_both_sides_of_the_adaptive_gate():
    """The mixed test is only meaningful for AAS if some rows are gated in and some out."""
    rt = make_runtime()
    rt.add_request("a", steer(profile="aas", angle=35.0))
    rt.begin_step(["a"], [64])
    site = rt.site_ids[Site(2, "input_norm")]
    h = torch.randn(64, D, generator=torch.Generator().manual_seed(1)) * 3
    b1 = PROFILES["aas"].vectors[2]["b1"]
    gated = h @ b1 > 0
    assert 0 < int(gated.sum()) < 64
    got = rt.delta(h, site)
    assert torch.equal(got[~gated], torch.zeros_like(got[~gated]))
    assert bool((got[gated].abs().sum(dim=1) > 0).all())
    r = steer(profile="aas", angle=35.0)
    torch.testing.assert_close(h + got, reference_op(PROFILES["aas"], r, 2)(h), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_delta_low_precision(dtype):
    rt, resolved, order, counts = _mixed_runtime()
    site = Site(2, "input_norm")
    i = rt.site_ids[site]
    h = (torch.randn(sum(counts), D, generator=torch.Generator().manual_seed(2)) * 3).to(dtype)
    got = rt.delta(h, i)
    assert got.dtype == dtype
    expected, _ = _expected_delta(h.float(), site, order, counts, resolved)
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=5e-2)
    assert torch.equal(got[:2], torch.zeros(2, D, dtype=dtype))
    # Unsteered rows stay bit-identical through h + delta.
    assert torch.equal((h + got)[:2], h[:2])


@pytest.mark.parametrize(
    "requests, method",
    [
        (
            {
                "r1": dict(profile="ss", angle=100.0),
                "r2": dict(profile="ss-b", angle=60.0),
                "r3": dict(profile="ss", angle=300.0),
            },
            "ROTATE",
        ),
        (
            {
                "r1": dict(profile="add", scale=2.0),
                "r2": dict(profile="probe", scale=-1.5),
                "r3": dict(profile="cat", categories=["fraud", "violence"], scale=1.0),
            },
            "ADD",
        ),
        ({"r1": dict(profile="abl")}, "ABLATE"),
        ({"r1": dict(profile="sas", angle=30.0), "r2": dict(profile="sas", angle=250.0)}, "ANGULAR_STANDARD"),
        ({"r1": dict(profile="aas", angle=35.0), "r2": dict(profile="aas", angle=200.0)}, "ANGULAR_ADAPTIVE"),
    ],
)
def test_sites_steered_by_one_method_take_the_short_path_with_the_same_result(requests, method):
    """Where every slot steering a site this step shares a method, the runtime runs the short op; its
    corrections equal the general op's on the same tables and the reference ops; unsteered rows stay 0."""
    rt = make_runtime()
    resolved = {rid: steer(**kw) for rid, kw in requests.items()}
    for rid, r in resolved.items():
        rt.add_request(rid, r)
    order, counts = ["plain", *requests], [2, *([3] * len(requests))]
    rt.begin_step(order, counts)
    n = sum(counts)
    h = torch.randn(n, D, generator=torch.Generator().manual_seed(3)) * 3
    short_sites = [i for i in range(len(rt.sites)) if rt._site_method[i] is not None]
    assert short_sites and all(rt._site_method[i].name == method for i in short_sites)
    for i in short_sites:
        got = rt.delta(h, i)
        general = runtime_mod.token_deltas(
            h,
            rt.bases[i],
            rt.methods[i],
            rt.gains[i],
            rt.thresholds[i],
            rt.token_slot[:n],
            rt.token_cos[:n],
            rt.token_sin[:n],
            rt.token_scale[:n],
        )
        torch.testing.assert_close(got, general, rtol=1e-5, atol=2e-5)
        expected, _ = _expected_delta(h, rt.sites[i], order, counts, resolved)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-5)
        assert torch.equal(got[:2], torch.zeros(2, D))


def test_a_site_two_methods_share_this_step_takes_the_general_op():
    rt = make_runtime()
    rt.add_request("rot", steer(profile="ss", angle=100.0))  # layers 1, 2
    rt.add_request("snap", steer(profile="sas", angle=30.0))  # layers 1, 2, same sites
    rt.begin_step(["rot", "snap"], [2, 2])
    shared = [i for i, site in enumerate(rt.sites) if site.layer in (1, 2) and rt._site_active[i]]
    assert shared and all(rt._site_method[i] is None for i in shared)


def test_site_unused_in_step_returns_zeros():
    rt = make_runtime()
    rt.add_request("a", steer(profile="ss", angle=90.0))  # layers 1, 2, norm sites only
    rt.add_request("idle", steer(profile="add"))  # bound, but not in this step
    rt.begin_step(["a", "x"], [3, 2])
    h = torch.randn(5, D)
    for i, site in enumerate(rt.sites):
        got = rt.delta(h, i)
        if site.layer in (1, 2) and site.kind in ("input_norm", "post_attn_norm"):
            assert bool((got[:3].abs().sum(dim=1) > 0).all()), site
            assert torch.equal(got[3:], torch.zeros(2, D))
        else:
            assert torch.equal(got, torch.zeros_like(h)), site


def test_stale_rows_after_a_shorter_step_are_zero():
    rt = make_runtime()
    rt.add_request("a", steer(profile="add", scale=2.0))
    site = rt.site_ids[Site(1, "layer_output")]
    rt.begin_step(["a"], [6])
    h = torch.randn(6, D)
    assert bool((rt.delta(h, site).abs().sum(dim=1) > 0).all())
    rt.begin_step(["a", "u"], [2, 1])
    got = rt.delta(h, site)  # 6 rows: 3 real tokens + 3 padding rows
    assert bool((got[:2].abs().sum(dim=1) > 0).all())
    assert torch.equal(got[2:], torch.zeros(4, D))


def test_nothing_steered_gives_zeros_everywhere():
    rt = make_runtime()
    rt.add_request("a", steer(profile="ss"))
    rt.begin_step(["u1", "u2"], [3, 3])
    h = torch.randn(6, D)
    for i in range(len(rt.sites)):
        assert torch.equal(rt.delta(h, i), torch.zeros_like(h))


# ----------------------------------------------------------------- the custom op


def test_custom_op_matches_runtime(no_global_runtime):
    rt, *_ = _mixed_runtime()
    n = rt.token_slot.shape[0]
    h = torch.randn(n, D, generator=torch.Generator().manual_seed(3))
    # No runtime installed: the op is a no-op correction.
    assert torch.equal(torch.ops.vllm_steer.delta(h, 0), torch.zeros_like(h))
    set_runtime(rt)
    assert runtime_mod.get_runtime() is rt
    for i in range(len(rt.sites)):
        assert torch.equal(torch.ops.vllm_steer.delta(h, i), rt.delta(h, i))


def test_custom_op_inside_torch_compile(no_global_runtime):
    rt = make_runtime(max_tokens=8)
    rt.add_request("a", steer(profile="ss", angle=100.0))
    rt.add_request("b", steer(profile="add", scale=2.0))
    rt.begin_step(["a", "u", "b"], [3, 2, 3])
    set_runtime(rt)
    norm_site = rt.site_ids[Site(1, "input_norm")]
    out_site = rt.site_ids[Site(1, "layer_output")]

    def block(x):
        y = torch.tanh(x) * 2.0
        y = y + torch.ops.vllm_steer.delta(y, norm_site)
        z = y * 0.5 + 1.0
        return z + torch.ops.vllm_steer.delta(z, out_site)

    def eager(x):
        y = torch.tanh(x) * 2.0
        y = y + rt.delta(y, norm_site)
        z = y * 0.5 + 1.0
        return z + rt.delta(z, out_site)

    compiled = torch.compile(block, fullgraph=False)
    x = torch.randn(8, D, generator=torch.Generator().manual_seed(4))
    first = compiled(x)
    torch.testing.assert_close(first, eager(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first[3:5], torch.tanh(x[3:5]) + 1.0, rtol=1e-6, atol=1e-6)  # unsteered rows
    assert not torch.allclose(first[:3], torch.tanh(x[:3]) + 1.0)

    # The compiled graph reads the runtime's buffers at every call: a new step
    # (new angles, new token map) changes its output without recompiling.
    rt.remove_request("a")
    rt.add_request("a", steer(profile="ss", angle=250.0))
    rt.begin_step(["b", "a"], [1, 7])
    second = compiled(x)
    torch.testing.assert_close(second, eager(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(second, first)

    rt.begin_step(["u"], [8])
    torch.testing.assert_close(compiled(x), torch.tanh(x) + 1.0, rtol=1e-6, atol=1e-6)
    set_runtime(None)
    torch.testing.assert_close(compiled(x), torch.tanh(x) + 1.0, rtol=1e-6, atol=1e-6)


def test_layer_override_steers_only_the_chosen_layers():
    """steer_layers=[2] on a layers-[1, 2] profile: a slot of its own, layer 1 untouched, layer 2 as the reference."""
    rt = make_runtime()
    rt.add_request("all", steer(profile="ss", angle=90.0))
    rt.add_request("two", steer(profile="ss", angle=90.0, layers=[2]))
    assert rt.slots_in_use == 2
    rt.begin_step(["all", "two"], [3, 3])
    h = torch.randn(6, D, generator=torch.Generator().manual_seed(3)) * 3
    for layer in (1, 2):
        got = rt.delta(h, rt.site_ids[Site(layer, "input_norm")])
        assert bool((got[:3].abs().sum(dim=1) > 0).all())
        if layer == 1:
            assert torch.equal(got[3:], torch.zeros(3, D))
        else:
            expected = reference_op(PROFILES["ss"], steer(profile="ss", angle=90.0), 2)(h[3:]) - h[3:]
            torch.testing.assert_close(got[3:], expected, rtol=1e-5, atol=2e-5)


def test_hot_reload_keeps_old_versions_and_refuses_unhooked_sites():
    rt = make_runtime()
    old = PROFILES["add"]
    rt.add_request("before", steer(profile="add", scale=1.0))
    new = random_profile("add", "addition", FP, [1, 2], seed=42, vector_norm=3.0, scale=1.5)
    rt.add_profiles({**PROFILES, "add": new})
    assert rt.profiles["add"] is new and rt.version(old.digest) is old and rt.version(new.digest) is new
    # A request validated against the old version still gets the old vectors, in a slot of its own.
    old_req = resolve_steering(parse_steering({"steer_profile": "add", "steer_scale": 1.0}), {"add": old})
    new_req = resolve_steering(parse_steering({"steer_profile": "add", "steer_scale": 1.0}), rt.profiles)
    rt.add_request("old", old_req)
    rt.add_request("new", new_req)
    rt.begin_step(["old", "new"], [1, 1])
    h = torch.zeros(2, D)
    got = rt.delta(h, rt.site_ids[Site(1, "layer_output")])
    torch.testing.assert_close(got[0], old.vectors[1]["vector"])
    torch.testing.assert_close(got[1], new.vectors[1]["vector"])
    deep = random_profile("deep", "addition", FP, [0], seed=1)
    with pytest.raises(runtime_mod.MissingSitesError, match=r"0\.layer_output"):
        rt.add_profiles({**rt.profiles, "deep": deep})
    assert "deep" not in rt.profiles


# ------------------------------------------------------------------ the scheduler's slot gate

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(
    budget=st.integers(1, 4),
    keys=st.lists(
        st.one_of(st.none(), st.integers(0, 7), st.lists(st.integers(0, 7), min_size=2, max_size=4)),
        min_size=1,
        max_size=30,
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_slot_gate_never_lets_the_worker_bind_more_distinct_settings_than_slots(budget, keys, seed):
    """A toy scheduler loop: arrivals, partial scheduling, preemption, finishing, in random order.

    The worker side is the real SteeringRuntime's rule (a slot per distinct key among bound
    requests; a routing request binds several); the gate must keep it within budget at every step,
    and every request that fits at all must finish.
    """
    import random

    def slots_of(k):
        if k is None:
            return ()
        return tuple(("p", str(i), None, None) for i in (k if isinstance(k, list) else [k]))

    rng = random.Random(seed)
    gate = SlotGate(budget)
    fits = [k for k in keys if len(set(slots_of(k))) <= budget]  # a request needing more slots than exist waits forever
    waiting = [(f"r{i}", slots_of(k)) for i, k in enumerate(fits)]
    bound: dict[str, tuple] = {}  # the worker's bindings (unsteered requests bind nothing)
    running: list[str] = []
    finishing: set[str] = set()
    done = 0
    for _ in range(10 * len(keys) + 20):
        gate.begin_step(finishing)
        for req_id in finishing:
            bound.pop(req_id, None)
        finished_now, finishing = finishing, set()
        new = []
        for req_id, slots in list(waiting):
            if gate.admit(req_id, slots) and rng.random() < 0.8:  # sometimes the token budget runs out
                waiting.remove((req_id, slots))
                if req_id not in bound:
                    new.append((req_id, slots))
                running.append(req_id)
        gate.end_step(new, finished_now)
        bound.update(new)
        assert len({k for slots in bound.values() for k in slots}) <= budget
        for req_id in list(running):
            roll = rng.random()
            if roll < 0.3:
                running.remove(req_id)
                finishing.add(req_id)
                done += 1
            elif roll < 0.4:  # preempted: back to the front of the queue, still bound in the worker
                running.remove(req_id)
                waiting.insert(0, (req_id, bound[req_id]))
        if done == len(fits):
            break
    assert done == len(fits), "every request is eventually admitted"


def test_slot_gate_defers_only_a_new_distinct_setting_when_full():
    gate = SlotGate(2)
    a, b, c = ("a", "d1", None, None), ("b", "d2", None, None), ("c", "d3", None, None)
    gate.begin_step(())
    assert gate.admit("1", (a,)) and gate.admit("2", (b,))
    assert not gate.admit("3", (c,)), "a third distinct setting waits"
    assert gate.admit("4", (a,)) and gate.admit("5", ()), "a shared setting and unsteered rows go ahead"
    gate.end_step([("1", (a,)), ("2", (b,)), ("4", (a,)), ("5", ())], ())
    assert gate.in_use == 2 and gate.deferred == 1
    gate.begin_step({"2"})  # request 2 finished: the worker frees its slot before binding new ones
    assert gate.admit("3", (c,))
    gate.end_step([("3", (c,))], {"2"})
    assert gate.in_use == 2


def test_slot_gate_counts_every_slot_of_a_routing_request():
    gate = SlotGate(3)
    router, cat1, cat2, other = ("r",), ("c1",), ("c2",), ("o",)
    gate.begin_step(())
    assert gate.admit("1", (other,))
    assert not gate.admit("2", (router, cat1, cat2)), "1 + 3 slots > 3: the routing request waits whole"
    gate.end_step([("1", (other,))], ())
    gate.begin_step({"1"})
    assert gate.admit("2", (router, cat1, cat2))
    assert gate.admit("3", (cat1,)), "a request on one of its category slots shares it"
    assert not gate.admit("4", (other,))
    gate.end_step([("2", (router, cat1, cat2)), ("3", (cat1,))], {"1"})
    assert gate.in_use == 3
