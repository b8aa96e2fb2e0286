"""``python -m rable_nb demo``: notebook 07 as a standalone web app, served by Voilà.

Voilà runs the notebook in a fresh kernel for each visitor and shows its outputs (the
widget app, the explanations) without code. This module only picks the run, sets what the
kernel reads (``RABLE_RUN_DIR``, ``RABLE_PROFILE``), raises the server's WebSocket message
limit above the demo's upload limit (``demo.SERVER_MESSAGE_LIMIT``) and leaves out the cells
tagged ``notebook-only`` (the same steps written as code, which mean nothing without it).
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from . import artefacts, config, demo
from .runner import NOTEBOOK_DIR

NOTEBOOK = NOTEBOOK_DIR / "07_interactive_demo.ipynb"
WEB_HIDDEN_TAG = "notebook-only"


def without_notebook_only_cells(_handler, notebook, cwd):  # noqa: ARG001 - Voilà's signature
    """Voilà's prelaunch hook: the notebook minus the cells tagged ``notebook-only``."""
    notebook.cells = [c for c in notebook.cells
                      if WEB_HIDDEN_TAG not in c.get("metadata", {}).get("tags", [])]
    return notebook


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def voila_app(run_dir: Path, port: int, ip: str = "127.0.0.1"):
    """A configured (not started) Voilà application serving notebook 07 for ``run_dir``."""
    from traitlets.config import Config
    from voila.app import Voila

    os.environ["RABLE_RUN_DIR"] = str(run_dir)  # the kernels inherit the environment
    profile = (artefacts.read_json(run_dir / "run.json") or {}).get("profile")
    if profile and not os.environ.get("RABLE_PROFILE"):
        os.environ["RABLE_PROFILE"] = profile
    cfg = Config()
    cfg.Voila.tornado_settings = {"websocket_max_message_size": demo.SERVER_MESSAGE_LIMIT}
    cfg.Voila.open_browser = False
    cfg.Voila.ip, cfg.Voila.port = ip, port
    cfg.VoilaConfiguration.prelaunch_hook = without_notebook_only_cells
    cfg.VoilaConfiguration.theme = "light"
    app = Voila(config=cfg)
    app.initialize([str(NOTEBOOK)])
    return app


def main_demo(args) -> int:
    """``python -m rable_nb demo [--run runs/NAME] [--port N]`` entry point."""
    given = Path(args.run).resolve() if args.run else None
    try:
        run_dir = demo.find_run(given)
    except demo.NoTrainedModel as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if given is None:
        print(f"using the newest run with a trained model: {demo.short_path(run_dir)} "
              "(choose another with --run)")
    port = args.port or free_port()
    app = voila_app(run_dir, port)
    print(f"demo of {demo.short_path(run_dir)} at http://127.0.0.1:{port}/ (Ctrl-C stops it)",
          flush=True)
    app.start()
    return 0
