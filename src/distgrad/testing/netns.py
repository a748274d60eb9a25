"""A cluster of hosts on one Linux machine, made of network namespaces.

Each host is a network namespace with its own stack, loopback and one interface
``eth0`` holding ``10.213.0.(k+1)/24``; the hosts are joined by veth pairs to a
bridge that lives in a namespace of its own, so nothing is added to the machine's
own namespace and no packet can leave the machine::

    host k  [eth0 10.213.0.(k+1)] ====veth==== [p<k>]-br0  (bridge namespace)

What a test or a person can do with it:

* ``run(k, cmd)`` / ``popen(k, cmd)``: a command "on" host k (``ip netns exec``);
* ``set_rate(k, "1gbit")``: cap host k's link in both directions with a token
  bucket (``tc qdisc tbf`` on both ends of its veth pair; ``None`` lifts the cap);
* ``link_down(k)`` / ``link_up(k)``: pull host k's cable (its bridge port goes
  down: packets are dropped, open TCP connections survive a short outage);
* ``kill_host(k)``: SIGKILL every process on host k (a host that dies);
* ``in_host(k, fn)``: call ``fn`` in a thread that lives in host k's namespace
  (sockets it creates belong to that host), e.g. to probe a port.

Namespaces are named ``dgc-<pid>-<n>-...`` after the process that made them. A
cluster is torn down (its processes killed, its namespaces deleted) by
:meth:`Cluster.close`, on garbage collection, at interpreter exit and on
SIGTERM/SIGHUP; a set left by a process that died anyway (SIGKILL) is removed when
the next cluster starts, or by ``python -m distgrad.testing.netns down``.

Needs root and iproute2 (``ip``, ``tc``); :func:`unavailable` says why not. ``tc``'s
``netem`` is not required (no delay emulation): a link is a bandwidth cap, up or down.
Every wait here is bounded in attempts and in time.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from distgrad.errors import ConfigError, positive_int

PREFIX = "dgc"
SUBNET = "10.213.0"
"""Host k has address ``SUBNET.(k+1)``. Every cluster is its own L2 segment behind its own
bridge, so clusters made at the same time may reuse the same addresses."""
IFACE = "eth0"
"""The interface name inside every host namespace (``GLOO_SOCKET_IFNAME`` etc.)."""
MAX_HOSTS = 200
RATE_RE = re.compile(r"^(\d+(?:\.\d+)?)(k|m|g)?bit$")
_NAME_RE = re.compile(rf"^{PREFIX}-(\d+)-(\d+)-(br|h\d+)$")
_CLONE_NEWNET = 0x40000000
_seq = itertools.count()
_T = TypeVar("_T")


class ClusterError(RuntimeError):
    """A namespace command failed or something did not come up in time."""


def unavailable() -> str | None:
    """Why a namespace cluster cannot be built here, or None if it can."""
    if sys.platform != "linux":
        return f"network namespaces need Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return "network namespaces need root (run the cluster tests as root)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not on PATH"
    return None


def rate_bits(rate: str) -> float:
    """Bits per second of a tc rate such as ``"100mbit"``, ``"1gbit"``, ``"2.5gbit"``."""
    m = RATE_RE.match(rate) if isinstance(rate, str) else None
    if m is None:
        raise ConfigError(f"link rate must look like 100mbit, 1gbit or 10gbit, got {rate!r}")
    return float(m.group(1)) * {None: 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]


def wait_until(predicate: Callable[[], _T], *, timeout: float, what: str,
               interval: float = 0.1) -> _T:
    """Poll ``predicate`` until it returns a true value (returned), at most ``timeout``
    seconds and ``timeout / interval + 1`` attempts; raise ClusterError naming ``what``."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise ClusterError(f"`ip {' '.join(args)}` failed: {r.stderr.strip()}")
    return r


