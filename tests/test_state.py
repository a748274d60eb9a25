"""Checkpoints are whole: a worker and a server restored from a snapshot continue bit for bit.

Every registered algorithm (and the variants with state of their own) is driven by a
small sequential scheduler against a :class:`ParameterServer`, as the ``sim`` engine
serves requests. At several cut points — before a worker started, after its first
step, with a commit decision pending, right after a commit, late in the run — the
workers and the server are snapshotted, the snapshot goes through
``torch.save``/``torch.load(weights_only=True)``, and *fresh* objects
(``RunParts.make_worker``, ``RunParts.make_server``) load it and run to the end. The
requests they yield and the final parameters must equal the uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np
import pytest
import torch

from conftest import TinyMLP
from distgrad.algorithms import get_algorithm, names
from distgrad.compression import Compressor
from distgrad.data.mnist import Dataset
from distgrad.data.shards import make_shards
from distgrad.errors import ConfigError
from distgrad.job import Job, RunParts
from distgrad.models import initialize
from distgrad.server import ParameterServer
from distgrad.worker import BatchSource, Commit, Pull, Step, Worker

SAMPLES = 192
BATCH = 16


def _window(name: str, window: int = 3) -> int:
    try:
        get_algorithm(name).make_config({"window": window})
    except ConfigError:
        return 1
    return window


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one torch thread is faster, and a loaded machine does not slow it down."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def data() -> Dataset:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(SAMPLES + 32, 784, generator=g)
    y = torch.randint(0, 10, (SAMPLES + 32,), generator=g)
    return Dataset("random", x[:SAMPLES], y[:SAMPLES], x[SAMPLES:], y[SAMPLES:])


def make_parts(data: Dataset, name: str, params: dict[str, Any] | None = None,
               **job: Any) -> RunParts:
    algo = get_algorithm(name)
    kw: dict[str, Any] = dict(algorithm=name, workers=algo.exact_workers or 2,
                              window=_window(name), epochs=2, batch_size=BATCH, lr=0.01,
                              seed=3, params=params or {})
    kw.update(job)
    j = Job(**kw)
    shards = make_shards(data.y_train.numpy(), int(j.workers), "shuffled", j.seed)  # type: ignore[arg-type]
    return RunParts(job=j, dataset=data, shards=shards,
                    template=initialize(TinyMLP(hidden=8), seed=1),
                    loss_fn=torch.nn.functional.cross_entropy)


def _digest(t: torch.Tensor | None) -> str | None:
    if t is None:
        return None
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()


class Driver:
    """Serves workers' requests one at a time, round-robin, like the ``sim`` engine does
    (barrier for synchronous rules, the stale-synchronous gate for ``clock_bound``)."""

    def __init__(self, server: ParameterServer, workers: list[Worker],
                 sched: dict[str, Any] | None = None) -> None:
        self.server, self.workers = server, workers
        self.gens = [w.run() for w in workers]
        self.send: list[Any] = [None] * len(workers)
        self.waiting: dict[int, Commit] = {}
        self.queue: list[int] = []
        self.log: list[tuple] = []
        sched = sched or {}
        self.done: set[int] = set(sched.get("done", ()))
        self.turn = int(sched.get("turn", 0))
        self.commits = int(sched.get("commits", 0))

    def schedule_state(self) -> dict[str, Any]:
        """The scheduler's own position (an engine keeps this; it is not worker state)."""
        assert not self.waiting and not self.queue
        return {"done": sorted(self.done), "turn": self.turn, "commits": self.commits}

    def finished(self) -> bool:
        return len(self.done) == len(self.workers)

    def tick(self) -> None:
        """Advance the next worker (round-robin) to its next step, then whoever it freed."""
        n = len(self.workers)
        for _ in range(n):
            k = self.turn % n
            self.turn += 1
            if k not in self.done and k not in self.waiting:
                break
        else:
            raise AssertionError("every live worker waits: deadlock")
        self._advance(k)
        while self.queue:
            p = self.queue.pop(0)
            if p not in self.done and p not in self.waiting:
                self._advance(p)

    def run(self) -> None:
        while not self.finished():
            self.tick()

    # ------------------------------------------------------------------ serving
    def _advance(self, k: int) -> None:
        server = self.server
        while True:
            value, self.send[k] = self.send[k], None
            try:
                req = self.gens[k].send(value)
            except StopIteration:
                self.done.add(k)
                self.log.append((k, "done"))
                self._round(server.leave(k), k)
                self._release(k)
                return
            if isinstance(req, Step):
                s = req.stats
                self.log.append((k, "step", s.loss, s.correct, s.samples))
                return
            if isinstance(req, Pull):
                self.send[k] = server.pull(k, req.into, record=req.record)
                self.log.append((k, "pull", req.record, self.send[k], _digest(req.into)))
                continue
            assert isinstance(req, Commit)
            self.commits += 1
            self.log.append((k, "commit", req.steps, req.samples, req.nbytes,
                             _digest(req.payload), _digest(req.stale_center),
                             req.pull_into is not None,
                             None if req.encoded is None else _digest(req.encoded.data.float())))
            if server.rule.synchronous:
                self.waiting[k] = req
                self._round(server.submit(k, req.payload, req.steps, req.samples), k)
            else:
                rec = server.commit(k, req.payload, req.steps, req.samples, req.stale_center)
                self.log.append((k, "applied", rec.version, rec.staleness, rec.held,
                                 _digest(req.payload)))
                if rec.held:
                    self.waiting[k] = req
                else:
                    self._resume(k, req)
                self._release(k)
            if k in self.waiting:
                return

    def _resume(self, k: int, req: Commit) -> None:
        if req.pull_into is not None:
            self.send[k] = self.server.pull(k, req.pull_into)
        else:
            self.send[k] = self.server.version

    def _round(self, rec, current: int) -> None:
        if rec is None:
            return
        self.log.append(("round", rec.version, rec.participants))
        for p in rec.participants:
            req = self.waiting.pop(p, None)
            if req is None or p in self.done:
                continue
            self._resume(p, req)
            if p != current:
                self.queue.append(p)

    def _release(self, current: int) -> None:
        for p in self.server.released():
            req = self.waiting.pop(p, None)
            if req is None:
                continue
            self._resume(p, req)
            if p != current:
                self.queue.append(p)


