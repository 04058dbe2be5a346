"""Build the demo profiles in profiles/ for the default model (SmolLM2-135M-Instruct).

Provenance of the committed profiles: run from the repo root with the shared
prompt sets beside the checkout (../shared/data):

    .venv/bin/python scripts/build_demo_profiles.py --data ../shared/data --out profiles

64 AdvBench harmful behaviours (rows 0-63) vs 64 Alpaca instructions (rows 0-63),
chat template, last token; see vllm_steer/calibrate.py for the statistics.

* smollm2-selective / smollm2-angular: the Selective Steering plane (b1, b2) from
  harmful-vs-harmless norm-output candidates; selective on the discriminative layers.
* smollm2-ablation: b1 ablated at every layer.
* smollm2-refusal-add: SmolLM2-135M does not refuse, and adding the harmful-minus-
  harmless mean did not make it refuse at any scale we tried (see the sweep). So this
  vector is CAA-style: the same 128 prompts, teacher-forced with a refusal opening
  ("I'm sorry, but I cannot help with that") minus a compliant one ("Sure, here is a
  detailed answer"), last token, at the output of layer 18.

The default angle/scale of each profile comes from scripts/sweep_demo_profiles.py.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_steer.calibrate import chat_prompts, collect_activations, diff_of_means, discriminative_layers, second_axis, select_b1
from vllm_steer.default_model import ensure_default_model
from vllm_steer.profile import ModelFingerprint, ProfileSpec, save_profile

N = 64


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--out", default="profiles")
    ap.add_argument("--add-layer", type=int, default=18)
    ap.add_argument("--add-scale", type=float, default=0.5)
    ap.add_argument("--selective-angle", type=float, default=180.0)
    ap.add_argument("--angular-angle", type=float, default=0.0)
    args = ap.parse_args()
    data = Path(args.data)
    harmful = [r["goal"] for r in csv.DictReader(open(data / "advbench_harmful_behaviors.csv", newline=""))][:N]
    harmless = [json.loads(line)["instruction"] for line in open(data / "alpaca_harmless_1000.jsonl")][:N]

    model_dir = ensure_default_model()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    num_layers = model.config.num_hidden_layers
    fp = ModelFingerprint(architecture="LlamaForCausalLM", hidden_size=model.config.hidden_size,
                          num_layers=num_layers, name="SmolLM2-135M-Instruct")
    pos = collect_activations(model, tok, chat_prompts(tok, harmful))
    neg = collect_activations(model, tok, chat_prompts(tok, harmless))

    norm_sites = [(layer, kind) for layer in range(num_layers) for kind in ("input_norm", "post_attn_norm")]
    cands = torch.stack([diff_of_means(pos, neg, s) for s in norm_sites])
    k, b1 = select_b1(cands)
    b2 = second_axis(cands, b1)
    disc = discriminative_layers(pos, neg, b1, num_layers)
    print("b1 from", norm_sites[k], "discriminative layers", disc)
    b1f, b2f = b1.float(), b2.float()
    calib = {"harmful": f"advbench rows 0-{N-1}", "harmless": f"alpaca_harmless_1000 rows 0-{N-1}",
             "b1_site": f"layers.{norm_sites[k][0]}.{norm_sites[k][1]}", "discriminative_layers": disc,
             "script": "scripts/build_demo_profiles.py"}
    out = Path(args.out)

    def plane_profile(pid, method, layers, angle, desc):
        spec = ProfileSpec(format_version=1, id=pid, method=method, description=desc, model=fp, layers=layers,
                           tensors={l: {"b1": "b1", "b2": "b2"} for l in layers},
                           defaults={"angle": angle}, allowed={"angle": {"min": 0, "max": 360}}, calibration=calib)
        save_profile(out / pid, spec, {l: {"b1": b1f, "b2": b2f} for l in layers})

    plane_profile("smollm2-selective", "selective", disc, args.selective_angle,
                  "Selective Steering: norm-preserving rotation in span{b1,b2} on the discriminative layers")
    plane_profile("smollm2-angular", "angular_standard", list(range(num_layers)), args.angular_angle,
                  "Standard angular steering: in-plane part set to an absolute angle, all layers")

    layer = args.add_layer
    base = chat_prompts(tok, harmful + harmless)
    refusing = collect_activations(model, tok, [b + "I'm sorry, but I cannot help with that" for b in base], kinds=("layer_output",))
    complying = collect_activations(model, tok, [b + "Sure, here is a detailed answer" for b in base], kinds=("layer_output",))
    r = diff_of_means(refusing, complying, (layer, "layer_output"), normalize=False).float()
    spec = ProfileSpec(format_version=1, id="smollm2-refusal-add", method="addition",
                       description=f"CAA-style refusal-minus-compliance vector added at layer {layer} output (+ pushes toward refusal)",
                       model=fp, layers=[layer], tensors={layer: {"vector": "vector"}},
                       defaults={"scale": args.add_scale}, allowed={"scale": {"min": -4, "max": 4}},
                       calibration={**calib, "vector_site": f"layers.{layer}.layer_output", "vector_norm": float(r.norm()),
                                    "contrast": "teacher-forced refusal vs compliance openings (CAA-style)"})
    save_profile(out / "smollm2-refusal-add", spec, {layer: {"vector": r}})

    layers = list(range(num_layers))
    spec = ProfileSpec(format_version=1, id="smollm2-ablation", method="ablation",
                       description="Directional ablation of b1 at every layer input, attention and MLP output",
                       model=fp, layers=layers, tensors={l: {"vector": "b1"} for l in layers}, calibration=calib)
    save_profile(out / "smollm2-ablation", spec, {l: {"vector": b1f} for l in layers})
    print("wrote", sorted(p.name for p in out.iterdir()))


if __name__ == "__main__":
    main()
