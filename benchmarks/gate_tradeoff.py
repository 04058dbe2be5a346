"""What a gate's threshold trades: recall on one harmful source against false positives, on the test splits.

`vllm-steer calibrate --gate` picks the threshold on the *select* parts to hold every harmless source to its
false-positive target. This reads the shipped gate's own *test* parts (the same split: sources, shares and seed
from the profile's ``calibration.gating``), scores the last prompt token with the gate (Hugging Face, the
reference formula) and reports, for a harmful source, the threshold at which its recall reaches each target and
what every other source's flag rate is there — a description of the test split, not a way to choose a threshold.

    .venv/bin/python benchmarks/gate_tradeoff.py                            # XSTest-unsafe vs Alpaca, XSTest-safe
    .venv/bin/python benchmarks/gate_tradeoff.py --target advbench --sources advbench,alpaca
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", type=Path, default=REPO / "profiles" / "smollm2-refusal-gated")
    parser.add_argument("--model", default=None, help="HF model directory (default: the embedded default model)")
    parser.add_argument("--target", default="xstest-unsafe", help="the harmful source whose recall is set")
    parser.add_argument("--sources", default="xstest-unsafe,alpaca,xstest-safe", help="sources to score")
    parser.add_argument("--recalls", default="0.95,0.9,0.85,0.8")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gate_tradeoff_cpu.json")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_steer.calibration.gates import recorded_sources
    from vllm_steer.calibration.stats import collect_activations, format_prompts
    from vllm_steer.core.gates import GATE_HOOK, gate_score
    from vllm_steer.core.profile import load_profile
    from vllm_steer.default_model import ensure_default_model

    profile = load_profile(args.profile)
    assert profile.spec.gating is not None, f"{args.profile} has no gates"
    (gate,) = profile.spec.gating.gates  # one gate: its threshold alone decides
    record = profile.spec.calibration["gating"]
    wanted = args.sources.split(",")
    sources = [s for s in recorded_sources(profile.spec)[0] if s.name in wanted]
    path = args.model or str(ensure_default_model())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    fmt = record.get("prompt_format", "chat")
    scores: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for source in sources:
            prompts = [p.text for p in source.part("test")]
            stats = collect_activations(
                model,
                tokenizer,
                format_prompts(tokenizer, prompts, fmt),
                (GATE_HOOK,),
                16,
                None,
                keep_samples=True,
                add_special_tokens=fmt == "plain",
            )
            assert stats.samples is not None
            h = torch.cat(stats.samples[(gate.layer, GATE_HOOK)])
            scores[source.name] = gate_score(h, profile.gate_vectors[gate.name], gate.score)

    def rates(threshold: float) -> dict[str, float]:
        return {name: float((v > threshold).float().mean()) for name, v in scores.items()}

    assert gate.comparison == ">", "written for a '>' gate"
    points = [{"point": "shipped", "threshold": gate.threshold, **rates(gate.threshold)}]
    for recall in (float(r) for r in args.recalls.split(",")):
        target = scores[args.target].sort(descending=True).values
        k = max(1, int(torch.ceil(torch.tensor(recall * len(target))).item()))
        threshold = float(target[k - 1]) - 1e-7  # the k-th highest score fires
        points.append({"point": f"{args.target} recall {recall:g}", "threshold": threshold, **rates(threshold)})
    result = {
        "profile": profile.id,
        "gate": gate.model_dump(),
        "sizes": {name: len(v) for name, v in scores.items()},
        "points": points,
    }
    names = list(scores)
    lines = ["| point | threshold | " + " | ".join(names) + " |", "|---" * (2 + len(names)) + "|"]
    for p in points:
        lines.append(f"| {p['point']} | {p['threshold']:.4f} | " + " | ".join(f"{p[n]:.3f}" for n in names) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