def _final(server: ParameterServer, workers: list[Worker]) -> list[torch.Tensor]:
    return [m.clone() for m in server.models()] + [w.rep.params.clone() for w in workers]


def _through_bytes(obj: Any) -> Any:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _fresh(parts: RunParts) -> tuple[ParameterServer, list[Worker]]:
    return parts.make_server(), [parts.make_worker(k) for k in range(len(parts.shards))]


def _reference(parts: RunParts) -> tuple[Driver, list[int], list[int]]:
    """The uninterrupted run; returns it, the ticks after which every worker is between
    steps, and the commit count after each tick."""
    server, workers = _fresh(parts)
    d = Driver(server, workers)
    clean, commits = [0], [0]
    while not d.finished():
        d.tick()
        commits.append(d.commits)
        if not d.waiting:
            clean.append(len(commits) - 1)
    return d, clean, commits


def _cut_points(clean: list[int], commits: list[int]) -> list[int]:
    """Before anything, after the first step, with a commit decision pending, right after a
    commit, in the middle, near the end."""
    total = len(commits) - 1
    cuts = {0, 1}
    first = next((t for t in range(total) if commits[t + 1] > commits[t]), None)
    if first is not None:
        cuts.update({first, first + 1})
    second = next((t for t in range(total) if commits[t + 1] > commits[t] > 0), None)
    if second is not None:
        cuts.update({second, second + 1})
    cuts.update({total // 2, total - 2})
    ok = set(clean)
    out = []
    for c in sorted(cuts):
        while c <= total and c not in ok:
            c += 1
        if c <= total and c not in out:
            out.append(c)
    return out


def _restore(parts: RunParts, snap: dict[str, Any]) -> Driver:
    """Fresh server and workers, loaded from ``snap``."""
    server, workers = _fresh(parts)
    server.load_state_dict(snap["server"])
    for w, st in zip(workers, snap["workers"], strict=True):
        w.load_state_dict(st)
    return Driver(server, workers, snap["schedule"])


_PLAIN = (int, float, bool, str, type(None))


def _plain_attrs(obj: Any) -> dict[str, Any]:
    """The Python-side state of an object: its attributes that are plain values (or lists,
    tuples, sets of them). A rule that keeps a counter or a flag must restore it."""
    def plain(v: Any) -> bool:
        if isinstance(v, list | tuple | set | frozenset):
            return all(plain(x) for x in v)
        return isinstance(v, _PLAIN)
    return {k: v for k, v in vars(obj).items() if plain(v)}


def _assert_same_python_state(d: Driver, d2: Driver) -> None:
    pairs = [(d.server, d2.server), (d.server.rule, d2.server.rule)]
    for w, w2 in zip(d.workers, d2.workers, strict=True):
        pairs += [(w, w2), (w.rule, w2.rule), (w.batches, w2.batches)]
        if w.compressor is not None:
            pairs.append((w.compressor, w2.compressor))
    for a, b in pairs:
        assert _plain_attrs(a) == _plain_attrs(b), type(a).__name__


def check_resume(parts: RunParts) -> None:
    ref, clean, commits = _reference(parts)
    assert ref.commits > 2, "the setup should commit several times"
    expected = _final(ref.server, ref.workers)
    cuts = _cut_points(clean, commits)
    for cut in cuts:
        server, workers = _fresh(parts)
        d = Driver(server, workers)
        for _ in range(cut):
            d.tick()
        snap = {"server": server.state_dict(), "workers": [w.state_dict() for w in workers],
                "schedule": d.schedule_state()}
        before = list(d.log)
        restored = [_restore(parts, _through_bytes(snap))]
        _assert_same_python_state(d, restored[0])
        if cut == cuts[len(cuts) // 2]:
            # the same in-memory snapshot loaded twice: nothing may be shared (torch.optim's
            # load_state_dict keeps the tensors it is given)
            restored += [_restore(parts, snap), _restore(parts, snap)]
            for d2 in restored[1:]:
                d2.run()
        for d2 in restored:
            if not d2.finished():
                d2.run()
            assert before + d2.log == ref.log, f"requests differ after a cut at tick {cut}"
            got = _final(d2.server, d2.workers)
            assert len(got) == len(expected)
            for a, b in zip(got, expected, strict=True):
                assert torch.equal(a, b), f"parameters differ after a cut at tick {cut}"
            assert d2.server.version == ref.server.version
            for w, r in zip(d2.workers, ref.workers, strict=True):
                assert (w.steps, w.version, w.window_steps, w.uncommitted_samples) == (
                    r.steps, r.version, r.window_steps, r.uncommitted_samples)


# --------------------------------------------------------------------------- every algorithm


@pytest.mark.parametrize("name", names())
def test_every_algorithm_resumes_bit_exactly(name, data):
    check_resume(make_parts(data, name))


VARIANTS = [
    ("adag", {"placement": "worker"}, {}),
    ("gem", {"placement": "server"}, {}),
    ("easgd", {"early_commit": True, "early_commit_threshold": 0.5}, {}),
    ("eamsgd", {"nesterov_sign": "distkeras"}, {}),
    ("diloco-async", {"adag_gamma": 0.01, "outer_momentum": 0.9}, {}),
    ("localsgd", {"warmup_steps": 4}, {}),
    ("dcasgd", {"mode": "adaptive"}, {}),
    ("ssp", {"bound": 0, "average": True}, {}),
    ("staleness-lr", {"softsync": 1}, {}),
    ("ensemble", {"same_init": True}, {}),
    ("downpour", {}, {"compression": "int8"}),
    ("agn", {}, {"compression": "bf16", "inner_optimizer": "sgd",
                 "inner_options": {"momentum": 0.9}}),
    ("sync", {}, {"inner_optimizer": "sgd", "inner_options": {"momentum": 0.9}}),
]


@pytest.mark.parametrize(("name", "params", "job"), VARIANTS,
                         ids=[f"{v[0]}-{'-'.join(map(str, {**v[1], **v[2]}))}" for v in VARIANTS])
def test_stateful_variants_resume_bit_exactly(name, params, job, data):
    check_resume(make_parts(data, name, params, **job))


def test_the_easgd_equilibrium_flag_is_exercised(data):
    """The variant above must actually take an early commit, or its flag goes untested."""
    parts = make_parts(data, "easgd", {"early_commit": True, "early_commit_threshold": 0.5})
    ref, _, _ = _reference(parts)
    steps = [e[2] for e in ref.log if e[1] == "commit"]
    assert any(s < parts.config.window for s in steps[:-2]), steps


# --------------------------------------------------------------------------- the pieces


def _assert_same(a: Any, b: Any, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        # bit for bit: a scratch buffer (torch.empty) may hold NaN bit patterns, which
        # torch.equal would call different from themselves
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.detach().reshape(-1).view(torch.uint8),
                           b.detach().reshape(-1).view(torch.uint8)), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.mark.parametrize("name", names())
def test_state_round_trips_through_torch_save(name, data):
    parts = make_parts(data, name, compression="fp16")
    server, workers = _fresh(parts)
    d = Driver(server, workers)
    for _ in range(7):
        d.tick()
    while d.waiting:
        d.tick()
    state = {"server": server.state_dict(), "workers": [w.state_dict() for w in workers]}
    loaded = _through_bytes(state)
    _assert_same(state, loaded)
    server2, workers2 = _fresh(parts)
    server2.load_state_dict(loaded["server"])
    for w, st in zip(workers2, loaded["workers"], strict=True):
        w.load_state_dict(st)
    _assert_same(state, {"server": server2.state_dict(),
                         "workers": [w.state_dict() for w in workers2]})


def test_worker_state_holds_the_inner_optimizer_and_position(data):
    parts = make_parts(data, "downpour", compression="int8")
    w = parts.make_worker(0)
    gen = w.run()
    assert isinstance(next(gen), Pull)
    assert isinstance(gen.send(0), Step)
    st = w.state_dict()
    assert st["started"] and st["steps"] == 1 and st["window_steps"] == 1
    assert st["pending_step"]["samples"] == BATCH
    assert st["batches"]["position"] == BATCH
    assert st["batches"]["order"].dtype == torch.int64
    opt = st["replica"]["optimizer"]["state"]
    assert opt and all(int(s["step"]) == 1 for s in opt.values())  # Adam moments after 1 step
    assert st["compressor"] == {"codec": "int8", "residual": None}  # no commit yet
    assert all(t.device.type == "cpu" for t in st["replica"]["grads"])


def test_snapshots_do_not_alias_the_live_worker(data):
    parts = make_parts(data, "downpour")
    w = parts.make_worker(0)
    gen = w.run()
    next(gen)
    gen.send(0)
    st = w.state_dict()
    frozen = _through_bytes(st)
    for _ in range(2):
        gen.send(None)  # more steps change the parameters and the Adam moments
    _assert_same(st, frozen)
    a, b = parts.make_worker(0), parts.make_worker(0)
    a.load_state_dict(st)
    b.load_state_dict(st)
    ga, gb = a.run(), b.run()
    next(ga)
    next(gb)  # both step from the same snapshot: loading must not share the Adam moments
    _assert_same(st, frozen)
    assert torch.equal(a.rep.params, b.rep.params)


def test_a_snapshot_in_the_middle_of_a_commit_is_refused(data):
    parts = make_parts(data, "downpour", window=1)
    w = parts.make_worker(0)
    gen = w.run()
    next(gen)
    gen.send(0)
    assert isinstance(gen.send(None), Commit)
    with pytest.raises(RuntimeError, match="middle of a commit"):
        w.state_dict()
    assert isinstance(gen.send(1), Step)
    assert w.state_dict()["window_steps"] == 1


def test_a_snapshot_in_the_middle_of_the_initial_pull_is_refused(data):
    w = make_parts(data, "downpour").make_worker(0)
    gen = w.run()
    next(gen)
    with pytest.raises(RuntimeError, match="initial pull"):
        w.state_dict()


def test_before_start_and_after_the_end(data):
    parts = make_parts(data, "agn")
    fresh = parts.make_worker(1)
    st = fresh.state_dict()
    assert not st["started"] and st["replica"]["buffers"] == {}
    w = parts.make_worker(1)
    w.load_state_dict(_through_bytes(st))
    assert isinstance(next(w.run()), Pull)  # not started: the run begins with its pull
    server, workers = _fresh(parts)
    Driver(server, workers).run()
    end = parts.make_worker(1)
    end.load_state_dict(_through_bytes(workers[1].state_dict()))
    assert list(end.run()) == []  # finished: nothing left to do
    with pytest.raises(ValueError, match="worker 1 loaded into worker 0"):
        parts.make_worker(0).load_state_dict(workers[1].state_dict())


def test_batch_source_state_keeps_reassigned_work():
    x, y = torch.arange(20.0).view(10, 2), torch.arange(10)
    src = BatchSource(x, y, np.arange(6), batch_size=4, epochs=1, seed=0)
    it = iter(src)
    next(it)
    src.extend(np.array([8, 9]))
    st = _through_bytes(src.state_dict())
    other = BatchSource(x, y, np.arange(6), batch_size=4, epochs=1, seed=1)
    other.load_state_dict(st)
    assert [b[1].tolist() for b in other] == [b[1].tolist() for b in it]


def test_compressor_residual_round_trips():
    c = Compressor("int8", [3, 2])
    c.compress(torch.tensor([0.3, -1.0, 0.001, 2.0, 0.7]))
    st = _through_bytes(c.state_dict())
    d = Compressor("int8", [3, 2])
    d.load_state_dict(st)
    nxt = torch.tensor([0.1, 0.2, -0.3, 0.4, 0.5])
    assert torch.equal(c.compress(nxt.clone()).data, d.compress(nxt.clone()).data)
    assert torch.equal(c.residual, d.residual)
    with pytest.raises(ValueError, match="codec"):
        Compressor("fp16", [3, 2]).load_state_dict(st)
