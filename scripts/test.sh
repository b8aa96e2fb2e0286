#!/usr/bin/env bash
# Test suite: set up .venv if needed, then unit tests + every notebook through nbval in
# the smoke profile (root conftest.py sets RABLE_PROFILE=smoke and a temporary run dir).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests notebooks --nbval-lax "$@"
