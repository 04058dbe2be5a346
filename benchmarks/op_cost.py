"""Cost of the batched steering op: flat in K, near its floor, small against a decoder layer.

Side by side in one run, on the machine at hand, for N tokens of width d with every token steered by
one of K distinct slots (Selective Steering rotation — the op's full path; 64 slots allocated):

* ``token_deltas`` (what the engine runs at a hook site; the caller then adds the delta to the
  residual) — as a ratio to K = 1: is the op flat in the number of distinct profiles?
* the **physical floor**: one read and one write of the residual (``out.copy_(h)``, N×d elements), the
  least any op that changes every row must move. ``op / floor`` says how close the op is to it.
* **one decoder layer** of the same width, Llama-shaped (RMSNorm, q/k/v/o with head dim 64, causal
  SDPA over the N tokens as one sequence, RMSNorm, SwiGLU MLP with intermediate 8/3·d): what a step
  spends per layer anyway. ``op / layer`` is the op's share of a steered layer.
* with ``--fused``, the same op fused: compiled by ``torch.compile`` (Inductor fuses its ~50
  element-wise and gather kernels into a few) and, where Triton and CUDA are there, the one-kernel
  Triton op (:mod:`vllm_steer.engine.kernels`) the runtime uses on CUDA.
* the **hook way** at op level: one op call per distinct setting on that setting's rows (what forward
  hooks applying one setting per batch amount to), and ``loop / batched``.

On CUDA, ``--cuda-graphs`` captures each timed callable in a CUDA graph and times replays, as vLLM's
decode does (the op's shapes are static, so it captures); eager launches are timed otherwise. The
device, dtype and graph mode are recorded with every row.

    .venv/bin/python benchmarks/op_cost.py                                  # CPU, fp32, d = 576 and 2048
    python benchmarks/op_cost.py --device cuda --cuda-graphs --dtype bfloat16 --hidden 2048 4096 \\
        --tokens 32 512 4096 --out benchmarks/results/op_cost_cuda.json        # a GPU box (torch only)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs from a bare checkout (no install) too
from vllm_steer.core.ops import Method, token_deltas
from vllm_steer.engine import kernels

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def replayer(fn: Callable[[], object], graphs: bool) -> Callable[[], object]:
    """``fn`` itself, or (``graphs``) the replay of one CUDA graph captured from it after a warm-up on a
    side stream, as vLLM captures a decode batch."""
    if not graphs:
        return fn
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up allocator and kernels (and any compile) before capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def seconds_per_call(run: Callable[[], object], reps: int, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        run()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def _timer(fn: Callable[[], object], device: str, reps: int, graphs: bool) -> float:
    """Seconds per call: eager calls, or replays of one captured CUDA graph (after 3 untimed runs)."""
    run = replayer(fn, graphs)
    for _ in range(3):
        run()
    return seconds_per_call(run, reps, device)


class DecoderLayer(torch.nn.Module):
    """A Llama-shaped decoder layer (no KV cache): the yardstick for what a step already spends."""

    def __init__(self, d: int):
        super().__init__()
        self.heads = max(1, d // 64)
        self.head_dim = d // self.heads
        inter = round(8 * d / 3 / 64) * 64 or 64
        self.norm1, self.norm2 = torch.nn.RMSNorm(d), torch.nn.RMSNorm(d)
        self.qkv = torch.nn.Linear(d, 3 * d, bias=False)
        self.o = torch.nn.Linear(d, d, bias=False)
        self.gate_up = torch.nn.Linear(d, 2 * inter, bias=False)
        self.down = torch.nn.Linear(inter, d, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        n, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(n, 3, self.heads, self.head_dim).permute(1, 2, 0, 3)
        attn = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.o(attn.permute(1, 0, 2).reshape(n, d))
        gate, up = self.gate_up(self.norm2(h)).chunk(2, dim=-1)
        return h + self.down(torch.nn.functional.silu(gate) * up)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument(
        "--dtype", default="float32", choices=sorted(DTYPES), help="activation dtype (the op computes in fp32)"
    )
    ap.add_argument("--cuda-graphs", action="store_true", help="time CUDA-graph replays (cuda only), as vLLM decodes")
    ap.add_argument("--tokens", type=int, nargs="+", default=[32, 512])
    ap.add_argument("--hidden", type=int, nargs="+", default=[576, 2048])
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 8, 32, 64], help="distinct settings per batch")
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument(
        "--fused", action="store_true", help="also time the fused ops: torch.compile'd, and the Triton kernel on CUDA"
    )
    ap.add_argument("--out", default="benchmarks/results/op_cost_cpu.json")
    args = ap.parse_args()
    if args.cuda_graphs and args.device != "cuda":
        ap.error("--cuda-graphs needs --device cuda")
    torch.manual_seed(0)
    dev, dtype, graphs = args.device, DTYPES[args.dtype], args.cuda_graphs
    rows = []
    fused_ops = {}
    if args.fused:
        fused_ops["compiled"] = torch.compile(token_deltas, dynamic=False, fullgraph=True)
        if dev == "cuda" and kernels.available():
            fused_ops["triton"] = kernels.token_deltas_triton
    with torch.inference_mode():
        for d in args.hidden:
            layer = DecoderLayer(d).to(dev, dtype)
            q, _ = torch.linalg.qr(torch.randn(d, 2 * args.slots, device=dev))
            bases = q.T.reshape(args.slots, 2, d).contiguous()
            methods = torch.full((args.slots,), int(Method.ROTATE), dtype=torch.int64, device=dev)
            zeros = torch.zeros(args.slots, device=dev)
            for n in args.tokens:
                h = torch.randn(n, d, device=dev, dtype=dtype)
                out = torch.empty_like(h)
                floor = _timer(lambda: out.copy_(h), dev, args.reps, graphs)
                layer_s = _timer(lambda: layer(h), dev, max(5, args.reps // 2), graphs)
                cos = torch.full((n,), 0.5, device=dev)
                sin = torch.full((n,), 0.866, device=dev)
                scale = torch.zeros(n, device=dev)
                base = None
                for k in sorted({min(k, args.slots, n) for k in args.ks}):
                    slot = (torch.arange(n, device=dev) % k).to(torch.int64)
                    t = _timer(
                        lambda: token_deltas(h, bases, methods, zeros, zeros, slot, cos, sin, scale),
                        dev,
                        args.reps,
                        graphs,
                    )
                    # The hook way: one call per distinct setting, each on its own rows.
                    groups = [torch.nonzero(slot == i).squeeze(1) for i in range(k)]
                    ones = [torch.zeros(len(idx), dtype=torch.int64, device=dev) for idx in groups]

                    def per_setting():
                        acc = torch.zeros_like(h)
                        for i, idx in enumerate(groups):
                            acc[idx] = token_deltas(
                                h[idx],
                                bases[i : i + 1],
                                methods[i : i + 1],
                                zeros[:1],
                                zeros[:1],
                                ones[i],
                                cos[idx],
                                sin[idx],
                                scale[idx],
                            )
                        return acc

                    loop = _timer(per_setting, dev, max(5, args.reps // 5), graphs)
                    base = base or t
                    fused = {}
                    for name, op in fused_ops.items():
                        f = _timer(
                            lambda: op(h, bases, methods, zeros, zeros, slot, cos, sin, scale), dev, args.reps, graphs
                        )
                        fused |= {f"{name}_ms": f * 1e3, f"{name}_vs_floor": f / floor, f"{name}_vs_layer": f / layer_s}
                    rows.append(
                        {
                            **fused,
                            "hidden": d,
                            "tokens": n,
                            "K": k,
                            "op_ms": t * 1e3,
                            "vs_K1": t / base,
                            "floor_ms": floor * 1e3,
                            "vs_floor": t / floor,
                            "layer_ms": layer_s * 1e3,
                            "vs_layer": t / layer_s,
                            "per_setting_loop_ms": loop * 1e3,
                            "loop_vs_batched": loop / t,
                        }
                    )
    if dev == "cuda":
        device = torch.cuda.get_device_name()
    else:
        device = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    meta = {
        "device": device,
        "dtype": args.dtype,
        "cuda_graphs": graphs,
        "fused": sorted(fused_ops),
        "torch": torch.__version__,
        "slots": args.slots,
        "command": "python benchmarks/op_cost.py " + " ".join(sys.argv[1:]),
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"{meta['device']}, {args.dtype}, {'CUDA graphs' if graphs else 'eager launches'}")
    fused_head = "".join(f" {name} ms | {name} / floor | {name} / layer |" for name in fused_ops)
    print(
        "| d | tokens | K | op ms | vs K=1 | floor ms | op / floor | layer ms | op / layer | per-setting loop ms | "
        "loop / batched |" + fused_head
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * fused_head.count("|"))
    for r in rows:
        fused_cells = "".join(
            f" {r[f'{name}_ms']:.4f} | {r[f'{name}_vs_floor']:.1f} | {r[f'{name}_vs_layer']:.3f} |"
            for name in fused_ops
        )
        print(
            f"| {r['hidden']} | {r['tokens']} | {r['K']} | {r['op_ms']:.3f} | {r['vs_K1']:.2f} | {r['floor_ms']:.4f} | "
            f"{r['vs_floor']:.1f} | {r['layer_ms']:.3f} | {r['vs_layer']:.3f} | {r['per_setting_loop_ms']:.3f} | "
            f"{r['loop_vs_batched']:.1f} |" + fused_cells
        )
    print(meta)


if __name__ == "__main__":
    main()
