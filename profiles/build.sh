#!/usr/bin/env bash
# Rebuilds the demo profiles for the default model with `vllm-steer calibrate` (see profiles/README.md).
# Reads the prompt sets shipped in the package (or $VLLM_STEER_DATA). Takes ~60 min on the 2-core CPU box.
set -euo pipefail
cd "$(dirname "$0")/.."
M=$(.venv/bin/vllm-steer default-model)
C=".venv/bin/vllm-steer calibrate $M --n 64 --seed 0 --held-out 0.2 --sweep-n 8 --max-tokens 32"
$C --method selective        --id smollm2-selective        --out profiles/smollm2-selective        --sweep 0:360:30
$C --method angular_standard --id smollm2-angular          --out profiles/smollm2-angular          --sweep 0:360:30
$C --method angular_adaptive --id smollm2-angular-adaptive --out profiles/smollm2-angular-adaptive --sweep 0:360:30
$C --method ablation         --id smollm2-ablation         --out profiles/smollm2-ablation
$C --method addition         --id smollm2-refusal-add      --out profiles/smollm2-refusal-add      --layers 18 --scale 0.25
$C --method probe            --id smollm2-probe            --out profiles/smollm2-probe
$C --method category         --id smollm2-category         --out profiles/smollm2-category         --harmful catqa --n 24
# The harm gate (docs/methods.md §2.9, §3.11): every row of AdvBench, HarmBench, CatQA and XSTest (split per source
# into fit / select / test), false positives held to 1 % of Alpaca and 20 % of XSTest-safe; ~15 min more.
# (The 1 MB report/gate.json it also writes is left out of the repository.)
.venv/bin/vllm-steer calibrate "$M" --method addition --id smollm2-refusal-gated --out profiles/smollm2-refusal-gated \
  --sweep none --batch-size 16 --gate --gate-action refuse --gate-fpr 0.01,xstest-safe=0.2
rm -f profiles/smollm2-refusal-gated/report/gate.json
# The same harm gate as a gate-only profile (method null: the gate and nothing that steers), which the strict tier
# of deploy/tenants.example.yaml forces; the same sources, split and seed choose the same gate; ~12 min.
.venv/bin/vllm-steer calibrate "$M" --gate-only --id smollm2-guard --out profiles/smollm2-guard \
  --batch-size 16 --gate-fpr 0.01,xstest-safe=0.2
rm -f profiles/smollm2-guard/report/gate.json
# Category routing (docs/methods.md §2.9): the category profile again, a router of one gate per category (40 CatQA
# questions per category) and deciding gates from every row of AdvBench, HarmBench, XSTest-unsafe and the CatQA
# questions the router does not use, against every row of Alpaca and XSTest-safe; ~15 min.
$C --method category         --id smollm2-category-routed  --out profiles/smollm2-category-routed  --harmful catqa --n 24 \
  --sweep none --batch-size 16 --gate --gate-route --gate-route-from catqa --gate-route-n 40 \
  --gate-fpr 0.01,xstest-safe=0.2 --gate-probe-c 0.1
rm -f profiles/smollm2-category-routed/report/gate.json
