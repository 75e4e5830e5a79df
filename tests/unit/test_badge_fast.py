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


# ------------------------------------------------------------------ values the mutation check asks for


def test_work_counters_and_timings_describe_the_run():
    import time

    p, h = _inputs(600, 4, 16, 6)
    st = BadgeStats()
    assert (st.picks, st.refreshed_rows, st.refresh_pairs, st.exact_keys) == (0, 0, 0, 0)
    assert (st.setup_s, st.picks_s) == (0.0, 0.0)
    t0 = time.perf_counter()
    got = badge_kmeanspp(p, h, 40, seed=1, stats=st)
    wall = time.perf_counter() - t0
    assert st.picks == 40 == len(got)
    # Every pick after the first brings at least its winner up to date, against at least one
    # center each; a row is never refreshed against more centers than were chosen before it.
    assert 39 <= st.refreshed_rows <= st.refresh_pairs <= 39 * st.refreshed_rows
    assert st.exact_keys >= 0 and isinstance(st.refresh_pairs, int)
    assert 0.0 <= st.setup_s and 0.0 <= st.picks_s and st.setup_s + st.picks_s <= wall
    one = BadgeStats()
    badge_kmeanspp(p, h, 1, seed=1, stats=one)
    assert (one.picks, one.refreshed_rows, one.refresh_pairs, one.exact_keys) == (1, 0, 0, 0)


def test_seed_zero_by_default_and_empty_results_are_int64():
    p, h = _inputs(300, 3, 8, 7)
    np.testing.assert_array_equal(badge_kmeanspp(p, h, 20), badge_kmeanspp(p, h, 20, seed=0))
    assert not np.array_equal(badge_kmeanspp(p, h, 20), badge_kmeanspp(p, h, 20, seed=1))
    none = badge_kmeanspp(p, h, 0, seed=0)
    assert none.dtype == np.int64 and none.size == 0
    nothing = badge_kmeanspp(p, h, 5, seed=0, candidates=np.zeros(300, bool))
    assert nothing.dtype == np.int64 and nothing.size == 0


def test_duplicates_at_a_large_feature_scale_and_no_warnings():
    # Exact duplicates must get D^2 = 0 whatever the scale of the activations (the zero
    # threshold is relative to ||g_i||^2 + ||g_c||^2), and dividing by those zeros is silent.
    import warnings

    p, h = _inputs(20, 3, 64, 8)
    p2 = np.tile(p, (3, 1))
    # exact twins and near twins (relative 2^-23: D^2 ~ 1e-14 of the scale, counted as 0)
    h2 = np.concatenate([h, h * np.float32(1 + 2**-23), h]).astype(np.float64) * 1e3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for seed in range(3):
            got = badge_kmeanspp(p2, h2, 60, seed=seed)
            np.testing.assert_array_equal(got, badge_kmeanspp_explicit(p2, h2, 60, seed=seed))
            assert {int(i) % 20 for i in got[:20]} == set(range(20))


@pytest.mark.parametrize(
    "probs_shape, h_shape, message",
    [
        ((10,), (10, 4), "probs [N, C] and penultimate [N, H] must share N; got (10,), (10, 4)"),
        ((10, 3), (10,), "probs [N, C] and penultimate [N, H] must share N; got (10, 3), (10,)"),
        ((10, 3), (9, 4), "probs [N, C] and penultimate [N, H] must share N; got (10, 3), (9, 4)"),
    ],
)
def test_input_validation_messages(probs_shape, h_shape, message):
    with pytest.raises(ValueError) as err:
        badge_kmeanspp(np.full(probs_shape, 0.5), np.ones(h_shape), 2, seed=0)
    assert str(err.value) == message
    p, h = _inputs(10, 3, 4, 5)
    with pytest.raises(ValueError) as err:
        badge_kmeanspp(p, h, 2, seed=0, candidates=np.ones(9, bool))
    assert str(err.value) == "candidates mask has shape (9,), expected (10,)"


def test_explicit_reference_defaults_edges_and_the_gemv_baseline():
    import warnings

    p, h = _inputs(300, 4, 12, 9)
    ref = badge_kmeanspp_explicit(p, h, 30, seed=0)
    np.testing.assert_array_equal(badge_kmeanspp_explicit(p, h, 30), ref)  # seed 0 by default
    # The float32 matrix-vector baseline picks the same items away from float32 near-ties.
    np.testing.assert_array_equal(badge_kmeanspp_explicit(p, h, 30, seed=0, method="gemv"), ref)
    g = gradient_embedding(p, h)
    np.testing.assert_array_equal(badge_kmeanspp_explicit(p, h, 30, seed=0, g=g), ref)
    assert badge_kmeanspp_explicit(p, h, 1, seed=0).tolist() == [int(np.argmax((g * g).sum(1)))]
    empty = badge_kmeanspp_explicit(p, h, 0, seed=0)
    assert empty.dtype == np.int64 and empty.size == 0
    with pytest.raises(ValueError) as err:
        badge_kmeanspp_explicit(p, h, 3, method="GEMV")
    assert str(err.value) == "method must be 'float64' or 'gemv', got 'GEMV'"
    # Duplicates: D^2 = 0 (float32 rounding in gemv included), drawn only after every distinct
    # item, never twice, and no warning for the divisions by zero.
    p2, h2 = np.tile(p[:15], (3, 1)), np.tile(h[:15], (3, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for method in ("float64", "gemv"):
            got = badge_kmeanspp_explicit(p2, h2, 45, seed=1, method=method)
            assert len(set(got.tolist())) == 45
            assert {int(i) % 15 for i in got[:15]} == set(range(15)), method
