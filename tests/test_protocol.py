"""The protocol core on its own: exactly-once for every request kind, reordering, attempt
fencing, barrier and gate, replay schedules. Scripted peers, no I/O (the style of
trio's protocol tests): each test sends requests as a worker would and checks the
replies, the center and the events."""

from __future__ import annotations

import pytest
import torch

from distgrad.algorithms import RunInfo, StepStats, get_algorithm
from distgrad.metrics.events import Recorder
from distgrad.protocol import (
    CommitRequest,
    DoneRequest,
    FailRequest,
    ProtocolCore,
    PullRequest,
    Rejected,
    StatsRequest,
)
from distgrad.protocol.core import replay_schedule
from distgrad.server import ParameterServer

N = 4


def make_core(algorithm: str = "downpour", workers: int = 2, totals: list[int] | None = None,
              schedule: list[tuple[str, int]] | None = None, **params) -> ProtocolCore:
    algo = get_algorithm(algorithm)
    cfg = algo.make_config(params)
    info = RunInfo(workers=workers, lr=0.1, inner_optimizer="sgd")
    server = ParameterServer(torch.zeros(N), algo.server_rule(cfg, info), workers)
    now = [0.0]
    core = ProtocolCore(server, Recorder(), lambda: now[0], totals=totals, schedule=schedule)
    for k in range(workers):
        core.admit(k, 0)
    return core


def commit(k: int, seq: int, base: int, position: int, value: float = 1.0, samples: int = 2,
           attempt: int = 0, pull: bool = True) -> CommitRequest:
    return CommitRequest(k, attempt, seq, base_version=base, steps=1, samples=samples,
                         position=position, payload=torch.full((N,), value), want_pull=pull)


def events(core: ProtocolCore, kind: str) -> list[dict]:
    return core.sink.of_type(kind)  # type: ignore[union-attr]


def test_a_resent_pull_gets_the_same_answer_and_moves_the_pull_clock_once():
    core = make_core()
    (first,) = core.handle(PullRequest(0, 0, 1))
    core.handle(commit(1, 1, 0, 2))  # the center moves to version 1
    (again,) = core.handle(PullRequest(0, 0, 1))  # the reply to seq 1 was lost
    assert again.duplicate and again.version == first.version == 0
    assert torch.equal(again.pulled, torch.zeros(N))
    assert core.server.base_version[0] == 0  # not re-pulled at version 1
    assert len(events(core, "pull")) == 1


def test_a_resent_read_gets_the_same_answer_and_leaves_the_pull_clock():
    core = make_core()
    core.handle(PullRequest(0, 0, 1))
    core.handle(commit(1, 1, 0, 2))
    (read,) = core.handle(PullRequest(0, 0, 2, record=False))
    (again,) = core.handle(PullRequest(0, 0, 2, record=False))
    assert read.version == again.version == 1 and again.duplicate
    assert torch.equal(again.pulled, torch.ones(N))
    assert core.server.base_version[0] == 0


def test_a_resent_commit_is_answered_again_and_applied_once():
    core = make_core()
    core.handle(PullRequest(0, 0, 1))
    (first,) = core.handle(commit(0, 2, 0, 2))
    center = core.server.center.clone()
    (again,) = core.handle(commit(0, 2, 0, 2))
    assert again.duplicate and again.version == first.version == 1
    assert torch.equal(again.pulled, first.pulled)
    assert torch.equal(core.server.center, center)
    assert len(events(core, "commit")) == 1 and core.slots[0].position == 2


def test_a_resent_done_and_fail_are_answered_once():
    core = make_core(totals=[2, 2])
    core.handle(PullRequest(0, 0, 1))
    core.handle(commit(0, 2, 0, 2))
    (ack,) = core.handle(DoneRequest(0, 0, 3))
    (again,) = core.handle(DoneRequest(0, 0, 3))
    assert ack.kind == again.kind == "done" and again.duplicate
    assert len(events(core, "done")) == 1
    core.handle(PullRequest(1, 0, 1))
    core.handle(FailRequest(1, 0, 2, reason="out of memory"))
    core.handle(FailRequest(1, 0, 2, reason="out of memory"))
    assert [f["kind"] for f in events(core, "fault")] == ["error"]


def test_a_duplicated_step_report_is_counted_once():
    core = make_core()
    s = StatsRequest(0, 0, 1, StepStats(loss=1.0, correct=1, samples=8))
    core.handle(s)
    core.handle(s)
    assert core.sink.samples == 8 and core.slots[0].uncommitted == 8


def test_a_reordered_older_request_is_rejected_without_effect():
    core = make_core()
    core.handle(PullRequest(0, 0, 1))
    core.handle(commit(0, 3, 0, 2))
    center = core.server.center.clone()
    with pytest.raises(Rejected, match="stale sequence number 2"):
        core.handle(commit(0, 2, 0, 4, value=5.0))  # an older request arriving late
    with pytest.raises(Rejected, match="stale sequence number 1"):
        core.handle(commit(0, 1, 1, 4, value=5.0))  # same seq as a pull: not a resend
    assert torch.equal(core.server.center, center)


