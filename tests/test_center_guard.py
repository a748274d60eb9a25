"""A center no insider can poison: counter bounds, out-of-protocol requests and the
non-finite guard, on the protocol core (trusted and not), on a real network server, and
through whole runs on ``sim`` and ``local``.

An insider holds the secret and speaks the protocol; what it must not do is crash or hang
the server, or turn the center into Inf/NaN. Every refused request leaves the center
bit-identical (compared as bytes) and the run goes on.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distgrad import Algorithm, train
from distgrad.algorithms import (
    _BY_PATH,
    REGISTRY,
    AlgorithmConfig,
    RunInfo,
    WorkerRule,
    get_algorithm,
)
from distgrad.algorithms.base import AddServer
from distgrad.metrics.events import Recorder
from distgrad.metrics.schedule import EvalSchedule
from distgrad.protocol import (
    CommitRequest,
    DoneRequest,
    FailRequest,
    ProtocolCore,
    PullRequest,
    Rejected,
    StatsRequest,
)
from distgrad.protocol.core import MAX_COUNT
from distgrad.server import NonFinite, ParameterServer
from distgrad.stats import StepStats

N = 4
BIG = 3.4e38  # finite; two of them overflow float32 (max ≈ 3.4028e38)
ROOT = Path(__file__).resolve().parents[1]


def make_core(algorithm: str = "downpour", workers: int = 2, trusted: bool = False,
              totals: list[int] | None = None, on_update=None, **params) -> ProtocolCore:
    algo = get_algorithm(algorithm)
    info = RunInfo(workers=workers, lr=0.1, inner_optimizer="sgd")
    server = ParameterServer(torch.zeros(N), algo.server_rule(algo.make_config(params), info),
                             workers)
    core = ProtocolCore(server, Recorder(), lambda: 0.0, totals=totals, trusted=trusted,
                        on_update=on_update)
    for k in range(workers):
        core.admit(k, 0)
    return core


def commit(k: int, seq: int, base: int, position: int, value: float = 1.0, samples: int = 2,
           steps: int = 1, stale: torch.Tensor | None = None, reply: bool = False
           ) -> CommitRequest:
    return CommitRequest(k, 0, seq, base_version=base, steps=steps, samples=samples,
                         position=position, payload=torch.full((N,), value), stale=stale,
                         want_pull=True, want_reply=reply)


def snapshot(core: ProtocolCore) -> bytes:
    return core.server.center.numpy().tobytes()


# --------------------------------------------------------------------------- the guard


def test_two_finite_overflowing_commits_the_second_is_rejected_center_bit_identical():
    core = make_core()
    core.handle(PullRequest(0, 0, 1))
    core.handle(PullRequest(1, 0, 1))
    core.handle(commit(0, 2, 0, 2, BIG))  # finite: applied
    before, version = snapshot(core), core.server.version
    with pytest.raises(Rejected, match=r"would make 4 element\(s\) of the center non-finite"):
        core.handle(commit(1, 2, 0, 2, BIG))
    assert snapshot(core) == before and core.server.version == version
    assert core.slots[1].position == 0  # the window was not counted
    # the run goes on: worker 1 pulls and commits something sane
    core.handle(PullRequest(1, 0, 3))
    (r,) = core.handle(commit(1, 4, 1, 2, -BIG))
    assert r.version == 2 and torch.equal(core.server.center, torch.zeros(N))


def test_a_trusted_workers_overflowing_commit_is_dropped_and_it_goes_on():
    """sim and local (trusted): the diverging worker is answered with the unchanged center,
    its window is recorded as lost, and the run continues."""
    core = make_core(trusted=True, totals=[4, 4])
    core.handle(PullRequest(0, 0, 1))
    core.handle(PullRequest(1, 0, 1))
    core.handle(commit(0, 2, 0, 2, BIG))
    before = snapshot(core)
    (r,) = core.handle(commit(1, 2, 0, 2, BIG))
    assert snapshot(core) == before and r.version == 1 and r.base_version == 1
    assert torch.equal(r.pulled, core.server.center)
    (fault,) = core.sink.of_type("fault")
    assert fault["kind"] == "rejected" and fault["samples_lost"] == 2
    assert "non-finite" in fault["reason"]
    (r,) = core.handle(commit(1, 3, 1, 4, -BIG))  # the next window is applied
    assert r.version == 2
    core.handle(DoneRequest(1, 0, 4))
    assert core.slots[1].state == "done"


def test_a_trusted_exchange_commit_dropped_gets_a_zero_reply():
    core = make_core("aeasgd", trusted=True)
    core.handle(PullRequest(0, 0, 1))
    core.server.center.fill_(BIG)
    req = commit(0, 2, 0, 2, -BIG, reply=True)  # elastic difference −α(θ − θ̃) overflows
    (r,) = core.handle(req)
    assert torch.equal(r.reply, torch.zeros(N)) and torch.equal(core.server.center,
                                                                torch.full((N,), BIG))


def test_a_round_that_would_overflow_is_dropped_center_bit_identical():
    core = make_core("averaging")
    core.handle(PullRequest(0, 0, 1))
    core.handle(PullRequest(1, 0, 1))
    before = snapshot(core)
    assert core.handle(commit(0, 2, 0, 2, BIG)) == []
    replies = core.handle(commit(1, 2, 0, 2, BIG))  # the sum of the round overflows
    assert sorted(r.worker for r in replies) == [0, 1]
    assert snapshot(core) == before and core.server.version == 1
    assert [f["kind"] for f in core.sink.of_type("fault")] == ["rejected", "rejected"]
    core.handle(commit(0, 3, 1, 4, 1.0))  # the next round is applied from a clean sum
    core.handle(commit(1, 3, 1, 4, 3.0))
    assert torch.equal(core.server.center, torch.full((N,), 2.0))


def test_a_refused_commit_leaves_the_rules_state_as_it_was():
    """DC-ASGD keeps optimizer state; the refused commit must not leave a trace in it."""
    algo = get_algorithm("dcasgd")
    cfg = algo.make_config({"mode": "adaptive"})
    server = ParameterServer(torch.zeros(N), algo.server_rule(cfg, RunInfo(2, 0.1, "sgd")), 2)
    server.pull(0, torch.empty(N))
    server.commit(0, torch.full((N,), 1.0), 1, 1)
    state = server.rule.state_dict()
    center = server.center.clone()
    with pytest.raises(NonFinite):
        server.commit(0, torch.full((N,), float("inf")), 1, 1)
    after = server.rule.state_dict()
    assert torch.equal(server.center, center)
    assert torch.equal(after["mean_square"], state["mean_square"])
    assert repr(after["optimizer"]) == repr(state["optimizer"])


def test_the_guard_can_be_turned_off():
    algo = get_algorithm("downpour")
    server = ParameterServer(torch.full((N,), BIG), algo.server_rule(
        algo.make_config({}), RunInfo(1, 0.1, "sgd")), 1, guard=False)
    server.commit(0, torch.full((N,), BIG), 1, 1)
    assert not torch.isfinite(server.center).any()


# --------------------------------------------------------------------------- bounds


def test_samples_2_to_the_62_is_refused_at_once_instead_of_hanging():
    """The issue's hang: a commit of 2⁶² samples with a consistent position, on a core that
    does not know the worker's total (Spark), made the evaluation schedule loop ~2⁶² times.
    It is refused before anything is counted."""
    rec = Recorder()
    evals = EvalSchedule(1, lambda t, v: None)
    core = make_core(on_update=evals.maybe)
    core.sink = rec
    core.handle(PullRequest(0, 0, 1))
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            core.handle(commit(0, 2, 0, 1 << 62, samples=1 << 62))
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the server hangs on a huge sample count"
    assert isinstance(outcome[0], Rejected) and "commit samples" in str(outcome[0])
    assert rec.samples_committed == 0 and core.slots[0].position == 0


@pytest.mark.parametrize(("fields", "match"), [
    (dict(steps=0), "commit steps"),
    (dict(steps=3, samples=2), "commit steps"),  # more steps than samples
    (dict(samples=-1, position=-1), "commit samples"),
    (dict(samples=MAX_COUNT + 1, position=MAX_COUNT + 1), "commit samples"),
    (dict(position=1), "expected 2"),
    (dict(samples=6, position=6), "past the 4 samples"),
    (dict(base=1), "future version"),
    (dict(base=-5), "base version"),
    (dict(seq=1 << 40), "jumps more than"),
    (dict(seq=True), "sequence number"),
])
def test_a_commit_with_counters_out_of_bounds_is_refused(fields, match):
    core = make_core(totals=[4, 4])
    core.handle(PullRequest(0, 0, 1))
    kw = dict(k=0, seq=2, base=0, position=2, samples=2, steps=1)
    kw.update(fields)
    with pytest.raises(Rejected, match=match):
        core.handle(commit(**kw))
    assert torch.equal(core.server.center, torch.zeros(N)) and core.slots[0].position == 0


def test_a_reported_total_is_bounded_by_the_job():
    core = make_core()
    core.max_total = 100
    with pytest.raises(Rejected, match="samples worker 0 reports to process"):
        core.admit(0, 1, total=1 << 62)
    with pytest.raises(Rejected, match="attempt"):
        core.admit(0, 1 << 63)
    core.admit(0, 1, total=100)  # within the bound


def test_step_reports_with_bad_fields_are_refused():
    core = make_core()
    for stats in (StepStats(loss=1.0, correct=3, samples=2), StepStats(1.0, 0, -1),
                  StepStats(loss="x", correct=0, samples=1)):  # type: ignore[arg-type]
        with pytest.raises(Rejected, match="bad step stats"):
            core.handle(StatsRequest(0, 0, 5, stats))


def test_a_step_report_of_zero_samples_is_a_heartbeat_that_counts_nothing():
    rec = Recorder()
    core = make_core()
    core.sink = rec
    core.handle(StatsRequest(0, 0, 5, StepStats(0.0, 0, 0)))
    core.handle(StatsRequest(0, 0, 5, StepStats(0.0, 0, 0)))  # its seq is not kept
    assert rec.samples == 0 and core.slots[0].position == 0


# --------------------------------------------------------------------------- out of protocol


def test_an_adag_commit_before_any_pull_is_rejected_not_raised():
    core = make_core("adag")
    with pytest.raises(Rejected, match="commit before any pull"):
        core.handle(commit(0, 1, 0, 2))
    assert torch.equal(core.server.center, torch.zeros(N))
    core.handle(PullRequest(0, 0, 2))
    core.handle(commit(0, 3, 0, 2))  # after a pull it is served


def test_a_second_commit_in_one_sync_round_is_rejected():
    core = make_core("averaging")
    core.handle(PullRequest(0, 0, 1))
    assert core.handle(commit(0, 2, 0, 2)) == []
    with pytest.raises(Rejected, match="still waiting"):
        core.handle(commit(0, 3, 0, 4))
    with pytest.raises(Rejected, match="still waiting"):
        core.handle(commit(0, 4, 1, 4))


def test_a_new_attempts_commit_while_the_old_ones_is_in_the_round_is_rejected():
    """Attempt 0 of worker 0 is parked at the barrier; attempt 1 takes over and commits its
    next window before the round completes (ParameterServer.submit raised RuntimeError)."""
    core = make_core("averaging", totals=[4, 4])
    core.handle(PullRequest(0, 0, 1))
    core.handle(PullRequest(1, 0, 1))
    assert core.handle(commit(0, 2, 0, 2)) == []
    assert core.admit(0, 1).position == 2
    core.handle(PullRequest(0, 1, 1, record=True))
    early = CommitRequest(0, 1, 2, base_version=0, steps=1, samples=2, position=4,
                          payload=torch.ones(N), want_pull=True)
    with pytest.raises(Rejected, match="already has a commit in the open round"):
        core.handle(early)
    replies = core.handle(commit(1, 2, 0, 2))  # the round completes (attempt 0's commit in)
    assert [r.worker for r in replies] == [1] and core.server.version == 1
    core.handle(PullRequest(0, 1, 3))
    again = CommitRequest(0, 1, 4, base_version=1, steps=1, samples=2, position=4,
                          payload=torch.ones(N), want_pull=True)
    assert core.handle(again) == []  # now it joins the next round


def test_an_ssp_pull_while_held_is_rejected():
    core = make_core("ssp", bound=0)
    core.handle(PullRequest(0, 0, 1))
    core.handle(PullRequest(1, 0, 1))
    assert core.handle(commit(0, 2, 0, 2)) == []
    for req in (PullRequest(0, 0, 3), PullRequest(0, 0, 4, record=False)):
        with pytest.raises(Rejected, match="held by the stale-synchronous gate"):
            core.handle(req)


# --------------------------------------------------------------------------- fuzzing

ALGOS = ["downpour", "adag", "averaging", "ssp", "aeasgd", "gem", "dcasgd", "dynsgd"]
VALUES = st.sampled_from([0.0, 1.0, -2.5, BIG, -BIG, 1e30, float("inf"), float("nan")])
INTS = st.one_of(st.integers(-3, 12), st.sampled_from([1 << 40, 1 << 62, 1 << 63, -(1 << 63)]))


@st.composite
def requests(draw):
    kind = draw(st.sampled_from(["pull", "read", "commit", "stats", "done", "fail", "admit"]))
    k, a, seq = draw(st.integers(-1, 2)), draw(st.integers(0, 2)), draw(INTS)
    if kind in ("pull", "read"):
        return PullRequest(k, a, seq, record=kind == "pull")
    if kind == "commit":
        payload = torch.full((N,), draw(VALUES))
        stale = draw(st.one_of(st.none(), VALUES.map(lambda v: torch.full((N,), v))))
        return CommitRequest(k, a, seq, base_version=draw(INTS), steps=draw(INTS),
                             samples=draw(INTS), position=draw(INTS), payload=payload,
                             stale=stale, want_pull=draw(st.booleans()),
                             want_reply=draw(st.booleans()))
    if kind == "stats":
        return StatsRequest(k, a, seq, StepStats(loss=1.0, correct=draw(INTS),
                                                 samples=draw(INTS)))
    if kind == "done":
        return DoneRequest(k, a, seq)
    if kind == "fail":
        return FailRequest(k, a, seq, reason="é" * draw(st.integers(0, 3000)))
    return ("admit", k if k >= 0 else None, draw(st.one_of(st.none(), INTS)),
            draw(st.one_of(st.none(), INTS)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(algorithm=st.sampled_from(ALGOS), trusted=st.booleans(),
       script=st.lists(requests(), max_size=25))
def test_any_request_sequence_is_served_or_rejected_and_the_center_stays_finite(
        algorithm, trusted, script):
    """Arbitrary fields and orders, from insiders: the core answers or raises Rejected —
    never anything else — and the center is always finite."""
    core = make_core(algorithm, trusted=trusted, totals=[8, 8])
    for req in script:
        before = snapshot(core)
        try:
            if isinstance(req, tuple):
                core.admit(*req[1:])
            else:
                core.handle(req)
        except Rejected:
            assert snapshot(core) == before  # refused: nothing applied
        assert torch.isfinite(core.server.center).all()


# --------------------------------------------------------------------------- on the network


def test_the_guard_on_a_real_network_server():
    """An authenticated insider sends two finite 3.4e38 commits over TCP: the second is
    refused with a reason, the center is bit-identical, and the server keeps serving the
    insider and an honest worker."""
    from distgrad.transport.client import NetClient, RemoteError
    from distgrad.transport.server import NetServer

    secret = b"guard-test-secret-guard-test-secret!"
    core = make_core()
    for k in (0, 1):  # the network admits its own attempts
        core.slots[k].state, core.slots[k].attempt = "free", -1
    net = NetServer(core, secret)
    thread = net.serve_in_thread()
    clients = []
    try:
        insider = NetClient(net.address, secret, worker=0, timeout=10, retries=1)
        honest = NetClient(net.address, secret, worker=1, timeout=10, retries=1)
        clients += [insider, honest]
        into = torch.empty(N)
        insider.pull(into)
        honest.pull(into)
        insider.commit(torch.full((N,), BIG), steps=1, samples=1, pull_into=into)
        before = snapshot(core)
        with pytest.raises(RemoteError, match="non-finite"):
            insider.commit(torch.full((N,), BIG), steps=1, samples=1, pull_into=into)
        assert snapshot(core) == before
        insider.position -= 1  # the refused window was not counted by the server
        assert insider.pull(into) == 1 and into.numpy().tobytes() == before
        honest.base_version = 0
        honest.pull(into)
        assert honest.commit(torch.full((N,), -BIG), steps=1, samples=1, pull_into=into) == 2
        assert torch.equal(into, torch.zeros(N))
        assert net.error is None and thread.is_alive()
    finally:
        for c in clients:
            c.close()
        net.stop()
        thread.join(30)
        net.close()


# --------------------------------------------------------------------------- whole runs


class PoisonWorker(WorkerRule):
    """DOWNPOUR, except that the first two commits of every worker are 3.4e38 each."""

    def make_payload(self, rep, steps):
        self.sent = getattr(self, "sent", 0) + 1
        payload = super().make_payload(rep, steps)
        return payload.fill_(BIG) if self.sent <= 2 else payload


#: not registered at import (the registry-wide contract tests must not see it): the run
#: resolves it by import path, and the fixture below forgets it afterwards
POISON = Algorithm(name="poison-test", summary="DOWNPOUR whose workers first commit 3.4e38 "
                   "twice", config=AlgorithmConfig, worker_rule=PoisonWorker,
                   server_rule=AddServer)


@pytest.fixture()
def registry():
    saved, saved_paths = dict(REGISTRY), dict(_BY_PATH)
    yield
    REGISTRY.clear()
    REGISTRY.update(saved)
    _BY_PATH.clear()
    _BY_PATH.update(saved_paths)


@pytest.mark.parametrize("engine", ["sim", "local"])
def test_a_poisoning_worker_does_not_stop_a_run(engine, monkeypatch, registry):
    """On the trusted engines the overflowing commits are dropped (``rejected`` faults),
    the run completes and its center is finite."""
    monkeypatch.syspath_prepend(str(ROOT))  # spawned workers import this module by path
    result = train(algorithm="tests.test_center_guard:POISON", engine=engine, workers=2,
                   epochs=1, train_samples=240, batch_size=40, window=1, model="cnn",
                   eval_every=10.0, seed=1, threads=1)
    rejected = [f for f in result.events if f["type"] == "fault" and f["kind"] == "rejected"]
    assert rejected and all("non-finite" in f["reason"] for f in rejected)
    assert result.status == "completed"
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_eval_schedule_jumps_in_constant_time():
    """A count within the core's bounds (up to 2⁴⁰) must not make the evaluation schedule
    loop once per sample: the next point is computed, not stepped to."""
    seen: list[int] = []
    evals = EvalSchedule(10, lambda t, v: seen.append(v))
    evals.maybe(0.0, 0, 0)
    evals.maybe(0.0, 1, 9)
    assert seen == [0] and evals.next_at == 10
    evals.maybe(0.0, 2, 35)
    assert seen == [0, 2] and evals.next_at == 40
    evals.maybe(0.0, 3, MAX_COUNT)
    assert evals.next_at > MAX_COUNT and evals.next_at % 10 == 0
    assert evals.next_at - MAX_COUNT <= 10
