"""CPU speed ratios behind docs/quick-profile.md, measured interleaved in one process
(A, B, A, B, ...) so that the shared machine's load swings hit both alike.

    OMP_NUM_THREADS=1 python scripts/bench_cpu_recipe.py [--rounds 8] [--batch 128]

Prints the median images/s of: a bare forward + backward of the quick network with the
default (contiguous) and the channels_last memory format, and the weak views (protocol vs
light), plus the share of one short-recipe ABLE step per operator group (torch.profiler).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch

from rable_nb.engine import augment, engine, recipe
from rable_nb.parts import candidates
from rable_nb import config
from rable_nb.engine.networks import PLLNet, standardize


def timed(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--arch", default="mini_cnn")
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    bs = args.batch
    x = torch.rand(bs, 3, 32, 32)
    y = torch.randint(0, 10, (bs,))
    nets = {}
    for fmt in ("contiguous", "channels_last"):
        torch.manual_seed(0)
        net = PLLNet(args.arch, 10)
        if fmt == "channels_last":
            net = net.to(memory_format=torch.channels_last)
        nets[fmt] = net

    def step(fmt):
        net = nets[fmt]
        xi = standardize(x)
        if fmt == "channels_last":
            xi = xi.contiguous(memory_format=torch.channels_last)
        loss = torch.nn.functional.cross_entropy(net(xi), y)
        net.zero_grad(set_to_none=True)
        loss.backward()
    gen = torch.Generator().manual_seed(0)
    cases = {"fwd+bwd contiguous": lambda: step("contiguous"),
             "fwd+bwd channels_last": lambda: step("channels_last"),
             "weak view protocol": lambda: augment.weak_view(x, gen),
             "weak view light": lambda: recipe.light_view(x, gen),
             "strong view protocol": lambda: augment.strong_view(x, gen)}
    times = {k: [] for k in cases}
    for _ in range(args.rounds):
        for k, fn in cases.items():
            times[k].append(timed(fn, 3))
    out = {k: bs / statistics.median(v) for k, v in times.items()}
    out["channels_last_speedup"] = out["fwd+bwd channels_last"] / out["fwd+bwd contiguous"]
    # where a short-recipe ABLE step spends its time
    rng = np.random.default_rng(0)
    yy = np.arange(1024) % 10
    xx = rng.integers(0, 256, (1024, 32, 32, 3), dtype=np.uint8)
    tr = engine.Trainer(engine.TrainConfig(method="able", arch=args.arch, epochs=1,
                                           batch_size=bs, **config.RECIPES["short"]),
                        xx, candidates.uniform_candidates(yy, 10, 0.3, 0), yy, "cpu")
    idx = torch.arange(bs)
    g = tr.epoch_generator(0)
    tr._train_mode()
    tr.step(idx, g)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            tr.step(idx, g)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    out.update(threads=torch.get_num_threads(), load=os.getloadavg()[0], batch=bs,
               arch=args.arch, commit=config.git_commit())
    print(json.dumps(out, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
