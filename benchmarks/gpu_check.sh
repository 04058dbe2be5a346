#!/usr/bin/env bash
# The GPU-only checks, in one run on a CUDA box with PyTorch (no vLLM needed):
#   1. tests/gpu/test_cuda.py: the Triton kernel against the torch op; the op and the runtime replayed from
#      CUDA graphs (also inside torch.compile); the pinned-buffer race of a step prepared while the GPU
#      is busy;
#   2. benchmarks/op_cost.py with CUDA graphs (+ the Triton and torch.compile-fused ops), bf16;
#   3. the same op timed as eager launches, for the launch cost CUDA graphs remove;
#   4. benchmarks/step_overhead.py: the runtime + custom op in a captured decoder stack, steered vs plain.
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (default benchmarks/results)
# Missing pure-Python deps (pydantic) may travel as wheels in .whl/: they are installed to /tmp/site.
set -u
out=${1:-benchmarks/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_cuda.py 2>&1 | tee "$out/test_cuda.log"
timeout 150 python3 benchmarks/op_cost.py --device cuda --cuda-graphs --fused --dtype bfloat16 --hidden 2048 4096 \
  --tokens 32 512 4096 --ks 1 8 64 --out "$out/op_cost_cuda.json" 2>&1 | grep -v "^W1\|^  warn" | tee "$out/op_cost_cuda.md"
timeout 60 python3 benchmarks/op_cost.py --device cuda --dtype bfloat16 --hidden 2048 4096 --tokens 32 512 4096 \
  --ks 1 64 --out "$out/op_cost_cuda_eager.json" 2>&1 | tee "$out/op_cost_cuda_eager.md"
timeout 200 python3 benchmarks/step_overhead.py --device cuda --dtype bfloat16 --out "$out/step_overhead_cuda.json" \
  2>&1 | tee "$out/step_overhead_cuda.md"
