"""The steering op and runtime on a CUDA device, replayed from CUDA graphs as vLLM decodes.

Skipped without a GPU (CI has none); the GPU box runs it with ``benchmarks/gpu_check.sh``. What only a
GPU can show:

* a graph captured once serves any later mix of slots, methods, angles and unsteered rows, because the
  op reads every per-step value from static buffers filled in place (the LoRA pattern), and its
  replay equals the eager op and the reference formulas;
* the runtime's custom op, captured alone and inside ``torch.compile`` (vLLM's configuration), follows
  ``begin_step`` across steps, and rows left unsteered are bit-identical to a step that steers nothing;
* the per-step token map is copied host → device without blocking, so a step prepared while the GPU is
  still busy must not overwrite the pinned buffers the previous step's copy has yet to read.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from support.ops import random_tables, reference_row
from support.runtime import MIXED, PROFILES, steer
from vllm_steer.core.ops import Method, single_method_deltas, token_deltas
from vllm_steer.core.profile import METHOD_HOOKS
from vllm_steer.engine.kernels import token_deltas_triton
from vllm_steer.engine.runtime import SteeringRuntime, set_runtime, sites_for_profiles
from vllm_steer.testing.hf_reference import reference_op

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_check.sh)")

CUDA = "cuda"


def _capture(fn):
    """Warm ``fn`` up on a side stream, then capture one call in a CUDA graph (as vLLM does).

    Returns the graph and the static output tensor its replays overwrite."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


# ------------------------------------------------------------------- the op


