"""Exact k-center greedy: equal to a float64 brute force, ties included; the sharded versions."""

from __future__ import annotations

import numpy as np
import pytest

import after_ray.al.kernels.kcenter as kc
from after_ray.al.kernels.kcenter import KCenterStats, kcenter_greedy
from after_ray.al.kernels.reference import kcenter_greedy_naive


def brute_force(x, labeled, k, candidates=None):
    """The rule of the kcenter module docstring, in float64 with no shortcuts."""
    x64 = np.asarray(x).astype(np.float64)
    n = len(x64)
    lab = np.unique(np.asarray(labeled, dtype=np.int64))
    mask = np.ones(n, bool) if candidates is None else np.asarray(candidates, bool).copy()
    mask[lab] = False
    cand = np.flatnonzero(mask)
    u = x64[cand]
    d = np.full(len(cand), np.inf)
    for p in lab:
        d = np.minimum(d, ((u - x64[p]) ** 2).sum(1))
    picks, alive = [], np.ones(len(cand), bool)
    if not len(lab) and len(cand):
        i = int(np.argmin(((u - u.mean(axis=0)) ** 2).sum(1)))
        picks.append(cand[i])
        alive[i] = False
        d = ((u - u[i]) ** 2).sum(1)
    while len(picks) < min(k, len(cand)):
        i = int(np.argmax(np.where(alive, d, -np.inf)))
        picks.append(cand[i])
        alive[i] = False
        d = np.minimum(d, ((u - u[i]) ** 2).sum(1))
    return np.asarray(picks, dtype=np.int64)


@pytest.fixture
def few_cells(monkeypatch):
    """Small anchor count so that the cell pruning / demotion path runs at test sizes."""
    monkeypatch.setattr(kc, "_N_CELLS", 8)


def _rng(seed=0):
    return np.random.default_rng(seed)


def test_random_data_equals_brute_force_and_does_not_scan_every_pick(few_cells):
    x = _rng(1).standard_normal((4000, 64)).astype(np.float32)
    st = KCenterStats()
    got = kcenter_greedy(x, [], 300, hot_size=64, stats=st)
    np.testing.assert_array_equal(got, brute_force(x, [], 300))
    # The lazy scheme computes fewer (row, center) distances than one pass per pick (the gap
    # grows with the pool: at 10^5-10^6 rows it is 100x or more).
    assert st.refresh_pairs + st.hot_updates < 0.5 * 300 * len(x)
    assert st.refills >= 2  # the refill path was exercised


def test_labeled_set_and_candidates_mask(few_cells):
    rng = _rng(2)
    x = rng.standard_normal((3000, 16)).astype(np.float32)
    lab = rng.choice(3000, 60, replace=False)
    cand = rng.random(3000) < 0.4
    cand[lab[:10]] = True  # labeled rows inside the mask are still never picked
    got = kcenter_greedy(x, lab, 250, candidates=cand, hot_size=32)
    np.testing.assert_array_equal(got, brute_force(x, lab, 250, cand))
    assert not np.isin(got, lab).any() and cand[got].all()


def test_clustered_and_low_dimensional_data(few_cells):
    rng = _rng(3)
    centers = rng.standard_normal((30, 20)).astype(np.float32) * 8
    blobs = centers[rng.integers(0, 30, 3000)] + rng.standard_normal((3000, 20)).astype(np.float32)
    st = KCenterStats()
    np.testing.assert_array_equal(
        kcenter_greedy(blobs, [], 400, hot_size=64, stats=st), brute_force(blobs, [], 400)
    )
    manifold = (rng.random((3000, 3)) @ rng.standard_normal((3, 20))).astype(np.float32)
    st2 = KCenterStats()
    got = kcenter_greedy(manifold, [5, 6], 1200, hot_size=64, stats=st2)
    np.testing.assert_array_equal(got, brute_force(manifold, [5, 6], 1200))
    assert st.extra.get("demoted_rows", 0) + st2.extra.get("demoted_rows", 0) > 0


def test_duplicates_and_k_larger_than_pool(few_cells):
    rng = _rng(4)
    base = rng.standard_normal((300, 12)).astype(np.float32)
    x = np.concatenate([base, base, base[:100]])  # every row has an exact twin
    rng.shuffle(x)
    got = kcenter_greedy(x, [], 10_000, hot_size=16)
    assert len(got) == len(x) and len(set(got.tolist())) == len(x)
    np.testing.assert_array_equal(got, brute_force(x, [], 10_000))


def test_integer_grid_ties_go_to_the_lowest_position(few_cells):
    grid = np.stack(np.meshgrid(np.arange(7), np.arange(6), np.arange(5), indexing="ij"), -1)
    x = grid.reshape(-1, 3).astype(np.float32)
    np.testing.assert_array_equal(kcenter_greedy(x, [], 500, hot_size=16), brute_force(x, [], 500))
    np.testing.assert_array_equal(
        kcenter_greedy(x, [0, 57], 120, hot_size=16), brute_force(x, [0, 57], 120)
    )
    # Empty labeled set: the first pick is the candidate nearest the mean, lowest position on ties
    # (the mean of this grid is the cell centre (3, 2.5, 2): 2 rows tie).
    assert kcenter_greedy(x, [], 1)[0] == brute_force(x, [], 1)[0]


