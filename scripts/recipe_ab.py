"""One method trained on a run's long tail with chosen TrainConfig settings: the A/B
measurements behind docs/quick-profile.md.

    python scripts/recipe_ab.py RUN_DIR OUT_JSON --method able --recipe short \
        --set strong_augment=protocol --epochs 25

Trains on the long-tailed images of ``RUN_DIR`` (made by notebook 01) with the quick
profile's network, batch and learning rate, evaluates on the 10,000 test images after every
epoch (as notebook 04 does) and writes last / many / medium / few accuracy, the per-class
recall and precision of the learned pseudo-labels against the hidden truth (reporting
only), wall time, threads and the load average to ``OUT_JSON``.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rable_nb import config
from rable_nb.data import images as data
from rable_nb.engine import engine
from rable_nb.stages import s04_training as training


def pseudo_label_quality(trainer) -> dict:
    """Per-class recall and precision of argmax(conf ⊙ Y) against the hidden labels."""
    pred = (trainer.conf * trainer.cand).argmax(1).cpu().numpy()
    truth = trainer.labels.cpu().numpy()
    c = trainer.cfg.num_classes
    recall = [float((pred[truth == k] == k).mean()) for k in range(c)]
    precision = [float((truth[pred == k] == k).mean()) if (pred == k).any() else 0.0
                 for k in range(c)]
    return dict(recall=recall, precision=precision, mean_recall=float(np.mean(recall)),
                min_recall=float(np.min(recall)), overall=float((pred == truth).mean()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("out_json")
    ap.add_argument("--method", default="able")
    ap.add_argument("--recipe", default="short", choices=sorted(config.RECIPES))
    ap.add_argument("--epochs", type=int, default=training.PROFILE_DEFAULTS["quick"]["EPOCHS"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a TrainConfig field (Python literal), e.g. label_smoothing=0.2")
    args = ap.parse_args(argv)
    quick = training.PROFILE_DEFAULTS["quick"]
    fields = dict(method=args.method, arch=quick["ARCH"], epochs=args.epochs,
                  batch_size=quick["BATCH_SIZE"], lr=quick["LR"], seed=args.seed,
                  **config.RECIPES[args.recipe])
    for item in args.set:
        key, value = item.split("=", 1)
        try:
            fields[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            fields[key] = value
    cfg = engine.TrainConfig(**fields)
    cifar = data.load_cifar10(None)
    d = training.prepare_data(args.run_dir, cifar, args.method, 1000, args.seed, device="cpu")
    load0, t0 = os.getloadavg()[0], time.time()
    with tempfile.TemporaryDirectory() as tmp:
        result = engine.train(cfg, d, tmp, "cpu", progress=False)
    wall = time.time() - t0
    trainer, final = result["trainer"], result["final"]
    out = dict(method=args.method, recipe=args.recipe, settings=args.set, epochs=args.epochs,
               seed=args.seed, last=final["overall"], many=final["many"],
               medium=final["medium"], few=final["few"], wall_s=wall,
               train_s=sum(h["train_s"] for h in result["history"]),
               curve=[round(h["test_acc"], 4) for h in result["history"]],
               threads=torch.get_num_threads(), load_start=load0, load_end=os.getloadavg()[0],
               commit=config.git_commit())
    if trainer.method.disambiguates:
        out["pseudo_labels"] = pseudo_label_quality(trainer)
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "curve"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
