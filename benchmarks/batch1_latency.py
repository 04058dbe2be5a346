"""Per-token latency of one request at a time, steered vs unsteered, interleaved and repeated.

Single sweeps on a shared machine confound steering cost with the machine's drift (this 2-core VM drifts
by ±25 % within minutes). Here every repetition runs every setting back to back in one engine — the
unsteered request first — so each steered number has an unsteered neighbour taken seconds before it;
the report gives per setting the median over repetitions of ms/token and of the ratio to that neighbour.

    .venv/bin/python benchmarks/batch1_latency.py [--reps 5] [--max-tokens 64] [--compiled]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_SETTINGS = {
    "unsteered": None,
    "selective": {"steer_profile": "smollm2-selective", "steer_angle": 180.0},
    "refusal-add": {"steer_profile": "smollm2-refusal-add", "steer_scale": 0.25},
    "category": {"steer_profile": "smollm2-category", "steer_scale": -2.0, "steer_categories": ["generic"]},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF model directory (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--profiles", default=str(REPO / "profiles"))
    ap.add_argument("--settings", default=None, help='JSON {"name": vllm_xargs | null}; the first must be unsteered')
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--compiled", action="store_true", help="torch.compile (vLLM's default) instead of eager")
    ap.add_argument("--out", default=str(HERE / "results" / "batch1_latency_cpu.json"))
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from vllm import LLM, SamplingParams

    from vllm_steer.default_model import ensure_default_model

    settings = json.loads(args.settings) if args.settings else DEFAULT_SETTINGS
    names = list(settings)
    if settings[names[0]] is not None:
        sys.exit("--settings: the first setting must be unsteered (null)")
    model = args.model or str(ensure_default_model())
    llm = LLM(
        model=model,
        dtype="float32",
        enforce_eager=not args.compiled,
        max_model_len=512,
        max_num_seqs=8,
        seed=0,
        additional_config={"vllm_steer": {"profiles": args.profiles}},
    )
    prompt = "Write a long story about a ship that sails north."
    llm.generate([prompt], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    ms: dict[str, list[float]] = {n: [] for n in names}
    ratio: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(args.reps):
        for name in names:
            params = SamplingParams(
                max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True, extra_args=settings[name]
            )
            start = time.perf_counter()
            llm.generate([prompt], params, use_tqdm=False)
            ms[name].append((time.perf_counter() - start) / args.max_tokens * 1e3)
            ratio[name].append(ms[name][-1] / ms[names[0]][-1])
        print(
            f"rep {rep + 1}/{args.reps}: " + ", ".join(f"{n} {ms[n][-1]:.1f}" for n in names) + " ms/token", flush=True
        )

    rows = [
        {
            "setting": n,
            "ms_per_token_median": statistics.median(ms[n]),
            "ms_per_token_min": min(ms[n]),
            "ms_per_token_max": max(ms[n]),
            "ratio_to_unsteered_median": statistics.median(ratio[n]),
            "ratio_min": min(ratio[n]),
            "ratio_max": max(ratio[n]),
        }
        for n in names
    ]
    meta = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "model": Path(model).name,
        "mode": "compiled" if args.compiled else "eager",
        "reps": args.reps,
        "max_tokens": args.max_tokens,
        "command": "python benchmarks/batch1_latency.py " + " ".join(sys.argv[1:]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows, "samples_ms": ms}, indent=2))
    lines = [
        (
            f"{meta['machine']}; {meta['model']}; {meta['mode']}; {args.reps} interleaved repetitions of "
            f"{args.max_tokens} tokens. Command: `{meta['command']}`"
        ),
        "",
        "| setting | ms/token median (min–max) | ratio to its repetition's unsteered run: median (min–max) |",
        "|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['ms_per_token_median']:.1f} ({r['ms_per_token_min']:.1f}–{r['ms_per_token_max']:.1f}) | "
            f"{r['ratio_to_unsteered_median']:.3f} ({r['ratio_min']:.3f}–{r['ratio_max']:.3f}) |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
