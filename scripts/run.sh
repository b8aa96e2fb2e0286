#!/usr/bin/env bash
# Main job: set up .venv if needed, then run the main job (the quick profile's recipe on
# the real long tail, a curated set of notebooks: rable_nb/batch/runner.py MAIN_JOB) into
# runs/main/; `--profile smoke` (the test profile) runs every notebook in runs/smoke/.
# Extra arguments go to `python -m rable_nb run`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec .venv/bin/python -m rable_nb run "$@"
