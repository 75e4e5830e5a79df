"""Exact k-center greedy: equal to a float64 brute force, ties included; the sharded versions."""

from __future__ import annotations

import numpy as np
import pytest
from kcenter_brute_force import brute_force

import after_ray.al.kernels.kcenter as kc
from after_ray.al.kernels.kcenter import KCenterStats, kcenter_greedy
from after_ray.al.kernels.reference import kcenter_greedy_naive


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


# ------------------------------------------------------------------ LazyKCenter as the shards use it


def _greedy_over_shards(x, labeled, k, *, shards=3, candidates=None, hot_size=16, chunk_rows=300):
    """after_ray.distributed.kcenter's exact mode without Ray: one LazyKCenter per row range,
    the global candidate mean for the first pick, every pick committed to every shard."""
    n = len(x)
    lab = np.unique(np.asarray(labeled, dtype=np.int64))
    mask = np.ones(n, bool) if candidates is None else np.asarray(candidates, bool).copy()
    mask[lab] = False
    bounds = np.linspace(0, n, shards + 1).astype(int)
    states = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        cand = np.flatnonzero(mask[a:b]) + a
        st = kc.LazyKCenter(
            kc.RowSource(x, cand), capacity=k, chunk_rows=chunk_rows, hot_size=hot_size
        )
        states.append((st, cand))
    sums = [st.candidate_sum() for st, _ in states]
    center_mean = sum(t for t, _ in sums) / sum(c for _, c in sums)
    lab_rows = kc.RowSource(x, lab) if len(lab) else None
    for st, _ in states:
        st.setup(lab_rows, center_mean)
    picks = []
    for j in range(min(k, int(mask.sum()))):
        props = []
        for s, (st, cand) in enumerate(states):
            if st.stats.picks < st.n:
                value, local = st.propose(need_value=True)
                props.append((value, int(cand[local]), s, local))
        if j == 0 and not len(lab):
            value, pos, owner, local = min(props, key=lambda p: (p[0], p[1]))
        else:
            value, pos, owner, local = min(props, key=lambda p: (-p[0], p[1]))
        picks.append(pos)
        for s, (st, _) in enumerate(states):
            st.commit(x[pos], local if s == owner else None)
    return np.asarray(picks, dtype=np.int64), states


def test_shards_with_a_global_mean_equal_the_single_process_greedy(few_cells):
    rng = _rng(40)
    # A trend along the rows: each shard's own mean is far from the global one.
    x = (rng.standard_normal((1800, 6)) + np.linspace(-3, 3, 1800)[:, None]).astype(np.float32)
    got, states = _greedy_over_shards(x, [], 60)
    np.testing.assert_array_equal(got, brute_force(x, [], 60))
    assert sum(st.stats.picks for st, _ in states) == 60
    lab = rng.choice(1800, 40, replace=False)
    cand = rng.random(1800) < 0.6
    got, _ = _greedy_over_shards(x, lab, 50, candidates=cand)
    np.testing.assert_array_equal(got, brute_force(x, lab, 50, cand))


def test_first_pick_nearest_a_given_mean_ties_and_a_single_row():
    rng = _rng(41)
    x = rng.standard_normal((2000, 5)).astype(np.float32)
    x64 = x.astype(np.float64)
    for center in (x64.mean(0) + 0.25, rng.standard_normal(5) * 2):
        state = kc.LazyKCenter(kc.RowSource(x), capacity=3, chunk_rows=256)
        state.setup(None, center_mean=center)
        value, idx = state.propose()
        d = ((x64 - center) ** 2).sum(1)
        assert idx == int(np.argmin(d)) and value == pytest.approx(d.min(), rel=1e-9)
    # Two copies of the nearest row (positions 7 and 1500): the lower position, exact value.
    x[1500] = x[7]
    center = x64[7] + 1e-3
    state = kc.LazyKCenter(kc.RowSource(x), capacity=3, chunk_rows=256)
    state.setup(None, center_mean=center)
    value, idx = state.propose()
    assert idx == 7 and value == pytest.approx(((x[7].astype(np.float64) - center) ** 2).sum())
    assert state.stats.exact_rechecks >= 2  # both copies were compared in float64
    single = kc.LazyKCenter(kc.RowSource(x[:1]), capacity=1)
    single.setup(None, center_mean=np.zeros(5))
    assert single.propose() == (pytest.approx(float((x64[0] ** 2).sum())), 0)
    with pytest.raises(RuntimeError) as err:
        single.commit(x[0], 0)
        single.commit(x[0], None)
    assert str(err.value) == "k-center state holds at most 1 picks"


def test_input_conversions_refusals_and_empty_results():
    rng = _rng(42)
    grid = np.stack(np.meshgrid(np.arange(6), np.arange(5), np.arange(4), indexing="ij"), -1)
    x32 = (grid.reshape(-1, 3) + 16).astype(np.float32)
    # float64 input is compared on its float32 values: perturbations below float32 precision
    # (ulp(16) ~ 2e-6) must not break the grid's exact ties.
    x64 = x32.astype(np.float64) + rng.uniform(-1e-9, 1e-9, size=x32.shape)
    np.testing.assert_array_equal(kcenter_greedy(x64, [], 60), brute_force(x32, [], 60))
    # store_dtype converts chunk by chunk (small chunks here), and every row makes it.
    x = rng.standard_normal((2500, 8)).astype(np.float32)
    np.testing.assert_array_equal(
        kcenter_greedy(x, [], 50, store_dtype="float16", chunk_rows=100),
        brute_force(x.astype(np.float16), [], 50),
    )
    for empty in (kcenter_greedy(x, [], 0), kcenter_greedy(x, np.arange(2500), 4)):
        assert empty.dtype == np.int64 and empty.size == 0
    with pytest.raises(ValueError) as err:
        kcenter_greedy(x[:, 0], [], 3)
    assert str(err.value) == "embeddings must be [N, D]; got shape (2500,)"
    with pytest.raises(ValueError) as err:
        kcenter_greedy(x, [2500], 3)
    assert str(err.value) == "labeled positions must lie in [0, 2500); got min 2500, max 2500"
    with pytest.raises(ValueError) as err:
        kcenter_greedy(x, [], 3, candidates=np.ones(10, bool))
    assert str(err.value) == "candidates mask has shape (10,), expected (2500,)"
    st = KCenterStats()
    kcenter_greedy(x, [], 30, hot_size=16, stats=st)
    assert st.picks == 30 and st.refills >= 1 and st.exact_rechecks >= 1
    assert 0 < st.refreshed_rows and 0 < st.hot_updates
