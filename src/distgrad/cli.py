"""Command line: ``distgrad algorithms | train | compare | reproduce``.

The only module that reads the environment and configures logging or threads.
Bad input gives one line on stderr naming the bad value, and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from distgrad.errors import ConfigError

EXAMPLE = (
    "example:\n  distgrad train --algorithm adag --workers 8 --window 10 --epochs 3 "
    "--set gamma=1e-4 --out runs/adag"
)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _fail(message: str) -> NoReturn:
    sys.stderr.write(f"distgrad: error: {message}\n")
    raise SystemExit(2)


# --------------------------------------------------------------------------- algorithms


def cmd_algorithms(args: argparse.Namespace) -> int:
    from distgrad.algorithms import REGISTRY, names

    width = max(len(n) for n in names())
    for name in names():
        algo = REGISTRY[name]
        if args.verbose:
            cfg = algo.config()
            params = ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items())
            print(f"{name:<{width}}  {algo.summary}\n{'':<{width}}  [{params}]  {algo.reference}")
        else:
            print(f"{name:<{width}}  {algo.summary}")
    return 0


# --------------------------------------------------------------------------- train


def _parse_set(items: list[str]) -> dict[str, str]:
    params: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        params[key.strip()] = value.strip()
    return params


def _parse_crash(text: str) -> tuple[int, float]:
    worker, sep, when = text.partition("@")
    try:
        if not sep:
            raise ValueError
        return int(worker), float(when)
    except ValueError:
        raise ConfigError(f"--crash expects WORKER@TIME (e.g. 3@120), got {text!r}") from None


def _job_from_args(args: argparse.Namespace) -> Any:
    from distgrad.engines.timing import Timing
    from distgrad.job import Job

    params: dict[str, Any] = _parse_set(args.set or [])
    window = args.window
    if "window" in params:
        if window is not None:
            raise ConfigError("window given twice (--window and --set window=...)")
        try:
            window = int(params.pop("window"))
        except ValueError:
            raise ConfigError("window must be an integer") from None
    timing = Timing(
        model=args.timing, step_time=args.step_time, sigma=args.sigma,
        stragglers=args.stragglers, straggler_factor=args.straggler_factor,
        crashes=tuple(_parse_crash(c) for c in args.crash or []),
        commit_time=args.commit_time, server_time=args.server_time,
    )
    return Job(
        algorithm=args.algorithm, params=params, engine=args.engine, workers=args.workers,
        window=window, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        inner_optimizer=args.inner_optimizer, dataset=args.dataset, model=args.model,
        sharding=args.sharding, train_samples=args.train_samples, seed=args.seed,
        eval_every=args.eval_every, timing=timing,
        track_distance=not args.no_distance, record_batches=not args.no_batch_log,
    )


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from distgrad.job import train

    job = _job_from_args(args)
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else Path("runs") / (
        f"{job.algorithm}-n{job.workers}-{time.strftime('%Y%m%d-%H%M%S')}")
    bar = None
    progress = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=None, unit="sample", unit_scale=True, dynamic_ncols=True, mininterval=1.0,
                   desc=f"{job.algorithm} n={job.workers}", file=sys.stderr)

        def progress(done: int, total: int) -> None:
            if bar.total is None:
                bar.total = total
            bar.update(done - bar.n)

    try:
        result = train(job, out=out, overwrite=args.overwrite, progress=progress)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        sys.stderr.write(f"interrupted; partial run written to {out}\n")
        return 130
    if bar is not None:
        bar.close()
    s = result.summary
    acc = s["test_accuracy"]
    print(f"test accuracy {acc:.4f}  test loss {s['test_loss'] or float('nan'):.4f}  "
          f"train accuracy {s['train_accuracy']:.4f}" if acc is not None else "test accuracy n/a")
    virtual = f", {s['virtual_seconds']:.1f} s virtual" if s.get("virtual_seconds") else ""
    print(f"{s['samples']} samples, {s['commits']} commits, mean staleness "
          f"{s['staleness_mean']:.2f}, {s['wall_seconds']:.1f} s wall{virtual}")
    if s["diverged"]:
        print("the run DIVERGED (non-finite loss or accuracy at chance)")
    print(f"run directory: {out}")
    return 0


# --------------------------------------------------------------------------- compare


def cmd_compare(args: argparse.Namespace) -> int:
    from distgrad.metrics.efficiency import center_curve, notebook_curve, temporal_efficiency
    from distgrad.metrics.events import read_events

    runs = []
    for d in (Path(args.a), Path(args.b)):
        events_path = d / "events.jsonl"
        if not events_path.exists():
            raise ConfigError(f"{str(d)!r} is not a run directory (no events.jsonl)")
        summary_path = d / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        runs.append((d, read_events(events_path), summary))
    (da, ea, sa), (db, eb, sb) = runs
    ca, cb = center_curve(ea), center_curve(eb)
    if len(ca[0]) < 2 or len(cb[0]) < 2:
        raise ConfigError("each run needs at least two evaluations of the center")
    e_center = temporal_efficiency(ca, cb)
    try:
        e_nb: float | None = temporal_efficiency(
            notebook_curve(ea, window=args.te_window, stride=args.te_window / 5),
            notebook_curve(eb, window=args.te_window, stride=args.te_window / 5))
        nb_note = ""
    except ValueError as exc:
        e_nb, nb_note = None, str(exc)
    for label, d, s in (("A", da, sa), ("B", db, sb)):
        acc = s.get("test_accuracy")
        print(f"{label}: {d}  {s.get('algorithm', '?')} n={s.get('workers', '?')} "
              f"λ={s.get('window', '?')}  final test accuracy "
              f"{'n/a' if acc is None else f'{acc:.4f}'}")
    print(f"E(A,B) center test accuracy vs time: {e_center:.3f}")
    if e_nb is not None:
        print(f"E(A,B) notebook ({args.te_window:g} s window of mini-batch accuracy): {e_nb:.3f}")
    else:
        print(f"E(A,B) notebook variant: n/a ({nb_note}; try a smaller --te-window)")
    print("E > 1: A reaches higher accuracy sooner (area under accuracy-vs-time, "
          "up to the shorter run's end)")
    return 0


# --------------------------------------------------------------------------- reproduce


def cmd_reproduce(args: argparse.Namespace) -> int:
    import shlex

    import torch

    from distgrad import reproduce
    from distgrad.errors import choose
    from distgrad.reproduce.spec import SCALES

    if args.list:
        width = max(len(n) for n in reproduce.names())
        for name in reproduce.names():
            print(f"{name:<{width}}  {reproduce.get_experiment(name).shows}")
        return 0
    if not args.name:
        raise ConfigError("name an experiment (see `distgrad reproduce --list`) or `all`")
    choose("scale", args.scale, SCALES)
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    names = reproduce.names() if args.name == ["all"] else args.name
    full = [n.strip() for n in (args.full or "").split(",") if n.strip()]
    for name in [*names, *full]:
        reproduce.get_experiment(name)  # unknown names fail before anything runs
    for name in full:
        if name not in names:
            raise ConfigError(f"--full {name}: not among the experiments to run")
    if args.page and names != reproduce.names():
        raise ConfigError("--page needs every experiment: use `distgrad reproduce all`")
    if args.discussion and not Path(args.discussion).is_file():
        raise ConfigError(f"--discussion {args.discussion!r} is not a file")
    base = Path(args.out) if args.out else Path("runs") / f"reproduce-{args.scale}"
    single = len(names) == 1 and args.out is not None
    runs_dir = base / "runs"
    command = shlex.join(["distgrad", "reproduce", *args.name, "--scale", args.scale,
                          *(["--full", ",".join(full)] if full else []),
                          "--engine", args.engine, "--out", str(base),
                          *(["--threads", str(args.threads)] if args.threads else []),
                          *(["--page", args.page] if args.page else []),
                          *(["--discussion", args.discussion] if args.discussion else [])])
    outcomes = []
    for name in names:
        scale = "full" if name in full else args.scale
        out = base if single else base / (name if scale == args.scale else f"{name}-{scale}")
        outcomes.append(reproduce.run_experiment(name, scale=scale, out=out,
                                                 engine=args.engine, runs_dir=runs_dir,
                                                 command=command))
    for o in outcomes:
        for claim, v in o.verdicts:
            print(f"{o.experiment.name:<22} {claim.id:<12} {v.label:<14} {v.ours}")
    counts = reproduce.summary_counts(outcomes)
    print(f"{counts[True]} hold, {counts[False]} do not hold, {counts[None]} not tested")
    for o in outcomes:
        print(f"report: {o.report}")
    if args.page:
        from distgrad.reproduce.page import write_page

        page = write_page(outcomes, Path(args.page), command=command, scale=args.scale,
                          discussion=Path(args.discussion) if args.discussion else None)
        print(f"page: {page}")
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from distgrad.algorithms import names
    from distgrad.data import DATASETS, SHARDINGS
    from distgrad.engines.timing import TIMING_MODELS
    from distgrad.job import ENGINES
    from distgrad.models import MODELS
    from distgrad.optim import INNER_OPTIMIZERS

    parser = _Parser(prog="distgrad", description=(
        "Data-parallel PyTorch training with a parameter server: the asynchronous "
        "optimizers of Hermans' thesis on a deterministic simulator."))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("algorithms", help="list the algorithms, one per line")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also show each algorithm's hyperparameters and defaults")
    p.set_defaults(func=cmd_algorithms)

    p = sub.add_parser("train", help="train a model and write a run directory",
                       epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to train")
    g.add_argument("--algorithm", default="adag", metavar="NAME",
                   help=f"one of: {', '.join(names())} (default adag)")
    g.add_argument("--engine", default="sim", metavar="NAME",
                   help=f"one of: {', '.join(ENGINES)} (default sim)")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="number of workers n (default 2; sequential: 1)")
    g.add_argument("--window", type=int, default=None, metavar="L",
                   help="communication window λ: local steps per commit "
                        "(default: the algorithm's, see `distgrad algorithms -v`)")
    g.add_argument("--epochs", type=int, default=1, metavar="E",
                   help="passes over the training set, split over the workers (default 1)")
    g.add_argument("--batch-size", type=int, default=128, metavar="B",
                   help="mini-batch size per worker step (default 128)")
    g.add_argument("--lr", type=float, default=1e-3, metavar="X",
                   help="learning rate of the inner optimizer (default 0.001)")
    g.add_argument("--inner-optimizer", default="adam", metavar="NAME",
                   help=f"worker optimizer: {'|'.join(INNER_OPTIMIZERS)} (default adam)")
    g.add_argument("--dataset", default="mnist", metavar="NAME",
                   help=f"one of: {', '.join(DATASETS)} (default mnist)")
    g.add_argument("--model", default="mlp", metavar="NAME",
                   help=f"{'|'.join(MODELS)}: the thesis MLP 784-1000-2000-1000-10 or a "
                        "small CNN (default mlp)")
    g.add_argument("--sharding", default="shuffled", metavar="HOW",
                   help=f"how the data is split over workers: {'|'.join(SHARDINGS)} "
                        "(default shuffled)")
    g.add_argument("--train-samples", type=int, default=None, metavar="N",
                   help="use only the first N training samples (quick runs; the test set "
                        "stays complete)")
    g.add_argument("--seed", type=int, default=0, metavar="S", help="seed (default 0)")
    g.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="algorithm hyperparameter, repeatable (e.g. --set gamma=1e-4, "
                        "--set rho=5)")

    g = p.add_argument_group("simulator timing (engine sim)")
    g.add_argument("--timing", default="lognormal", metavar="MODEL",
                   help=f"step-time model: {'|'.join(TIMING_MODELS)} (default lognormal; "
                        "constant serves workers in lockstep round-robin)")
    g.add_argument("--step-time", type=float, default=0.05, metavar="SEC",
                   help="mean virtual seconds per full-batch step (default 0.05)")
    g.add_argument("--sigma", type=float, default=0.25,
                   help="lognormal jitter σ (default 0.25)")
    g.add_argument("--stragglers", type=int, default=0, metavar="K",
                   help="workers 0..K-1 are slower (default 0)")
    g.add_argument("--straggler-factor", type=float, default=2.0, metavar="F",
                   help="how much slower the stragglers are (default 2)")
    g.add_argument("--crash", action="append", metavar="W@T",
                   help="worker W dies at virtual time T; repeatable")
    g.add_argument("--commit-time", type=float, default=0.0, metavar="SEC",
                   help="virtual round-trip time of one commit (default 0)")
    g.add_argument("--server-time", type=float, default=0.0, metavar="SEC",
                   help="virtual time the server needs per commit; commits queue (default 0)")

    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="DIR",
                   help="run directory (default runs/ALGO-nN-TIMESTAMP)")
    g.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    g.add_argument("--eval-every", type=float, default=0.5, metavar="EPOCHS",
                   help="evaluate the center on the test set every this many epochs of "
                        "committed samples (default 0.5), and at the end")
    g.add_argument("--no-distance", action="store_true",
                   help="do not record ‖θ̃_t − θ̃_{t−τ}‖ per commit (saves one model copy "
                        "per worker)")
    g.add_argument("--no-batch-log", action="store_true",
                   help="do not log every mini-batch (smaller events.jsonl; no notebook-style "
                        "temporal efficiency)")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch threads for the simulator (default: torch's choice)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("compare", help="temporal efficiency E(A,B) of two runs and their "
                                       "final accuracies")
    p.add_argument("a", metavar="DIR_A")
    p.add_argument("b", metavar="DIR_B")
    p.add_argument("--te-window", type=float, default=5.0, metavar="SEC",
                   help="window of the notebook variant (thesis: 5 s, stride 1 s = window/5)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "reproduce", help="run the thesis' experiments and check its claims",
        description="Run an experiment of Hermans (2017) and write DIR/report.md: for every "
                    "claim, the condition, the thesis' number, ours, and whether it holds, "
                    "with the figures beside it. Runs are kept in DIR/runs and reused.",
        epilog="examples:\n  distgrad reproduce --list\n  distgrad reproduce e2-accumulation "
               "--scale quick --out runs/e2\n  distgrad reproduce all --scale quick --out "
               "runs/reproduce --page docs/reproduction.md",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="*", metavar="NAME",
                   help="experiment name(s) from --list, or `all`")
    p.add_argument("--list", action="store_true", help="list the experiments, one per line")
    p.add_argument("--scale", default="quick", metavar="SCALE",
                   help="full (the thesis' setup: 40 epochs, full grids; hours per experiment, "
                        "about a day for the 98-run E6 grid on 2 cores), quick (fewer epochs, "
                        "smaller grids; minutes to an hour per experiment on 2 cores) or tiny "
                        "(a smoke test with a tiny model; seconds; numbers mean nothing) "
                        "(default quick)")
    p.add_argument("--full", metavar="NAMES",
                   help="comma-separated experiments to run at scale full whatever --scale "
                        "says (their reports go to DIR/NAME-full)")
    p.add_argument("--engine", default="sim", metavar="NAME",
                   help=f"engine of the MNIST runs: one of {', '.join(ENGINES)} (default sim; "
                        "the 2-D simulations always use sim)")
    p.add_argument("--out", metavar="DIR",
                   help="one experiment: DIR/report.md; several (or none given): "
                        "DIR/NAME/report.md each; the runs go to DIR/runs "
                        "(default DIR: runs/reproduce-SCALE)")
    p.add_argument("--page", metavar="FILE",
                   help="with `all`: also write the results page (e.g. docs/reproduction.md) "
                        "and copy the figures beside it")
    p.add_argument("--discussion", metavar="FILE",
                   help="markdown inserted into the page after the claim table")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch threads (default: torch's choice)")
    p.set_defaults(func=cmd_reproduce)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except ConfigError as exc:
        _fail(str(exc))


if __name__ == "__main__":
    raise SystemExit(main())
