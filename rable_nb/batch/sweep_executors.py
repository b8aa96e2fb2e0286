"""Sweep executors: how grid points run. Every point runs :func:`run_point` (its notebooks'
output in ``point.log``, its record in ``point.json``) in its own process: ``parallel``
points at once on this machine with the visible GPUs handed out round-robin (``local``), or
as a Ray task on a local Ray or the cluster at ``RAY_ADDRESS`` (``ray``). Each executor is a
generator of ``("start" | "end", job, record | None)`` events; closing it stops the points
still running. ``rable_nb/stages/s08_sweep.py`` builds the jobs and writes the results.
"""
from __future__ import annotations

import importlib.util
import multiprocessing
import os
import queue
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stderr, redirect_stdout, suppress
from pathlib import Path

from tqdm.auto import tqdm

from ..rundir import artefacts
from .. import config
from . import runner

POINT_FILE = "point.json"
LOG_FILE = "point.log"  # what a point's notebooks print (papermill's stdout/stderr)
EXECUTORS = ("local", "ray")
STOP_GRACE_S = 10  # Ctrl-C: seconds a worker gets after SIGTERM before SIGKILL


def check_executor(executor: str = "local", parallel: int = 1, cpus_per_point=None,
                   gpus_per_point=None) -> None:
    """Raise ``ValueError`` naming the option when these executor settings cannot work."""
    if executor not in EXECUTORS:
        raise ValueError(f"--executor {executor!r} is not one of {EXECUTORS}.")
    if not isinstance(parallel, int) or parallel < 1:
        raise ValueError(f"--parallel {parallel!r} is invalid: a positive integer is needed.")
    if executor == "local":
        if cpus_per_point is not None or gpus_per_point is not None:
            raise ValueError("--cpus-per-point/--gpus-per-point are for --executor ray; the "
                             "local executor runs --parallel points at once and spreads them "
                             "over the visible GPUs.")
        return
    if parallel != 1:
        raise ValueError("--parallel is for the local executor; under --executor ray, "
                         "--cpus-per-point and --gpus-per-point decide how many points share "
                         "a machine.")
    if cpus_per_point is not None and not cpus_per_point > 0:
        raise ValueError(f"--cpus-per-point {cpus_per_point!r} is invalid: it must be > 0.")
    if gpus_per_point is not None and not gpus_per_point >= 0:
        raise ValueError(f"--gpus-per-point {gpus_per_point!r} is invalid: it must be >= 0 "
                         "(fractions such as 0.5 put two points on one GPU).")
    if importlib.util.find_spec("ray") is None:
        raise ValueError("--executor ray needs Ray, which is not installed: "
                         "pip install -e '.[cluster]'")


def run_point(job: dict) -> dict:
    """Run one grid point's notebooks into its directory; write and return its ``point.json``.

    The one per-point function of both executors (inside a spawned process of the local pool,
    or as a Ray task). What the notebooks print goes to ``<point dir>/point.log``; a failure
    is recorded (status ``failed`` and the error), never raised.
    """
    run_dir = Path(job["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    record = dict(params=job["params"], notebooks=job["notebooks"], profile=job["profile"],
                  host=socket.gethostname(), gpus=os.environ.get("CUDA_VISIBLE_DEVICES"))
    start = time.time()
    with open(run_dir / LOG_FILE, "a") as log, redirect_stdout(log), redirect_stderr(log):
        print(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} point {run_dir.name} on "
              f"{record['host']}, CUDA_VISIBLE_DEVICES={record['gpus']}", flush=True)
        try:
            runner.run(job["profile"], job["notebooks"], str(run_dir), job["params"],
                       kernel=job["kernel"], notebook_dir=Path(job["notebook_dir"]),
                       resume=True, log_file=log)
            record["status"] = "done"
        except Exception as err:  # noqa: BLE001 - recorded; the sweep goes on
            record.update(status="failed", error=f"{type(err).__name__}: {err}"[:4000])
            print(record["error"], flush=True)
    record["seconds"] = round(time.time() - start, 1)
    config.write_json(run_dir / POINT_FILE, record)
    return record


def _record(run_dir: Path) -> dict:
    """A point's ``point.json`` record; empty when it has none (never started, or running)
    or when it is damaged (moved aside with a notice: the point runs again)."""
    return artefacts.read_json(run_dir / POINT_FILE, what="sweep point record",
                               resumable=True, schema={"status": str, "params?": dict}) or {}


def _lost_point(job: dict, why: str) -> dict:
    """Record (and return) a point whose worker ended without recording it."""
    record = dict(params=job["params"], notebooks=job["notebooks"], profile=job["profile"],
                  status="failed", error=f"{why}; see {Path(job['run_dir']) / LOG_FILE}")
    config.write_json(Path(job["run_dir"]) / POINT_FILE, record)
    return record


