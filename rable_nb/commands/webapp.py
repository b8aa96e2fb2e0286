"""``python -m rable_nb demo``: notebook 07 as a standalone web app, served by Voilà.

Voilà runs the notebook in a kernel of its own for each visitor and shows its outputs (the
widget app, the explanations) without code. This module picks the run, sets what the
kernel reads (``RABLE_RUN_DIR``, ``RABLE_PROFILE``) and configures Voilà and its Jupyter
server for a demo that many people open and close:

- **Pre-heated kernels** (Voilà's ``preheat_kernel``): ``POOL`` kernels have run the
  notebook before anyone asks, so a visitor gets a page whose models are already loaded;
  the pool refills after each visit. Voilà refuses a ``prelaunch_hook`` with pre-heating,
  so the cells tagged ``notebook-only`` (the same steps written as code) are left out of a
  copy of the notebook in a temporary folder, and that copy is served.
- **Kernels that end.** Closing or reloading the tab sends Voilà's shutdown request, which
  carries the ``_xsrf`` cookie's token; Voilà's pages never set that cookie, so the request
  was refused (403). :class:`XsrfCookieIdentity` issues the cookie with every page, and the
  XSRF check itself stays as it is. A kernel whose page went away without saying so (a
  crash, a lost connection) is culled by the Jupyter server once it has had no connection
  and no activity for ``CULL_AFTER`` seconds; a kernel with its page open never is.
- The server's WebSocket message limit is raised above the demo's upload limit
  (``demo.SERVER_MESSAGE_LIMIT``); it listens on 127.0.0.1 only and on the port asked
  for, or refuses to start (Voilà would otherwise move to another port silently).
- No request leaves the machine: Voilà's ``lab`` template links Font Awesome from a CDN;
  the ``rable`` template (``voila_share/voila/templates/rable``, found through
  ``JUPYTER_PATH``) is the same page without those links; the icons come from the Font
  Awesome that Voilà's own bundle serves.
"""
from __future__ import annotations

import atexit
import errno
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from .. import config
from ..stages import s07_demo as demo
from ..rundir import runfiles
from ..batch.runner import NOTEBOOK_DIR

NOTEBOOK = NOTEBOOK_DIR / "07_interactive_demo.ipynb"
WEB_HIDDEN_TAG = "notebook-only"
SHARE = Path(__file__).parent / "voila_share"  # a Jupyter data folder: voila/templates/rable
TEMPLATE = "rable"
POOL = 1  # pre-heated kernels waiting for visitors (each holds the models: see docs/demo.md)
CULL_AFTER = 120  # seconds without a connection or activity before a kernel is shut down


def without_notebook_only_cells(notebook):
    """The notebook minus the cells tagged ``notebook-only``."""
    notebook.cells = [c for c in notebook.cells
                      if WEB_HIDDEN_TAG not in c.get("metadata", {}).get("tags", [])]
    return notebook


