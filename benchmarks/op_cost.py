"""Cost of the batched steering op vs the number of distinct profiles K in the batch.

Side by side in one run, on the machine at hand: for N tokens of width d, the time
of ``token_deltas`` with every token steered by one of K distinct slots, as a ratio
to (a) K = 1 (is the op flat in K?) and (b) one ``d×d`` linear layer on the same
tokens (a yardstick for a decoder layer, which has ~12 such matmuls). Also the
per-setting loop the HF-hooks path needs (one op call per distinct setting on its
rows), the "usual way" done at op level.

    .venv/bin/python benchmarks/op_cost.py [--device cuda] [--out benchmarks/results/op_cost_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from vllm_steer.ops import Method, token_deltas


def _time(fn, device: str, reps: int) -> float:
    for _ in range(3):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, nargs="+", default=[32, 512])
    ap.add_argument("--hidden", type=int, nargs="+", default=[576, 2048])
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default="benchmarks/results/op_cost_cpu.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(torch.get_num_threads())
    dev = args.device
    rows = []
    for d in args.hidden:
        for n in args.tokens:
            h = torch.randn(n, d, device=dev)
            q, _ = torch.linalg.qr(torch.randn(d, 2 * args.slots, device=dev))
            bases = q.T.reshape(args.slots, 2, d).contiguous()
            methods = torch.full((args.slots,), int(Method.ROTATE), dtype=torch.int64, device=dev)
            zeros = torch.zeros(args.slots, device=dev)
            weight = torch.randn(d, d, device=dev) / d**0.5
            linear = _time(lambda: h @ weight, dev, args.reps)
            cos = torch.full((n,), 0.5, device=dev)
            sin = torch.full((n,), 0.866, device=dev)
            scale = torch.zeros(n, device=dev)
            base = None
            for k in sorted({min(k, args.slots, n) for k in (1, 8, 32, 64)}):
                slot = (torch.arange(n, device=dev) % k).to(torch.int64)
                t = _time(lambda: token_deltas(h, bases, methods, zeros, zeros, slot, cos, sin, scale), dev, args.reps)
                # The hook way: one call per distinct setting, each on its own rows.
                groups = [torch.nonzero(slot == i).squeeze(1) for i in range(k)]

                def per_setting():
                    out = torch.zeros_like(h)
                    for i, idx in enumerate(groups):
                        sub = h[idx]
                        one = torch.zeros(len(idx), dtype=torch.int64, device=dev)
                        out[idx] = token_deltas(sub, bases[i : i + 1], methods[i : i + 1], zeros[:1], zeros[:1], one, cos[idx], sin[idx], scale[idx])
                    return out

                loop = _time(per_setting, dev, max(5, args.reps // 5))
                base = base or t
                rows.append({"hidden": d, "tokens": n, "K": k, "op_ms": t * 1e3, "vs_K1": t / base,
                             "vs_linear": t / linear, "linear_ms": linear * 1e3, "per_setting_loop_ms": loop * 1e3,
                             "loop_vs_batched": loop / t})
    meta = {"device": dev if dev != "cpu" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "torch": torch.__version__, "slots": args.slots, "command": "python benchmarks/op_cost.py " + " ".join(
                f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items())}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"| d | tokens | K | op ms | vs K=1 | vs one d×d linear | per-setting loop ms | loop / batched |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['hidden']} | {r['tokens']} | {r['K']} | {r['op_ms']:.3f} | {r['vs_K1']:.2f} | {r['vs_linear']:.2f} | "
              f"{r['per_setting_loop_ms']:.3f} | {r['loop_vs_batched']:.1f} |")
    print(meta)


if __name__ == "__main__":
    main()
