"""``python -m rable_nb campaign``: one command that turns a short GPU lease into a committable
results bundle (docs/gpu-lease.md says how to spend a lease on it).

Stages, in order, each with its own share of ``--minutes`` (``BUDGETS``):

- ``environment``: Python, torch, CUDA, the device, package versions, the commit;
- ``cuda_tests``: the suite's CUDA-only tests (``pytest -m cuda``), outcome and failure text;
- ``speed``: ``bench train --both`` and ``bench gen`` for pixel, feature, gan;
- ``device_checks``: every base method and modifier (eager and, on CUDA, graph), every
  generator backend (a few fitting steps, then samples), one short paper-size pass;
- ``protocol_l``: protocol L's data and settings, several methods side by side on the one
  device, all with the epoch count that lets the whole cosine schedule end in the time left
  (chosen after timing the first epochs); metrics as notebook 04 writes them.

Every stage's outcome goes to ``<out>/campaign.json`` the moment the stage ends (atomic
writes), so a kill leaves each finished stage recorded. A stage that raises is recorded
(type, message, traceback tail) and the next one runs; a stage whose share no longer fits in
the time left is skipped and says so, and so is an item whose packages are missing
(``require``). The stages call the package directly: no papermill, no notebook kernels.
``--tiny`` runs the same stages on a CPU at tiny sizes (generated data) in about a minute:
``tests/test_campaign.py`` runs it, so the command is proven before any GPU is lent.
The stages and the state they share (``Campaign``) are in ``rable_nb/commands/campaign_stages.py``,
protocol L's in ``rable_nb/commands/campaign_protocol.py``.
"""
from __future__ import annotations

import datetime
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import campaign_protocol, campaign_stages
from .. import config
from .campaign_stages import SUMMARY, Campaign, error_record

BUNDLE_LIMIT = 1_000_000            # bytes: the whole bundle, checked when it is written
# stage -> (share of the total budget, fewest seconds worth starting it; None: what is left)
BUDGETS = {"environment": (0.02, 1), "cuda_tests": (0.15, 15), "speed": (0.13, 15),
           "device_checks": (0.17, 15), "protocol_l": (None, 45)}
TINY_LEAST = 1                      # --tiny: any stage with a second left is worth starting
TINY_MINUTES = 5.0                  # --tiny's default budget (ample: it needs 0.5-2 min)
# protocol L: the quick table's strongest method on real data only (able+la: 35.87 % in
# results/quick-cpu; supervised uses true labels, rable* need a generator) + the two the
# issue names
DEFAULT_METHODS = ("able+la", "able+records", "corr+records+mixup")


STAGES = [("environment", campaign_stages.environment),
          ("cuda_tests", campaign_stages.cuda_tests), ("speed", campaign_stages.speed),
          ("device_checks", campaign_stages.device_checks),
          ("protocol_l", campaign_protocol.protocol_l)]


class CampaignError(ValueError):
    """Bad input to the command: one clear line, nothing written."""


def stage_budget(camp: Campaign, name: str) -> tuple[float, float]:
    """(seconds this stage may take, fewest seconds worth starting it)."""
    share, least = BUDGETS[name]
    left = camp.left()
    budget = left if share is None else min(share * camp.total_s, left)
    return budget, (TINY_LEAST if camp.tiny else least)


def run_stages(camp: Campaign, stages) -> dict:
    """Run ``stages`` [(name, fn(camp, deadline) -> record)] in order, recording each in
    ``campaign.json`` as soon as it ends; returns the summary."""
    camp.summary.setdefault("stages", {})
    camp.write()
    for name, fn in stages:
        budget, least = stage_budget(camp, name)
        t0 = time.time()
        if budget < least:
            record = {"status": "skipped", "reason": f"budget: it needs at least {least:.0f} s "
                      f"and {max(camp.left(), 0):.0f} s of the campaign are left"}
        else:
            camp.summary["stages"][name] = {"status": "running", "budget_s": round(budget, 1),
                                            "started_s": round(t0 - camp.start, 1)}
            camp.write()                      # a kill inside the stage leaves this behind
            try:
                record = dict(fn(camp, t0 + budget) or {})
                record.setdefault("status", "ok")
            except Exception as err:          # recorded; the next stage still runs
                record = {"status": "error", "error": error_record(err)}
        record.update(budget_s=round(budget, 1), started_s=round(t0 - camp.start, 1),
                      seconds=round(time.time() - t0, 1))
        camp.summary["stages"][name] = record
        camp.write()
        print(f"[{time.time() - camp.start:6.0f} s] {name:<14} {record['status']:<8} "
              f"{headline(record)}", flush=True)
    camp.summary["seconds"] = round(time.time() - camp.start, 1)
    camp.summary["status"] = overall(camp.summary["stages"])
    camp.write()
    return camp.summary