def web_notebook(folder: Path) -> Path:
    """Write the notebook the web page runs (without ``notebook-only`` cells) into ``folder``."""
    import nbformat
    path = Path(folder) / NOTEBOOK.name
    nbformat.write(without_notebook_only_cells(nbformat.read(NOTEBOOK, as_version=4)), path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int, ip: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((ip, port))
        except OSError as err:
            return err.errno in (errno.EADDRINUSE, errno.EACCES)
    return False


def identity_provider():
    """Voilà's identity provider, plus the ``_xsrf`` cookie set on every GET (tornado sets
    it once per browser), which Voilà's shutdown request on leaving the page sends back."""
    from jupyter_core.utils import ensure_async
    from voila.voila_identity_provider import VoilaIdentityProvider

    class XsrfCookieIdentity(VoilaIdentityProvider):
        async def get_user(self, handler):
            user = await ensure_async(super().get_user(handler))
            if handler.request.method == "GET":
                handler.current_user = user  # tornado's xsrf_token reads it
                handler.xsrf_token  # noqa: B018 - reading it sets the cookie when missing
            return user

    return XsrfCookieIdentity


def kernel_manager():
    """Jupyter's kernel manager (Voilà adds its pool on top), whose culler counts a kernel's
    idle time from when it left the pool at the earliest. A pre-heated kernel idles in the
    pool, which Voilà keeps from the culler; without this, a kernel that had waited there
    longer than ``CULL_AFTER`` was culled in the second between being handed to a visitor
    and the visitor's page connecting to it, leaving a dead page."""
    from jupyter_server._tz import utcnow
    from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager

    class DemoKernelManager(AsyncMappingKernelManager):
        async def cull_kernel_if_idle(self, kernel_id):
            # Voilà's subclass asks only about kernels that are not in its pool
            seen = self.__dict__.setdefault("_out_of_pool", {})
            for gone in set(seen) - set(self._kernels):
                del seen[gone]
            kernel = self._kernels.get(kernel_id)
            first = seen.setdefault(kernel_id, utcnow())
            if getattr(kernel, "last_activity", first) < first:
                kernel.last_activity = first
            return await super().cull_kernel_if_idle(kernel_id)

    return DemoKernelManager


def voila_app(run_dir: Path, port: int, ip: str = "127.0.0.1", pool: int = POOL,
              cull_after: float = CULL_AFTER):
    """A configured (not started) Voilà application serving notebook 07 for ``run_dir``."""
    from traitlets.config import Config
    from voila.app import Voila

    os.environ["RABLE_RUN_DIR"] = str(run_dir)  # the kernels inherit the environment
    profile = runfiles.read_run_log(run_dir).get("profile")
    if profile and not os.environ.get("RABLE_PROFILE"):
        os.environ["RABLE_PROFILE"] = profile
    folder = Path(tempfile.mkdtemp(prefix="rable-demo-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    notebook = web_notebook(folder)
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        [str(SHARE), *filter(None, [os.environ.get("JUPYTER_PATH")])])  # the rable template
    cfg = Config()
    cfg.Voila.tornado_settings = {"websocket_max_message_size": demo.SERVER_MESSAGE_LIMIT}
    cfg.Voila.open_browser = False
    cfg.Voila.ip, cfg.Voila.port, cfg.Voila.port_retries = ip, port, 0
    cfg.Voila.identity_provider_class = identity_provider()
    cfg.VoilaConfiguration.template = TEMPLATE
    cfg.VoilaConfiguration.theme = "light"
    cfg.VoilaConfiguration.multi_kernel_manager_class = kernel_manager()
    cfg.VoilaConfiguration.preheat_kernel = pool > 0
    cfg.VoilaConfiguration.default_pool_size = pool
    # a kernel with no page connected and no activity for cull_after seconds is shut down
    cfg.MappingKernelManager.cull_idle_timeout = cull_after
    cfg.MappingKernelManager.cull_interval = max(1, min(30, int(cull_after // 2)))
    cfg.MappingKernelManager.cull_connected = False
    cfg.MappingKernelManager.cull_busy = False
    app = Voila(config=cfg)
    app.initialize([str(notebook)])
    return app


def main_demo(args) -> int:
    """``python -m rable_nb demo [--run runs/NAME] [--port N] [--pool N] [--cull-after S]``."""
    given = Path(args.run).resolve() if args.run else None
    try:
        run_dir = demo.find_run(given)
    except demo.NoTrainedModel as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if given is None:
        print(f"using the newest run with a trained model: {config.short_path(run_dir)} "
              "(choose another with --run)")
    port = args.port or free_port()
    if port_in_use(port):
        print(f"error: port {port} on 127.0.0.1 is in use (another server?): choose another "
              "with --port, or leave --port out for a free one.", file=sys.stderr)
        return 1
    pool = POOL if args.pool is None else args.pool
    cull_after = CULL_AFTER if args.cull_after is None else args.cull_after
    if pool < 0 or cull_after <= 0:
        print("error: --pool must be >= 0 and --cull-after > 0.", file=sys.stderr)
        return 1
    app = voila_app(run_dir, port, pool=pool, cull_after=cull_after)
    print(f"demo of {config.short_path(run_dir)} at http://127.0.0.1:{app.port}/ (Ctrl-C stops "
          f"it; {config.plural(pool, 'pre-heated kernel')}; a kernel without its page is shut "
          f"down after {cull_after:g} s)", flush=True)
    app.start()
    return 0