def test_a_new_attempt_fences_the_old_one_for_every_request_kind():
    core = make_core()
    core.handle(PullRequest(0, 0, 1))
    adm = core.admit(0, 1)
    assert adm.position == 0 and [f["kind"] for f in events(core, "fault")] == ["superseded"]
    center = core.server.center.clone()
    for req in (PullRequest(0, 0, 1), PullRequest(0, 0, 2), commit(0, 2, 0, 2),
                DoneRequest(0, 0, 3), FailRequest(0, 0, 4)):
        with pytest.raises(Rejected, match="attempt 0 of worker 0 is not live"):
            core.handle(req)
    assert torch.equal(core.server.center, center)
    (pulled,) = core.handle(PullRequest(0, 1, 1))  # the new attempt starts its own seqs
    assert pulled.version == 0


def test_a_new_attempt_resumes_after_the_last_applied_window():
    core = make_core(totals=[4, 4])
    core.handle(PullRequest(0, 0, 1))
    core.handle(commit(0, 2, 0, 2))
    adm = core.admit(0, 1)
    assert adm.position == 2
    core.handle(PullRequest(0, 1, 1))
    (dup,) = core.handle(commit(0, 2, 1, 2, attempt=1))  # the same window sent again
    assert dup.duplicate and len(events(core, "commit")) == 1


def test_a_commit_resent_while_at_the_barrier_waits_and_the_round_applies_once():
    core = make_core("averaging")
    core.handle(PullRequest(0, 0, 1))
    core.handle(PullRequest(1, 0, 1))
    assert core.handle(commit(0, 2, 0, 2)) == []
    assert core.handle(commit(0, 2, 0, 2)) == []  # resent while parked
    replies = core.handle(commit(1, 2, 0, 2, value=3.0))
    assert sorted(r.worker for r in replies) == [0, 1]
    assert len(events(core, "round")) == 1
    assert torch.equal(core.server.center, torch.full((N,), 2.0))
    (again,) = core.handle(commit(0, 2, 0, 2))  # its answer was lost: the same answer
    assert again.duplicate and again.version == 1


def test_out_of_protocol_requests_are_rejected_not_raised():
    core = make_core("ssp", bound=0)
    core.handle(PullRequest(0, 0, 1))
    core.handle(PullRequest(1, 0, 1))
    assert core.handle(commit(0, 2, 0, 2)) == []  # held: worker 1 has not committed
    with pytest.raises(Rejected, match="held by the stale-synchronous gate"):
        core.handle(PullRequest(0, 0, 3))
    with pytest.raises(Rejected, match="still waiting"):
        core.handle(commit(0, 4, 0, 4))
    replies = core.handle(commit(1, 2, 0, 2))
    assert sorted(r.worker for r in replies) == [0, 1]


def test_a_commit_past_the_workers_samples_is_rejected():
    core = make_core(totals=[4, 4])
    core.handle(PullRequest(0, 0, 1))
    with pytest.raises(Rejected, match="past the 4 samples"):
        core.handle(commit(0, 2, 0, 6, samples=6))
    assert torch.equal(core.server.center, torch.zeros(N))


def test_an_untrusted_transport_refuses_non_finite_payloads():
    core = make_core()
    core.handle(PullRequest(0, 0, 1))
    with pytest.raises(Rejected, match="non-finite"):
        core.handle(commit(0, 2, 0, 2, value=float("nan")))
    assert torch.equal(core.server.center, torch.zeros(N))


def test_a_schedule_holds_requests_until_their_turn():
    schedule = [("pull", 1), ("pull", 0), ("commit", 0), ("commit", 1)]
    core = make_core(schedule=schedule)
    assert core.handle(PullRequest(0, 0, 1)) == []  # worker 1 pulls first in the recording
    assert core.handle(PullRequest(0, 0, 1)) == []  # a resend while held is not queued twice
    replies = core.handle(PullRequest(1, 0, 1))
    assert [r.worker for r in replies] == [1, 0]
    assert core.handle(commit(1, 2, 0, 2)) == []
    replies = core.handle(commit(0, 2, 0, 2))
    assert [(r.worker, r.version) for r in replies] == [(0, 1), (1, 2)]
    assert replay_schedule(core.sink.events) == schedule
    assert core.schedule is None  # used up: served as they come from now on


def test_a_schedule_that_diverges_is_refused():
    core = make_core(schedule=[("commit", 0)])
    with pytest.raises(Rejected, match="replay diverged: worker 0 sent a pull"):
        core.handle(PullRequest(0, 0, 1))
