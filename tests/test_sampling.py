"""Sampling follows transformers' semantics; generation stats, cancellation and limits behave."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import MinPLogitsWarper, RepetitionPenaltyLogitsProcessor

from lfm_edge.export.exporter import export
from lfm_edge.runtime.backends.python import LfmSession
from lfm_edge.runtime.generate import Generation, generate
from lfm_edge.runtime.sampling import Sampling, next_tokens
from tiny_models import build

RNG = np.random.default_rng(0)


def test_greedy_and_degenerate_samplers_pick_the_argmax():
    logits = RNG.standard_normal((4, 50))
    best = logits.argmax(-1)
    rng = np.random.default_rng(1)
    for s in (Sampling(), Sampling(temperature=1.0, top_k=1), Sampling(temperature=1.0, top_p=1e-6),
              Sampling(temperature=1.0, min_p=0.999)):
        assert (next_tokens(logits, s, rng) == best).all()


def test_seeded_sampling_is_reproducible_and_follows_the_distribution():
    logits = np.log(np.array([[0.5, 0.3, 0.2]]))
    s = Sampling(temperature=1.0, seed=7)
    draws = [int(next_tokens(logits, s, np.random.default_rng(i))[0]) for i in range(3000)]
    freq = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.2], atol=0.03)
    a = [int(next_tokens(logits, s, np.random.default_rng(5))[0]) for _ in range(5)]
    assert a == [int(next_tokens(logits, s, np.random.default_rng(5))[0]) for _ in range(5)]


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    rng = np.random.default_rng(0)
    draws = {int(next_tokens(logits, Sampling(temperature=1.0, top_p=0.75), rng)[0]) for _ in range(500)}
    assert draws == {0, 1}


def test_repetition_penalty_matches_transformers():
    logits = RNG.standard_normal((2, 30)).astype(np.float32)
    history = np.array([[1, 5, 5, 9], [-1, -1, 2, 3]])  # -1 is left padding
    ours = logits.astype(np.float64).copy()
    processor = RepetitionPenaltyLogitsProcessor(1.3)
    want = np.stack([processor(torch.tensor(h[h >= 0])[None], torch.tensor(row)[None])[0].numpy()
                     for h, row in zip(history, logits, strict=True)])
    # next_tokens applies the penalty in place on its float64 copy; greedy reads the result
    picked = next_tokens(ours, Sampling(repetition_penalty=1.3), np.random.default_rng(0), history)
    assert (picked == want.argmax(-1)).all()
    s = Sampling(temperature=1.0, min_p=0.2)
    warper = MinPLogitsWarper(0.2)
    kept = warper(None, torch.tensor(logits)).isfinite().numpy()
    draws = np.array([next_tokens(logits, s, np.random.default_rng(i)) for i in range(400)])
    for row in range(2):
        assert set(draws[:, row]) <= set(np.flatnonzero(kept[row]))


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -1}, "temperature -1"), ({"top_p": 0}, "top_p 0"), ({"top_k": -3}, "top_k -3"),
    ({"min_p": 1.5}, "min_p 1.5"), ({"repetition_penalty": 0}, "repetition_penalty 0"),
    ({"temperature": float("nan")}, "temperature nan"),
])
def test_invalid_sampling_parameters_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**kwargs)


def test_defaults_from_generation_config():
    s = Sampling.from_generation_config({"do_sample": True, "temperature": 0.3, "min_p": 0.15,
                                         "repetition_penalty": 1.05, "eos_token_id": 7})
    assert (s.temperature, s.min_p, s.repetition_penalty) == (0.3, 0.15, 1.05)
    assert Sampling.from_generation_config({"do_sample": False, "temperature": 0.3}).greedy
    assert Sampling.from_generation_config({}, temperature=0.5).temperature == 0.5


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling")
    build("moe_mixed", root / "ckpt")
    return LfmSession(export(root / "ckpt", root / "bundle").bundle)


def test_stats_and_stop_reasons(session):
    gen = Generation(session, [[5, 6, 7, 8]], 6, eos_token_ids=[])
    steps = list(gen)
    assert len(steps) == 6 and gen.stats.stopped == "length"
    assert gen.stats.prompt_tokens == 4 and gen.stats.generated_tokens == 6
    assert gen.stats.time_to_first_token > 0 and gen.stats.decode_tokens_per_second > 0
    assert gen.stats.peak_rss_mb > 10 and gen.stats.provider == "CPUExecutionProvider"
    first = steps[0][0]
    eos = Generation(session, [[5, 6, 7, 8]], 6, eos_token_ids=[first])
    assert list(eos) == [[first]] and eos.stats.stopped == "eos"


def test_cancel_from_another_thread(session):
    cancel = threading.Event()
    gen = Generation(session, [[5, 6, 7]], 400, eos_token_ids=[], cancel=cancel)
    seen = 0
    for _ in gen:
        seen += 1
        if seen == 3:
            threading.Thread(target=cancel.set).start()
            threading.Event().wait(0.05)
    assert gen.stats.stopped == "cancelled" and 3 <= seen < 400


def test_limits_are_checked_before_running(session):
    with pytest.raises(ValueError, match="exceed the model's context length 512"):
        Generation(session, [[5] * 500], 20)
    with pytest.raises(ValueError, match="token id 300 is outside the vocabulary"):
        Generation(session, [[5, 300]], 2)
    with pytest.raises(ValueError, match="each with at least one token"):
        Generation(session, [[]], 2)
    assert generate(session, [[5, 6]], 0) == [[]]


def test_truncation_is_the_callers_choice(session):
    long = list(range(3, 290)) * 2  # 574 tokens, context 512
    gen = Generation(session, [long], 12, eos_token_ids=[], overflow="truncate")
    assert len(list(gen)) == 12 and gen.stats.prompt_tokens == 500
    assert list(Generation(session, [long[-500:]], 12, eos_token_ids=[])) == \
        list(Generation(session, [long], 12, eos_token_ids=[], overflow="truncate"))
    with pytest.raises(ValueError, match="overflow 'drop'"):
        Generation(session, [long], 12, overflow="drop")
