"""A steered decode step against a plain one, on a stack of decoder layers replayed from CUDA graphs.

The GPU box has PyTorch but no vLLM, so this runs what the plugin adds to a vLLM step without vLLM:
the real :class:`~vllm_steer.engine.runtime.SteeringRuntime` and its custom op ``torch.ops.vllm_steer.delta``,
called at every hooked site of a Llama-shaped stack (``op_cost.DecoderLayer``: norms, q/k/v/o, causal
attention over the batch, SwiGLU MLP), captured in one CUDA graph as vLLM captures a decode batch. What
it cannot show is a KV cache: real decode attention reads one, so a real step costs more than this
one and the ratios here are a pessimistic bound on the plugin's share.

Scenarios, each a throughput ratio to the plugin-off graph replayed in the same repetition
(interleaved, median over repetitions):

* ``plugin-idle`` — profiles loaded, nothing steered. Inside a graph the op runs at every hooked site
  whatever the mix (the graph must serve any mix), so idle costs what steering costs;
* ``all:selective`` (the middle ~56 % of layers, two sites each), ``all:ablation`` (three sites in
  every layer), ``mixed:8`` (eight settings of every method, a quarter of the rows unsteered).

Each for the general op as the runtime can run it in a graph: ``triton`` (one kernel per site, the
CUDA default), ``compiled`` (torch.compile), ``off`` (the eager op: ~50 small kernels per site).

    python benchmarks/step_overhead.py --device cuda --dtype bfloat16        # a GPU box (torch only)
    .venv/bin/python benchmarks/step_overhead.py --smoke                      # CPU, minimal (smoke test)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # runs from a bare checkout (no install) too
sys.path.insert(0, str(HERE))
from op_cost import DTYPES, DecoderLayer, replayer, seconds_per_call  # noqa: E402
from vllm_steer.core.profile import ModelFingerprint  # noqa: E402
from vllm_steer.core.request import parse_steering, resolve_steering  # noqa: E402
from vllm_steer.engine.runtime import SteeringRuntime, set_runtime, sites_for_profiles  # noqa: E402
from vllm_steer.testing.synthetic import random_profile  # noqa: E402

SCENARIOS = {
    "all": ("plugin-idle", "all:selective", "all:ablation", "mixed:8"),
    "selective": ("plugin-idle", "all:selective", "mixed:8-selective"),
}
"""Per ``--hooks``: a server started with seven profiles of every method (their sites' union is hooked),
or with the one Selective Steering profile (two sites on each of its layers)."""


def _profiles(d: int, n_layers: int, hooks: str) -> dict:
    fp = ModelFingerprint(architecture="LlamaForCausalLM", hidden_size=d, num_layers=n_layers)
    mid = list(range(n_layers // 4, n_layers // 4 + max(1, (9 * n_layers) // 16)))
    one = [n_layers // 2]
    spec = {
        "sel": ("selective", mid),
        "abl": ("ablation", list(range(n_layers))),
        "sas": ("angular_standard", mid),
        "aas": ("angular_adaptive", mid),
        "add": ("addition", one),
        "probe": ("probe", one),
        "cat": ("category", one),
    }
    return {
        pid: random_profile(pid, method, fp, layers, seed=i, **({"categories": ("a", "b")} if pid == "cat" else {}))
        for i, (pid, (method, layers)) in enumerate(spec.items())
        if hooks == "all" or pid == "sel"
    }


def _plan(name: str, n: int) -> list[tuple[str | None, dict | None]]:
    """One request per token (a decode batch): (request id, its steering)."""
    if name == "plugin-idle":
        return [(f"r{i}", None) for i in range(n)]
    if name == "all:selective":
        return [(f"r{i}", {"profile": "sel", "angle": 120.0}) for i in range(n)]
    if name == "all:ablation":
        return [(f"r{i}", {"profile": "abl"}) for i in range(n)]
    if name == "mixed:8-selective":  # eight angles = eight slots on the same sites, a quarter unsteered
        return [
            (f"r{i}", {"profile": "sel", "angle": 100.0 + 20.0 * (i % 8)} if i < (3 * n) // 4 else None)
            for i in range(n)
        ]
    settings = [
        {"profile": "sel", "angle": 120.0},
        {"profile": "sel", "angle": 200.0},
        {"profile": "abl"},
        {"profile": "sas", "angle": 90.0},
        {"profile": "aas", "angle": 120.0},
        {"profile": "add", "scale": 4.0},
        {"profile": "probe", "scale": -2.0},
        {"profile": "cat", "categories": ["a"], "scale": 2.0},
    ]
    steered = (3 * n) // 4
    return [(f"r{i}", settings[i % 8] if i < steered else None) for i in range(n)]


def measure(d: int, n_layers: int, n_tokens: int, args) -> list[dict]:
    dev, dtype, graphs = args.device, DTYPES[args.dtype], args.device == "cuda" and not args.no_graphs
    torch.manual_seed(0)
    with torch.device(dev):  # built on the device: initializing billions of weights on the host takes minutes
        layers = [DecoderLayer(d).to(dtype) for _ in range(n_layers)]
    profiles = _profiles(d, n_layers, args.hooks)
    scenarios = SCENARIOS[args.hooks]
    sites = sites_for_profiles(profiles)  # a server started with these profiles hooks exactly these
    by_layer = [[i for i, s in enumerate(sites) if s.layer == layer] for layer in range(n_layers)]
    h = torch.randn(n_tokens, d, device=dev, dtype=dtype)

    def forward(plugin: bool):
        x = h
        for layer, block in enumerate(layers):
            if plugin:
                for site in by_layer[layer]:
                    x = x + torch.ops.vllm_steer.delta(x, site)
            x = block(x)
        return x

    # As vLLM runs a model: compiled by torch.compile (the custom op stays opaque), or eager.
    plain_fn, steered_fn = (lambda: forward(False)), (lambda: forward(True))
    if args.compile:
        plain_fn, steered_fn = torch.compile(plain_fn, fullgraph=True), torch.compile(steered_fn, fullgraph=True)
    rows = []
    with torch.inference_mode():
        plain = replayer(plain_fn, graphs)
        for op in args.ops:
            runtime = SteeringRuntime(
                profiles, sites, hidden_size=d, max_slots=16, max_tokens=max(n_tokens, 4), device=dev, fused=op
            )
            set_runtime(runtime)
            try:
                runtime.begin_step([], [])
                steered = replayer(steered_fn, graphs)  # captured once, serves every scenario
                # Sites where the capture found the fused op not compiled and captured the eager op (should be 0).
                fallbacks = runtime.fused_fallbacks
                ratios: dict[str, list[float]] = {name: [] for name in scenarios}
                for rep in range(args.reps):
                    for name in scenarios:
                        plan = _plan(name, n_tokens)
                        for rid, kw in plan:
                            steering = None
                            if kw is not None:
                                steering = resolve_steering(
                                    parse_steering({f"steer_{k}": v for k, v in kw.items()}), profiles
                                )
                            runtime.add_request(rid, steering)
                        runtime.begin_step([rid for rid, _ in plan], [1] * len(plan))
                        order = (plain, steered) if rep % 2 == 0 else (steered, plain)
                        times = {id(run): seconds_per_call(run, args.iters, dev) for run in order}
                        ratios[name].append(times[id(plain)] / times[id(steered)])
                        for rid, _ in plan:
                            runtime.remove_request(rid)
                plain_ms = seconds_per_call(plain, args.iters, dev) * 1e3
                for name in scenarios:
                    rows.append(
                        {
                            "hidden": d,
                            "layers": n_layers,
                            "tokens": n_tokens,
                            "op": op,
                            "scenario": name,
                            "sites_hooked": len(sites),
                            "fused_fallbacks": fallbacks,
                            "ratio_median": statistics.median(ratios[name]),
                            "ratio_min": min(ratios[name]),
                            "ratio_max": max(ratios[name]),
                            "plain_step_ms": plain_ms,
                        }
                    )
            finally:
                set_runtime(None)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--no-graphs", action="store_true", help="on CUDA, time eager launches instead of graph replays")
    ap.add_argument(
        "--compile", action="store_true", help="torch.compile the stack, as vLLM does (the op stays opaque)"
    )
    ap.add_argument(
        "--hooks",
        choices=sorted(SCENARIOS),
        default="all",
        help="all: seven profiles of every method loaded; selective: the one selective profile",
    )
    ap.add_argument(
        "--models", nargs="+", default=["2048x16", "4096x32"], help="hidden x layers (Llama-3.2-1B, -8B shapes)"
    )
    ap.add_argument("--tokens", type=int, nargs="+", default=[32, 256], help="decode batch sizes")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument(
        "--ops",
        nargs="+",
        default=None,
        choices=["triton", "compiled", "off"],
        help="the general op inside the graph (default: triton compiled off on CUDA, off on CPU)",
    )
    ap.add_argument("--smoke", action="store_true", help="tiny model, one repetition (the smoke test)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.ops is None:
        args.ops = ["triton", "compiled", "off"] if args.device == "cuda" else ["off"]
    if args.smoke:
        args.models, args.tokens, args.reps, args.iters = ["64x4"], [8], 1, 1
    rows = []
    for model in args.models:
        d, n_layers = (int(x) for x in model.split("x"))
        for n in args.tokens:
            rows.extend(measure(d, n_layers, n, args))
    graphs = args.device == "cuda" and not args.no_graphs
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    meta = {
        "device": device,
        "dtype": args.dtype,
        "cuda_graphs": graphs,
        "compiled": args.compile,
        "hooks": args.hooks,
        "torch": torch.__version__,
        "command": "python benchmarks/step_overhead.py " + " ".join(sys.argv[1:]),
    }
    out = Path(args.out or f"benchmarks/results/step_overhead_{'cuda' if args.device == 'cuda' else 'cpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(
        f"{device}, {args.dtype}, {'CUDA graphs' if graphs else 'eager launches'}; steered / plain throughput, "
        f"median [min–max] of {args.reps}"
    )
    scenarios = SCENARIOS[args.hooks]
    print("| model (d × layers) | tokens | sites hooked | plain step ms | op | " + " | ".join(scenarios) + " |")
    print("|---|---|---|---|---|" + "---|" * len(scenarios))
    keyed = {(r["hidden"], r["layers"], r["tokens"], r["op"], r["scenario"]): r for r in rows}
    for key in sorted({k[:4] for k in keyed}):
        first = keyed[(*key, scenarios[0])]
        cells = " | ".join(
            f"{keyed[(*key, s)]['ratio_median']:.3f} [{keyed[(*key, s)]['ratio_min']:.2f}–"
            f"{keyed[(*key, s)]['ratio_max']:.2f}]"
            for s in scenarios
        )
        op = key[3] + (f" ({first['fused_fallbacks']} sites fell back to eager)" if first["fused_fallbacks"] else "")
        print(
            f"| {key[0]} × {key[1]} | {key[2]} | {first['sites_hooked']} | {first['plain_step_ms']:.3f} | {op} | {cells} |"
        )
    print(meta)


if __name__ == "__main__":
    main()
