"""What gates cost: the same profile with and without a gate, in one engine, batches interleaved.

The goal (issue 19): gates on every row at batch 64 within 1 % of the same profile without gates. One engine
with the plugin serves both profiles — the demo refusal vector (``smollm2-refusal-add``) and a copy of it with a
gate that fires on every prompt (so both steer the same rows the same way, and the gated one also scores every
row's last prompt token and reads its decision at every step) — and, for reference, a copy whose gate never
fires (action ``steer``: those rows run unsteered). Category routing is measured the same way: the demo category
profile with one gate per category (``steer_categories: "auto"``) against that profile with one named category.
Every repetition runs each scenario once, in rotating
order, seconds apart; the report gives per scenario the median and spread over repetitions of its throughput
ratio to the ungated profile's run of the same repetition.

    .venv/bin/python benchmarks/gate_overhead.py                  # eager, B=64, 32 tokens, 7 reps
    .venv/bin/python benchmarks/gate_overhead.py --smoke          # minimal, for the smoke test
    .venv/bin/python benchmarks/gate_overhead.py --scenarios routed:fires   # routing only (and its baseline)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BASE = "smollm2-refusal-add"
CATEGORY = "smollm2-category"
ROUTED = f"{CATEGORY}-routed-fires"
SCENARIOS = {
    "ungated": {"steer_profile": BASE},
    "gated:fires": {"steer_profile": f"{BASE}-gate-fires"},
    "gated:never": {"steer_profile": f"{BASE}-gate-never"},
    "category": {"steer_profile": CATEGORY, "steer_categories": ["Physical Harm"]},
    "routed:fires": {"steer_profile": ROUTED, "steer_categories": "auto"},
}
"""Each row's steering per scenario."""
BASELINES = {"ungated": "ungated", "gated:fires": "ungated", "gated:never": "ungated"}
BASELINES |= {"category": "category", "routed:fires": "category"}
"""The scenario each one's ratio is taken against: the gates against the same profile without them; category
routing (every row gated and steered with the vector of the category whose routing gate has the largest margin,
one routing gate per category) against the category profile steering every row with one named category."""


def write_profiles(root: Path, source: Path) -> Path:
    """The base profile and its two gated copies (a projection gate on the base vector at its own layer:
    threshold -2 always fires, +2 never does; a cosine lies in [-1, 1])."""
    from vllm_steer.core.gates import GateSpec
    from vllm_steer.core.profile import ProfileSpec, load_profile, save_profile
    from vllm_steer.testing.synthetic import with_gates

    base = load_profile(source / BASE)
    save_profile(root / BASE, base.spec, base.vectors)
    layer = base.spec.layers[0]
    direction = base.vectors[layer]["vector"]
    for suffix, threshold in (("gate-fires", -2.0), ("gate-never", 2.0)):
        gate = GateSpec(name="g", layer=layer, tensor="gate.g", score="projection", threshold=threshold)
        gated = with_gates(base, "steer", [gate], {"g": direction})
        raw = gated.spec.model_dump()
        raw["id"] = f"{BASE}-{suffix}"
        spec = ProfileSpec.model_validate(raw)
        save_profile(root / spec.id, spec, gated.vectors, gated.gate_vectors)
    # Category routing: a deciding gate that always fires (threshold -2) and one routing gate per category (its own
    # vector at the profile's first layer: the largest margin picks the row's category).
    category = load_profile(source / CATEGORY)
    save_profile(root / CATEGORY, category.spec, category.vectors)
    first = category.spec.layers[0]
    names = [c for c in category.spec.categories if c != "generic"]
    gates = [GateSpec(name="harm", layer=first, tensor="gate.harm", score="projection", threshold=-2.0)]
    gates += [
        GateSpec(name=f"c{i}", layer=first, tensor=f"gate.c{i}", score="projection", threshold=0.0, category=c)
        for i, c in enumerate(names)
    ]
    vectors = {f"c{i}": category.vectors[first][c] for i, c in enumerate(names)}
    routed = with_gates(category, "steer", gates, {"harm": category.vectors[first]["generic"], **vectors})
    raw = routed.spec.model_dump()
    raw["id"] = ROUTED
    spec = ProfileSpec.model_validate(raw)
    save_profile(root / spec.id, spec, routed.vectors, routed.gate_vectors)
    return root


