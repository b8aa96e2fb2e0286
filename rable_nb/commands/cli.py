"""Command line: ``python -m rable_nb run|sweep|bench|figures|results|demo|report|campaign``
(see docs/usage.md)."""
from __future__ import annotations

import argparse
import json
import sys

from .. import config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rable_nb",
                                     description="RABLE notebooks: run the executable report.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="execute notebooks in order with papermill")
    run.add_argument("--profile", help=f"one of {config.PROFILES}; without it, the main job "
                     "(the quick profile's recipe on a curated set of notebooks and methods: "
                     "runner.MAIN_JOB)")
    run.add_argument("--only", help="comma-separated notebook numbers, e.g. 00,01")
    run.add_argument("--out", help="run directory (default runs/<profile>)")
    run.add_argument("-p", nargs=2, action="append", metavar=("NAME", "VALUE"),
                     help="notebook parameter (repeatable); values parse as Python literals")
    run.add_argument("--kernel", default="python3", help="Jupyter kernel name")
    run.add_argument("--resume", action="store_true",
                     help="skip notebooks this run directory already finished with the same parameters")

    sweep = sub.add_parser("sweep", help="one papermill run per point of a parameter grid")
    sweep.add_argument("grid", help="YAML grid file (see examples/)")
    sweep.add_argument("--out", help="sweep directory (default runs/sweep-<grid name>)")
    sweep.add_argument("--kernel", default="python3", help="Jupyter kernel name")
    sweep.add_argument("--parallel", type=int, default=1, metavar="K",
                       help="local executor: points at once, each in its own process "
                            "(several visible GPUs: spread round-robin)")
    sweep.add_argument("--executor", default="local", help="local (default) or ray: every "
                       "point a Ray task, on RAY_ADDRESS's cluster or a local Ray")
    sweep.add_argument("--cpus-per-point", type=float, metavar="C",
                       help="ray: CPUs each point needs (default 1)")
    sweep.add_argument("--gpus-per-point", type=float, metavar="G",
                       help="ray: GPUs each point needs (default 0; 0.5 = two points per GPU)")

    bench = sub.add_parser("bench", help="throughput benchmark; last line is one JSON object")
    bench.add_argument("what", choices=("train", "synth", "gen", "augment"),
                       help="train: a training step; synth: Stable Diffusion; gen: a generator "
                            "backend; augment: the augmented views alone")
    bench.add_argument("--generator", default="pixel",
                       help="backend timed by `bench gen`: one whose class has a `bench` "
                            "(sd's is `bench synth`)")
    bench.add_argument("--profile", default="smoke", help=f"one of {config.PROFILES}")
    bench.add_argument("--device", default="auto", help=f"one of {config.DEVICES}")
    bench.add_argument("--batch-size", type=int, nargs="*", help="batch size(s) to time")
    paths = bench.add_mutually_exclusive_group()
    paths.add_argument("--eager", dest="paths", action="store_const", const=("eager",),
                       help="train: time the eager step (the default)")
    paths.add_argument("--graph", dest="paths", action="store_const", const=("cuda_graph",),
                       help="train: time the CUDA-graph step (CUDA only)")
    paths.add_argument("--both", dest="paths", action="store_const",
                       const=("eager", "cuda_graph"), help="train: time both, in one run")
    bench.add_argument("--precision", nargs="+", choices=("bf16", "fp32"),
                       help="train: forward-pass precision(s) to time, a row each (default: bf16 "
                            "on CUDA, fp32 on CPU; 'bf16 fp32' gives fp32_over_bf16, the speed "
                            "cost of PRECISION=fp32)")

    figures = sub.add_parser("figures", help="copy a run's report figures into figures/")
    figures.add_argument("--run", required=True, help="run directory, e.g. runs/paper")
    figures.add_argument("--force", action="store_true", help="allow non-paper profiles")

    results = sub.add_parser("results", help="regenerate results/README.md from its metrics files")
    results.add_argument("--root", help="results folder (default results/)")

    demo = sub.add_parser("demo", help="serve notebook 07's app as a web page (Voilà)")
    demo.add_argument("--run", help="run directory (default: the newest one with a trained model)")
    demo.add_argument("--port", type=int, help="port (default: a free one; a busy one is refused)")
    demo.add_argument("--pool", type=int, help="pre-heated kernels waiting for visitors "
                      "(default webapp.POOL = 1; 0: each visitor waits for a new kernel)")
    demo.add_argument("--cull-after", type=float, help="seconds after which a kernel with no "
                      "page and no activity is shut down (default webapp.CULL_AFTER = 120)")

    report = sub.add_parser("report", help="a run's executed notebooks as one HTML page")
    report.add_argument("--run", required=True, help="run directory, e.g. runs/smoke")
    report.add_argument("--out", help="HTML file (default <run>/report.html)")

    from .campaign import add_parser as add_campaign  # torch-free until it runs
    add_campaign(sub)
    return parser


def is_project_error(err: BaseException) -> bool:
    """An error this package raises on purpose (its message names the file and the fix)."""
    return type(err).__module__.split(".")[0] == __package__.split(".")[0]


def main(argv: list[str] | None = None) -> int:
    """Every command, under one handler: the package's own errors and the operating
    system's (disk full, read-only, permission) end in one line naming the file and what
    to do, exit code 1, never a raw traceback."""
    args = build_parser().parse_args(argv)
    try:
        return _command(args)
    except Exception as err:  # noqa: BLE001 - sorted below; anything else is a bug: raised
        if is_project_error(err):
            print(f"error: {err}", file=sys.stderr)
        elif isinstance(err, OSError):
            from ..rundir.artefacts import os_error_line
            print(f"error: {os_error_line(err)}", file=sys.stderr)
        else:
            raise
        return 1


def _command(args) -> int:
    if args.command == "run":
        from ..batch.runner import main_run
        return main_run(args)
    if args.command == "sweep":
        from ..stages.s08_sweep import main_sweep
        return main_sweep(args)
    if args.command == "results":
        from ..batch.results import main_results
        return main_results(args)
    if args.command == "campaign":
        from .campaign import main_campaign
        return main_campaign(args)
    if args.command == "figures":
        from .figures import main_figures
        return main_figures(args)
    if args.command == "demo":
        from .webapp import main_demo
        return main_demo(args)
    if args.command == "report":
        from .report import main_report
        return main_report(args)
    if args.profile not in config.PROFILES:
        print(f"error: unknown profile {args.profile!r}; choose one of {config.PROFILES}",
              file=sys.stderr)
        return 1
    if (args.paths is not None or args.precision is not None) and args.what != "train":
        print("error: --eager/--graph/--both/--precision apply to 'bench train' only",
              file=sys.stderr)
        return 1
    from . import bench
    if args.what == "augment":  # the views alone: independent of the profile
        result = bench.augment_views(device=args.device, batch_sizes=args.batch_size)
    elif args.what == "train":
        result = bench.train(profile=args.profile, device=args.device,
                             batch_sizes=args.batch_size, paths=args.paths or ("eager",),
                             precisions=args.precision)
    else:
        name = "sd" if args.what == "synth" else args.generator
        try:
            result = bench.generator(name, args.profile, args.device, args.batch_size)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
