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


# Flags of `train` are generated from the dataclasses (one source of truth for names,
# types, defaults and help): the Job's fields (metadata "help", "flag", "metavar",
# "choices", "group"), the Timing fields (help below until Timing carries it as field
# metadata) and each engine's options (distgrad.engines.options).

TIMING_GROUP = "simulator timing (engine sim; --crash also kills local workers)"
TIMING_PREFIX = "timing_"  # argparse dests of the Timing fields (Timing.model vs Job.model)

_TIMING_FLAGS: dict[str, dict[str, Any]] = {
    "model": {"flag": "--timing", "metavar": "MODEL", "choices": "TIMING_MODELS",
              "help": "step-time model: {choices} (constant serves workers in lockstep "
                      "round-robin)"},
    "step_time": {"metavar": "SEC", "help": "mean virtual seconds per full-batch step"},
    "sigma": {"metavar": "S", "help": "lognormal jitter σ"},
    "stragglers": {"metavar": "K", "help": "workers 0..K-1 are slower"},
    "straggler_factor": {"metavar": "F", "help": "how much slower the stragglers are"},
    "crashes": {"flag": "--crash", "metavar": "W@T",
                "help": "worker W dies at time T (sim: virtual; local: SIGKILL after T "
                        "seconds); repeatable"},
    "commit_time": {"metavar": "SEC", "help": "virtual round-trip time of one commit"},
    "server_time": {"metavar": "SEC",
                    "help": "virtual time the server needs per commit; commits queue"},
    "cost_profile": {"metavar": "FILE",
                     "help": "sim: take --server-time (for the job's algorithm) and "
                             "--commit-time from a cost profile written by `distgrad "
                             "reproduce --measure-costs FILE` (costs measured on the local "
                             "engine, in units of its measured step: x --step-time, and "
                             "scaled by the model size); nonzero --server-time/--commit-time "
                             "win"},
    "fixed_order": {"help": "sim and local: each worker visits its shard in the same order "
                            "every pass (dist-keras' order) instead of reshuffling it each "
                            "pass (per-worker streams keep their own order)"},
}

# fields that take a list of values: repeated flags, parsed by _job_from_args
_REPEATED = {"params", "crashes", "model_args", "data_args"}


def _flag_meta(cls: type, f: Any) -> dict[str, Any]:
    """The CLI metadata of dataclass field ``f`` (empty: not a flag)."""
    from distgrad.engines.timing import TIMING_MODELS, Timing

    meta = dict(f.metadata)
    if cls is Timing:
        meta = {**_TIMING_FLAGS.get(f.name, {}), **meta}
        if meta.get("choices") == "TIMING_MODELS":
            meta["choices"] = lambda: TIMING_MODELS
    return meta if "help" in meta else {}


def _default_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 10_000:
        return f"{value:,}"
    return str(value)


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, *,
                        group: str | None = None, prefix: str = "",
                        seen: set[str] | None = None,
                        groups: dict[str, Any] | None = None) -> list[str]:
    """Add one flag per field of ``cls`` that has CLI metadata; return their dests.

    The flag is ``--field-name`` (or ``metadata["flag"]``), the type and default the
    field's; a boolean that defaults to True becomes a ``--no-...`` switch. ``seen``
    skips dests already added (a field several engines share, e.g. ``threads``).
    """
    import typing
    from dataclasses import fields

    from distgrad.engines.options import field_default

    seen = set() if seen is None else seen
    groups = {} if groups is None else groups
    hints = typing.get_type_hints(cls)
    dests = []
    for f in fields(cls):
        meta = _flag_meta(cls, f)
        dest = prefix + f.name
        if not meta or dest in seen:
            continue
        seen.add(dest)
        dests.append(dest)
        name = group or meta.get("group") or "options"
        if name not in groups:
            groups[name] = parser.add_argument_group(name)
        default = field_default(f)
        text = str(meta["help"])
        choices = meta.get("choices")
        if choices is not None:
            listed = list(choices() if callable(choices) else choices)
            sep = ", " if "one of: {choices}" in text else "|"
            text = text.replace("{choices}", sep.join(listed))
        kind = typing.get_args(hints[f.name]) or (hints[f.name],)
        base = next((t for t in kind if t is not type(None)), str)
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"dest": dest}
        if base is bool:
            kw["action"] = "store_false" if default else "store_true"
        elif f.name in _REPEATED:
            kw.update(action="append", default=None, metavar=meta.get("metavar"))
        else:
            if "(default" not in text and default is not None:
                text += f" (default {_default_text(default)})"
            kw.update(default=default, metavar=meta.get("metavar"),
                      type=base if base in (int, float) else str)
        groups[name].add_argument(*meta.get("short", ()), flag, help=text.replace("%", "%%"),
                                  **kw)
    return dests