def headline(record: dict) -> str:
    """One short line about a stage's record, for stdout."""
    if record.get("error"):
        return f"{record['error']['type']}: {record['error']['message'][:150]}"
    text = record.get("headline") or record.get("reason") or ""
    return f"{text} ({record['seconds']:.0f} of {record['budget_s']:.0f} s)"


def overall(stages: dict) -> str:
    """'ok' when every stage is, else the worst status of any ('error' > 'failed' > ...)."""
    statuses = {r["status"] for r in stages.values()}
    for worst in ("error", "failed", "partial", "skipped"):
        if worst in statuses:
            return worst
    return "ok"


def bundle_files(out: Path) -> dict[str, int]:
    """{relative path: bytes} of every file in the bundle."""
    return {p.relative_to(out).as_posix(): p.stat().st_size
            for p in sorted(out.rglob("*")) if p.is_file()}


def check_bundle(out: Path) -> dict:
    """Size and file count of the bundle; ``ValueError`` over ``BUNDLE_LIMIT`` or when it
    holds a checkpoint."""
    files = bundle_files(out)
    heavy = [f for f in files if f.endswith((".safetensors", ".pt", ".pth", ".npz"))]
    size = sum(files.values())
    if heavy:
        raise ValueError(f"the bundle holds checkpoints or arrays: {heavy}")
    if size > BUNDLE_LIMIT:
        raise ValueError(f"the bundle is {size} bytes, over its {BUNDLE_LIMIT} limit")
    return {"files": len(files), "bytes": size}


# -- the command ---------------------------------------------------------------------------
def add_parser(sub) -> None:
    """``campaign`` and its options on the CLI's subparsers."""
    p = sub.add_parser("campaign", help="spend a short GPU lease: every GPU-only check, the "
                       "speed numbers and a shortened protocol-L run in one results bundle")
    p.add_argument("--minutes", type=float, help="the whole campaign's budget "
                   f"(default 9; --tiny: {TINY_MINUTES:g})")
    p.add_argument("--device", default=None, help="cuda (default) or cpu; --tiny: cpu")
    p.add_argument("--out", help="bundle folder (default results/gpu-DATE-DEVICE; --tiny: "
                   "runs/campaign-tiny-DATE)")
    p.add_argument("--tiny", action="store_true",
                   help="the same stages on a CPU at tiny sizes on generated data (~1 min)")
    p.add_argument("--methods", help="protocol L's methods, comma-separated (default "
                   f"{','.join(DEFAULT_METHODS)})")
    p.add_argument("--data", help="CIFAR-10 folder or archives (default: RABLE_DATA, the "
                   "shared copy, ./data); --tiny generates its own")
    p.add_argument("--work", help="scratch folder for run directories and caches (default: "
                   "a new temporary folder, deleted at the end)")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "device"


def default_out(device: str, tiny: bool) -> Path:
    """results/gpu-<date>-<device name> (tiny: runs/campaign-tiny-<date>), with -2, -3, ...
    when a bundle of that name exists already (a lease must never stop on its name)."""
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    if tiny:
        base = config.PROJECT_ROOT / "runs" / f"campaign-tiny-{date}"
    else:
        import torch
        name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
        base = config.PROJECT_ROOT / "results" / f"gpu-{date}-{_slug(name.replace('NVIDIA', ''))}"
    out, k = base, 1
    while out.exists():
        k += 1
        out = base.with_name(f"{base.name}-{k}")
    return out


