"""Factorised BADGE seeding: equal to the explicit version, exact D^2 sampling, no O(NCH) memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from after_ray.al.kernels.badge import BadgeStats, badge_kmeanspp
from after_ray.al.kernels.reference import badge_kmeanspp_explicit, gradient_embedding


def _inputs(n, c, h, seed, *, sharp=2.0):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n, c)) * sharp
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    feats = np.maximum(rng.standard_normal((n, h)), 0)
    return p.astype(np.float32), feats.astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_explicit_reference(seed):
    p, h = _inputs(1200, 4, 24, seed)
    cand = None if seed != 1 else np.random.default_rng(9).random(1200) < 0.5
    st = BadgeStats()
    got = badge_kmeanspp(p, h, 150, seed=seed, candidates=cand, stats=st)
    np.testing.assert_array_equal(
        got, badge_kmeanspp_explicit(p, h, 150, seed=seed, candidates=cand)
    )
    assert len(set(got.tolist())) == 150
    if cand is not None:
        assert cand[got].all()
    # Only a small part of the pool is brought up to date per pick.
    assert st.refreshed_rows < 0.2 * 150 * 1200


def test_first_pick_is_largest_gradient_norm_and_duplicates():
    p, h = _inputs(40, 3, 8, 3)
    g = gradient_embedding(p, h)
    assert badge_kmeanspp(p, h, 1, seed=0)[0] == int(np.argmax((g * g).sum(1)))
    p2, h2 = np.tile(p[:15], (3, 1)), np.tile(h[:15], (3, 1))  # every item three times
    for seed in range(3):
        got = badge_kmeanspp(p2, h2, 100, seed=seed)
        assert len(got) == 45 and len(set(got.tolist())) == 45  # k > pool: everything
        np.testing.assert_array_equal(got, badge_kmeanspp_explicit(p2, h2, 100, seed=seed))
        # Distinct items come first: a duplicate of a center has D^2 = 0 and is drawn last.
        first15 = {int(i) % 15 for i in got[:15]}
        assert first15 == set(range(15))


def test_second_pick_is_drawn_proportionally_to_d2():
    # Four items in C=2, H=1: g = a * h; the first center is the largest |g|.
    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.5, 0.5]], dtype=np.float64)
    h = np.array([[1.0], [2.0], [3.0], [0.5]])
    g = gradient_embedding(p, h)
    first = int(np.argmax((g * g).sum(1)))
    d2 = ((g - g[first]) ** 2).sum(1)
    want = d2 / d2.sum()
    counts = np.zeros(4)
    trials = 3000
    for seed in range(trials):
        picks = badge_kmeanspp(p, h, 2, seed=seed)
        assert picks[0] == first
        counts[picks[1]] += 1
    freq = counts / trials
    assert freq[first] == 0
    tolerance = 4 * np.sqrt(want * (1 - want) / trials) + 1e-3  # 4 binomial standard errors
    assert np.all(np.abs(freq - want) <= tolerance), (freq, want)


def test_memory_stays_far_below_the_gradient_embedding():
    n, c, hdim = 20_000, 4, 256
    p, h = _inputs(n, c, hdim, 4)
    explicit_bytes = n * c * hdim * 8
    tracemalloc.start()
    badge_kmeanspp(p, h, 30, seed=0, chunk_rows=2048)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 0.1 * explicit_bytes


def test_input_validation():
    p, h = _inputs(10, 3, 4, 5)
    with pytest.raises(ValueError):
        badge_kmeanspp(p, h[:9], 2, seed=0)
    with pytest.raises(ValueError):
        badge_kmeanspp(p, h, 2, seed=0, candidates=np.ones(9, bool))
    assert badge_kmeanspp(p, h, 0, seed=0).size == 0
