#!/usr/bin/env bash
# The version matrix: think-cache's exactness tests against several transformers releases, one virtual
# environment each (.venv-compat/<version>, torch pinned to 2.13.0). Every version difference lives in
# think_cache/_compat.py; this is what proves it.
#
#   bash scripts/compat.sh                 # the whole matrix
#   bash scripts/compat.sh 4.56.2 5.24.0   # chosen versions (CI runs the oldest; the main suite runs the newest)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$#" -gt 0 ]; then versions=("$@"); else versions=(4.56.2 4.57.6 5.0.0 5.12.1 5.24.0); fi
tests=(tests/test_exactness.py tests/test_reference.py tests/test_policies.py tests/test_patch.py
       tests/test_validation.py tests/test_memory.py tests/test_compact.py tests/test_scoring.py
       tests/test_families.py)
failed=()
for version in "${versions[@]}"; do
  env=".venv-compat/$version"
  if [ ! -x "$env/bin/python" ]; then
    python3 -m venv "$env"
    "$env/bin/pip" install -q torch==2.13.0 "transformers==$version" accelerate numpy packaging pytest hypothesis
    "$env/bin/pip" install -q --no-deps -e .
  fi
  echo "=== transformers $version"
  "$env/bin/python" -m pytest -q -p no:cacheprovider "${tests[@]}" || failed+=("$version")
done
if [ "${#failed[@]}" -gt 0 ]; then echo "FAILED on transformers ${failed[*]}"; exit 1; fi
echo "all ${#versions[@]} versions passed"