def test_float16_store_equals_brute_force_on_rounded_values():
    x = _rng(5).standard_normal((2500, 16)).astype(np.float32)
    x16 = x.astype(np.float16)
    ref = brute_force(x16, [], 200)
    np.testing.assert_array_equal(kcenter_greedy(x16, [], 200, hot_size=32), ref)
    np.testing.assert_array_equal(
        kcenter_greedy(x, [], 200, hot_size=32, store_dtype="float16"), ref
    )


def test_edge_cases_and_naive_baseline():
    x = _rng(6).standard_normal((500, 8)).astype(np.float32)
    assert kcenter_greedy(x, [], 0).size == 0
    assert kcenter_greedy(x, np.arange(500), 5).size == 0  # everything labeled
    assert kcenter_greedy(x, [], 5, candidates=np.zeros(500, bool)).size == 0
    one = np.zeros(500, bool)
    one[42] = True
    np.testing.assert_array_equal(kcenter_greedy(x, [1], 3, candidates=one), [42])
    np.testing.assert_array_equal(kcenter_greedy_naive(x, [], 60), brute_force(x, [], 60))
    np.testing.assert_array_equal(kcenter_greedy_naive(x, [3, 9], 60), brute_force(x, [3, 9], 60))
    with pytest.raises(ValueError):
        kcenter_greedy(x, [500], 3)


@pytest.mark.ray
def test_sharded_exact_equals_single_process_and_two_round_is_bounded(ray_session):
    from after_ray.distributed.kcenter import sharded_kcenter_greedy

    rng = _rng(7)
    x = rng.standard_normal((2400, 12)).astype(np.float32)
    lab = rng.choice(2400, 30, replace=False)
    cand = rng.random(2400) < 0.8
    for labeled in ([], lab):
        single = kcenter_greedy(x, labeled, 80, candidates=cand)
        sharded = sharded_kcenter_greedy(x, labeled, 80, candidates=cand, shards=3, hot_size=64)
        np.testing.assert_array_equal(sharded, single)
    approx = sharded_kcenter_greedy(x, lab, 80, candidates=cand, shards=3, mode="two_round")

    def radius(picks):
        centers = x[np.concatenate([lab, picks])].astype(np.float64)
        u = x[cand & ~np.isin(np.arange(2400), lab)].astype(np.float64)
        return np.sqrt(((u[:, None] - centers[None]) ** 2).sum(-1).min(1).max())

    assert len(set(approx.tolist())) == 80 and cand[approx].all() and not np.isin(approx, lab).any()
    # Composable-coreset guarantee: <= 4 OPT <= 4 x (exact greedy radius).
    assert radius(approx) <= 4 * radius(kcenter_greedy(x, lab, 80, candidates=cand))


# ------------------------------------------------------------------ the naive baseline, by value


def test_naive_baseline_in_chunks_float16_small_distances_and_timings():
    import time

    rng = _rng(30)
    # Squared distances mostly < 1, and a trend along the rows: every chunk has its own mean,
    # so the first pick (nearest the mean of all candidates) needs every chunk, once.
    x = (rng.standard_normal((3000, 6)) * 0.1 + np.linspace(0, 1, 3000)[:, None]).astype(np.float32)
    cand = rng.random(3000) < 0.7
    t0 = time.perf_counter()
    timings = {}
    got = kcenter_greedy_naive(x, [], 40, candidates=cand, chunk_rows=256, timings=timings)
    wall = time.perf_counter() - t0
    np.testing.assert_array_equal(got, brute_force(x, [], 40, cand))
    assert got.dtype == np.int64
    assert set(timings) == {"setup_s", "picks_s", "timed_picks"}
    assert timings["timed_picks"] == 39  # the first pick (nearest the mean) is set-up
    assert 0 <= timings["setup_s"] and 0 <= timings["picks_s"]
    assert timings["setup_s"] + timings["picks_s"] <= wall
    lab = rng.choice(3000, 50, replace=False)
    timings = {}
    got = kcenter_greedy_naive(x, lab, 30, chunk_rows=500, timings=timings)
    np.testing.assert_array_equal(got, brute_force(x, lab, 30))
    assert timings["timed_picks"] == 30
    x16 = rng.standard_normal((3000, 5)).astype(np.float16)
    np.testing.assert_array_equal(kcenter_greedy_naive(x16, [], 300), brute_force(x16, [], 300))
    one = kcenter_greedy_naive(x, [], 1)
    assert one.tolist() == brute_force(x, [], 1).tolist()
    none = kcenter_greedy_naive(x, [], 0)
    assert none.dtype == np.int64 and none.size == 0


def test_naive_baseline_with_more_than_one_block_of_labeled_rows_and_candidates():
    # 4200 labeled rows (two blocks of 4096) and 8800 candidates (two blocks of 8192). Labeled
    # row 4096 (the first of the second block) sits on a far point next to candidate 12000, so
    # that candidate is covered only if every labeled block is used.
    rng = _rng(31)
    x = (rng.standard_normal((13000, 4)) * 0.1).astype(np.float32)
    lab = np.arange(4200)
    x[4096] = 50.0
    x[12000] = 50.0 + 1e-3
    got = kcenter_greedy_naive(x, lab, 12)
    np.testing.assert_array_equal(got, brute_force(x, lab, 12))
    assert 12000 not in got.tolist()
