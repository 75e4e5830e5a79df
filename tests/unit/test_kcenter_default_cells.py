"""k-center at its shipped cell count: with k > ``_N_CELLS`` (256) the picks after the anchors
join cells and the triangle-inequality pruning decides demotions. ``test_kcenter`` shrinks the
cell count to reach that path at small sizes; here it runs unpatched, against the textbook
greedy of ``kernels.reference`` (one pass over every candidate per pick)."""

from __future__ import annotations

import numpy as np
import pytest
from kcenter_brute_force import clustered

import after_ray.al.kernels.kcenter as kc
from after_ray.al.kernels.kcenter import KCenterStats, kcenter_greedy
from after_ray.al.kernels.reference import kcenter_greedy_naive


def _clustered(n: int, d: int, n_clusters: int, seed: int) -> np.ndarray:
    return clustered(n, d, n_clusters, seed, scale=4.0)


@pytest.mark.parametrize(("n", "k", "labeled"), [(6000, 600, 0), (5000, 400, 80)])
def test_default_cells_with_k_above_the_cell_count_equal_the_textbook_greedy(
    n, k, labeled, monkeypatch
):
    assert kc._N_CELLS == 256 and k > kc._N_CELLS
    cell_passes = []
    real_pass = kc.LazyKCenter._nearest_cell_pass

    def counting_pass(self, *args):
        cell_passes.append(self.j)
        return real_pass(self, *args)

    monkeypatch.setattr(kc.LazyKCenter, "_nearest_cell_pass", counting_pass)
    x = _clustered(n, 24, 40, seed=k)
    rng = np.random.default_rng(k + 1)
    lab = rng.choice(n, labeled, replace=False) if labeled else np.empty(0, dtype=np.int64)
    stats = KCenterStats()
    got = kcenter_greedy(x, lab, k, hot_size=128, chunk_rows=2048, stats=stats)
    want = kcenter_greedy_naive(x, lab, k)
    np.testing.assert_array_equal(got, want)
    assert stats.picks == k and stats.refills >= 2
    # The pruning path decided some refills: it ran after the 256 anchors were placed.
    assert cell_passes and min(cell_passes) >= kc._N_CELLS


def test_default_cells_with_a_candidate_mask():
    n, k = 5000, 320
    x = _clustered(n, 16, 30, seed=7)
    rng = np.random.default_rng(8)
    lab = rng.choice(n, 50, replace=False)
    cand = rng.random(n) < 0.6
    got = kcenter_greedy(x, lab, k, candidates=cand, hot_size=64, chunk_rows=1024)
    np.testing.assert_array_equal(got, kcenter_greedy_naive(x, lab, k, candidates=cand))
    assert cand[got].all() and not np.isin(got, lab).any()