def _job_from_args(args: argparse.Namespace) -> Any:
    """The Job the generated flags describe (its engine settings included)."""
    from dataclasses import fields

    from distgrad.engines.timing import Timing
    from distgrad.job import Job
    from distgrad.parts import ENGINE_FIELDS

    params: dict[str, Any] = _parse_set(args.params or [])
    window = args.window
    if "window" in params:
        if window is not None:
            raise ConfigError("window given twice (--window and --set window=...)")
        try:
            window = int(params.pop("window"))
        except ValueError:
            raise ConfigError("window must be an integer") from None
    timing_values = {f.name: getattr(args, TIMING_PREFIX + f.name) for f in fields(Timing)
                     if hasattr(args, TIMING_PREFIX + f.name)}
    timing_values["crashes"] = tuple(_parse_crash(c) for c in args.timing_crashes or [])
    values = {f.name: getattr(args, f.name) for f in fields(Job)
              if f.name not in _REPEATED and _flag_meta(Job, f)}
    values.update({name: getattr(args, name) for name in ENGINE_FIELDS})
    from distgrad.entry import parse_kwargs

    return Job(**{**values, "params": params, "window": window,
                  "model_args": parse_kwargs(args.model_args, "--model-arg"),
                  "data_args": parse_kwargs(args.data_args, "--data-arg"),
                  "timing": Timing(**timing_values)})


def _engine_options_from_args(args: argparse.Namespace, engine: str) -> Any:
    """The options dataclass of ``engine`` from the generated flags."""
    from distgrad.engines.options import options_for

    return options_for(engine, **vars(args))


_RUN_MODE_DESTS = {"resume", "replay", "out", "overwrite", "quiet", "func", "command",
                   "defaults", "flags"}


