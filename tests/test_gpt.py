"""The second workload: a byte-level GPT on the shipped corpus, with perplexity."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

import distgrad
from distgrad.data.text import corpus_bytes, load_text
from distgrad.metrics.evaluate import Evaluator
from distgrad.models import build_model
from distgrad.models.gpt import GPT
from distgrad.replica import flatten_parameters, parameter_count

TINY = {"n_layer": 1, "n_embd": 32, "n_head": 2}


def test_corpus_ships_and_splits_into_next_byte_windows() -> None:
    text = corpus_bytes("pystdlib")
    assert hashlib.sha256(text).hexdigest().startswith("94c4ff6901e84889")
    d = load_text("pystdlib", block=64)
    assert d.x_train.shape[1] == 64 and d.x_train.dtype == torch.int64
    assert torch.equal(d.x_train[0, 1:], d.y_train[0, :-1])  # y is x shifted by one
    assert len(d.y_test) == (len(text) - int(len(text) * 0.95) - 1) // 64


def test_gpt_shapes_sizes_and_causality() -> None:
    assert parameter_count(GPT()) == 834_304
    assert parameter_count(GPT(n_layer=6, n_embd=256)) == 4_820_992
    m = build_model("gpt", seed=0).eval()
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    out = m(x)
    assert out.shape == (2, 16, 256)
    y = x.clone()
    y[:, 10] = (y[:, 10] + 1) % 256  # changing byte 10 changes no earlier output
    assert torch.equal(m(y)[:, :10], out[:, :10])
    again = build_model("gpt", seed=0)
    assert torch.equal(flatten_parameters(again), flatten_parameters(build_model("gpt", 0)))


def test_perplexity_of_an_untrained_model_is_near_uniform() -> None:
    d = load_text("pystdlib", block=32)
    model = GPT(block=32, **TINY)
    ev = Evaluator(model, distgrad.data.tasks.cross_entropy)
    m = ev.evaluate([flatten_parameters(model).clone()], d.x_test[:50], d.y_test[:50])
    assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))
    assert 200 < m["perplexity"] < 320  # N(0, 0.02) weights: close to 256 bytes uniform


@pytest.mark.parametrize("algorithm", ["diloco", "adag", "agn"])
def test_gpt_trains_with_the_newer_methods(algorithm: str) -> None:
    res = distgrad.train(engine="sim", workers=2, model="gpt", model_args=TINY,
                         dataset="pystdlib", data_args={"block": 32}, train_samples=512,
                         batch_size=32, window=2, algorithm=algorithm, lr=3e-3, threads=1,
                         eval_every=1.0)
    s = res.summary
    assert s["task"] == "language_model" and not s["diverged"]
    assert s["test_perplexity"] < 100  # from ~256: byte statistics learned in 16 steps
    assert s["test_accuracy"] > 0.1