def _tc(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["tc", "-n", ns, *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise ClusterError(f"`tc -n {ns} {' '.join(args)}` failed: {r.stderr.strip()}")
    return r


def namespaces() -> list[str]:
    """Every network namespace of this module's naming scheme (any owner)."""
    r = _ip("netns", "list", check=False)
    names = [line.split()[0] for line in r.stdout.splitlines() if line.strip()]
    return [n for n in names if _NAME_RE.match(n)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ns_pids(ns: str) -> list[int]:
    r = _ip("netns", "pids", ns, check=False)
    return [int(p) for p in r.stdout.split() if p.isdigit()]


def _kill_ns_processes(ns: str, timeout: float = 10.0) -> None:
    """SIGKILL every process whose network namespace is ``ns``; wait until none is left."""
    me = os.getpid()
    deadline = time.monotonic() + timeout
    for _ in range(200):
        pids = [p for p in _ns_pids(ns) if p != me]
        if not pids or time.monotonic() > deadline:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def _delete(names: Sequence[str]) -> None:
    """Kill what runs in the namespaces, then delete them (hosts first, the bridge last)."""
    for ns in sorted(names, key=lambda n: n.endswith("-br")):
        _kill_ns_processes(ns)
        _ip("netns", "del", ns, check=False)


def remove_stale(*, owner: int | None = None) -> list[str]:
    """Delete the namespace sets whose owning process is dead (or, with ``owner``, the set
    of that PID whatever its state). Returns the names removed."""
    stale = []
    for ns in namespaces():
        m = _NAME_RE.match(ns)
        assert m is not None
        pid = int(m.group(1))
        if (owner is not None and pid == owner) or (owner is None and not _alive(pid)):
            stale.append(ns)
    _delete(stale)
    return stale


class _State:
    """What teardown needs, kept apart from the Cluster so that a finalizer can hold it."""

    def __init__(self, names: list[str], workdir: Path, own_workdir: bool) -> None:
        self.names = names
        self.procs: list[subprocess.Popen[Any]] = []
        self.workdir, self.own_workdir = workdir, own_workdir
        self.scratch: list[Path] = []
        self.lock = threading.Lock()
        self.closed = False

    def teardown(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            for p in self.procs:
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(p.pid, signal.SIGTERM)
            deadline = time.monotonic() + 5.0
            for p in self.procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(max(0.0, deadline - time.monotonic()))
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(p.pid, signal.SIGKILL)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        p.wait(5.0)
            _delete(self.names)
            for d in self.scratch:
                shutil.rmtree(d, ignore_errors=True)
            if self.own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)


_live: weakref.WeakSet[_State] = weakref.WeakSet()
_handlers_installed = False


def _install_signal_handlers() -> None:
    """On SIGTERM/SIGHUP tear every live cluster down, then let the previous handler act."""
    global _handlers_installed
    if _handlers_installed or threading.current_thread() is not threading.main_thread():
        return
    _handlers_installed = True
    for signum in (signal.SIGTERM, signal.SIGHUP):
        previous = signal.getsignal(signum)

        def handler(sig: int, frame: Any, previous: Any = previous) -> None:
            for state in list(_live):
                state.teardown()
            if callable(previous):
                previous(sig, frame)
            elif previous != signal.SIG_IGN:
                signal.signal(sig, signal.SIG_DFL)
                os.kill(os.getpid(), sig)

        signal.signal(signum, handler)


class Cluster:
    """``hosts`` network namespaces on one bridge; see the module docstring.

    ``rate`` caps every host's link (``"10gbit"``, ``"1gbit"``, ``"100mbit"``; None: no
    cap). ``workdir`` holds the processes' logs (default: a temporary directory removed
    at teardown). Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, hosts: int = 3, *, rate: str | None = None,
                 workdir: str | Path | None = None) -> None:
        positive_int("hosts", hosts)
        if hosts > MAX_HOSTS:
            raise ConfigError(f"hosts must be <= {MAX_HOSTS}, got {hosts}")
        reason = unavailable()
        if reason is not None:
            raise ClusterError(reason)
        if rate is not None:
            rate_bits(rate)
        remove_stale()
        base = f"{PREFIX}-{os.getpid()}-{next(_seq)}"
        self.bridge_ns = f"{base}-br"
        self.host_ns = [f"{base}-h{k}" for k in range(hosts)]
        own = workdir is None
        wd = Path(tempfile.mkdtemp(prefix=f"{base}-")) if workdir is None else Path(workdir)
        wd.mkdir(parents=True, exist_ok=True)
        self._state = _State([], wd, own)
        self._finalizer = weakref.finalize(self, self._state.teardown)
        _live.add(self._state)
        _install_signal_handlers()
        self._logs = itertools.count()
        self.rates: list[str | None] = [None] * hosts
        try:
            self._build(rate)
        except BaseException:
            self.close()
            raise

    # ---- construction -------------------------------------------------------------------

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._state.names.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def _build(self, rate: str | None) -> None:
        self._add_ns(self.bridge_ns)
        _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        for k, ns in enumerate(self.host_ns):
            self._add_ns(ns)
            # created inside the bridge namespace with its peer moved straight into the host:
            # the machine's own namespace never sees either end
            _ip("-n", self.bridge_ns, "link", "add", f"p{k}", "type", "veth", "peer", "name",
                IFACE, "netns", ns)
            _ip("-n", self.bridge_ns, "link", "set", f"p{k}", "master", "br0")
            _ip("-n", self.bridge_ns, "link", "set", f"p{k}", "up")
            _ip("-n", ns, "addr", "add", f"{self.ip(k)}/24", "dev", IFACE)
            _ip("-n", ns, "link", "set", IFACE, "up")
            if rate is not None:
                self.set_rate(k, rate)

    # ---- addressing -----------------------------------------------------------------------

    @property
    def hosts(self) -> int:
        return len(self.host_ns)

    @property
    def workdir(self) -> Path:
        return self._state.workdir

    def _check(self, host: int) -> str:
        if isinstance(host, bool) or not isinstance(host, int) or not 0 <= host < self.hosts:
            raise ConfigError(f"host must be in 0..{self.hosts - 1}, got {host!r}")
        if self._state.closed:
            raise ClusterError("the cluster has been torn down")
        return self.host_ns[host]

    def ip(self, host: int) -> str:
        """Host ``host``'s address (``10.213.0.(host+1)``)."""
        if isinstance(host, bool) or not isinstance(host, int) or not 0 <= host < self.hosts:
            raise ConfigError(f"host must be in 0..{self.hosts - 1}, got {host!r}")
        return f"{SUBNET}.{host + 1}"

    def host_of_ip(self, ip: str) -> int:
        """The host that owns address ``ip``."""
        for k in range(self.hosts):
            if self.ip(k) == ip:
                return k
        raise ConfigError(f"{ip!r} is no host of this cluster ({self.ip(0)}..)")

    def scratch(self, name: str) -> Path:
        """A fresh directory with a short path under the system's temporary directory
        (for Unix socket paths, which must stay under 108 bytes), removed at teardown."""
        path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-{os.getpid()}-{name}-"))
        self._state.scratch.append(path)
        return path

    # ---- links ---------------------------------------------------------------------------

    def set_rate(self, host: int, rate: str | None) -> None:
        """Cap host ``host``'s link at ``rate`` in both directions (None: no cap)."""
        ns = self._check(host)
        ends = ((ns, IFACE), (self.bridge_ns, f"p{host}"))
        if rate is None:
            for where, dev in ends:
                _tc(where, "qdisc", "del", "dev", dev, "root", check=False)
        else:
            bits = rate_bits(rate)
            # a bucket of 4 ms of traffic (at least 64 KiB, one GSO segment): the cap holds
            # over any window longer than a few milliseconds
            burst = max(int(bits / 8 * 0.004), 65536)
            for where, dev in ends:
                _tc(where, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
                    "burst", str(burst), "latency", "50ms")
        self.rates[host] = rate

    def link_down(self, host: int) -> None:
        """Partition host ``host``: its bridge port goes down, its packets are dropped."""
        self._check(host)
        _ip("-n", self.bridge_ns, "link", "set", f"p{host}", "down")

    def link_up(self, host: int) -> None:
        """Reconnect host ``host`` (undo :meth:`link_down`)."""
        self._check(host)
        _ip("-n", self.bridge_ns, "link", "set", f"p{host}", "up")
        wait_until(lambda: "LOWER_UP" in _ip("-n", self.host_ns[host], "link", "show",
                                              IFACE).stdout,
                   timeout=10, what=f"host {host}'s link to come back up")
        wait_until(lambda: "forwarding" in subprocess.run(
                       ["bridge", "-n", self.bridge_ns, "link", "show", "dev", f"p{host}"],
                       capture_output=True, text=True, timeout=30).stdout,
                   timeout=10, what=f"host {host}'s bridge port to forward")
        # Address lookups that failed while the cable was out would otherwise delay the
        # first packets after it is back; forget them on every host.
        for ns in self.host_ns:
            _ip("-n", ns, "neigh", "flush", "dev", IFACE, check=False)

    def link_bytes(self, host: int) -> dict[str, int]:
        """Bytes host ``host`` has sent (``tx``) and received (``rx``) on its link."""
        ns = self._check(host)
        base = f"/sys/class/net/{IFACE}/statistics"
        r = subprocess.run(["ip", "netns", "exec", ns, "cat", f"{base}/tx_bytes",
                            f"{base}/rx_bytes"], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise ClusterError(f"reading host {host}'s counters failed: {r.stderr.strip()}")
        tx, rx = (int(v) for v in r.stdout.split())
        return {"tx": tx, "rx": rx}

    # ---- processes -----------------------------------------------------------------------

    def env(self, host: int, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of a process on ``host``: this one's, with this interpreter's
        bin directory first on PATH and ``DISTGRAD_HOST``/``DISTGRAD_HOST_IP`` set."""
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["DISTGRAD_HOST"], env["DISTGRAD_HOST_IP"] = str(host), self.ip(host)
        env.update(extra or {})
        return env

    def _argv(self, host: int, cmd: str | Sequence[str]) -> list[str]:
        ns = self._check(host)
        argv = ["bash", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        return ["ip", "netns", "exec", ns, *argv]

    def popen(self, host: int, cmd: str | Sequence[str], *, env: dict[str, str] | None = None,
              log: str | Path | None = None, cwd: str | Path | None = None,
              **kw: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` (a shell string or an argv list) on host ``host`` in a session of
        its own; stdout and stderr go to ``log`` (default: a file under :attr:`workdir`,
        its path in ``proc.log``) unless given in ``kw``. Killed at teardown."""
        argv = self._argv(host, cmd)
        path = Path(log) if log is not None else \
            self.workdir / f"host{host}-{next(self._logs)}.log"
        handle = None
        if "stdout" not in kw:
            handle = open(path, "ab")  # noqa: SIM115 (closed below, the child keeps its copy)
            kw["stdout"] = handle
            kw.setdefault("stderr", subprocess.STDOUT)
        try:
            proc = subprocess.Popen(argv, env=self.env(host, env), cwd=cwd,
                                    start_new_session=True, **kw)
        finally:
            if handle is not None:
                handle.close()
        proc.log = path  # type: ignore[attr-defined]
        self._state.procs.append(proc)
        return proc

    def run(self, host: int, cmd: str | Sequence[str], *, env: dict[str, str] | None = None,
            timeout: float = 300, check: bool = True, cwd: str | Path | None = None
            ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` on host ``host`` to completion (at most ``timeout`` seconds) and
        return its captured output; ``check`` raises ClusterError on a non-zero exit."""
        argv = self._argv(host, cmd)
        proc = subprocess.Popen(argv, env=self.env(host, env), cwd=cwd, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(f"host {host}: {cmd!r} ran longer than {timeout} s") from exc
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        r = subprocess.CompletedProcess(argv, proc.returncode, out, err)
        if check and r.returncode != 0:
            raise ClusterError(f"host {host}: {cmd!r} exited with {r.returncode}:\n"
                               f"{out[-2000:]}{err[-4000:]}")
        return r

    def pids(self, host: int) -> list[int]:
        """The processes running on host ``host``."""
        return _ns_pids(self._check(host))

    def kill_host(self, host: int) -> None:
        """SIGKILL every process on host ``host`` (the host dies; its link stays)."""
        _kill_ns_processes(self._check(host))

    def in_host(self, host: int, fn: Callable[[], _T], *, timeout: float = 60) -> _T:
        """Call ``fn()`` in a thread moved into host ``host``'s network namespace and return
        its result (sockets ``fn`` opens belong to that host)."""
        ns = self._check(host)
        out: dict[str, Any] = {}

        def target() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
                try:
                    if libc.setns(fd, _CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), f"setns into {ns} failed")
                finally:
                    os.close(fd)
                out["value"] = fn()
            except BaseException as exc:
                out["error"] = exc

        t = threading.Thread(target=target, name=f"in-{ns}", daemon=True)
        t.start()
        t.join(timeout)
        if t.is_alive():
            raise ClusterError(f"host {host}: call did not return within {timeout} s")
        if "error" in out:
            raise out["error"]
        return out["value"]

    def can_connect(self, host: int, address: str, port: int, timeout: float = 3.0) -> bool:
        """Whether host ``host`` can open a TCP connection to ``address:port``."""
        def probe() -> bool:
            with socket.socket() as s:
                s.settimeout(timeout)
                try:
                    s.connect((address, port))
                except OSError:
                    return False
                return True
        return self.in_host(host, probe, timeout=timeout + 10)

    def wait_port(self, host: int, address: str, port: int, *, timeout: float = 60) -> None:
        """Wait until host ``host`` can connect to ``address:port``."""
        wait_until(lambda: self.can_connect(host, address, port), timeout=timeout,
                   interval=0.25, what=f"{address}:{port} to accept from host {host}")

    # ---- teardown ------------------------------------------------------------------------

    def close(self) -> None:
        """Kill every process on the hosts and delete the namespaces (idempotent)."""
        self._finalizer()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> dict[str, Any]:
        return {"bridge": self.bridge_ns,
                "hosts": [{"host": k, "namespace": ns, "ip": self.ip(k), "iface": IFACE,
                           "rate": self.rates[k]} for k, ns in enumerate(self.host_ns)],
                "workdir": str(self.workdir)}


# ---- command line ---------------------------------------------------------------------------


def _format(text: str, cluster: Cluster) -> str:
    """Replace ``{ip0}``, ``{ip1}``... by the hosts' addresses."""
    return text.format(**{f"ip{k}": cluster.ip(k) for k in range(cluster.hosts)})


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m distgrad.testing.netns",
        description="A cluster of network namespaces on this machine (root and iproute2): "
                    f"hosts 10.213.0.1, .2, ... on a private bridge, interface {IFACE}.")
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="build a cluster, print it as JSON, keep it until Ctrl-C "
                                   "or SIGTERM; enter a host with `ip netns exec NAMESPACE "
                                   "bash`")
    run = sub.add_parser("run", help="build a cluster, start one shell command per --on, "
                                     "wait for all of them, tear down")
    for q in (up, run):
        q.add_argument("--hosts", type=int, default=3, help="number of hosts (default 3)")
        q.add_argument("--rate", default=None,
                       help="cap every link, e.g. 100mbit, 1gbit, 10gbit (default: none)")
    up.add_argument("--json", metavar="PATH", help="also write the description to PATH")
    run.add_argument("--on", nargs=2, action="append", metavar=("HOST", "COMMAND"), default=[],
                     help="run COMMAND (bash; {ip0}, {ip1}... are the hosts' addresses) on "
                          "host HOST; repeatable, started in the given order")
    run.add_argument("--delay", type=float, default=1.0,
                     help="seconds between starting two commands (default 1)")
    run.add_argument("--timeout", type=float, default=3600,
                     help="kill everything after this many seconds (default 3600)")
    down = sub.add_parser("down", help="remove the namespace sets of dead processes (or of "
                                       "--pid's, killing what runs in them)")
    down.add_argument("--pid", type=int, default=None)
    args = p.parse_args(argv)
    reason = unavailable()
    if reason is not None:
        p.error(reason)
    if args.cmd == "down":
        removed = remove_stale(owner=args.pid)
        print("\n".join(removed) if removed else "nothing to remove")
        return 0
    try:
        with Cluster(args.hosts, rate=args.rate) as cluster:
            if args.cmd == "up":
                text = json.dumps(cluster.describe(), indent=2)
                print(text, flush=True)
                if args.json:
                    Path(args.json).write_text(text + "\n")
                print(f"up; `ip netns exec {cluster.host_ns[0]} bash` enters host 0. "
                      "Ctrl-C tears down.", file=sys.stderr, flush=True)
                stop = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
                signal.pthread_sigmask(signal.SIG_BLOCK, stop)
                signal.sigwait(stop)  # the context manager tears down
                return 0
            procs = []
            for host, command in args.on:
                procs.append(cluster.popen(int(host), _format(command, cluster),
                                           stdout=None, stderr=None))
                time.sleep(args.delay)
            deadline = time.monotonic() + args.timeout
            codes = []
            for proc in procs:
                try:
                    codes.append(proc.wait(max(1.0, deadline - time.monotonic())))
                except subprocess.TimeoutExpired:
                    print(f"timed out: {shlex.join(proc.args)}", file=sys.stderr)
                    codes.append(124)
            return max(codes, default=0)
    except (ClusterError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
