"""Compressed commits (fp16, bf16, int8 with error feedback; bytes per commit) and the
experimental compensation of implicit momentum."""

from __future__ import annotations

import pytest
import torch

from distgrad import ConfigError, Job, train
from distgrad.compression import Compressor, decode, encode, payload_bytes

FAST = dict(epochs=1, batch_size=64, lr=1e-3, inner_optimizer="adam", eval_every=10.0)


def run(name, mnist_small, tiny_mlp, **kw):
    base = dict(FAST, seed=3, model=tiny_mlp, **mnist_small)
    base.update(kw)
    return train(engine="sim", algorithm=name, **base)


# --------------------------------------------------------------------------- compression


def test_fp32_compression_is_no_compression(mnist_small, tiny_mlp):
    none = run("adag", mnist_small, tiny_mlp, workers=3, window=2)
    fp32 = run("adag", mnist_small, tiny_mlp, workers=3, window=2, compression="fp32")
    assert none.params_sha256 == fp32.params_sha256
    assert none.bytes_per_commit == fp32.bytes_per_commit == 4 * none.parameters


@pytest.mark.parametrize(("codec", "per_param"), [("fp16", 2), ("bf16", 2), ("int8", 1)])
def test_bytes_per_commit_in_events_and_summary(codec, per_param, mnist_small, tiny_mlp):
    res = run("agn", mnist_small, tiny_mlp, workers=2, window=2, compression=codec)
    tensors = len(list(tiny_mlp.parameters()))
    expected = per_param * res.parameters + (4 * tensors if codec == "int8" else 0)
    assert expected == payload_bytes(codec, res.parameters, tensors)
    commits = [e for e in res.events if e["type"] == "commit"]
    assert {c["bytes"] for c in commits} == {expected}
    assert res.bytes_per_commit == expected
    assert res.bytes_committed == expected * res.commits
    assert res.test_accuracy > 0.6  # still learns


def test_rounds_record_the_bytes_of_all_their_commits(mnist_small, tiny_mlp):
    res = run("averaging", mnist_small, tiny_mlp, workers=3, window=4, compression="bf16")
    rounds = [e for e in res.events if e["type"] == "round"]
    assert all(r["bytes"] == 2 * res.parameters * len(r["workers"]) for r in rounds)


def test_adag_worker_placement_counts_the_stale_center(mnist_small, tiny_mlp):
    res = run("adag", mnist_small, tiny_mlp, workers=2, window=2, compression="fp16",
              params={"placement": "worker"})
    assert res.bytes_per_commit == 2 * res.parameters + 4 * res.parameters


def test_int8_encoding_by_hand():
    x = torch.tensor([0.5, -1.0, 0.25, 2.0])
    enc = encode("int8", x, (3, 1))
    # tensor 0: scale 1/127, q = round(63.5) = 64 (half to even), -127, round(31.75) = 32
    assert enc.data.tolist() == [64, -127, 32, 127]
    torch.testing.assert_close(enc.scales, torch.tensor([1 / 127, 2 / 127]))
    assert enc.nbytes == 4 + 2 * 4
    out = decode(enc, torch.empty(4))
    torch.testing.assert_close(out, torch.tensor([64 / 127, -1.0, 32 / 127, 2.0]))


def test_fp16_clamps_instead_of_overflowing():
    enc = encode("fp16", torch.tensor([1e6, -1e6, 1.0]), (3,))
    assert torch.isfinite(decode(enc, torch.empty(3))).all()


def test_compressor_payload_is_what_the_wire_decodes_to():
    gen = torch.Generator().manual_seed(1)
    comp = Compressor("int8", (60, 40), error_feedback=True)
    for _ in range(5):
        payload = torch.randn(100, generator=gen)
        enc = comp.compress(payload)
        assert torch.equal(decode(enc, torch.empty(100)), payload)


def test_error_feedback_makes_applied_int8_commits_track_the_true_sum():
    gen = torch.Generator().manual_seed(0)
    deltas = [torch.randn(1000, generator=gen) * 1e-3 + 2e-4 for _ in range(300)]
    true = torch.stack(deltas).sum(0)
    errors = {}
    for ef in (True, False):
        comp = Compressor("int8", (600, 400), error_feedback=ef)
        applied = torch.zeros(1000)
        for d in deltas:
            payload = d.clone()
            comp.compress(payload)
            applied += payload
        errors[ef] = float((applied - true).abs().max())
        if ef:  # Σ applied = Σ true − e_T, and |e_T| <= half a quantization step
            half_step = max(float(d.abs().max()) for d in deltas) / 127 / 2 * 1.01
            torch.testing.assert_close(applied, true - comp.residual, rtol=0, atol=1e-5)
            assert errors[ef] <= half_step
    assert errors[False] > 5 * errors[True]


def test_compression_rejects_unknown_codecs():
    with pytest.raises(ConfigError, match="unknown compression 'int4'"):
        Job(compression="int4")


# --------------------------------------------------------------------------- momentum


def test_momentum_compensation_formula_and_application(mnist_small, tiny_mlp):
    from distgrad.optim import compensated_momentum

    assert compensated_momentum(0.9, 1) == 0.9
    assert compensated_momentum(0.95, 10) == pytest.approx(0.95 - 0.9)
    assert compensated_momentum(0.9, 20) == 0.0  # never below 0
    job = Job(algorithm="downpour", workers=4, inner_optimizer="sgd",
              inner_options={"momentum": 0.9}, momentum_target=0.9)
    assert job.effective_inner_options() == {"momentum": pytest.approx(0.9 - 0.75)}
    res = run("downpour", mnist_small, tiny_mlp, workers=4, window=1, momentum_target=0.95)
    assert res.inner_options == {"beta1": pytest.approx(0.95 - 0.75)}
    with pytest.raises(ConfigError, match="'averaging' is synchronous"):
        Job(algorithm="averaging", momentum_target=0.9)
    with pytest.raises(ConfigError, match=r"momentum_target must lie in \[0, 1\), got 1.5"):
        Job(algorithm="agn", momentum_target=1.5)
