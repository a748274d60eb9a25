"""Many hosts for real: serve/work, a multi-node Ray cluster and a Spark standalone cluster
across network namespaces (:mod:`distgrad.testing.netns`), with link failures and killed
hosts. Needs root and iproute2; skipped with the reason otherwise."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from distgrad.errors import ConfigError
from distgrad.testing import netns
from distgrad.testing.netns import Cluster, ClusterError, unavailable, wait_until
from distgrad.testing.recipes import (
    spark_task_hosts,
    start_ray,
    start_serve,
    start_spark,
    start_work,
    wait_all,
    write_secret,
)

REASON = unavailable()
pytestmark = [pytest.mark.cluster, pytest.mark.skipif(REASON is not None, reason=str(REASON))]

# the README's laptop run: ADAG, 2 workers, λ=10, 4,000 samples (about 10 s on 2 cores)
JOB = ["--algorithm", "adag", "--workers", "2", "--window", "10", "--epochs", "1",
       "--train-samples", "4000"]
PARAMS = 4_798_010  # the thesis MLP: one center is 4·PARAMS bytes on the wire


def root_links() -> list[str]:
    r = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=30)
    return sorted(line.split(":")[1].strip() for line in r.stdout.splitlines())


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Three fresh hosts per test; every process on them is killed afterwards."""
    with Cluster(3, workdir=tmp_path / "cluster") as c:
        yield c


def events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def commits_of(run: Path) -> list[dict]:
    return [e for e in events(run) if e["type"] == "commit"] \
        if (run / "events.jsonl").exists() else []


# ---- the harness --------------------------------------------------------------------------


def test_hosts_are_isolated_capped_partitioned_and_torn_down(tmp_path: Path) -> None:
    before = root_links()
    with Cluster(3, rate="100mbit", workdir=tmp_path) as c:
        names = [c.bridge_ns, *c.host_ns]
        assert set(names) <= set(netns.namespaces())
        assert all(str(os.getpid()) in n for n in names)
        assert root_links() == before  # nothing was added to the machine's namespace
        out = c.run(1, "ip -o -4 addr show; ip -o link show").stdout
        assert "10.213.0.2/24" in out and "lo" in out and "LOOPBACK,UP" in out
        for where, dev in ((c.host_ns[2], "eth0"), (c.bridge_ns, "p2")):
            qdisc = subprocess.run(["tc", "-n", where, "qdisc", "show", "dev", dev],
                                   capture_output=True, text=True, timeout=30).stdout
            assert "tbf" in qdisc and "rate 100Mbit" in qdisc, qdisc
        c.set_rate(2, None)
        assert "tbf" not in subprocess.run(["tc", "-n", c.host_ns[2], "qdisc", "show"],
                                           capture_output=True, text=True, timeout=30).stdout
        listener = c.popen(0, [sys.executable, "-c", textwrap.dedent("""
            import socket, time
            s = socket.socket(); s.bind(("0.0.0.0", 5001)); s.listen(); time.sleep(120)
            """)])
        c.wait_port(1, c.ip(0), 5001, timeout=60)
        assert not c.can_connect(1, "127.0.0.1", 5001)  # host 1's loopback is its own
        c.link_down(1)
        assert not c.can_connect(1, c.ip(0), 5001)
        assert c.can_connect(2, c.ip(0), 5001)
        c.link_up(1)
        assert c.can_connect(1, c.ip(0), 5001)
        c.kill_host(0)
        assert listener.wait(30) == -signal.SIGKILL and c.pids(0) == []
        with pytest.raises(ConfigError, match=r"host must be in 0\.\.2, got 3"):
            c.ip(3)
        with pytest.raises(ConfigError, match="got '1gb'"):
            c.set_rate(0, "1gb")
    assert not set(names) & set(netns.namespaces())
    assert root_links() == before


def test_a_crashed_owner_leaves_nothing_behind(tmp_path: Path) -> None:
    """SIGTERM: the owner's handler tears down. SIGKILL: the next cluster removes the set."""
    code = textwrap.dedent("""
        import sys, time
        from distgrad.testing.netns import Cluster
        c = Cluster(2)
        c.popen(1, ["sleep", "300"])
        print(c.bridge_ns, flush=True)
        time.sleep(300)
        """)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                 text=True, start_new_session=True)
        try:
            bridge = owner.stdout.readline().strip()  # type: ignore[union-attr]
            prefix = bridge.removesuffix("-br")
            assert prefix and any(n.startswith(prefix) for n in netns.namespaces())
            owner.send_signal(sig)
            owner.wait(60)
        finally:
            if owner.poll() is None:
                owner.kill()
                owner.wait(30)
        if sig == signal.SIGKILL:
            assert any(n.startswith(prefix) for n in netns.namespaces())  # left behind...
            with Cluster(1, workdir=tmp_path / "next"):
                pass  # ...and removed when the next cluster starts
        assert not any(n.startswith(prefix) for n in netns.namespaces())


