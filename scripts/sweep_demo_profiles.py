"""Sweep the demo profiles' angle/scale on held-out prompts, all settings in ONE engine call.

    .venv/bin/python scripts/sweep_demo_profiles.py --profiles profiles --data ../shared/data

Prints the substring refusal rate (methods.md §5.2) on harmful and harmless held-out prompts
(AdvBench / Alpaca rows 64..64+n) per setting; the chosen defaults are written into the profiles by
scripts/build_demo_profiles.py's --add-scale / --selective-angle / --angular-angle.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profiles", default="profiles")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams

    from vllm_steer.default_model import ensure_default_model
    from vllm_steer.metrics import is_refusal

    data = Path(args.data)
    harmful = [r["goal"] for r in csv.DictReader(open(data / "advbench_harmful_behaviors.csv", newline=""))][64:64 + args.n]
    harmless = [json.loads(l)["instruction"] for l in open(data / "alpaca_harmless_1000.jsonl")][64:64 + args.n]
    settings = [("unsteered", None)]
    settings += [(f"add x{s}", {"steer_profile": "smollm2-refusal-add", "steer_scale": s}) for s in (0.5, 1.0, 1.5, 2.0, 3.0)]
    settings += [(f"selective {a}", {"steer_profile": "smollm2-selective", "steer_angle": float(a)}) for a in range(0, 360, 30)]
    settings += [(f"angular {a}", {"steer_profile": "smollm2-angular", "steer_angle": float(a)}) for a in range(0, 360, 30)]
    llm = LLM(model=str(ensure_default_model()), dtype="float32", max_model_len=1024, max_num_seqs=64, seed=0,
              enforce_eager=True, additional_config={"vllm_steer": {"profiles": args.profiles}})
    tok = llm.get_tokenizer()
    chat = lambda p: tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
    prompts, params, keys = [], [], []
    for name, s in settings:
        for kind, group in (("harmful", harmful), ("harmless", harmless)):
            for p in group:
                prompts.append(chat(p)); keys.append((name, kind))
                params.append(SamplingParams(max_tokens=args.max_tokens, temperature=0.0, extra_args=s))
    outs = llm.generate(prompts, params)
    rates: dict = {}
    for (name, kind), o in zip(keys, outs):
        rates.setdefault(name, {}).setdefault(kind, []).append(is_refusal(o.outputs[0].text))
    print(f"{'setting':16s} harmful harmless  example")
    examples = {k: o.outputs[0].text for k, o in zip(keys, outs)}
    for name, _ in settings:
        r = rates[name]
        print(f"{name:16s} {sum(r['harmful'])/len(r['harmful']):7.2f} {sum(r['harmless'])/len(r['harmless']):8.2f}  "
              f"{examples[(name, 'harmless')][:70]!r}")


if __name__ == "__main__":
    main()
