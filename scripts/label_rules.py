"""The purity of every conditioning-label rule on one warm-up: the measurement behind the
``LABEL_RULE`` defaults (docs/labels-and-controls.md).

    python scripts/label_rules.py RUN_DIR [--profile quick] [-p WARMUP_EPOCHS 25] [--json OUT]

Trains (or loads from the cache) the profile's warm-up on the long tail of ``RUN_DIR``
(made by notebook 01), exactly as notebook 03 does, then assigns the conditioning labels
under each rule and prints, against the hidden truth (reporting only): mean and worst
per-class precision and recall of the conditioning sets, the range of planned / true class
counts, the EM prior's estimated / true counts and the sizes of the three rarest classes'
sets.
"""
from __future__ import annotations

import argparse
import ast
import json
import sys

import numpy as np

from rable_nb import config
from rable_nb.data import images as data
from rable_nb.parts import labelrules, warmup
from rable_nb.rundir import runfiles
from rable_nb.engine.networks import batched_logits

GRID = [("confidence", {}), ("confidence", {"keep": 0.5}),
        ("adjusted", {"tau": 0.5}), ("adjusted", {"tau": 0.5, "keep": 0.5}),
        ("sinkhorn", {"eps": 0.1}), ("sinkhorn", {"eps": 0.2}),
        ("sinkhorn", {"eps": 0.1, "keep": 0.5}), ("sinkhorn", {"eps": 0.2, "keep": 0.5}),
        ("sinkhorn", {"eps": 0.2, "keep": 0.25})]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--profile", default="quick")
    ap.add_argument("-p", nargs=2, action="append", metavar=("NAME", "VALUE"), default=[])
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args(argv)
    extra = {k: ast.literal_eval(v) for k, v in args.p}
    P = config.resolve("rebalance", PROFILE=args.profile, RUN_DIR=args.run_dir, create=False,
                       **extra)
    cifar = data.load_cifar10(P.get("DATA_DIR"))
    ds = runfiles.load_dataset(args.run_dir, cifar)
    x, cand, truth = cifar.train_x[ds["indices"]], ds["candidates"], ds["labels"]
    conf, net, info = warmup.warmup(x, cand, cifar, warmup.WarmupSettings.from_params(P),
                                    P.get("DEVICE") or "auto")
    logits = batched_logits(net, x).float().cpu().numpy()
    prior = labelrules.estimate_prior(logits, cand)
    true = np.bincount(truth, minlength=cifar.num_classes)
    est = prior * len(x) / true
    print(f"warm-up {info['method']} {info['epochs']} epochs (test accuracy "
          f"{info['test_accuracy']:.3f}); EM prior: estimated / true counts "
          f"{est.min():.2f}–{est.max():.2f}")
    rows = []
    for rule, kw in GRID:
        every, score = labelrules.labelled(rule, logits, cand, conf, prior=prior,
                                           **{k: v for k, v in kw.items() if k != "keep"})
        kept = labelrules.keep_confident(every, score, kw.get("keep", 1.0))
        pur = labelrules.purity(kept, truth, cifar.num_classes)
        prec, rec = np.array(pur["precision"]), np.array(pur["recall"], float)
        planned = np.bincount(every, minlength=cifar.num_classes) / true
        row = dict(rule=rule, **kw, precision_mean=prec.mean(), precision_worst=prec.min(),
                   recall_mean=rec.mean(), recall_worst=rec.min(),
                   planned_over_true=[planned.min(), planned.max()],
                   rarest_sets=pur["cond_counts"][-3:])
        rows.append(row)
        setting = ", ".join(f"{k} {v}" for k, v in kw.items())
        print(f"{rule:10s} {setting:18s} precision {prec.mean():.3f} (worst {prec.min():.3f})"
              f"  recall {rec.mean():.3f} (worst {rec.min():.3f})  planned/true "
              f"{planned.min():.2f}–{planned.max():.2f}  rarest sets {pur['cond_counts'][-3:]}")
    if args.json:
        config.write_json(args.json, dict(warmup=info, estimated_over_true=est.tolist(),
                                          rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