def test_wait_loops_are_bounded() -> None:
    calls = []
    with pytest.raises(ClusterError, match="timed out after 0 s waiting for nothing"):
        wait_until(lambda: calls.append(1), timeout=0.3, interval=0.1, what="nothing")
    assert 2 <= len(calls) <= 6


# ---- serve / work ---------------------------------------------------------------------------


def test_serve_on_one_host_and_work_on_two_others(cluster: Cluster, tmp_path: Path) -> None:
    secret = write_secret(tmp_path / "secret")
    run = tmp_path / "net"
    server, address = start_serve(cluster, 0, [*JOB, "--out", str(run), "-q"],
                                  secret_file=secret, workdir=tmp_path)
    assert address.startswith(f"{cluster.ip(0)}:")
    workers = [start_work(cluster, k, address, secret_file=secret) for k in (1, 2)]
    assert wait_all([server, *workers], 300) == [0, 0, 0]
    net = summary(run)
    # each worker host pulled the center over its own link at least twice
    for k in (1, 2):
        assert cluster.link_bytes(k)["rx"] > 2 * 4 * PARAMS
    cluster.run(0, ["distgrad", "train", "--engine", "local", *JOB, "--out",
                    str(tmp_path / "local"), "-q"], timeout=300)
    local = summary(tmp_path / "local")
    assert net["samples_committed"] == local["samples_committed"] == 4000
    assert net["test_accuracy"] > 0.75 and local["test_accuracy"] > 0.75
    assert abs(net["test_accuracy"] - local["test_accuracy"]) < 0.05


def _serve_agn(cluster: Cluster, tmp_path: Path, *extra: str) -> tuple:
    """AGN with λ=2 on 6,000 samples: many short windows, so faults land mid-run."""
    secret = write_secret(tmp_path / "secret")
    run = tmp_path / "run"
    server, address = start_serve(
        cluster, 0, ["--algorithm", "agn", "--workers", "2", "--window", "2", "--epochs", "1",
                     "--train-samples", "6000", "--batch-size", "64", "--out", str(run), "-q",
                     *extra], secret_file=secret, workdir=tmp_path)
    return secret, run, server, address


def _wait_commits(run: Path, worker: int, count: int) -> None:
    wait_until(lambda: sum(c["worker"] == worker for c in commits_of(run)) >= count,
               timeout=120, interval=0.2, what=f"{count} commits of worker {worker}")


def _check_exactly_once(run: Path) -> dict:
    """Every sample of both shards committed exactly once; samples_lost adds up."""
    s = summary(run)
    commits = commits_of(run)
    per_worker = {k: sum(c["samples"] for c in commits if c["worker"] == k) for k in (0, 1)}
    assert per_worker == {0: 3000, 1: 3000}
    assert s["samples_committed"] == 6000 and s["status"] == "completed"
    faults = [e for e in events(run) if e["type"] == "fault"]
    assert s["samples_lost"] == sum(f["samples_lost"] for f in faults)
    return s


