#!/usr/bin/env bash
# Create .venv from requirements.txt when missing or stale; a fast no-op otherwise.
# Sourced by scripts/run.sh and scripts/test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "error: Python >= 3.11 is needed (found $("$PY" --version)); set PYTHON=..." >&2; exit 1; }
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -c1-16)
if [ ! -x .venv/bin/python ] || [ "$(cat .venv/.installed 2>/dev/null)" != "$want" ]; then
  echo "setting up .venv from requirements.txt (first time: about 3 minutes) ..."
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  if ! .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt \
       > .venv/install.log 2>&1; then
    grep -v "is ignored" .venv/install.log | tail -30 >&2
    echo "error: pip install failed; full log in .venv/install.log" >&2
    exit 1
  fi
  echo "$want" > .venv/.installed
fi
# JupyterLab from .venv: a WebSocket message may exceed Tornado's 10 MiB, so an upload too
# big for notebook 07 reaches it and gets its message instead of breaking the connection
install -m 644 -D jupyter-config/jupyter_server_config.json .venv/etc/jupyter/jupyter_server_config.json