# -- executors: generators of ("start" | "end", job, record | None) --------------------------
def visible_gpus() -> list[str]:
    """GPUs this process may hand out: the entries of ``CUDA_VISIBLE_DEVICES`` when it is set
    (ids or UUIDs, up to the first invalid one such as -1), else every device torch counts."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        import torch
        return [str(i) for i in range(torch.cuda.device_count())]
    gpus = []
    for entry in (e.strip() for e in env.split(",")):
        if not entry or entry.startswith("-"):
            break
        gpus.append(entry)
    return gpus


def worker_gpus(parallel: int, gpus: list[str]) -> list[str | None]:
    """``CUDA_VISIBLE_DEVICES`` of each of the ``parallel`` worker slots: the GPUs round-robin,
    so points running together spread evenly (``None``: no GPU, the environment is kept)."""
    return [gpus[slot % len(gpus)] if gpus else None for slot in range(parallel)]


def _point_process(job: dict, gpu: str | None) -> None:
    """A local worker: its own session (Ctrl-C reaches only the sweep, which stops it), its
    GPU, every output (the kernel's too) into ``point.log``, then :func:`run_point`."""
    os.setsid()
    tqdm.set_lock(threading.RLock())  # not tqdm's semaphore, which a stopped worker would leak
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    Path(job["run_dir"]).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(job["run_dir"]) / LOG_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    run_point(job)


def _stop(procs: list) -> None:
    """SIGTERM each worker's process group, SIGKILL what is left after ``STOP_GRACE_S``.
    A kernel notices its worker's death and exits (ipykernel's parent poller)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in (p for p in procs if p.is_alive()):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:  # not yet in its own group, or exited meanwhile
                with suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)
        deadline = time.time() + STOP_GRACE_S
        for proc in procs:
            proc.join(max(0.0, deadline - time.time()))


def _local_events(jobs: list[dict], parallel: int):
    """Run the jobs in spawned processes, at most ``parallel`` at once (a thread pool, each
    thread watching one process); closing the generator stops them and starts no more."""
    gpus = worker_gpus(parallel, visible_gpus() if parallel > 1 else [])
    ctx = multiprocessing.get_context("spawn")
    events, slots = queue.Queue(), queue.Queue()
    for slot in range(parallel):
        slots.put(slot)
    running, lock, stopping = {}, threading.Lock(), threading.Event()

    def supervise(job: dict) -> None:
        slot = slots.get()
        try:
            with lock:
                if stopping.is_set():
                    return
                (Path(job["run_dir"]) / POINT_FILE).unlink(missing_ok=True)
                proc = ctx.Process(target=_point_process, args=(job, gpus[slot]))
                proc.start()
                running[job["index"]] = proc
            events.put(("start", job, None))
            proc.join()
            if stopping.is_set():
                return
            record = _record(Path(job["run_dir"])) or _lost_point(
                job, f"its worker process exited with code {proc.exitcode} before recording it")
            events.put(("end", job, record))
        except Exception as err:  # noqa: BLE001 - the point fails, the sweep goes on
            events.put(("end", job, _lost_point(job, f"its worker failed: {err!r}")))
        finally:
            with lock:
                running.pop(job["index"], None)
            slots.put(slot)

    pool = ThreadPoolExecutor(parallel, thread_name_prefix="sweep-point")
    try:
        for job in jobs:
            pool.submit(supervise, job)
        ended = 0
        while ended < len(jobs):
            event = events.get()
            ended += event[0] == "end"
            yield event
    finally:
        with lock:
            stopping.set()
            procs = list(running.values())
        pool.shutdown(wait=False, cancel_futures=True)
        _stop(procs)
        pool.shutdown(wait=True)


def _ray_events(jobs: list[dict], cpus_per_point: float, gpus_per_point: float):
    """Each job as a Ray task, on the cluster at ``RAY_ADDRESS``, the Ray instance this process
    already started, or a new local one; closing the generator cancels the unfinished tasks."""
    import ray
    own = not ray.is_initialized()
    if own:
        # RAY_ADDRESS's cluster, else a new local instance; a point's output is in point.log
        ray.init(log_to_driver=False)
    task = ray.remote(run_point).options(num_cpus=cpus_per_point, num_gpus=gpus_per_point)
    pending = {}
    try:
        for job in jobs:
            (Path(job["run_dir"]) / POINT_FILE).unlink(missing_ok=True)
            pending[task.remote(job)] = job
            yield "start", job, None
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in ready:
                job = pending.pop(ref)
                try:
                    record = ray.get(ref)
                except Exception as err:  # noqa: BLE001 - a lost task fails its point only
                    record = _lost_point(job, f"its Ray task failed: {err}"[:4000])
                yield "end", job, record
    finally:
        for ref in pending:  # quietly: the sweep is stopping (Ctrl-C, SIGTERM, SIGHUP)
            with suppress(Exception):
                ray.cancel(ref, force=True)
        if own:
            ray.shutdown()