@pytest.mark.slow  # ~35 s: a partition past --worker-timeout
def test_a_worker_host_partitioned_longer_than_the_worker_timeout(cluster: Cluster,
                                                                  tmp_path: Path) -> None:
    """Host 2's cable is pulled until the server has declared its worker dead, and a few
    seconds more: once the link is back the worker (or a replacement) resumes at the first
    uncommitted sample and nothing is applied twice. (A worker building its model sends
    heartbeats; 10 s keeps the partition short.)"""
    secret, run, server, address = _serve_agn(cluster, tmp_path, "--worker-timeout", "10",
                                              "--rejoin-timeout", "60")
    workers = [start_work(cluster, k, address, secret_file=secret,
                          args=("--worker", str(k - 1), "--timeout", "3")) for k in (1, 2)]
    _wait_commits(run, 1, 3)
    cluster.link_down(2)
    wait_until(lambda: any(e["type"] == "fault" and e["worker"] == 1 and e["kind"] == "timeout"
                           for e in events(run)), timeout=60, what="worker 1 declared dead")
    time.sleep(3)  # stay partitioned past the declaration
    cluster.link_up(2)
    # the partitioned worker either rejoins by itself or gives up; then it is replaced
    with contextlib.suppress(subprocess.TimeoutExpired):
        workers[1].wait(60)
    if workers[1].poll() is not None and workers[1].returncode != 0:
        workers.append(start_work(cluster, 2, address, secret_file=secret,
                                  args=("--worker", "1", "--timeout", "3")))
    assert wait_all([server, workers[0], workers[-1]], 300) == [0, 0, 0]
    s = _check_exactly_once(run)
    timeouts = [e for e in events(run) if e["type"] == "fault" and e["kind"] == "timeout"]
    assert [f["worker"] for f in timeouts] == [1]
    assert s["test_accuracy"] > 0.8


@pytest.mark.slow  # ~25 s
def test_a_worker_host_killed_and_replaced(cluster: Cluster, tmp_path: Path) -> None:
    secret, run, server, address = _serve_agn(cluster, tmp_path, "--worker-timeout", "10",
                                              "--rejoin-timeout", "60")
    w0 = start_work(cluster, 1, address, secret_file=secret, args=("--worker", "0"))
    start_work(cluster, 2, address, secret_file=secret, args=("--worker", "1"))
    _wait_commits(run, 1, 3)
    cluster.kill_host(2)
    committed = sum(c["samples"] for c in commits_of(run) if c["worker"] == 1)
    assert committed < 3000
    w1 = start_work(cluster, 2, address, secret_file=secret, args=("--worker", "1"))
    assert wait_all([server, w0, w1], 300) == [0, 0, 0]
    _check_exactly_once(run)
    faults = [e for e in events(run) if e["type"] == "fault" and e["worker"] == 1]
    assert faults and faults[0]["attempt"] == 0  # the killed attempt, declared dead


@pytest.mark.slow  # the workers try to rejoin for 60 s first
def test_killed_server_host_makes_the_workers_fail_loudly(cluster: Cluster,
                                                          tmp_path: Path) -> None:
    """Without a server, workers give up after their bounded retries (no hang, no zero)."""
    secret, run, _, address = _serve_agn(cluster, tmp_path)
    workers = [start_work(cluster, k, address, secret_file=secret, args=("--timeout", "2"))
               for k in (1, 2)]
    _wait_commits(run, 0, 2)
    cluster.kill_host(0)
    codes = wait_all(workers, 120)
    assert all(c != 0 for c in codes)
    for w in workers:
        assert "TransportError" in Path(w.log).read_text()  # type: ignore[attr-defined]


@pytest.mark.slow  # ~30 s
def test_killed_server_host_resumes_from_its_checkpoint(cluster: Cluster,
                                                        tmp_path: Path) -> None:
    port = "47000"
    secret, run, server, address = _serve_agn(cluster, tmp_path, "--checkpoint-every", "1",
                                              "--port", port, "--worker-timeout", "30")
    workers = [start_work(cluster, k, address, secret_file=secret, args=("--timeout", "5"))
               for k in (1, 2)]
    _wait_commits(run, 0, 3)
    wait_until(lambda: (run / "checkpoint.pt").exists(), timeout=3, what="a checkpoint")
    cluster.kill_host(0)
    server = cluster.popen(0, ["distgrad", "serve", "--resume", str(run), "--bind", "0.0.0.0",
                               "--port", port, "--secret-file", str(secret), "-q"])
    assert wait_all([server, *workers], 300) == [0, 0, 0]
    _check_exactly_once(run)


