"""The stages of ``python -m rable_nb campaign`` (``rable_nb/commands/campaign.py`` runs them) and the
state they share (``Campaign``): each is ``fn(camp, deadline) -> record``; an item that would
start after ``deadline`` is skipped and says so, and so is one whose packages are missing.
Protocol L's side-by-side runs are in ``rable_nb/commands/campaign_protocol.py``.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import config

SUMMARY = "campaign.json"              # the bundle's record of every stage
# distributions the campaign's stages import (environment: their versions; `missing`: those
# not installed), and some it does not need, recorded for the notebooks' sake
PACKAGES = ("torch", "torchvision", "numpy", "pillow", "safetensors", "tqdm", "scipy",
            "diffusers", "torchcfm", "pot", "torchdiffeq", "scikit-learn", "transformers",
            "tokenizers", "huggingface-hub", "requests", "pytest")
NOT_NEEDED = ("pyyaml", "matplotlib", "pandas", "papermill")
CUDA_MARK = "pytest.mark.cuda"          # how a test file marks its CUDA-only tests


def require(*modules: str) -> str | None:
    """Why an item needing ``modules`` cannot run here (None when all are importable)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return (f"needs {', '.join(missing)} (not installed here; docs/gpu-lease.md lists the "
            "wheels a bare torch image needs)")


def error_record(err: BaseException) -> dict:
    """Type, message and the last lines of the traceback of an exception."""
    tail = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    return {"type": type(err).__name__, "message": str(err)[:2000],
            "traceback": tail[-3000:]}



@dataclass
class Campaign:
    """What every stage reads: settings, folders, the clock, and earlier stages' records."""

    out: Path                       # the bundle (committed): small files only
    work: Path                      # scratch: run directories, checkpoints, decoded data
    device: str
    tiny: bool
    minutes: float
    methods: list[str]
    data_dir: Path | None = None
    start: float = field(default_factory=time.time)
    summary: dict = field(default_factory=dict)
    prefetch: object = None         # the background decode of the data (a process)
    workers: dict = field(default_factory=dict)   # protocol L: method -> (process, pipe)

    @property
    def total_s(self) -> float:
        return 60 * self.minutes

    @property
    def deadline(self) -> float:
        return self.start + self.total_s

    def left(self) -> float:
        return self.deadline - time.time()

    def stage(self, name: str) -> dict:
        """An earlier stage's record ({} when it did not run)."""
        return self.summary.get("stages", {}).get(name, {})

    def write(self) -> None:
        config.write_json(self.out / SUMMARY, self.summary)

    def note(self, stage: str, **fields) -> None:
        """Add ``fields`` to a running stage's record, on disk at once (what a kill leaves)."""
        self.summary["stages"][stage].update(fields)
        self.write()


def items(deadline: float, work) -> tuple[dict, str]:
    """Run ``work`` [(key, needs (module names), fn() -> dict)] until ``deadline``; every
    item's record ({status: ok|failed|skipped, ...}) and the stage status."""
    out = {}
    for key, needs, fn in work:
        missing = require(*needs)
        if missing:
            out[key] = {"status": "skipped", "reason": missing}
            continue
        if time.time() >= deadline:
            out[key] = {"status": "skipped", "reason": "the stage's budget was spent"}
            continue
        t0 = time.time()
        try:
            record = {"status": "ok", **(fn() or {})}
        except Exception as err:        # a CUDA-only crash: recorded, the next item runs
            record = {"status": "failed", "error": error_record(err)}
        record["seconds"] = round(time.time() - t0, 2)
        out[key] = record
    statuses = [r["status"] for r in out.values()]
    status = ("failed" if "failed" in statuses else
              "partial" if "skipped" in statuses else "ok")
    return out, status


def summary_line(records: dict) -> str:
    counts: dict[str, int] = {}
    for r in records.values():
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))


