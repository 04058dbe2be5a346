"""The engine's gate decisions on a gated profile's own held-out test split, next to what calibration measured.

`vllm-steer calibrate --gate` reports each source's flag rate on its test part from Hugging Face activations
(``calibration.gating.test_flag_rate`` in ``profile.json``). This runs the same test prompts (the same split:
sources, shares and seed from the profile's ``calibration.gating``) through a vLLM engine with the plugin, one
mixed batch, and reads every row's decision back from the workers (``vllm_steer_gate_decisions``): the rate
per source the *engine* decides, and how many rows the engine and calibration disagree on.

    .venv/bin/python benchmarks/gate_rates.py                       # profiles/smollm2-refusal-gated
    .venv/bin/python benchmarks/gate_rates.py --profile DIR --n 40  # the first N prompts of every source
    .venv/bin/python benchmarks/gate_rates.py --profile profiles/smollm2-category-routed \
        --out benchmarks/results/gate_rates_routed_cpu.json            # routing: where each row steers too
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", type=Path, default=REPO / "profiles" / "smollm2-refusal-gated")
    parser.add_argument("--model", default=None, help="HF model directory (default: the embedded default model)")
    parser.add_argument("--n", type=int, default=None, help="the first N prompts of every source (default: all)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gate_rates_cpu.json")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    from vllm_steer.calibration.gates import recorded_sources
    from vllm_steer.core.profile import load_profile, save_profile
    from vllm_steer.default_model import ensure_default_model
    from vllm_steer.evaluation.gates import decisions_by_request, external_id

    profile = load_profile(args.profile)
    record = profile.spec.calibration["gating"]
    sources, routes = recorded_sources(profile.spec, n=args.n)
    model = args.model or str(ensure_default_model())
    root = Path(tempfile.mkdtemp(prefix="gate-rates-"))
    save_profile(root / profile.id, profile.spec, profile.vectors, profile.gate_vectors)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    llm = LLM(
        model=model,
        dtype="float32",
        seed=0,
        enforce_eager=True,
        max_model_len=1024,
        max_num_seqs=64,
        additional_config={"vllm_steer": {"profiles": str(root)}},
    )
    tok = llm.get_tokenizer()
    rows = [(s.name, p.text) for s in sources for p in s.test]
    chats = [
        tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        for _, text in rows
    ]
    # a routing profile's rows route (steer_categories "auto", its action steer); others only flag
    setting = {"steer_categories": "auto"} if routes else {"steer_gate_action": "flag"}
    params = SamplingParams(max_tokens=1, temperature=0.0, extra_args={"steer_profile": profile.id, **setting})
    started = time.time()
    outs = llm.generate(chats, [params] * len(chats), use_tqdm=True)
    seconds = time.time() - started
    decisions = {
        external_id(k): v
        for k, v in decisions_by_request(llm.collective_rpc("vllm_steer_gate_decisions", args=("",))).items()
    }
    by_source: dict[str, list[bool]] = {}
    own: dict[str, list[bool]] = {}  # routing sources: gated and steered with their own category
    for (name, _), out in zip(rows, outs, strict=True):
        decision = decisions[out.request_id]
        by_source.setdefault(name, []).append(bool(decision["fired"]))
        if name in routes:
            own.setdefault(name, []).append(bool(decision["fired"]) and decision.get("category") == routes[name])
    engine = {name: sum(v) / len(v) for name, v in by_source.items()}
    routing = record.get("test_routing", {})
    calibrated = dict(record.get("test_flag_rate", {}))
    calibrated |= {name: routing[c]["recall"] for name, c in routes.items() if c in routing}
    result = {
        "profile": profile.id,
        "model": model,
        "rows": len(rows),
        "generate_s": seconds,
        "engine_flag_rate": engine,
        "calibration_flag_rate": calibrated,
        "flagged": {name: [sum(v), len(v)] for name, v in by_source.items()},
    }
    if routes:
        result["engine_routed_to_own"] = {routes[name]: sum(v) / len(v) for name, v in own.items()}
        result["calibration_routed_to_own"] = {c: routing[c]["accuracy"] for c in routes.values() if c in routing}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| source | engine: flagged / n | engine rate | calibration (HF) rate |", "|---|---|---|---|"]
    for name, v in by_source.items():
        cal = calibrated.get(name)
        lines.append(f"| {name} | {sum(v)} / {len(v)} | {engine[name]:.3f} | {'—' if cal is None else f'{cal:.3f}'} |")
    if routes:
        lines += ["", "| category | engine: gated and routed to it | calibration (HF) |", "|---|---|---|"]
        for name, v in own.items():
            cal = result["calibration_routed_to_own"].get(routes[name])
            lines.append(f"| {routes[name]} | {sum(v)} / {len(v)} | {'—' if cal is None else f'{cal:.3f}'} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
