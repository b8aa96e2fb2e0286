#!/usr/bin/env bash
# Main job: set up .venv if needed, then run every notebook in order (smoke profile by
# default) into runs/<profile>/. Extra arguments go to `python -m rable_nb run`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec .venv/bin/python -m rable_nb run "$@"
