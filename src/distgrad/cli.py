"""Command line: ``distgrad algorithms | train | compare | serve | work | reproduce``.

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
        threads=args.threads, device=args.device, on_failure=args.on_failure,
        checkpoint_every=args.checkpoint_every, deferred_eval=args.deferred_eval,
        compression=args.compress, error_feedback=not args.no_error_feedback,
        momentum_target=args.momentum_target,
    )


_RUN_MODE_DESTS = {"resume", "replay", "out", "overwrite", "quiet", "func", "command",
                   "defaults"}


def cmd_train(args: argparse.Namespace) -> int:
    from distgrad.job import train

    call: dict[str, Any] = {}
    if args.resume or args.replay:
        if args.resume and args.replay:
            raise ConfigError("--resume and --replay exclude each other")
        changed = [d for d, v in args.defaults.items()
                   if d not in _RUN_MODE_DESTS and getattr(args, d) != v]
        if changed:
            flag = "--" + changed[0].replace("_", "-")
            raise ConfigError(f"{flag} cannot be combined with --resume/--replay: the job is "
                              "the one recorded in the run directory")
    if args.resume:
        out = Path(args.resume)
        call["resume"] = out
        label = f"resume {out.name}"
    else:
        if args.replay:
            call["replay"] = args.replay
            label = f"replay {Path(args.replay).name}"
        else:
            call["job"] = job = _job_from_args(args)
            call["engine"] = _engine_from_args(args, job)
            label = f"{job.algorithm} n={job.workers}"
        out = Path(args.out) if args.out else Path("runs") / (
            f"{label.replace(' ', '-').replace('=', '')}-{time.strftime('%Y%m%d-%H%M%S')}")
        call.update(out=out, overwrite=args.overwrite)
    bar = None
    progress = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=None, unit="sample", unit_scale=True, dynamic_ncols=True,
                   mininterval=1.0, desc=label, file=sys.stderr)

        def progress(done: int, total: int) -> None:
            if bar.total is None:
                bar.total = total
            bar.update(done - bar.n)

    try:
        result = train(progress=progress, **call)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        hint = (f"; continue with: distgrad train --resume {out}"
                if (out / "checkpoint.pt").exists() else "")
        sys.stderr.write(f"interrupted; partial run written to {out}{hint}\n")
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


# --------------------------------------------------------------------------- remote engines


def _read_secret(args: argparse.Namespace, create: bool) -> bytes:
    """The shared secret: ``--secret-file`` (created if missing when ``create``), else the
    environment variable. Never a command-line value."""
    import os

    from distgrad.transport.auth import SECRET_ENV, check_secret, read_secret_file

    if args.secret_file:
        path = Path(args.secret_file)
        existed = path.exists()
        secret = read_secret_file(path, create=create)
        if not existed:
            sys.stderr.write(f"wrote a new shared secret to {path} (mode 600); give the "
                             "workers this file or its content in $DISTGRAD_SECRET\n")
        return secret
    if os.environ.get(SECRET_ENV):
        return check_secret(os.environ[SECRET_ENV])
    raise ConfigError(f"no shared secret: pass --secret-file PATH or set ${SECRET_ENV}")


def _engine_from_args(args: argparse.Namespace, job: Any) -> Any:
    """An engine instance configured from the engine options (None: the job's default)."""
    if getattr(args, "engine_instance", None) is not None:
        return args.engine_instance
    if job.engine == "ray":
        from distgrad.engines.ray import RayEngine

        return RayEngine(address=args.ray_address, shard_threshold=args.ray_shard_threshold,
                         shards=args.ray_shards, max_restarts=args.max_restarts)
    if job.engine == "spark":
        from distgrad.engines.spark import SparkEngine

        return SparkEngine(master=args.spark_master, max_failures=args.max_restarts + 1)
    return None


def _configure_logging(level: str) -> None:
    import logging

    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")


def cmd_serve(args: argparse.Namespace) -> int:
    from distgrad.engines.net import NetEngine

    _configure_logging(args.log_level)
    args.engine = "net"
    secret = _read_secret(args, create=True)

    def announce(address: str) -> None:
        print(f"distgrad server listening on {address}", flush=True)
        print(f"start workers with: distgrad work --connect {address} "
              f"{'--secret-file ' + args.secret_file if args.secret_file else ''}".rstrip(),
              flush=True)
        if args.address_file:
            tmp = Path(args.address_file + ".tmp")
            tmp.write_text(address + "\n")
            tmp.replace(args.address_file)

    args.engine_instance = NetEngine(
        secret, bind=args.bind, port=args.port, advertise=args.advertise,
        integrity=args.integrity, worker_timeout=args.worker_timeout,
        rejoin_timeout=args.rejoin_timeout, on_listen=announce)
    return cmd_train(args)


def cmd_work(args: argparse.Namespace) -> int:
    from distgrad.transport.client import parse_address
    from distgrad.transport.worker_main import work

    _configure_logging(args.log_level)
    parse_address(args.connect)
    secret = _read_secret(args, create=False)
    if args.processes < 1:
        raise ConfigError(f"--processes must be >= 1, got {args.processes}")
    if args.worker is not None and args.worker < 0:
        raise ConfigError(f"--worker must be >= 0, got {args.worker}")
    return work(args.connect, secret, processes=args.processes, worker=args.worker,
                threads=args.threads or 1, timeout=args.timeout, device=args.device)


def _add_remote_commands(sub: Any, train_parser: argparse.ArgumentParser) -> None:
    """``train``'s engine options, and the ``serve`` / ``work`` commands."""
    p = sub.add_parser(
        "serve", parents=[train_parser], conflict_handler="resolve",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="start a network parameter server for workers on other hosts",
        description="Start a parameter server that `distgrad work` processes on other hosts "
                    "join over TCP (SLURM, Kubernetes, SSH). Takes every option of `train`; "
                    "prints the address to give the workers and writes the run directory "
                    "when all workers are done.",
        epilog="example:\n  distgrad serve --algorithm adag --workers 4 --epochs 1 "
               "--secret-file ~/.distgrad-secret --bind 0.0.0.0 --address-file addr\n"
               "  distgrad work --connect $(cat addr) --secret-file ~/.distgrad-secret "
               "--processes 4")
    g = p.add_argument_group("network server")
    g.add_argument("--bind", default="127.0.0.1", metavar="ADDR",
                   help="interface to listen on (default 127.0.0.1; 0.0.0.0 for other hosts)")
    g.add_argument("--port", type=int, default=0,
                   help="TCP port (default 0: the OS chooses a free one)")
    g.add_argument("--advertise", default=None, metavar="HOST",
                   help="host name printed for the workers (default: the bind address, or "
                        "this host's name with --bind 0.0.0.0)")
    g.add_argument("--secret-file", default=None, metavar="PATH",
                   help="file holding the shared secret; created (mode 600) if missing. "
                        "Default: $DISTGRAD_SECRET")
    g.add_argument("--address-file", default=None, metavar="PATH",
                   help="also write HOST:PORT to this file (for job scripts)")
    g.add_argument("--integrity", default="full", choices=("full", "header"),
                   help="MAC every payload (full, default) or only headers (faster; on "
                        "trusted networks)")
    g.add_argument("--worker-timeout", type=float, default=120.0, metavar="SEC",
                   help="a worker silent this long is declared dead (default 120)")
    g.add_argument("--rejoin-timeout", type=float, default=None, metavar="SEC",
                   help="with no worker running, a dead worker not replaced within this time "
                        "is abandoned and its samples reported lost (default: "
                        "--worker-timeout)")
    g.add_argument("--log-level", default="info", choices=("debug", "info", "warning"),
                   help="server log level on stderr (default info)")
    # (not engine="net" here: parents share action objects, that would change train's default)
    p.set_defaults(func=cmd_serve)

    g = train_parser.add_argument_group("ray engine (--engine ray)")
    g.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT",
                   help="join an existing Ray cluster ('auto': the one `ray start` made on "
                        "this host); default: start a local Ray instance")
    g.add_argument("--ray-shard-threshold", type=int, default=50_000_000, metavar="N",
                   help="shard the server over several actors when the model has more than N "
                        "parameters (default 50,000,000)")
    g.add_argument("--ray-shards", type=int, default=None, metavar="S",
                   help="number of server shards when sharding (default: one per 25M "
                        "parameters)")
    g = train_parser.add_argument_group("spark engine (--engine spark)")
    g.add_argument("--spark-master", default=None, metavar="URL",
                   help="Spark master (default: the session spark-submit made, else "
                        "local[WORKERS])")
    g = train_parser.add_argument_group("fault tolerance (ray, spark)")
    g.add_argument("--max-restarts", type=int, default=3, metavar="R",
                   help="restarts of a failed worker (Ray actor; Spark task attempts - 1) "
                        "before the run fails (default 3)")

    p = sub.add_parser(
        "work", help="start worker process(es) that join a `distgrad serve` server",
        description="Connect to a `distgrad serve` server, authenticate with the shared "
                    "secret, receive the job, and train this host's share of it.")
    p.add_argument("--connect", required=True, metavar="HOST:PORT",
                   help="the address `distgrad serve` printed")
    p.add_argument("--secret-file", default=None, metavar="PATH",
                   help="file holding the shared secret (default: $DISTGRAD_SECRET)")
    p.add_argument("--processes", type=int, default=1, metavar="N",
                   help="worker processes to start on this host (default 1)")
    p.add_argument("--worker", type=int, default=None, metavar="K",
                   help="take worker id K (K..K+N-1 with --processes N), e.g. to replace a "
                        "dead worker; default: any free id")
    p.add_argument("--threads", type=int, default=1, metavar="T",
                   help="torch threads per worker process (default 1)")
    p.add_argument("--device", default="cpu", help="torch device of the replica (default cpu)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SEC",
                   help="resend a request the server has not answered after SEC seconds; "
                        "give up after 3 resends (default 60)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning"),
                   help="log level on stderr (default info)")
    p.set_defaults(func=cmd_work)


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
    from distgrad.compression import CODECS
    from distgrad.data import DATASETS, SHARDINGS
    from distgrad.engines.timing import TIMING_MODELS
    from distgrad.job import ENGINES
    from distgrad.models import MODELS
    from distgrad.optim import INNER_OPTIMIZERS

    parser = _Parser(prog="distgrad", description=(
        "Data-parallel PyTorch training with a parameter server: the asynchronous "
        "optimizers of Hermans' thesis and newer ones, on local worker processes, a "
        "deterministic simulator, TCP workers on other hosts, Ray or Spark."))
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
    g.add_argument("--engine", default="local", metavar="NAME",
                   help=f"one of: {', '.join(ENGINES)} (default local: one process per "
                        "worker on this machine; sim: deterministic simulator)")
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

    g = p.add_argument_group("worker processes (engine local)")
    g.add_argument("--device", default="cpu", metavar="DEV",
                   help="cpu|cuda: where workers train; cuda assigns GPUs round-robin, the "
                        "center stays in host shared memory (default cpu)")
    g.add_argument("--on-failure", default="reassign", metavar="HOW",
                   help="reassign|drop: what happens to the samples a dead worker had not "
                        "committed (default reassign: a live worker takes them)")
    g.add_argument("--checkpoint-every", type=float, default=None, metavar="SEC",
                   help="snapshot the server (center, rule state, clock) every SEC seconds to "
                        "DIR/checkpoint.pt")
    g.add_argument("--deferred-eval", action="store_true",
                   help="snapshot the center on the --eval-every schedule but evaluate the "
                        "snapshots after training (no CPU taken from the workers)")
    g.add_argument("--resume", metavar="DIR",
                   help="continue the run in DIR from its last checkpoint")
    g.add_argument("--replay", metavar="DIR",
                   help="rerun the sim run recorded in DIR on local worker processes in the "
                        "recorded commit order (ends with the same params_sha256)")

    g = p.add_argument_group("commits")
    g.add_argument("--compress", default="none", metavar="CODEC",
                   help=f"compress every commit: {'|'.join(CODECS)} (default none; int8 has "
                        "one scale per parameter tensor); bytes per commit go to the events "
                        "and summary.json")
    g.add_argument("--no-error-feedback", action="store_true",
                   help="do not carry what compression lost into the next commit")
    g.add_argument("--momentum-target", type=float, default=None, metavar="MU",
                   help="EXPERIMENTAL, asynchronous algorithms: set the inner optimizer's "
                        "momentum (sgd momentum, adam beta1) to max(MU - (1 - 1/n), 0) so "
                        "explicit + implicit momentum stays near MU")

    g = p.add_argument_group("simulator timing (engine sim; --crash also kills local workers)")
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
                   help="worker W dies at time T (sim: virtual; local: SIGKILL after T "
                        "seconds); repeatable")
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
                   help="torch threads: per worker process (local, default 1) or for the "
                        "whole simulator (sim, default: torch's choice)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)
    p.set_defaults(defaults={a.dest: a.default for a in p._actions if a.dest != "help"})

    p = sub.add_parser("compare", help="temporal efficiency E(A,B) of two runs and their "
                                       "final accuracies")
    p.add_argument("a", metavar="DIR_A")
    p.add_argument("b", metavar="DIR_B")
    p.add_argument("--te-window", type=float, default=5.0, metavar="SEC",
                   help="window of the notebook variant (thesis: 5 s, stride 1 s = window/5)")
    p.set_defaults(func=cmd_compare)

    _add_remote_commands(sub, sub.choices["train"])


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