def scenario_names(text: str | None) -> list[str]:
    """The scenarios to run (comma-separated; ``None``: all), each with its baseline, in :data:`SCENARIOS` order."""
    if text is None:
        return list(SCENARIOS)
    wanted = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in SCENARIOS]
    if unknown or not wanted:
        raise SystemExit(f"--scenarios: unknown {unknown or text!r} (of {', '.join(SCENARIOS)})")
    chosen = set(wanted) | {BASELINES[n] for n in wanted}
    return [n for n in SCENARIOS if n in chosen]


def run(args: argparse.Namespace) -> dict:
    from vllm import LLM, SamplingParams

    from vllm_steer.data import cycled_prompts
    from vllm_steer.default_model import ensure_default_model

    model = args.model or str(ensure_default_model())
    profiles = write_profiles(Path(tempfile.mkdtemp(prefix="gate-bench-")), REPO / "profiles")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    started = time.time()
    llm = LLM(
        model=model,
        dtype="float32",
        seed=0,
        max_num_seqs=max(args.batch, 8),
        enforce_eager=True,
        max_model_len=1024,
        # a routing row holds its own slot and one per category (12 with the unsteered default's): 16 at any batch
        additional_config={"vllm_steer": {"profiles": str(profiles), "max_slots": 16}},
    )
    startup = time.time() - started
    tok = llm.get_tokenizer()
    chats = [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in cycled_prompts("advbench", args.batch)
    ]

    def once(setting: dict) -> dict:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True, extra_args=setting)
        start = time.perf_counter()
        outs = llm.generate(chats, [params] * len(chats), use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        return {
            "seconds": seconds,
            "tokens": tokens,
            "tok_s": tokens / seconds,
            "texts": [o.outputs[0].text for o in outs],
        }

    names = scenario_names(args.scenarios)
    once(SCENARIOS[names[0]])  # warm-up
    reps = []
    for rep in range(args.reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        reps.append({name: once(SCENARIOS[name]) for name in order})
    # The gate that never fires leaves its rows unsteered: the same text in every repetition. (The one that always
    # fires differs from the ungated profile by design: under a gate, prompt tokens are not steered.)
    stable = (
        all(r["gated:never"]["texts"] == reps[0]["gated:never"]["texts"] for r in reps)
        if "gated:never" in names
        else None
    )
    summary = {}
    for name in names:
        ratios = [r[name]["tok_s"] / r[BASELINES[name]]["tok_s"] for r in reps]
        summary[name] = {
            "baseline": BASELINES[name],
            "median_tok_s": statistics.median(r[name]["tok_s"] for r in reps),
            "median_ratio": statistics.median(ratios),
            "min_ratio": min(ratios),
            "max_ratio": max(ratios),
        }
    for r in reps:
        for v in r.values():
            v.pop("texts")
    return {
        "command": "benchmarks/gate_overhead.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out" and v not in (None, False)
        ),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "model": model,
        "batch": args.batch,
        "max_tokens": args.max_tokens,
        "startup_s": startup,
        "never_fired_rows_stable": stable,
        "reps": reps,
        "summary": summary,
    }


def table(result: dict) -> str:
    lines = [
        "| scenario | tok/s (median) | vs its baseline, same repetition: median (min–max) |",
        "|---|---|---|",
    ]
    for name, s in result["summary"].items():
        ratio = f"{s['median_ratio']:.3f} ({s['min_ratio']:.3f}–{s['max_ratio']:.3f})"
        lines.append(f"| {name} | {s['median_tok_s']:.1f} | {ratio} vs {s.get('baseline', 'ungated')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default=None, help="HF model directory (default: the embedded SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument(
        "--scenarios",
        default=None,
        help=f"comma-separated, each run with its baseline (default: all of {list(SCENARIOS)})",
    )
    parser.add_argument("--smoke", action="store_true", help="batch 4, 4 tokens, 1 repetition")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gate_overhead_cpu.json")
    args = parser.parse_args()
    if args.smoke:
        args.batch, args.max_tokens, args.reps = 4, 4, 1
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(table(result) + "\n")
    print(table(result))
    if result["never_fired_rows_stable"] is not None:
        print(
            f"rows of the gate that never fires are the same in every repetition: {result['never_fired_rows_stable']}"
        )


if __name__ == "__main__":
    main()
