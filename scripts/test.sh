#!/usr/bin/env bash
# Test suite: set up .venv if needed, then every test in the smoke profile (root conftest.py
# sets RABLE_PROFILE=smoke and a temporary run dir). Each notebook runs once, through
# papermill, in the test of its stage. `--fast`: the inner loop, without the tests marked
# `notebook` (they start kernels or processes) or `slow`. Other arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
tier=()
if [ "${1:-}" = "--fast" ]; then
  shift
  tier=(-m "not notebook and not slow")
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "${tier[@]}" tests "$@"