# -- environment ---------------------------------------------------------------------------
def environment(camp: Campaign, deadline: float) -> dict:
    import torch
    versions = {}
    for name in PACKAGES + NOT_NEEDED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    out = {"python": platform.python_version(), "platform": platform.platform(),
           "cpus": os.cpu_count(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
           "commit": config.git_commit(), "packages": versions,
           "missing": sorted(k for k in PACKAGES if versions[k] is None)}
    if camp.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        out["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                      "memory_gib": round(props.total_memory / 2**30, 1),
                      "count": torch.cuda.device_count(),
                      "bf16": torch.cuda.is_bf16_supported()}
    out["headline"] = f"torch {out['torch']}, {out.get('gpu', {}).get('name', 'cpu')}, " \
                      f"commit {out['commit'][:12]}"
    return out


# -- the suite's CUDA-only tests --------------------------------------------------------------
def cuda_test_files(root: Path = config.PROJECT_ROOT) -> list[Path]:
    """Test files holding tests marked ``cuda`` (only these are collected: the rest of the
    suite imports packages a bare torch image lacks)."""
    return [p for p in sorted((root / "tests").glob("test_*.py")) if CUDA_MARK in p.read_text()]


def cuda_tests(camp: Campaign, deadline: float) -> dict:
    missing = require("pytest")
    if missing:
        return {"status": "skipped", "reason": missing}
    files = cuda_test_files()
    report = camp.work / "cuda-tests.xml"
    # the interpreter's own flags (-S, -I) too, as multiprocessing passes them on
    cmd = [sys.executable, *subprocess._args_from_interpreter_flags(), "-m", "pytest",
           "-m", "cuda", "-v", "--tb=short", "-p", "no:cacheprovider", f"--junitxml={report}",
           *[str(f.relative_to(config.PROJECT_ROOT)) for f in files]]
    path = os.pathsep.join([str(config.PROJECT_ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    try:
        done = subprocess.run(cmd, cwd=config.PROJECT_ROOT, env=env, capture_output=True,
                              text=True, timeout=max(deadline - time.time(), 1))
    except subprocess.TimeoutExpired as err:     # the tests that finished, from -v's lines
        text = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else (
            err.stdout or "")
        return {"status": "failed", "reason": "timed out at the stage's budget",
                "tests": verbose_outcomes(text), "output_tail": text[-2000:]}
    tests = junit_outcomes(report) if report.exists() else verbose_outcomes(done.stdout)
    counts = {s: sum(1 for t in tests.values() if t["outcome"] == s)
              for s in ("passed", "failed", "skipped")}
    # 0: all passed or skipped; 5 (none selected) means the cuda marker selects nothing
    status = "ok" if done.returncode == 0 and not counts["failed"] else "failed"
    return {"status": status, "command": " ".join(cmd[1:len(cmd) - len(files)] + ["<files>"]),
            "files": [f.name for f in files], "returncode": done.returncode, **counts,
            "tests": tests, "output_tail": done.stdout[-1500:] + done.stderr[-1500:],
            "headline": f"{counts['passed']} passed, {counts['failed']} failed, "
                        f"{counts['skipped']} skipped"}


def verbose_outcomes(text: str) -> dict:
    """{test id: {outcome}} from the lines of ``pytest -v`` (what a time-out leaves)."""
    found = re.findall(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR)", text, re.M)
    return {name: {"outcome": {"ERROR": "failed"}.get(o, o.lower())} for name, o in found}


def junit_outcomes(path: Path) -> dict:
    """{test id: {outcome, message (failures: their text, cut)}} from pytest's JUnit XML."""
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name')}"
        outcome, message = "passed", None
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
                message = ((child.get("message") or "") + "\n" + (child.text or ""))[-2500:]
            elif child.tag == "skipped":
                outcome, message = "skipped", child.get("message")
        out[name] = {"outcome": outcome, **({"message": message} if message else {})}
    return out


# -- speed ----------------------------------------------------------------------------------
def speed(camp: Campaign, deadline: float) -> dict:
    from . import bench
    profile = "smoke" if camp.tiny else "paper"
    train_bs, gen_bs = ([16], [8]) if camp.tiny else ([256], None)
    precisions = None if camp.tiny else ("bf16", "fp32")   # the cost of PRECISION='fp32'
    work = [("train", (), lambda: bench.train(profile, camp.device, train_bs,
                                              ("eager", "cuda_graph"), precisions))]
    work += generator_benches(camp.device, profile, gen_bs)
    records, status = items(deadline, work)
    out = {"status": status, "profile": profile, "items": records,
           "headline": summary_line(records)}
    train = records["train"]
    if train["status"] == "ok":
        rows = {r["path"]: r for r in train["results"]}
        out["headline"] = "; ".join(
            f"{p}: {r['able_images_per_s']:.0f} img/s" if "skipped" not in r else f"{p}: skipped"
            for p, r in rows.items()) + f" ({summary_line(records)})"
    return out


def generator_benches(device: str, profile: str, batch_sizes=None) -> list:
    """The speed stage's items for every registered backend with a ``bench`` that the
    campaign runs (``CAMPAIGN_BENCH``)."""
    from . import bench
    return [(f"gen_{name}", gen.REQUIRES,
             lambda name=name: bench.generator(name, profile, device, batch_sizes))
            for name, gen in bench.benched_generators().items() if gen.CAMPAIGN_BENCH]


# -- device checks -------------------------------------------------------------------------
def check_methods(camp: Campaign) -> list[str]:
    """The device checks' methods: every base alone, every modifier on ABLE, and the
    combinations that run second step variants (CORR's and SoLar's mixup) or stack
    modifiers; each piece brings its own ``tiny`` settings (:func:`train_check`)."""
    from .. import methods
    names = list(methods.BASES) + [f"able+{m}" for m in methods.MODIFIERS]
    names += ["corr+records+mixup", "solar+la+mixup", "supervised+la+mixup",
              "proden+records+la", "ssp+records+mixup", *camp.methods]
    return list(dict.fromkeys(n for n in names if methods.explain(n) is None))


def random_data(n: int, seed: int = 0, classes: int = 10):
    from ..parts import candidates
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return x, candidates.uniform_candidates(y, classes, 0.3, seed), y


def train_check(method: str, device: str, graph: bool, arch: str = "tiny_cnn", n: int = 128,
                batch: int = 32, epochs: int = 2) -> dict:
    """A few epochs of ``method`` on random images (+ one evaluation): loss terms per epoch,
    finite or not; raises on a crash or a non-finite loss."""
    from ..engine import engine, evaluation
    from .. import methods
    x, cand, y = random_data(n)
    cfg = engine.TrainConfig(method=method, arch=arch, epochs=epochs, batch_size=batch,
                             method_params=methods.tiny_params())
    tr = engine.Trainer(cfg, x, cand, y, device, graph=graph)
    rows = [tr.train_epoch(progress=False) for _ in range(tr.total_epochs)]
    raw, adjusted = evaluation.evaluate(tr.net, x[:64], y[:64], np.bincount(y, minlength=10),
                                        tr.log_prior())
    losses = {k: [r[k] for r in rows] for k in rows[0] if k.startswith("loss")}
    bad = [k for k, v in losses.items() if not all(math.isfinite(t) for t in v)]
    if bad:
        raise FloatingPointError(f"{method}: non-finite {bad}: {losses}")
    return {"graph": tr.graph, "epochs": len(rows), "losses": losses,
            "epoch_s": [round(r["train_s"], 3) for r in rows], "eval_acc": raw["overall"],
            **({"captures": tr._captured.captures} if tr.graph else {})}


def compare_paths(eager: dict, graph: dict, rel: float = 0.02, abs_: float = 2e-3) -> dict:
    """Largest gap between the eager and graph runs' per-epoch loss terms; the two draw the
    same random numbers, so bf16 rounding alone separates them (the tolerance of
    tests/test_cuda_graph.py): ``AssertionError`` past ``rel`` × |eager| + ``abs_``."""
    pairs = [(k, a, b) for k in eager["losses"]
             for a, b in zip(eager["losses"][k], graph["losses"].get(k, []))]
    off = [(k, a, b) for k, a, b in pairs if abs(a - b) > rel * abs(a) + abs_]
    if off:
        raise AssertionError(f"graph and eager losses differ: {off[:4]} (term, eager, graph)")
    return {"max_abs_gap": max((abs(a - b) for _, a, b in pairs), default=0.0)}


def method_work(camp: Campaign, name: str, **kw):
    def run():
        eager = train_check(name, camp.device, False, **kw)
        if camp.device != "cuda":
            return {"eager": eager, "graph": "not run: CUDA graphs need a CUDA device"}
        graph = train_check(name, camp.device, True, **kw)
        return {"eager": eager, "graph": graph, **compare_paths(eager, graph)}
    return run


def generator_check(name: str, device: str, run_dir: Path) -> dict:
    """Fit backend ``name`` with its ``TINY`` settings on 3 classes of random images (a
    feature-space backend: random feature vectors) and draw 2 samples per class; checks
    shape, dtype and finiteness."""
    from .. import generators
    from ..rundir import jsonl, runfiles
    counts = [9, 6, 3]
    labels = np.repeat(np.arange(3), counts)
    run_dir.mkdir(parents=True, exist_ok=True)
    runfiles.save_dataset(run_dir, dict(indices=np.arange(len(labels)), labels=labels,
                                       candidates=np.eye(3, dtype=bool)[labels],
                                       class_counts=np.array(counts)), {})
    jsonl.write(run_dir / "captions.jsonl",            # sd prompts from captions
                [{"index": i, "label": int(labels[i]), "caption": f"a photo number {i}"}
                 for i in range(len(labels))])
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8)
    gen = generators.get(name)
    if gen.space == "feature":
        x = rng.normal(size=(len(labels), 16)).astype(np.float32)
    P = {**generators.profile_defaults("smoke"), **gen.TINY, "SEED": 0, "TARGET_PER_CLASS": 8,
         "DEVICE": device, "GENERATOR": name, "CLASSES": ("cat", "dog", "frog")}
    fit = gen.fit(x, labels, counts, P, run_dir)
    samples = np.concatenate([gen.sample(c, 2, seed=0) for c in range(3)])
    if samples.shape[1:] != x.shape[1:]:
        raise AssertionError(f"{name}: samples of shape {samples.shape[1:]}, not {x.shape[1:]}")
    if not np.isfinite(samples.astype(np.float64)).all():
        raise FloatingPointError(f"{name}: non-finite samples")
    return {"fit": {k: v for k, v in fit.items() if isinstance(v, (int, float, bool, str))},
            "samples": list(samples.shape), "dtype": str(samples.dtype)}


def generator_checks(device: str, work_dir: Path) -> list:
    """The device checks of every registered backend (:func:`generator_check`)."""
    from .. import generators
    return [(f"generator:{name}", gen.REQUIRES,
             lambda name=name: generator_check(name, device, work_dir / f"gen-{name}"))
            for name, gen in generators.GENERATORS.items()]


def device_checks(camp: Campaign, deadline: float) -> dict:
    paper = ({"arch": "tiny_cnn", "n": 64, "batch": 16} if camp.tiny else
             {"arch": "resnet18", "n": 1024, "batch": 256})
    small = {"n": 48, "batch": 16} if camp.tiny else {}
    work = [("paper_pass", (), method_work(camp, "able+records", epochs=2, **paper))]
    work += [(f"method:{name}", (), method_work(camp, name, **small))
             for name in check_methods(camp)]
    work += generator_checks(camp.device, camp.work)
    records, status = items(deadline, work)
    return {"status": status, "items": records, "headline": summary_line(records)}
