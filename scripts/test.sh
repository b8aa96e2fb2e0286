#!/usr/bin/env bash
# Test suite: set up .venv if needed, then every test in the smoke profile (root conftest.py
# sets RABLE_PROFILE=smoke and a temporary run dir). Each notebook runs once, through
# papermill, in the test of its stage. `--fast`: the inner loop, without the tests marked
# `notebook` (they start kernels or processes) or `slow`. Other arguments go to pytest.
# Two pytest-xdist workers, one thread each (the two cores of the machine the suite is sized
# for; RABLE_TEST_WORKERS=N for another count, `-n 0` for one process), handed tests one at a
# time, longest first; a fixture that costs a kernel or a sweep is made once for both
# (tests/conftest.py). (Not --dist loadgroup: its xdist_group marks are lost on pytest 9.)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
tier=()
if [ "${1:-}" = "--fast" ]; then
  shift
  tier=(-m "not notebook and not slow")
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 \
  -n "${RABLE_TEST_WORKERS:-2}" --dist load --maxschedchunk 1 "${tier[@]}" tests "$@"