def parse_methods(text: str | None) -> list[str]:
    from .. import methods
    names = [m.strip() for m in text.split(",") if m.strip()] if text else list(DEFAULT_METHODS)
    for name in names:
        reason = methods.explain(name)
        if reason:
            raise CampaignError(f"--methods: {name!r}: {reason}")
        if "synthetic" in methods.data_sources(name) or methods.inputs(name) == "features":
            raise CampaignError(f"--methods: {name!r} needs a generator's top-up, which the "
                                "campaign does not make: choose methods on real data")
    if not names or len(set(names)) != len(names):
        raise CampaignError(f"--methods {text!r}: give distinct method names")
    return names


def make_campaign(args) -> Campaign:
    """Check every option (``CampaignError``, nothing written) and build the campaign."""
    minutes = args.minutes if args.minutes is not None else (TINY_MINUTES if args.tiny else 9.0)
    if not minutes > 0 or minutes > 600:
        raise CampaignError(f"--minutes {args.minutes:g} is invalid: give the budget in "
                            "minutes, > 0 (e.g. 9 for a 10-minute lease command)")
    device = args.device or ("cpu" if args.tiny else "cuda")
    if device not in ("cpu", "cuda"):
        raise CampaignError(f"--device {device!r} is invalid: cuda or cpu")
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise CampaignError("--device cuda: no CUDA device is visible here (use --tiny "
                                "for the CPU rehearsal, or --device cpu)")
    names = parse_methods(args.methods)
    data_dir = None
    if not args.tiny:
        from ..data import images as data
        data_dir = data.resolve_data_dir(args.data)
        if not data_dir.exists():
            raise CampaignError(f"--data {data_dir} does not exist: copy the CIFAR-10 "
                                "archives there (docs/gpu-lease.md)")
    out = config.project_path(args.out) if args.out else default_out(device, args.tiny)
    if out.exists() and any(out.iterdir()):
        raise CampaignError(f"--out {out} exists and is not empty: a bundle is never "
                            "mixed with an older one")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="rable-campaign-"))
    return Campaign(out=out, work=work, device=device, tiny=args.tiny, minutes=minutes,
                    methods=names, data_dir=data_dir)


def main_campaign(args) -> int:
    """``python -m rable_nb campaign``: 0 when every stage passed, 1 on bad input, 2 when a
    stage failed or was skipped (the bundle is written either way)."""
    start = time.time()
    os.environ.setdefault("TQDM_DISABLE", "1")          # one line per stage, no bars
    try:
        camp = make_campaign(args)
    except CampaignError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    camp.start = start
    if camp.tiny:       # tiny tensors on a shared CPU: more threads only add overhead
        import torch
        torch.set_num_threads(1)
    os.environ["RABLE_CACHE"] = str(camp.work / "cache")  # nothing leaks into .cache/
    camp.summary = {"options": {k: v for k, v in vars(args).items() if k != "command"},
                    "tiny": camp.tiny, "device": camp.device, "minutes": camp.minutes,
                    "methods": camp.methods,
                    "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                        timespec="seconds")}
    print(f"campaign: {camp.minutes:g} min on {camp.device}{' (tiny)' if camp.tiny else ''}"
          f" -> {camp.out}", flush=True)
    try:
        campaign_protocol.start_background(camp)   # the data's decode, protocol L's processes
        summary = run_stages(camp, STAGES)
    finally:
        campaign_protocol.stop_background(camp)
        if not args.work:
            shutil.rmtree(camp.work, ignore_errors=True)
    try:
        summary["bundle"] = check_bundle(camp.out)
    except ValueError as err:
        summary["bundle"] = {"error": str(err)}
        summary["status"] = "error"
    camp.write()
    print(f"campaign {summary['status']}: {camp.out / SUMMARY} "
          f"({summary['seconds']:.0f} s; bundle {summary['bundle']})", flush=True)
    return 0 if summary["status"] == "ok" else 2

