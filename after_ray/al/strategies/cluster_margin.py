"""Cluster-Margin (Citovsky et al., NeurIPS 2021): low-margin candidates, round-robin over clusters.

1. Cluster the whole pool's ``embeddings`` (labeled and unlabeled) with FAISS k-means
   (``after_ray.al.kernels.clustering.kmeans``) into ``n_clusters`` clusters. The paper runs average-link
   HAC once on a seed model's embeddings; exact HAC is O(N^2) memory (40 GB at 100k items), so
   k-means stands in for it (al-at-scale.md §2.3). Default ``n_clusters``: ``ceil(sqrt(N))``,
   the usual rule of thumb, capped at ``N`` (a config may set it).
2. Keep the ``k_m = min(#unlabeled, ceil(margin_pool_factor * k))`` unlabeled items with the
   smallest top-2 margin (ties by ``utt_id``).
3. Group the candidates by cluster. Visit the clusters from the one with the fewest candidates to
   the one with the most (equal counts: lower cluster id first) and take one candidate from each,
   round after round, until ``k`` are chosen; small clusters are exhausted first, which is how the
   method spreads the batch.
4. Inside a cluster the candidates are taken in a seeded random order: ``rng =
   numpy.random.default_rng(seed)``; for each cluster in the visiting order, its candidates sorted
   by ``utt_id`` are shuffled with ``rng.permutation``.

The step that scales is the per-round one (O(N) plus O(k_m log k_m)); the clustering is the
cost. This strategy is stateless, so it re-clusters every round; the embeddings change with the
model each round anyway.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from after_ray.al.pool import PoolView
from after_ray.al.strategies.base import (
    Strategy,
    check_factor,
    check_optional_positive_int,
    check_positive_int,
    top_k,
)
from after_ray.al.strategies.hybrid import prefilter_size
from after_ray.al.strategies.uncertainty import top2_margin


def default_n_clusters(n_items: int) -> int:
    """``ceil(sqrt(N))``, at least 1 and at most ``N``."""
    return max(1, min(n_items, math.ceil(math.sqrt(n_items))))


def round_robin_smallest_first(
    candidates: np.ndarray,
    assignment: np.ndarray,
    utt_ids: np.ndarray,
    k: int,
    seed: int,
) -> np.ndarray:
    """Steps 3-4 of the module docstring: ``k`` of ``candidates`` (positions), in pick order.

    ``assignment[p]`` is the cluster of position ``p``.
    """
    candidates = np.asarray(candidates, dtype=np.int64)
    clusters = np.asarray(assignment)[candidates]
    # Group by cluster, each group in utt_id order (the order the permutation is applied to).
    grouped = candidates[np.lexsort((utt_ids[candidates], clusters))]
    grouped_clusters = np.asarray(assignment)[grouped]
    ids, starts, counts = np.unique(grouped_clusters, return_index=True, return_counts=True)
    visit = np.lexsort((ids, counts))  # fewest candidates first, then lower cluster id
    rng = np.random.default_rng(seed)
    ordered = np.empty_like(grouped)
    round_of = np.empty(grouped.shape[0], dtype=np.int64)
    visit_rank = np.empty(grouped.shape[0], dtype=np.int64)
    out = 0
    for rank, g in enumerate(visit):
        members = grouped[starts[g] : starts[g] + counts[g]]
        ordered[out : out + counts[g]] = members[rng.permutation(counts[g])]
        round_of[out : out + counts[g]] = np.arange(counts[g])
        visit_rank[out : out + counts[g]] = rank
        out += counts[g]
    return ordered[np.lexsort((visit_rank, round_of))][:k]


class ClusterMarginSampling(Strategy):
    """Smallest-margin candidates spread round-robin over k-means clusters (seeded)."""

    name: ClassVar[str] = "cluster_margin"
    requires = frozenset({"probs", "embeddings"})

    def __init__(
        self,
        n_clusters: int | None = None,
        margin_pool_factor: float = 10.0,
        kmeans_niter: int = 20,
    ) -> None:
        self.n_clusters = check_optional_positive_int(self.name, "n_clusters", n_clusters)
        self.margin_pool_factor = check_factor(self.name, "margin_pool_factor", margin_pool_factor)
        self.kmeans_niter = check_positive_int(self.name, "kmeans_niter", kmeans_niter)

    def params(self) -> dict[str, Any]:
        return {
            "n_clusters": self.n_clusters,
            "margin_pool_factor": self.margin_pool_factor,
            "kmeans_niter": self.kmeans_niter,
        }

    def score(self, pool: PoolView) -> np.ndarray:
        """``[N]`` negated top-2 margins: the pre-filter's ranking (higher = smaller margin)."""
        return -top2_margin(pool.probs)

    def cluster(self, pool: PoolView, seed: int) -> np.ndarray:
        """``[N]`` cluster id of every row (k-means on the embeddings)."""
        from after_ray.al.kernels.clustering import kmeans

        n = len(pool)
        n_clusters = min(n, self.n_clusters) if self.n_clusters else default_n_clusters(n)
        _, assignment = kmeans(pool.embeddings, n_clusters, seed=seed, niter=self.kmeans_niter)
        return np.asarray(assignment, dtype=np.int64)

    def margin_candidates(self, pool: PoolView, k: int) -> np.ndarray:
        """Positions of the ``k_m`` smallest-margin unlabeled items, smallest first."""
        unl = pool.unlabeled_positions
        k_m = prefilter_size(k, unl.shape[0], self.margin_pool_factor)
        return top_k(self.score(pool)[unl], unl, pool.utt_ids, k_m)

    def _select(self, pool: PoolView, k: int, seed: int) -> np.ndarray:
        candidates = self.margin_candidates(pool, k)
        assignment = self.cluster(pool, seed)
        return round_robin_smallest_first(candidates, assignment, pool.utt_ids, k, seed)
