"""The campaign's protocol-L stage: protocol L's data and settings (docs/protocols.md), the
methods side by side on the one device, one process each, all trained for the same number
of epochs, chosen after timing the first epochs so that the whole cosine schedule ends
inside the stage's budget. Metrics and logs are notebook 04's (``training.finish``), with a
``campaign`` block that says how far short of protocol L's epochs they are (``results.py`` states
the gap); no checkpoint leaves the scratch folder.

While earlier stages run, a background process decodes CIFAR-10 into the campaign's cache,
so this stage starts from decoded arrays.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import time
from pathlib import Path

from .. import config
from .campaign_stages import Campaign, error_record

PROBE_EPOCHS = {False: 2, True: 1}  # timed before the epoch count is chosen (the last counts)
MARGIN = 0.88                       # share of the time left that the schedule may fill
END_S = 8                           # final evaluation, metrics, the processes' exit
MAX_EPOCHS = {False: config.L_EPOCHS, True: 2}  # tiny: a few epochs prove the mechanics
SETTING = dict(IMBALANCE_FACTOR=0.01, PARTIAL="uniform", Q=0.3, RATE=0.4, SEED=0)
TINY_DATA = dict(n_train=60, n_test=10)   # generated images per class
TINY_SETTINGS = dict(ARCH="tiny_cnn", BATCH_SIZE=16, N_MAX=24, N_TEST_PER_CLASS=5,
                     IMBALANCE_FACTOR=0.1)


def _context(camp: Campaign):
    """Spawned processes on a GPU machine (this process holds a CUDA context, which a fork
    must not inherit); forked ones on a CPU, which start without importing torch again."""
    forkable = camp.device == "cpu" and "fork" in multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if forkable else "spawn")


# -- started with the campaign: the data's decode and the methods' processes --------------
def start_background(camp: Campaign) -> None:
    """Generate (tiny) the data and start decoding it into the cache; on a GPU machine also
    start the methods' processes, which import what they need and wait for the stage (both
    overlap the earlier stages; a 2-core rehearsal starts its processes in the stage)."""
    if camp.tiny:
        from ..data import images as data
        camp.data_dir = data.write_fake_cifar(camp.work / "cifar", **TINY_DATA)
    camp.prefetch = _context(camp).Process(target=_decode, args=(str(camp.data_dir),),
                                           daemon=True)
    camp.prefetch.start()
    if not camp.tiny:
        start_workers(camp)


def start_workers(camp: Campaign) -> None:
    ctx = _context(camp)
    for method in camp.methods:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(method, child), daemon=True)
        proc.start()
        camp.workers[method] = (proc, parent)


def _decode(data_dir: str) -> None:
    from ..data import images as data
    data.load_cifar10(data_dir)


def stop_background(camp: Campaign) -> None:
    """Stop whatever is still running (the processes of a stage that ran out of time)."""
    procs = [p for p in [camp.prefetch, *(p for p, _ in camp.workers.values())] if p]
    for proc in procs:                  # a worker that sent its result is exiting
        proc.join(2)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)


# -- the epoch count ------------------------------------------------------------------------
def choose_epochs(epoch_s: float, seconds_left: float, extra_epochs: int = 0,
                  cap: int = config.L_EPOCHS) -> int:
    """Epochs E (≤ ``cap``) such that E + ``extra_epochs`` (a method's other stages, e.g.
    SoLar's estimation) epochs of ``epoch_s`` each fit into ``MARGIN`` of ``seconds_left``
    less ``END_S``; 0 when not even one does."""
    if epoch_s <= 0:
        raise ValueError(f"epoch_s={epoch_s!r} must be positive")
    fit = int((MARGIN * seconds_left - END_S) // epoch_s) - extra_epochs
    return max(0, min(cap, fit))


def extra_epochs(method: str, P: dict, epochs: int) -> int:
    """Epochs of ``method``'s stages besides the main one at ``epochs`` main epochs."""
    from .. import methods
    from ..stages import s04_training as training
    stages = methods.build(training.config_from_params(method, {**P, "EPOCHS": epochs})).stages()
    return sum(s.epochs for s in stages) - epochs


# -- the stage ------------------------------------------------------------------------------
def settings(camp: Campaign, run_dir: Path) -> dict:
    """Notebook 04's resolved parameters for protocol L (tiny: tiny sizes)."""
    extra = TINY_SETTINGS if camp.tiny else {}
    P = config.resolve("training", PROFILE="smoke" if camp.tiny else "paper",
                       PROTOCOL=None if camp.tiny else "L", RUN_DIR=str(run_dir),
                       DEVICE=camp.device, DATA_DIR=str(camp.data_dir), METHODS=camp.methods,
                       CHECKPOINT_EVERY=10**6, **{**SETTING, **extra})
    return P


def protocol_l(camp: Campaign, deadline: float) -> dict:
    from ..data import images as data
    from ..stages import s01_dataset as dataset
    proc = getattr(camp, "prefetch", None)
    if proc is not None:
        proc.join(max(deadline - time.time() - 30, 1))
    cifar = data.load_cifar10(camp.data_dir)
    run = camp.work / "protocol-l"
    P = settings(camp, run)
    dataset.run(P, cifar)                # stage 01, as notebook 01 runs it
    graph, why = use_graph(camp)
    P["GRAPH"] = graph
    if camp.device == "cuda":
        import torch
        torch.cuda.empty_cache()        # what the earlier stages cached goes to the workers
    if not camp.workers:
        start_workers(camp)
    threads = max(1, (os.cpu_count() or 1) // len(camp.methods))
    for _, conn in camp.workers.values():
        conn.send({"P": P, "data_dir": str(camp.data_dir), "threads": threads,
                   "tiny": camp.tiny})
    try:
        return _conduct(camp, camp.workers, P, deadline, run, {"graph": graph,
                                                               "graph_reason": why})
    finally:
        stop_background(camp)


def use_graph(camp: Campaign) -> tuple[bool, str]:
    """CUDA-graph steps for protocol L only when this campaign showed them sound and faster:
    the device checks of these methods passed on both paths and the graph step was faster."""
    if camp.device != "cuda":
        return False, "eager: no CUDA device"
    checks = camp.stage("device_checks").get("items", {})
    bad = [m for m in camp.methods if checks.get(f"method:{m}", {}).get("status") != "ok"]
    if bad:
        return False, f"eager: the graph path of {bad} was not checked or failed"
    ratio = (camp.stage("speed").get("items", {}).get("train", {}).get("graph_over_eager"))
    if not ratio or ratio < 1.05:
        return False, f"eager: graph_over_eager = {ratio}"
    return True, f"graph: checked, graph_over_eager = {ratio:.2f}"


def _receive(workers: dict, names, deadline: float) -> dict:
    """Each named worker's next message (an error record when it died or ran out of time)."""
    got = {}
    while len(got) < len(names) and time.time() < deadline:
        for m in names:
            p, conn = workers[m]
            if m in got:
                continue
            if conn.poll(0.2):
                got[m] = conn.recv()
            elif not p.is_alive():
                got[m] = {"error": {"type": "ProcessExit",
                                    "message": f"exit code {p.exitcode}", "traceback": ""}}
    for m in names:
        got.setdefault(m, {"error": {"type": "Timeout", "message": "not done at the stage's "
                                     "budget (its process was stopped)", "traceback": ""}})
    return got


def _conduct(camp, workers, P, deadline, run, info) -> dict:
    probes = _receive(workers, list(workers), deadline)
    timed = {m: r["epoch_s"][-1] for m, r in probes.items() if "epoch_s" in r}
    out = {**info, "side_by_side": len(workers), "probe": probes, "methods": {}}
    if not timed:
        out.update(status="failed", headline="no method finished its probe epochs")
        return out
    epoch_s = max(timed.values())
    left = deadline - time.time()
    cap = MAX_EPOCHS[camp.tiny]
    extra = max(extra_epochs(m, P, cap) for m in timed)
    epochs = choose_epochs(epoch_s, left, extra, cap)
    out.update(epoch_s=round(epoch_s, 3), seconds_left=round(left, 1), epochs=epochs,
               epoch_rule=f"E = min({cap}, floor(({MARGIN} × {left:.0f} s − {END_S} s) / "
                          f"{epoch_s:.2f} s) − {extra})")
    camp.note("protocol_l", **{k: out[k] for k in ("epoch_s", "epochs", "epoch_rule")})
    for m, (_, conn) in workers.items():
        conn.send(epochs if m in timed else 0)
    if epochs < 1:
        out.update(status="skipped", headline=f"an epoch takes {epoch_s:.1f} s side by side: "
                   "not one fits in the time left")
        return out
    results = _receive(workers, list(timed), deadline)
    bundle = camp.out / f"L-rho{1 / P['IMBALANCE_FACTOR']:g}-q{P['Q']:g}"
    for m, r in {**{m: probes[m] for m in probes if m not in timed}, **results}.items():
        out["methods"][m] = r if "error" in r else {"status": "ok", **r}
        log = run / "logs" / f"{m}.jsonl"
        (bundle / "logs").mkdir(parents=True, exist_ok=True)
        if "error" in r:                # the epochs it did finish, to see how far it got
            if log.exists():
                shutil.copy(log, bundle / "logs" / f"{m}.unfinished.jsonl")
            continue
        shutil.copy(run / f"metrics-{m}.json", bundle / f"metrics-{m}.json")
        shutil.copy(log, bundle / "logs" / f"{m}.jsonl")
    if bundle.exists():
        shutil.copy(run / "dataset.json", bundle / "dataset.json")
    done = [m for m, r in out["methods"].items() if r.get("status") == "ok"]
    out["status"] = "ok" if len(done) == len(workers) else ("partial" if done else "failed")
    out["headline"] = (f"{epochs} epochs × {len(workers)} side by side ({epoch_s:.2f} s/epoch): "
                       + ", ".join(f"{m} {100 * r['last']:.1f} %" for m, r in
                                   out["methods"].items() if r.get("status") == "ok"))
    return out


# -- one method's process --------------------------------------------------------------------
def _worker(method: str, conn) -> None:
    """Import, wait for the stage's settings, time the probe epochs (a throw-away network),
    then train with the epoch count the parent sends (0: stop)."""
    try:
        from ..data import images as data
        from ..stages import s04_training as training  # noqa: F401  (imported while others run)
        job = conn.recv()
        P, tiny = job["P"], job["tiny"]
        probe, cifar, d = _probe(method, P, job["data_dir"], job["threads"],
                                 PROBE_EPOCHS[tiny])
        conn.send(probe)
        epochs = conn.recv()
        if epochs:
            conn.send(_train(method, P, epochs, tiny, cifar, d))
    except Exception as err:
        conn.send({"error": error_record(err)})


def _probe(method: str, P: dict, data_dir: str, threads: int, epochs: int):
    """(timed probe epochs, the decoded data, the method's training data): notebook 04's
    training (``training.train``) of a throw-away network in a scratch folder beside the
    run, each epoch timed with its evaluation."""
    import torch

    from ..data import images as data
    from ..stages import s04_training as training
    torch.set_num_threads(threads)
    cifar = data.load_cifar10(data_dir)
    d = training.method_data(method, P, cifar)
    cfg = training.config_from_params(method, {**P, "EPOCHS": epochs}, cifar.num_classes)
    scratch = Path(P["RUN_DIR"]).parent / f"probe-{method}"
    shutil.rmtree(scratch, ignore_errors=True)   # never resumed: every epoch is timed
    try:
        history = training.train(cfg, d, scratch, P["DEVICE"], checkpoint_every=10**6,
                                 stop_after=epochs, progress=False, graph=P["GRAPH"])["history"]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    times = [round(h["seconds"], 3) for h in history]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"epoch_s": times}, cifar, d


def _train(method: str, P: dict, epochs: int, tiny: bool, cifar, d: dict) -> dict:
    from ..stages import s04_training as training
    full = training.protocol_name({**P, "EPOCHS": config.L_EPOCHS}, d["dataset_params"])
    campaign = {"protocol": "L", "epochs": epochs, "protocol_epochs": config.L_EPOCHS,
                "tiny": tiny,
                "note": "a GPU campaign's shortened protocol L: the whole cosine schedule in "
                        f"{epochs} of {config.L_EPOCHS} epochs"}
    m = training.run_method(method, {**P, "EPOCHS": epochs}, cifar, progress=False, data=d,
                            protocol="L-short" if full == "L" else "custom",
                            fields={"campaign": campaign})
    key = m["comparable_to_published"]
    return {"last": m[key]["last"], "best": m[key]["best"], "compared": key,
            "wall_s": round(m["wall_s"], 1), "epochs_done": m["epochs_done"]}
