"""The README's multi-host recipes, started on a :class:`~distgrad.testing.netns.Cluster`.

One place for how ``distgrad serve``/``work``, a multi-node Ray cluster (``ray start``)
and a Spark standalone cluster (pyspark's bundled master and worker classes) are
brought up across namespace hosts, used by ``tests/test_cluster.py`` and
``benchmarks/cluster.py`` alike. Every wait is bounded; every process started here
is killed when the cluster is torn down (Ray's daemons included: teardown kills
whatever runs in a host's namespace, so ``ray stop``, which would stop every Ray
on the machine, is never needed).
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distgrad.testing.netns import Cluster, ClusterError, wait_until

RAY_PORT = 6379
RAY_DASHBOARD_PORT = 8265
SPARK_PORT = 7077
SPARK_UI_PORT = 8080


def write_secret(path: str | Path) -> Path:
    """A fresh shared secret in ``path`` (mode 600, as ``distgrad work`` requires)."""
    path = Path(path)
    path.write_text(secrets.token_hex(32) + "\n")
    path.chmod(0o600)
    return path


def _log_tail(proc: subprocess.Popen[Any], chars: int = 3000) -> str:
    log = getattr(proc, "log", None)
    if log is None or not Path(log).exists():
        return ""
    return Path(log).read_text(errors="replace")[-chars:]


def start_serve(cluster: Cluster, host: int, args: list[str], *, secret_file: Path,
                workdir: Path, timeout: float = 120) -> tuple[subprocess.Popen[Any], str]:
    """``distgrad serve ARGS`` on ``host``, listening on all of its interfaces and
    advertising its address; returns the process and ``HOST:PORT`` once it listens."""
    addr = workdir / f"serve-{host}.addr"
    addr.unlink(missing_ok=True)
    proc = cluster.popen(host, ["distgrad", "serve", *args, "--bind", "0.0.0.0",
                                "--advertise", cluster.ip(host), "--secret-file",
                                str(secret_file), "--address-file", str(addr)])

    def ready() -> str | None:
        if proc.poll() is not None:
            raise ClusterError(f"distgrad serve exited with {proc.returncode}:\n"
                               f"{_log_tail(proc)}")
        return addr.read_text().strip() if addr.exists() else None

    return proc, wait_until(ready, timeout=timeout, interval=0.2,
                            what=f"distgrad serve on host {host} to listen")


def start_work(cluster: Cluster, host: int, address: str, *, secret_file: Path,
               args: tuple[str, ...] = ()) -> subprocess.Popen[Any]:
    """``distgrad work --connect ADDRESS`` on ``host``."""
    return cluster.popen(host, ["distgrad", "work", "--connect", address, "--secret-file",
                                str(secret_file), *args])


def wait_all(procs: list[subprocess.Popen[Any]], timeout: float) -> list[int]:
    """Wait for every process (``timeout`` seconds in all); their exit codes."""
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(f"{p.args!r} still running after {timeout:.0f} s:\n"
                               f"{_log_tail(p)}") from exc
    return codes


# ---- Ray ------------------------------------------------------------------------------------


@dataclass
class RayCluster:
    """A multi-node Ray cluster on namespace hosts, with token authentication."""

    cluster: Cluster
    head: int
    nodes: list[int]
    env: dict[str, str] = field(repr=False)

    @property
    def address(self) -> str:
        """The GCS address (``ray start --address`` / ``--ray-address``)."""
        return f"{self.cluster.ip(self.head)}:{RAY_PORT}"

    @property
    def dashboard(self) -> str:
        """The dashboard / job server URL (``ray job submit --address``)."""
        return f"http://{self.cluster.ip(self.head)}:{RAY_DASHBOARD_PORT}"

    def state(self, what: str, host: int | None = None) -> Any:
        """Ray's state API, asked from ``host`` (default the head): ``"nodes"`` gives
        ``[{node_id, node_ip, state}]``, ``"actors"`` ``[{class_name, node_ip, state}]``
        for every actor the cluster has seen (dead ones included)."""
        code = (
            "import json\n"
            "from ray.util.state import list_actors, list_nodes\n"
            f"a = {self.dashboard!r}\n"
            "ips = {n.node_id: n.node_ip for n in list_nodes(address=a, detail=True)}\n"
            "nodes = [{'node_id': n.node_id, 'node_ip': n.node_ip, 'state': n.state}"
            " for n in list_nodes(address=a, detail=True)]\n"
            "actors = [{'class_name': x.class_name, 'node_ip': ips.get(x.node_id),"
            " 'state': x.state} for x in list_actors(address=a, detail=True, limit=10000)]\n"
            f"print(json.dumps({what}))\n")
        r = self.cluster.run(self.head if host is None else host,
                             [sys.executable, "-c", code], env=self.env, timeout=120)
        return json.loads(r.stdout.strip().splitlines()[-1])


def start_ray(cluster: Cluster, *, head: int = 0, workers: tuple[int, ...] = (1, 2),
              workdir: Path, head_cpus: int = 0, worker_cpus: int = 1,
              object_store_bytes: int = 300_000_000, timeout: float = 180) -> RayCluster:
    """``ray start --head`` on ``head`` and ``ray start --address`` on each of
    ``workers``, as the README documents, with ``RAY_AUTH_MODE=token`` (a fresh token)
    and ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` unset; waits until every node is alive.

    ``head_cpus=0`` keeps tasks that need a CPU (the worker actors) off the head, so
    they must run on the other hosts. Each node has its own short ``--temp-dir`` (Ray's
    Unix sockets live there); ``workdir`` is the Ray processes' ``HOME``."""
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "HOME": str(workdir), "RAY_USAGE_STATS_ENABLED": "0"}
    unset = "unset RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER; "
    common = f"--object-store-memory {object_store_bytes} --disable-usage-stats"
    rc = RayCluster(cluster, head, [head, *workers], env)
    cluster.run(head, unset + f"ray start --head --node-ip-address {cluster.ip(head)} "
                f"--port {RAY_PORT} --dashboard-host {cluster.ip(head)} --num-cpus {head_cpus} "
                f"--temp-dir {cluster.scratch(f'ray{head}')} {common}", env=env, timeout=timeout)
    for k in workers:
        temp = cluster.scratch(f"ray{k}")
        cluster.run(k, unset + f"ray start --address {rc.address} --node-ip-address "
                    f"{cluster.ip(k)} --num-cpus {worker_cpus} --temp-dir {temp} {common}",
                    env=env, timeout=timeout)
    want = {cluster.ip(k) for k in rc.nodes}
    wait_until(lambda: {n["node_ip"] for n in rc.state("nodes") if n["state"] == "ALIVE"}
               >= want, timeout=timeout, interval=1.0,
               what=f"Ray nodes {sorted(want)} to be alive")
    return rc


# ---- Spark ----------------------------------------------------------------------------------


@dataclass
class SparkCluster:
    """A Spark standalone cluster: the master on one host, a worker on each other host."""

    cluster: Cluster
    master: int
    workers: list[int]
    workdir: Path

    @property
    def url(self) -> str:
        return f"spark://{self.cluster.ip(self.master)}:{SPARK_PORT}"

    def env(self, host: int) -> dict[str, str]:
        """What a Spark process on ``host`` needs: its own address for binding and for the
        name it gives others (all namespaces share one hostname), this interpreter."""
        ip = self.cluster.ip(host)
        return {"SPARK_LOCAL_IP": ip, "SPARK_LOCAL_HOSTNAME": ip,
                "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
                "SPARK_DAEMON_MEMORY": "256m", "SPARK_LOG_DIR": str(self.workdir / "logs"),
                "SPARK_WORKER_DIR": str(self.workdir / f"work{host}")}

    def alive_workers(self) -> int:
        url = f"http://{self.cluster.ip(self.master)}:{SPARK_UI_PORT}/json/"

        def ask() -> int:
            with urllib.request.urlopen(url, timeout=5) as r:  # inside the master's host
                return int(json.load(r)["aliveworkers"])
        try:
            return self.cluster.in_host(self.master, ask)
        except OSError:
            return 0

    def submit_conf(self, host: int) -> list[str]:
        """``spark-submit``/session settings for a driver on ``host``: executors reach the
        driver at its address; an uncompressed event log records where tasks ran."""
        return ["--conf", f"spark.driver.host={self.cluster.ip(host)}",
                "--conf", "spark.executor.memory=512m", "--conf", "spark.ui.enabled=false",
                "--conf", "spark.eventLog.enabled=true",
                "--conf", f"spark.eventLog.dir=file://{self.workdir / 'events'}",
                "--conf", "spark.eventLog.compress=false",
                "--conf", "spark.eventLog.rolling.enabled=false"]


def start_spark(cluster: Cluster, *, master: int = 0, workers: tuple[int, ...] = (1, 2),
                workdir: Path, cores: int = 1, memory: str = "1g",
                timeout: float = 180) -> SparkCluster:
    """pyspark's bundled standalone ``Master`` on ``master`` and a ``Worker`` (``cores``
    task slots) on each of ``workers``, via ``spark-class``; waits until all registered."""
    sc = SparkCluster(cluster, master, list(workers), workdir)
    (workdir / "events").mkdir(parents=True, exist_ok=True)
    cluster.popen(master, ["spark-class", "org.apache.spark.deploy.master.Master", "--host",
                           cluster.ip(master), "--port", str(SPARK_PORT), "--webui-port",
                           str(SPARK_UI_PORT)], env=sc.env(master))
    cluster.wait_port(master, cluster.ip(master), SPARK_PORT, timeout=timeout)
    for k in workers:
        cluster.popen(k, ["spark-class", "org.apache.spark.deploy.worker.Worker", sc.url,
                          "--host", cluster.ip(k), "--cores", str(cores), "--memory", memory,
                          "--work-dir", str(workdir / f"work{k}")], env=sc.env(k))
    wait_until(lambda: sc.alive_workers() >= len(workers), timeout=timeout, interval=1.0,
               what=f"{len(workers)} Spark workers to register with {sc.url}")
    return sc


def spark_task_hosts(event_dir: Path) -> dict[str, set[str]]:
    """From Spark event logs: the hosts that ran the tasks of barrier stages
    (``"barrier"``) and of all other stages (``"other"``)."""
    barrier_stages: set[int] = set()
    hosts: dict[int, set[str]] = {}
    for path in sorted(Path(event_dir).glob("*")):
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            e = json.loads(line)
            if e.get("Event") == "SparkListenerStageSubmitted":
                info = e["Stage Info"]
                if any(r.get("Barrier") for r in info.get("RDD Info", [])):
                    barrier_stages.add(info["Stage ID"])
            elif e.get("Event") == "SparkListenerTaskEnd":
                hosts.setdefault(e["Stage ID"], set()).add(e["Task Info"]["Host"])
    out: dict[str, set[str]] = {"barrier": set(), "other": set()}
    for stage, hs in hosts.items():
        out["barrier" if stage in barrier_stages else "other"] |= hs
    return out