class _ProgressBar:
    """The training progress bar (tqdm on stderr), created at the first sample so that
    nothing is drawn before the arguments, ``--out`` and the job are checked. Its total
    follows the run's (reassigned work); ``phase`` names what follows training."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="sample", unit_scale=True,
                            dynamic_ncols=True, mininterval=1.0, desc=self.label,
                            file=sys.stderr)
        if self.bar.total != max(total, done):
            self.bar.total = max(total, done)
        self.bar.update(done - self.bar.n)

    def phase(self, name: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(f"{self.label}: {name}", refresh=True)
        else:
            sys.stderr.write(f"{self.label}: {name}\n")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()  # leaves the cursor on a fresh line
            self.bar = None


def _resume_command(out: Path, serve: list[str] | None = None) -> str:
    """``distgrad train --resume OUT`` as it can be run from this shell: the bare name only
    where ``distgrad`` on the PATH is this very program, else its full path, else
    ``python -m distgrad`` with this interpreter. ``serve``: the run is a ``distgrad
    serve`` run, resumed by ``serve --resume OUT`` with these network options."""
    import shlex
    import shutil

    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if argv0 is not None and argv0.name == "distgrad" and argv0.exists():
        found = shutil.which("distgrad")
        if found and Path(found).resolve() == argv0.resolve():
            prog = "distgrad"
        else:
            prog = shlex.quote(str(argv0.resolve()))
    else:
        prog = f"{shlex.quote(sys.executable)} -m distgrad"
    if serve is not None:
        return " ".join([f"{prog} serve --resume {shlex.quote(str(out))}",
                         *map(shlex.quote, serve)])
    return f"{prog} train --resume {shlex.quote(str(out))}"


def cmd_train(args: argparse.Namespace) -> int:
    call: dict[str, Any] = {}
    args.serve_resume = getattr(args, "serve_resume", None)  # set by cmd_serve
    if args.resume or args.replay:
        if args.resume and args.replay:
            raise ConfigError("--resume and --replay exclude each other")
        changed = [d for d, v in args.defaults.items()
                   if d not in _RUN_MODE_DESTS and getattr(args, d) != v]
        if changed:
            flag = args.flags.get(changed[0], "--" + changed[0].replace("_", "-"))
            raise ConfigError(f"{flag} cannot be combined with --resume/--replay: the job is "
                              "the one recorded in the run directory")
    if args.resume and args.serve_resume is None:
        from distgrad.rundir import read_run_config

        if read_run_config(Path(args.resume)).get("engine") == "net":
            raise ConfigError(f"{args.resume!r} is a `distgrad serve` run: resume it with "
                              f"`distgrad serve --resume {args.resume}` and the network "
                              "options it had (--port, --bind, --secret-file), so that its "
                              "workers reconnect")
    if args.resume:
        out = Path(args.resume)
        call["resume"] = out
        if getattr(args, "engine_instance", None) is not None:  # serve --resume
            call["engine"] = args.engine_instance
        label = f"resume {out.name}"
    else:
        if args.out:  # before anything slow starts (the job's imports, data, processes)
            from distgrad.rundir import prepare_out

            prepare_out(args.out, args.overwrite)
        if args.replay:
            call["replay"] = args.replay
            label = f"replay {Path(args.replay).name}"
        else:
            call["job"] = job = _job_from_args(args)
            if getattr(args, "engine_instance", None) is not None:  # serve: built there
                call["engine"] = args.engine_instance
            elif job.engine in ("ray", "spark"):
                call["options"] = _engine_options_from_args(args, job.engine)
            label = f"{job.algorithm} n={job.workers}"
        out = Path(args.out) if args.out else Path("runs") / (
            f"{label.replace(' ', '-').replace('=', '')}-{time.strftime('%Y%m%d-%H%M%S')}")
        call.update(out=out, overwrite=args.overwrite)
    from distgrad.job import train
    from distgrad.run import RunFailed

    if not getattr(args, "engine_instance", None):  # serve configured its own logging
        _configure_logging("warning" if args.quiet else "info", fmt="distgrad: %(message)s")
    bar = None if args.quiet else _ProgressBar(label)
    import signal
    import threading

    # SIGTERM (SLURM, Kubernetes) acts as Ctrl-C does, from the start on
    term = (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
    if term:
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        result = train(progress=bar, **call)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        if (out / "checkpoint.pt").exists():
            hint = f"; continue with:\n  {_resume_command(out, args.serve_resume)}"
        else:
            hint = " (no checkpoint was written: nothing to resume; run it again)"
        sys.stderr.write(f"interrupted; partial run written to {out}{hint}\n")
        return 130
    except RunFailed as exc:
        if bar is not None:
            bar.close()
        sys.stderr.write(f"distgrad: error: the run failed: {exc}\n")
        cause = exc.__cause__  # an unexpected error: its traceback; ours explain themselves
        if cause is not None and type(cause).__name__ not in ("WorkerFailed", "EventLogError"):
            import traceback

            traceback.print_exception(cause, file=sys.stderr)
        if (out / "summary.json").exists():
            sys.stderr.write(f"summary: {out / 'summary.json'} (status: failed)\n")
        if (out / "checkpoint.pt").exists():
            sys.stderr.write(f"once the cause is fixed, continue from the last checkpoint "
                             f"with:\n  {_resume_command(out, args.serve_resume)}\n")
        return 1
    finally:
        if bar is not None:
            bar.close()
        if term:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    s = result.summary
    faults = [e for e in result.events if e["type"] == "fault"]
    if faults:
        from distgrad.metrics.events import describe_fault

        print(f"{len(faults)} fault{'s' if len(faults) > 1 else ''}, "
              f"{s['samples_lost']:,} samples lost:")
        for f in faults:
            print(f"  {describe_fault(f)}")
    failed_ckpts = [e for e in result.events if e["type"] == "checkpoint_failed"]
    if failed_ckpts:
        print(f"{len(failed_ckpts)} checkpoint(s) could not be written: "
              f"{failed_ckpts[-1].get('error')}")
    acc = s["test_accuracy"]
    def num(key: str) -> float:  # a figure the task does not have prints as nan
        return float("nan") if s.get(key) is None else s[key]
    print(f"test accuracy {acc:.4f}  test loss {num('test_loss'):.4f}  "
          f"train accuracy {num('train_accuracy'):.4f}" if acc is not None
          else "test accuracy n/a")
    extra = [f"{k.replace('_', ' ')} {s[k]:.4g}" for k in (
        "test_perplexity", "test_mse", "test_r2", "train_mse", "train_r2")
        if s.get(k) is not None]
    if extra or s.get("test_note"):
        print("  ".join(extra) + (f"  ({s['test_note']})" if s.get("test_note") else ""))
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
    clocks = ["virtual" if s.get("engine") == "sim" else "wall" if s.get("engine") else "?"
              for s in (sa, sb)]
    if clocks[0] != clocks[1]:
        if not args.mixed_clocks:
            raise ConfigError(
                f"A ran on {sa.get('engine', '?')!r} ({clocks[0]} seconds), B on "
                f"{sb.get('engine', '?')!r} ({clocks[1]} seconds): a temporal efficiency "
                f"over two different clocks means nothing; compare runs of the same kind "
                f"(or pass --mixed-clocks)")
        sys.stderr.write(f"warning: A's time is {clocks[0]} seconds, B's {clocks[1]} "
                         f"seconds: E(A,B) mixes two clocks\n")
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


def _configure_logging(level: str,
                       fmt: str = "%(asctime)s %(name)s %(levelname)s: %(message)s") -> None:
    """distgrad's log records at ``level`` and above (others' warnings too) on stderr, each
    on a clean line above a progress bar (``tqdm.write``); configuring again replaces it."""
    import logging

    class _TqdmHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            try:
                from tqdm import tqdm

                tqdm.write(self.format(record), file=sys.stderr)
            except Exception:
                self.handleError(record)

    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "distgrad_cli", False):
            root.removeHandler(h)
    handler = _TqdmHandler()
    handler.distgrad_cli = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    logging.getLogger("distgrad").setLevel(getattr(logging, level.upper()))


def cmd_serve(args: argparse.Namespace) -> int:
    from distgrad.engines.net import NetEngine

    # -q: warnings and errors only (a worker joining or leaving is INFO)
    _configure_logging("warning" if args.quiet else args.log_level)
    if not args.resume:  # (a resumed run's job, engine included, is the recorded one)
        args.engine = "net"
    secret = _read_secret(args, create=True)

    def resume_args(port: str) -> list[str]:
        """The network options of ``serve --resume``: the same port (the workers reconnect
        there), secret and timeouts (the secret itself is never printed)."""
        return [*(["--bind", opts.bind] if opts.bind != "127.0.0.1" else []), "--port", port,
                *(["--advertise", opts.advertise] if opts.advertise else []),
                *(["--secret-file", args.secret_file] if args.secret_file else []),
                *(["--protection", opts.protection] if opts.protection != "encrypt" else []),
                "--worker-timeout", f"{opts.worker_timeout:g}",
                *(["--rejoin-timeout", f"{opts.rejoin_timeout:g}"]
                  if opts.rejoin_timeout is not None else [])]

    def announce(address: str) -> None:
        args.serve_resume = resume_args(address.rpartition(":")[2])  # the port bound
        print(f"distgrad server listening on {address}", flush=True)
        print(f"start workers with: distgrad work --connect {address} "
              f"{'--secret-file ' + args.secret_file if args.secret_file else ''}".rstrip(),
              flush=True)
        if args.address_file:
            tmp = Path(args.address_file + ".tmp")
            tmp.write_text(address + "\n")
            tmp.replace(args.address_file)

    opts = _engine_options_from_args(args, "net")
    args.serve_resume = resume_args(str(opts.port))
    engine: Any = NetEngine
    extra: dict[str, Any] = {}
    if opts.shards > 1:  # DistBelief-style: one server per slice of the center
        if args.resume or args.checkpoint_every:
            raise ConfigError(f"--shards {opts.shards} cannot checkpoint or resume; use "
                              "--shards 1 with --checkpoint-every/--resume")
        from distgrad.transport.sharded import ShardedNetEngine

        engine, extra = ShardedNetEngine, {"shards": opts.shards}
    args.engine_instance = engine(
        secret, bind=opts.bind, port=opts.port, advertise=opts.advertise,
        protection=opts.protection, worker_timeout=opts.worker_timeout,
        rejoin_timeout=opts.rejoin_timeout, on_listen=announce, **extra)
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
                threads=args.threads or 1, timeout=args.timeout, device=args.device,
                protection=args.protection)


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
    from distgrad.engines.options import NetOptions, RayOptions, SparkOptions

    groups: dict[str, Any] = {}
    add_dataclass_flags(p, NetOptions, group="network server", groups=groups)
    g = groups["network server"]
    shards = next(a for a in g._group_actions if a.dest == "shards")
    shards.help = ("cut the center into S contiguous slices, each served by its own process "
                   "(spawned, one torch thread: its parameter server and port; --port P: "
                   "ports P..P+S-1) over one shared-memory center; workers connect to the "
                   "first and talk to all in parallel (DistBelief). A shard process that "
                   "fails ends the run; no --checkpoint-every/--resume (default 1)")
    g.add_argument("--secret-file", default=None, metavar="PATH",
                   help="file holding the shared secret; created (mode 600) if missing. "
                        "Default: $DISTGRAD_SECRET")
    g.add_argument("--address-file", default=None, metavar="PATH",
                   help="also write HOST:PORT to this file (for job scripts)")
    g.add_argument("--log-level", default="info", choices=("debug", "info", "warning"),
                   help="server log level on stderr (default info)")
    # (not engine="net" here: parents share action objects, that would change train's default)
    p.set_defaults(func=cmd_serve)

    seen: set[str] = set()
    groups = {}
    add_dataclass_flags(train_parser, RayOptions, group="ray engine (--engine ray)",
                        seen=seen, groups=groups)
    add_dataclass_flags(train_parser, SparkOptions, group="spark engine (--engine spark)",
                        seen=seen, groups=groups)
    _record_defaults(train_parser)

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
    p.add_argument("--protection", default="encrypt",
                   choices=("encrypt", "integrity", "header"),
                   help="the protection the server must use, as its --protection (default "
                        "encrypt); a mismatch is refused with both names")
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
    if args.measure_costs:
        from distgrad.reproduce.costs import describe, measure_costs, write_profile

        profile = measure_costs(engine=args.cost_engine)
        path = write_profile(args.measure_costs, profile)
        print(describe(profile))
        print(f"cost profile: {path} (use: distgrad train --engine sim --cost-profile "
              f"{path})")
        if not args.name:
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
    if args.replay_stale:
        from distgrad.reproduce.replay import replay_stale

        for flag, given in (("--page", args.page), ("--jobs", args.jobs > 1),
                            ("--available-only", args.available_only)):
            if given:
                raise ConfigError(f"--replay-stale trains nothing else and writes no report: "
                                  f"run {flag} in a command of its own")

        outcomes = [r for name in names for r in replay_stale(
            reproduce.get_experiment(name), "full" if name in full else args.scale, runs_dir,
            archive=Path(args.archive) if args.archive else None)]
        differ = [r["label"] for r in outcomes if not r["identical"]]
        print(f"{len(outcomes)} stale run(s) replayed: {len(outcomes) - len(differ)} "
              f"identical" + (f", DIFFERENT: {', '.join(differ)}" if differ else ""))
        return 1 if differ else 0
    command = shlex.join(["distgrad", "reproduce", *args.name, "--scale", args.scale,
                          *(["--full", ",".join(full)] if full else []),
                          "--engine", args.engine, "--out", str(base),
                          *(["--threads", str(args.threads)] if args.threads else []),
                          *(["--archive", args.archive] if args.archive else []),
                          *(["--available-only"] if args.available_only else []),
                          *(["--reuse-stale"] if args.reuse_stale else []),
                          *(["--page", args.page] if args.page else []),
                          *(["--compare-scale", args.compare_scale] if args.compare_scale
                            else []),
                          *(["--compare-out", args.compare_out] if args.compare_out else []),
                          *(["--compare-archive", args.compare_archive]
                            if args.compare_archive else []),
                          *(["--discussion", args.discussion] if args.discussion else [])])
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {args.jobs}")
    if args.jobs > 1 and not args.available_only:
        reproduce.train_parallel([(n, "full" if n in full else args.scale) for n in names],
                                 args.jobs, runs_dir, engine=args.engine,
                                 threads=args.threads or 1, reuse_stale=args.reuse_stale,
                                 archive=args.archive)
    outcomes = []
    for name in names:
        scale = "full" if name in full else args.scale
        out = base if single else base / (name if scale == args.scale else f"{name}-{scale}")
        outcomes.append(reproduce.run_experiment(name, scale=scale, out=out,
                                                 engine=args.engine, runs_dir=runs_dir,
                                                 command=command,
                                                 reuse_stale=args.reuse_stale,
                                                 archive=args.archive,
                                                 available_only=args.available_only))
    for o in outcomes:
        for claim, v in o.verdicts:
            print(f"{o.experiment.name:<22} {claim.id:<12} {v.label:<14} {v.ours}")
    counts = reproduce.summary_counts(outcomes)
    print(f"{counts[True]} hold, {counts[False]} do not hold, {counts[None]} not tested")
    for o in outcomes:
        print(f"report: {o.report}")
    if args.page:
        from distgrad.reproduce.page import write_page

        compare = None
        if args.compare_scale:
            choose("compare scale", args.compare_scale, SCALES)
            cbase = Path(args.compare_out or Path("runs") / f"reproduce-{args.compare_scale}")
            compare = [reproduce.run_experiment(name, scale=args.compare_scale,
                                                out=cbase / name, engine=args.engine,
                                                runs_dir=cbase / "runs",
                                                archive=args.compare_archive or args.archive,
                                                available_only=True,
                                                reuse_stale=args.reuse_stale)
                       for name in names  # simulations of their own would run: not compared
                       if reproduce.get_experiment(name).execute is None]
        page = write_page(outcomes, Path(args.page), command=command, scale=args.scale,
                          discussion_file=Path(args.discussion) if args.discussion else None,
                          compare=compare)
        print(f"page: {page}")
    return 0


# --------------------------------------------------------------------------- parser


def add_train_flags(p: argparse.ArgumentParser) -> None:
    """``train``'s flags: the Job's fields, the local/sim engine options, the Timing fields,
    and the run modes (output directory, resume, replay)."""
    from distgrad.engines.options import LocalOptions, SimOptions
    from distgrad.engines.timing import Timing
    from distgrad.job import Job

    groups: dict[str, Any] = {}
    for name in ("what to train", "worker processes (engine local)", "commits", TIMING_GROUP,
                 "output"):
        groups[name] = p.add_argument_group(name)
    add_dataclass_flags(p, Job, groups=groups)
    seen: set[str] = set()
    add_dataclass_flags(p, LocalOptions, group="worker processes (engine local)", seen=seen,
                        groups=groups)
    add_dataclass_flags(p, SimOptions, group="worker processes (engine local)", seen=seen,
                        groups=groups)
    add_dataclass_flags(p, Timing, group=TIMING_GROUP, prefix=TIMING_PREFIX, groups=groups)
    g = groups["worker processes (engine local)"]
    g.add_argument("--resume", metavar="DIR",
                   help="continue the run in DIR from its last checkpoint")
    g.add_argument("--replay", metavar="DIR",
                   help="rerun the sim run recorded in DIR on local worker processes in the "
                        "recorded commit order (ends with the same params_sha256)")
    g = groups["output"]
    g.add_argument("--out", metavar="DIR",
                   help="run directory (default runs/ALGO-nN-TIMESTAMP)")
    g.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    g.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bar; only warnings (faults, failed checkpoints) and errors "
                        "on stderr")


def _record_defaults(p: argparse.ArgumentParser) -> None:
    """Remember each flag's default and name (--resume/--replay reject changed settings)."""
    actions = [a for a in p._actions if a.dest != "help" and a.option_strings]
    p.set_defaults(defaults={a.dest: a.default for a in actions},
                   flags={a.dest: a.option_strings[-1] for a in actions})