# ---- Ray ------------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow  # ~60 s: three `ray start`s
def test_multi_node_ray_cluster_places_workers_on_other_hosts(cluster: Cluster,
                                                              tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="the ray extra is not installed")
    ray = start_ray(cluster, workdir=tmp_path)  # the head has 0 CPUs: no worker runs there
    nodes = ray.state("nodes")
    assert sorted(n["node_ip"] for n in nodes if n["state"] == "ALIVE") == \
        [cluster.ip(0), cluster.ip(1), cluster.ip(2)]
    cluster.run(0, ["distgrad", "train", "--engine", "ray", "--ray-address", ray.address,
                    *JOB, "--out", str(tmp_path / "ray"), "-q"], env=ray.env, timeout=300)
    s = summary(tmp_path / "ray")
    assert s["samples_committed"] == 4000 and s["test_accuracy"] > 0.75
    actors = ray.state("actors")
    placed = sorted(a["node_ip"] for a in actors if a["class_name"] == "WorkerActor")
    assert placed == [cluster.ip(1), cluster.ip(2)]
    # `ray job submit` as the README documents, from host 1, the run written on the head
    out = tmp_path / "ray-job"
    r = cluster.run(1, ["ray", "job", "submit", "--address", ray.dashboard, "--", "distgrad",
                        "train", "--engine", "ray", "--ray-address", "auto", *JOB, "--out",
                        str(out), "-q"], env=ray.env, timeout=300)
    assert "succeeded" in r.stdout + r.stderr
    assert summary(out)["samples_committed"] == 4000
    actors = ray.state("actors")
    placed = sorted(a["node_ip"] for a in actors if a["class_name"] == "WorkerActor")
    assert placed == [cluster.ip(1), cluster.ip(1), cluster.ip(2), cluster.ip(2)]


# ---- Spark ----------------------------------------------------------------------------------

TRAINER = """
import sys
import torch
from pyspark.sql import SparkSession
from distgrad.data import load_mnist
from distgrad.models import initialize
from distgrad.spark import SparkTrainer

spark = (SparkSession.builder.master(sys.argv[1]).appName("trainer")
         .config("spark.driver.host", sys.argv[2]).config("spark.executor.memory", "512m")
         .config("spark.ui.enabled", "false").config("spark.eventLog.enabled", "true")
         .config("spark.eventLog.dir", "file://" + sys.argv[3])
         .config("spark.eventLog.compress", "false")
         .config("spark.eventLog.rolling.enabled", "false").getOrCreate())
d = load_mnist()
rows = [(x.tolist(), int(y)) for x, y in zip(d.x_train[:3000], d.y_train[:3000])]
df = spark.createDataFrame(rows, "features array<float>, label long").repartition(2)
test = [(x.tolist(), int(y)) for x, y in zip(d.x_test[:1000], d.y_test[:1000])]
val = spark.createDataFrame(test, "features array<float>, label long")
model = initialize(torch.nn.Sequential(torch.nn.Linear(784, 64), torch.nn.ReLU(),
                                       torch.nn.Linear(64, 10)), 0)
trainer = SparkTrainer(model, algorithm="adag", workers=2, window=4, epochs=2,
                       batch_size=32, out=sys.argv[4])
_, result = trainer.fit(df, validation=val)
print("ACCURACY", result.test_accuracy)
spark.stop()
"""


@pytest.mark.spark
@pytest.mark.slow
def test_spark_standalone_cluster_runs_the_barrier_stage_on_the_worker_hosts(
        cluster: Cluster, tmp_path: Path) -> None:
    pytest.importorskip("pyspark", reason="the spark extra is not installed")
    spark = start_spark(cluster, workdir=tmp_path)
    # the README's spark-submit command, against the standalone master
    events_dir = tmp_path / "events"
    cli = subprocess.run([sys.executable, "-c", "import distgrad.cli as c; print(c.__file__)"],
                         capture_output=True, text=True, timeout=60).stdout.strip()
    cluster.run(0, ["spark-submit", "--master", spark.url, *spark.submit_conf(0), cli,
                    "train", "--engine", "spark", *JOB, "--out", str(tmp_path / "submit"),
                    "-q"], env=spark.env(0), timeout=400)
    s = summary(tmp_path / "submit")
    assert s["samples_committed"] == 4000 and s["test_accuracy"] > 0.75
    hosts = spark_task_hosts(events_dir)
    assert hosts["barrier"] == {cluster.ip(1), cluster.ip(2)}
    for f in events_dir.iterdir():
        f.rename(events_dir.parent / f"submitted-{f.name}")
    # SparkTrainer.fit from a driver on host 0
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    r = cluster.run(0, [sys.executable, str(script), spark.url, cluster.ip(0), str(events_dir),
                        str(tmp_path / "trainer")], env=spark.env(0), timeout=400)
    assert float(r.stdout.split("ACCURACY")[-1]) > 0.75
    assert spark_task_hosts(events_dir)["barrier"] == {cluster.ip(1), cluster.ip(2)}