def _kernel_check():
    """tests/gpu/kernel_check.py, loaded by path (it is a script beside this file, not a package module)."""
    spec = importlib.util.spec_from_file_location("kernel_check", Path(__file__).with_name("kernel_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_triton_kernel_equals_the_torch_op():
    check = _kernel_check().check

    assert check(CUDA, dims=(16, 100, 2048, 4096), sizes=(1, 37, 512)) == 108


@pytest.mark.parametrize("op", [token_deltas, token_deltas_triton], ids=["torch-op", "triton-op"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_captured_graph_serves_any_mix(dtype, op):
    d, n, n_slots = 256, 48, 6
    gen = torch.Generator().manual_seed(0)
    tables = random_tables(d, n, n_slots, gen, dtype=torch.float32)
    static = [t.to(CUDA) for t in (tables[0], tables[1], tables[2], tables[3], tables[4], *tables[6:])]
    h = torch.zeros(n, d, device=CUDA, dtype=dtype)
    graph, out = _capture(lambda: op(h, *static))
    kinds_seen: set[int] = set()
    for seed in range(1, 9):  # new mixes, written into the captured buffers in place
        gen = torch.Generator().manual_seed(seed)
        bases, methods, gains, thresholds, token_slot, theta, c, s, scale = random_tables(
            d, n, n_slots, gen, dtype=torch.float32
        )
        h_cpu = torch.randn(n, d, generator=gen, dtype=torch.float64) * 3
        for dst, src in zip(static, (bases, methods, gains, thresholds, token_slot, c, s, scale), strict=True):
            dst.copy_(src)
        h.copy_(h_cpu)
        graph.replay()
        torch.cuda.synchronize()
        got = out.clone()
        eager = op(h, *static)  # the same op, not captured
        torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
        h_used = h.double().cpu()  # what the op saw (rounded to dtype)
        tol = 2e-4 if dtype == torch.float32 else 6e-2
        for i in range(n):
            slot = int(token_slot[i])
            method = Method(int(methods[slot])) if slot >= 0 else Method.NONE
            if (
                method == Method.ANGULAR_ADAPTIVE
                and abs(float(h_used[i] @ bases[slot, 0].double()) - float(thresholds[slot])) < 1e-3
            ):
                continue  # on the gate's edge round-off may decide either way
            kinds_seen.add(int(method))
            b1, b2 = bases[slot].double() if slot >= 0 else (None, None)
            ref = reference_row(
                h_used[i],
                method,
                b1,
                b2,
                float(gains[slot]) if slot >= 0 else 0.0,
                float(thresholds[slot]) if slot >= 0 else 0.0,
                float(theta[i]),
                float(scale[i]),
            )
            if method == Method.NONE:
                assert torch.equal(got[i], torch.zeros_like(got[i])), f"row {i} unsteered but changed"
                assert torch.equal(h[i] + got[i], h[i])
            else:
                torch.testing.assert_close(
                    got[i].double().cpu(),
                    ref - h_used[i],
                    rtol=tol,
                    atol=tol * (1 + h_used[i].abs().max().item()),
                    msg=f"row {i}, {method.name}, mix {seed}",
                )
    assert kinds_seen == {int(m) for m in Method}, "every method must have been replayed"


@pytest.mark.parametrize("method", [m for m in Method if m != Method.NONE], ids=lambda m: m.name)
def test_short_paths_on_cuda_equal_the_general_op(method):
    gen = torch.Generator().manual_seed(int(method))
    d, n, n_slots = 512, 64, 4
    methods = torch.tensor([int(method), int(Method.NONE), int(method), int(method)])
    bases, methods, gains, thresholds, token_slot, _, c, s, scale = random_tables(
        d, n, n_slots, gen, torch.float32, methods
    )
    bases[1].zero_()  # a NONE slot is loaded all-zero, as the runtime does
    gains[1] = thresholds[1] = 0.0
    h = (torch.randn(n, d, generator=gen) * 3).to(CUDA, torch.bfloat16)
    cuda = [t.to(CUDA) for t in (bases, methods, gains, thresholds, token_slot, c, s, scale)]
    general = token_deltas(h, *cuda)
    short = single_method_deltas(method, h, cuda[0], *cuda[2:])
    torch.testing.assert_close(short.float(), general.float(), rtol=2e-2, atol=2e-2)
    untouched = (token_slot < 0) | (token_slot == 1)
    assert torch.equal(short[untouched.to(CUDA)], torch.zeros_like(short[untouched.to(CUDA)]))


# -------------------------------------------------------------- the runtime

TOKENS = 40  # the captured batch (vLLM pads a decode batch up to a captured size)
STEPS = [
    # (request → rows this step), unsteered and padding rows included; each step a different mix.
    {"plain": 3, "r-add": 2, "r-ss": 4, "r-sas": 3, "r-abl": 5, None: 2, "r-aas": 6, "plain2": 4, "r-cat": 3},
    {"r-ss": 1, "r-ss2": 1, "r-ssb": 1, "plain": 1, "r-probe": 1, "r-add": 1},
    {"plain": 7, "plain2": 5},  # nothing steered: the same graph, all rows + 0
    {"r-abl": TOKENS},
    {"r-aas": 10, "r-aas2": 10, "plain": 10, "r-cat2": 10},
]


def _layers():
    gen = torch.Generator().manual_seed(7)
    n_layers = max(layer for p in PROFILES.values() for layer in p.spec.layers) + 1
    d = next(iter(PROFILES.values())).spec.model.hidden_size
    return [torch.randn(d, d, generator=gen) / math.sqrt(d) for _ in range(n_layers)]


def _toy_forward(h, weights, sites, site_op):
    """Each layer: a matmul and tanh, then every hook site of that layer (``h + op(h, site)``)."""
    for layer, w in enumerate(weights):
        h = torch.tanh(h @ w) * 3
        for i, site in enumerate(sites):
            if site.layer == layer:
                h = h + site_op(h, i, site)
    return h


def _reference_forward(h, weights, sites, rows, resolved):
    """The same network with the plain reference op applied to each request's own rows."""

    def site_op(x, _i, site):
        delta = torch.zeros_like(x)
        start = 0
        for rid, count in rows:
            r = resolved.get(rid)
            profile = PROFILES[r.profile_id] if r else None
            if profile and site.layer in profile.spec.layers and site.kind in METHOD_HOOKS[profile.method]:
                part = x[start : start + count]
                delta[start : start + count] = reference_op(profile, r, site.layer)(part) - part
            start += count
        return delta

    return _toy_forward(h, weights, sites, site_op)


@pytest.mark.parametrize("fused", ["auto", "compiled", "off"])
@pytest.mark.parametrize("compiled", [False, True], ids=["graph", "compile+graph"])
def test_runtime_custom_op_replayed_across_steps(compiled, fused):
    sites = sites_for_profiles(PROFILES)
    rt = SteeringRuntime(
        PROFILES,
        sites,
        hidden_size=next(iter(PROFILES.values())).spec.model.hidden_size,
        max_slots=8,
        max_tokens=64,
        device=CUDA,
        fused=fused,
    )
    assert rt.fused == {"auto": "triton", "compiled": "compiled", "off": None}[fused]  # Triton: the CUDA default
    requests = {
        **MIXED,
        "r-aas2": dict(profile="aas", angle=200.0),
        "r-cat2": dict(profile="cat", categories=["malware"]),
    }
    resolved = {rid: steer(**kw) for rid, kw in requests.items()}
    weights_cpu = _layers()
    weights = [w.to(CUDA) for w in weights_cpu]

    def forward(x):
        return _toy_forward(x, weights, sites, lambda y, i, _site: torch.ops.vllm_steer.delta(y, i))

    fn = torch.compile(forward, fullgraph=True, dynamic=False) if compiled else forward
    d = rt.hidden_size
    h = torch.zeros(TOKENS, d, device=CUDA)
    set_runtime(rt)
    try:
        rt.begin_step([], [])
        graph, out = _capture(lambda: fn(h))
        # The warm-up steered nothing and still compiled the fused op, so the graph holds the fused op.
        assert bool(rt.fused_kinds) is (fused != "off") and rt.fused_fallbacks == 0
        gen = torch.Generator().manual_seed(11)
        for step, plan in enumerate(STEPS):
            for rid in [r for r in resolved if rt.is_bound(r) and r not in plan]:
                rt.remove_request(rid)  # finished requests give their slots back, as in the engine
            for rid in plan:
                if rid in resolved and not rt.is_bound(rid):
                    rt.add_request(rid, resolved[rid])
            rows = list(plan.items())
            rt.begin_step([rid for rid, _ in rows], [count for _, count in rows])
            filled = sum(count for _, count in rows)
            h_cpu = torch.randn(TOKENS, d, generator=gen)
            h.copy_(h_cpu)
            graph.replay()
            steered_out = out.clone()
            # The same inputs with nothing steered: the graph's own baseline.
            rt.begin_step([None], [filled])
            graph.replay()
            plain_out = out.clone()
            rt.begin_step([rid for rid, _ in rows], [count for _, count in rows])
            eager_out = forward(h)  # not capturing: the runtime's per-step short paths
            torch.cuda.synchronize()

            expected = _reference_forward(h_cpu, weights_cpu, sites, [*rows, (None, TOKENS - filled)], resolved)
            torch.testing.assert_close(
                steered_out.cpu(), expected, rtol=1e-4, atol=1e-4, msg=f"step {step}: graph vs reference"
            )
            torch.testing.assert_close(steered_out, eager_out, rtol=1e-5, atol=1e-5, msg=f"step {step}: graph vs eager")
            start = 0
            for rid, count in [*rows, (None, TOKENS - filled)]:
                if rid not in resolved:  # unsteered and padding rows: the bits of a step that steers nothing
                    assert torch.equal(steered_out[start : start + count], plain_out[start : start + count]), (
                        f"step {step}, {rid}"
                    )
                start += count
            changed = ~(steered_out == plain_out).all(dim=1)
            assert bool(changed[:filled].any()) == any(rid in resolved for rid in plan), (
                f"step {step}: steering had no effect"
            )
    finally:
        set_runtime(None)


def test_a_capture_before_any_eager_step_captures_the_eager_op_and_never_compiles_inside_it():
    rt = SteeringRuntime(
        PROFILES, sites_for_profiles(PROFILES), hidden_size=16, max_slots=4, max_tokens=64, device=CUDA
    )
    rt.add_request("a", steer(profile="ss", angle=100.0))
    site = rt.site_ids[sites_for_profiles({"ss": PROFILES["ss"]})[0]]
    h = torch.randn(8, 16, device=CUDA) * 3
    rt.begin_step(["a"], [8])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # no warm-up: the fused op was never compiled
        out = rt.delta(h, site)
    assert rt.fused_kinds == frozenset() and rt.fused_fallbacks == 1
    graph.replay()
    expected = rt.delta(h, site)  # outside the capture: compiles the fused op
    assert len(rt.fused_kinds) == 1
    torch.cuda.synchronize()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert bool((out.abs().sum(dim=1) > 0).all())


def _race(rt, guard: bool):
    """Prepare two steps back to back while the GPU is busy; return the first step's correction."""
    site = rt.site_ids[sites_for_profiles({"ss": PROFILES["ss"]})[0]]
    h = torch.randn(32, rt.hidden_size, device=CUDA, generator=torch.Generator(CUDA).manual_seed(3)) * 3
    rt.begin_step(["a"], [32])
    alone = rt.delta(h, site)  # the first step's correction, nothing else queued
    torch.cuda.synchronize()
    if not guard:
        rt._staging_copied = None
    torch.cuda._sleep(200_000_000)  # keep the GPU busy well past the host's next begin_step
    rt.begin_step(["a"], [32])
    first = rt.delta(h, site)
    rt.begin_step(["b"], [32])
    rt.delta(h, site)
    torch.cuda.synchronize()
    return first, alone


def test_a_step_prepared_while_the_gpu_is_busy_does_not_overwrite_the_last_steps_map():
    rt = SteeringRuntime(
        PROFILES, sites_for_profiles(PROFILES), hidden_size=16, max_slots=4, max_tokens=64, device=CUDA
    )
    rt.add_request("a", steer(profile="ss", angle=100.0))
    rt.add_request("b", steer(profile="ss", angle=300.0))  # same slot, another angle: only the per-token map differs
    first, alone = _race(rt, guard=True)
    torch.testing.assert_close(first, alone, rtol=0, atol=0)


def test_without_the_staging_guard_the_race_is_real():
    """Shows the test above can fail: without the event, the first step runs with the second step's angles."""
    rt = SteeringRuntime(
        PROFILES, sites_for_profiles(PROFILES), hidden_size=16, max_slots=4, max_tokens=64, device=CUDA
    )
    rt.add_request("a", steer(profile="ss", angle=100.0))
    rt.add_request("b", steer(profile="ss", angle=300.0))
    first, alone = _race(rt, guard=False)
    assert not torch.allclose(first, alone), "the unguarded copy read the next step's map"