def build_parser() -> argparse.ArgumentParser:
    from distgrad.job import ENGINES

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
    add_train_flags(p)
    p.set_defaults(func=cmd_train)
    _record_defaults(p)

    p = sub.add_parser("compare", help="temporal efficiency E(A,B) of two runs and their "
                                       "final accuracies")
    p.add_argument("a", metavar="DIR_A")
    p.add_argument("b", metavar="DIR_B")
    p.add_argument("--te-window", type=float, default=5.0, metavar="SEC",
                   help="window of the notebook variant (thesis: 5 s, stride 1 s = window/5)")
    p.add_argument("--mixed-clocks", action="store_true",
                   help="compare a sim run (virtual seconds) with a run on real workers "
                        "(wall seconds) anyway, with a warning; refused by default")
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
    p.add_argument("--measure-costs", metavar="FILE",
                   help="measure this machine's per-commit costs (one worker step, the "
                        "server's apply + pull per algorithm, the local engine's commit "
                        "transfer) for the thesis MLP and write them to FILE, a cost profile "
                        "for `distgrad train --engine sim --cost-profile FILE` (about 20 s)")
    p.add_argument("--cost-engine", default="local", choices=("local", "distkeras"),
                   help="with --measure-costs: local (shared memory, distgrad's local "
                        "engine) or distkeras (the thesis' transport modelled from measured "
                        "parts: pickled weights over TCP, a GIL-serialized server) "
                        "(default local)")
    p.add_argument("--compare-scale", metavar="SCALE",
                   help="with --page: also show each claim's verdict at SCALE, from the "
                        "finished runs in --compare-out or --compare-archive (nothing is "
                        "trained or simulated for it: the experiments that are simulations "
                        "of their own are not compared), and list the verdicts that changed")
    p.add_argument("--compare-out", metavar="DIR",
                   help="the --out of the SCALE runs (default runs/reproduce-SCALE)")
    p.add_argument("--compare-archive", metavar="DIR",
                   help="compact copies of the SCALE runs (default: --archive)")
    p.add_argument("--archive", metavar="DIR",
                   help="compact copies of finished runs (summaries and gzipped, rounded "
                        "events; small enough to commit): runs missing from DIR/runs are read "
                        "from here, and every run finished is copied here")
    p.add_argument("--available-only", action="store_true",
                   help="train nothing: report on the finished runs (in the runs directory "
                        "or --archive); claims that need an unfinished run are 'not tested'")
    p.add_argument("--reuse-stale", action="store_true",
                   help="reuse finished runs made by code whose result-affecting source "
                        "differs from this code's (the report marks them stale); default: "
                        "run them again")
    p.add_argument("--replay-stale", action="store_true",
                   help="train nothing: replay the first epochs of every finished stale run "
                        "(in the runs directory or --archive) at this code, compare its "
                        "events with the run's, and record the outcome in the run's marker; "
                        "the reports then say which stale runs replayed identically "
                        "(evidence for the epochs replayed, not a rerun); exit 1 if any "
                        "differs")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train N runs at once, in N processes (each with --threads torch "
                        "threads, default 1): every run is trained once, by one of them, "
                        "with the result it has alone; the reports follow when all are done "
                        "(default 1)")
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
