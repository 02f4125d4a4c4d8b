#!/usr/bin/env bash
# The GPU checks of one device session, in one call (about 9 minutes on an H100 with the defaults):
#   bash benchmarks/run_gpu_checks.sh OUT_DIR
# 1. kernel_check (with SWEEP=1: --sweep, the launch config tuned first): the kernel against the torch path over
#    full-precision and 2/4-bit stores, one layer's attention timed at 8k/32k/128k
# 2. gpu.py on the Llama-3.1-8B shape (random bf16 weights), batch 1 at CONTEXTS, every method of METHODS, one
#    profiled step per method (kernels, GPU time, host time by function), with COMPILE=1 the compiled static
#    caches (transformers' and ThinK's), the kernel launched as the sweep chose; decode times as the median and
#    the best of the repeats (a noisy host only adds time: read the issue's ratios from the best as well).
# Settings by environment: SWEEP (1), COMPILE (1), CONTEXTS (1x8k,1x32k; GROUPS is bash's own), METHODS (below), BUDGET_S (330),
# KERNEL_CHECK_S (300: its 56 checks compile on a fresh machine, about 110 s, 200 s with the sweep).
set -u
out=${1:-benchmarks/results}
mkdir -p "$out"
methods=${METHODS:-unpatched,dynamic,think-0.5,think-0.5+int4,snapkv-1024+think-0.5,streaming-2048+think-0.5,h2o-2048+think-0.5}
budget=${BUDGET_S:-330}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
started=$(date +%s)
sweep=()
[ "${SWEEP:-1}" = 1 ] && sweep=(--sweep)
timeout "${KERNEL_CHECK_S:-300}" python3 -u -m benchmarks.kernel_check "${sweep[@]}" --out "$out/kernel_check_h100.json" 2>&1 | tail -28
extra=()
# the sweep's choice only if this run wrote it (a kernel_check that timed out leaves an older file)
if [ "${SWEEP:-1}" = 1 ] && [ -f "$out/kernel_check_h100.json" ] \
    && [ "$(stat -c %Y "$out/kernel_check_h100.json")" -ge "$started" ]; then
    extra+=(--kernel-config "$out/kernel_check_h100.json")
fi
[ "${COMPILE:-1}" = 1 ] && extra+=(--compile --compile-timeout-s 140)
timeout $((budget + 50)) python3 -m benchmarks.gpu --groups "${CONTEXTS:-1x8k,1x32k}" --methods "$methods" \
    --profile --repeats 3 --budget-s "$budget" "${extra[@]}" \
    --out "$out/gpu_h100.json" 2>&1 | grep -v Warning | tail -45
