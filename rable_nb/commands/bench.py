"""Benchmarks (``python -m rable_nb bench train|augment|gen|synth``): the training step of the
engine, the augmented views alone, and the generator backends' own ``bench`` (a backend's
class declares it; ``synth`` is ``sd``'s). The last line the command prints is one JSON
object. Timings use ``profiling.timed``.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ..engine import augment, cuda_graph, evaluation, profiling
from ..parts import candidates
from .. import config, generators
from ..engine.engine import TrainConfig, Trainer
from ..engine.networks import PRECISIONS, autocast, device_name, pick_device, to_unit, used_precision
from ..stages.s04_training import LT_RHO100_IMAGES, PROFILE_DEFAULTS

BENCH_STEPS = {"smoke": 3, "quick": 10, "paper": 30}


# -- the training step --------------------------------------------------------------------
BENCH_PATHS = {"eager": False, "cuda_graph": True}   # step path -> Trainer(graph=...)
BENCH_TEST_IMAGES = 10_000                           # a CIFAR-10 test set


def train(profile: str = "smoke", device: str = "auto", batch_sizes=None,
          paths=("eager",), precisions=None) -> dict:
    """Speed of a full ABLE step per batch size, step path (``paths``: ``"eager"``,
    ``"cuda_graph"``) and precision (``precisions``: ``"bf16"`` autocast, ``"fp32"`` as the
    official code; see ``networks.PRECISIONS``; None: the device's default, bf16 on CUDA
    and fp32 on CPU); random uint8 images stand in for data.

    Per row: images/s of the step and of a bare forward+backward of the same network; the
    share of the step's wall time the device is busy (``profiling.busy_share``; on CPU a
    proxy) with kernels and launches per step (CUDA); ATen ops the host dispatches and
    reads back to the host per step; the evaluation of 10,000 test images; the projected
    epoch on CIFAR-10-LT rho = 100 (12,406 images, drop_last, + evaluation) and protocol L's
    800 of them (``run_800_epochs_min``). A CUDA-graph row on a CPU device says why it was
    skipped, and so does a bf16 row there (CPU passes are fp32: the fp32 row measures
    them). With both precisions measured, ``fp32_over_bf16`` is the first path's step time
    in fp32 over bf16 (the speed cost of ``PRECISION='fp32'``).
    """
    unknown = [p for p in paths if p not in BENCH_PATHS]
    if unknown or not paths:
        raise ValueError(f"paths={list(paths)!r} is invalid: choose from {list(BENCH_PATHS)}.")
    dev = pick_device(device)
    precisions = tuple(precisions or (used_precision(dev.type),))
    if any(p not in PRECISIONS for p in precisions):
        raise ValueError(f"precisions={list(precisions)!r} is invalid: choose from "
                         f"{list(PRECISIONS)}.")
    arch = PROFILE_DEFAULTS[profile]["ARCH"]
    batch_sizes = batch_sizes or [PROFILE_DEFAULTS[profile]["BATCH_SIZE"]]
    steps = BENCH_STEPS[profile]
    rng = np.random.default_rng(0)
    test_x = torch.as_tensor(rng.integers(0, 256, (BENCH_TEST_IMAGES, 32, 32, 3),
                                          dtype=np.uint8), device=dev)
    rows = []
    for bs in batch_sizes:
        n = bs * (steps + 1)
        x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, n)
        cand = candidates.uniform_candidates(labels, 10, 0.3, 0)
        for path in paths:
            for precision in precisions:
                row = {"batch_size": bs, "path": path, "precision": precision}
                if BENCH_PATHS[path] and dev.type != "cuda":
                    rows.append({**row, "skipped": "CUDA graphs need a CUDA device "
                                                   f"(device: {dev.type})"})
                    continue
                if used_precision(dev.type, precision) != precision:
                    rows.append({**row, "skipped": f"{precision} autocast is CUDA only: on "
                                                   f"{dev.type} every pass is fp32"})
                    continue
                cfg = TrainConfig(method="able", arch=arch, batch_size=bs, precision=precision)
                tr = Trainer(cfg, x, cand, labels, device, graph=BENCH_PATHS[path])
                rows.append({**row, **_measure(tr, steps, test_x)})
    measured = [r for r in rows if "skipped" not in r]
    out = {"what": "train", "profile": profile, "arch": arch, "device": device_name(dev),
           "steps": steps, "paths": list(paths), "precisions": list(precisions),
           "results": rows, **(measured or rows)[0]}
    first = {(r["path"], r["precision"]): r for r in measured if r["batch_size"] == batch_sizes[0]}
    for precision in precisions:
        if ("eager", precision) in first and ("cuda_graph", precision) in first:
            out.setdefault("graph_over_eager", (
                first["cuda_graph", precision]["able_images_per_s"]
                / first["eager", precision]["able_images_per_s"]))
    if (paths[0], "bf16") in first and (paths[0], "fp32") in first:
        out["fp32_over_bf16"] = (first[paths[0], "fp32"]["step_ms"]
                                 / first[paths[0], "bf16"]["step_ms"])
    return out


def _measure(tr: Trainer, steps: int, test_x: torch.Tensor) -> dict:
    """The measurements of one ``bench`` row (see there) on the trainer's path."""
    dev, bs = tr.dev, tr.cfg.batch_size
    gen = tr.epoch_generator(0)

    def able(i):
        tr.run_step(torch.arange(i * bs, (i + 1) * bs, device=dev), gen, i)
    warmup = cuda_graph.WARMUP + 1 if tr.graph else 1     # + the capture
    step_s = profiling.timed(able, steps, dev, warmup)
    ops = profiling.count_ops(able, steps)
    busy = profiling.busy_share(able, min(steps, 5), dev, step_s)
    views = tr._norm(to_unit(tr.x[:bs]))

    def bare(_):
        with autocast(dev.type, tr.cfg.precision):
            loss = tr.net(views).float().logsumexp(1).mean()
        tr.opt.zero_grad(set_to_none=True)
        loss.backward()
        tr.opt.step()
    bare_s = profiling.timed(bare, steps, dev)
    evaluation.predict(tr.net, test_x[:bs], precision=tr.cfg.precision)   # warm-up
    t0 = time.perf_counter()
    evaluation.predict(tr.net, test_x, precision=tr.cfg.precision).cpu()
    eval_s = time.perf_counter() - t0
    train_s = LT_RHO100_IMAGES // bs * step_s
    return {"able_images_per_s": bs / step_s, "bare_images_per_s": bs / bare_s,
            "bare_over_able": step_s / bare_s, "step_ms": 1e3 * step_s, **busy,
            "ops_per_step": ops["ops"], "host_syncs_per_step": ops["host_syncs"],
            "able_epoch_s_cifar10_lt_rho100": train_s, "eval_s": eval_s,
            "epoch_s_with_eval": train_s + eval_s,
            "run_800_epochs_min": config.L_EPOCHS * (train_s + eval_s) / 60}

def augment_views(device: str = "auto", batch_sizes=None) -> dict:
    """Images/s and dispatched ops of the weak and strong views alone (``augment.bench``)."""
    return augment.bench(device=device, batch_sizes=batch_sizes)


def benched_generators() -> dict:
    """The registered backends that declare a ``bench`` (name -> class)."""
    return {name: g for name, g in generators.GENERATORS.items() if g.bench is not None}


def generator(name: str, profile: str = "smoke", device: str = "auto", batch_sizes=None) -> dict:
    """The ``bench`` of generator backend ``name`` (one of :func:`benched_generators`)."""
    benched = benched_generators()
    if name not in benched:
        raise ValueError(f"`bench gen` times one of {sorted(benched)}, not {name!r}")
    return benched[name].bench(profile=profile, device=device, batch_sizes=batch_sizes)
