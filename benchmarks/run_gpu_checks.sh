#!/usr/bin/env bash
# The GPU checks of one device session, in one call (about 7 minutes on an H100):
#   bash benchmarks/run_gpu_checks.sh OUT_DIR
# 1. kernel_check --sweep: the launch config tuned, the kernel against the torch path, one layer's attention timed
# 2. gpu.py on the Llama-3.1-8B shape (random bf16 weights), batch 1 at 8k and 32k, every method, the compiled
#    static caches (transformers' and ThinK's), one profiled step per method, the kernel launched as tuned in 1.
set -u
out=${1:-benchmarks/results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
timeout 120 python3 -m benchmarks.kernel_check --sweep --out "$out/kernel_check_h100.json" 2>&1 | tail -20
config=()
[ -f "$out/kernel_check_h100.json" ] && config=(--kernel-config "$out/kernel_check_h100.json")
timeout 380 python3 -m benchmarks.gpu --groups 1x8k,1x32k \
    --methods unpatched,dynamic,think-0.5,think-0.5+int4,snapkv-1024+think-0.5,streaming-2048+think-0.5,h2o-2048+think-0.5 \
    --compile --compile-timeout-s 140 --profile --repeats 3 --budget-s 330 "${config[@]}" \
    --out "$out/gpu_h100.json" 2>&1 | grep -v Warning | tail -45
