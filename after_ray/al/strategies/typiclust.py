"""TypiClust (Hacohen, Dekel & Weinshall, ICML 2022): typical points of uncovered clusters.

A label-free (cold-start, low-budget) strategy on ``PoolView.embeddings``:

1. k-means (``after_ray.al.kernels.clustering.kmeans``) of the whole pool into
   ``K = min(max_clusters, #labeled + k, N)`` clusters (the reference caps K at 500).
2. Pick ``k`` items one at a time from the least covered cluster: the cluster with the fewest
   labeled-or-picked members, the larger cluster first among equals, then the lower cluster id.
   Clusters with fewer than ``min_cluster_size`` members (outliers; the reference uses 5) come
   only after every larger cluster has run out of unlabeled items (the reference drops them and
   fails when nothing else is left).
3. Inside the cluster, take the most *typical* unlabeled member not yet picked:
   ``typicality(x) = 1 / mean Euclidean distance to x's k nearest neighbours`` within the cluster
   (labeled members count as neighbours; the item itself does not; duplicates count at distance
   0), ``k = min(knn, cluster size // 2)`` (at least 1) as in the reference. Ranked by the mean
   distance (smallest first, which is highest typicality), ties by ``utt_id``.

Differences from the reference code, on purpose: distances are Euclidean as in the paper (the
reference takes FAISS's squared L2), and typicality is computed once per cluster over all its
members instead of being recomputed without the items picked so far (density is a property of
the data, not of what was labeled). The kNN is exact (float64, chunked; O(m^2 D) per cluster of
size m, only for clusters that receive a pick).

``speaker_norm`` (None: on when the pool has speaker ids; False: off; True: required): k-means
and typicality are computed on the embeddings z-scored per speaker over the whole pool
(:func:`~after_ray.al.strategies.base.speaker_standardize`), so clusters group emotions rather
than voices and "typical" does not mean "the most common voice".
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from after_ray.al.pool import PoolView
from after_ray.al.strategies.base import (
    Strategy,
    check_positive_int,
    check_speaker_norm,
    cover_clusters,
    distance_embeddings,
)

# Rows per chunk of the within-cluster distance matrix (chunk x cluster size float64 values).
_CHUNK_ELEMENTS = 1 << 22


def mean_knn_distance(x: np.ndarray, n_neighbors: int) -> np.ndarray:
    """``[m]`` mean Euclidean distance of each row of ``x`` to its ``n_neighbors`` nearest others.

    Exact (float64). Each row excludes itself by index, so duplicated rows are neighbours at
    distance 0. Returns ``inf`` for every row when ``n_neighbors`` is 0.
    """
    x = np.asarray(x, dtype=np.float64)
    m = x.shape[0]
    if n_neighbors <= 0:
        return np.full(m, np.inf)
    sq = np.einsum("ij,ij->i", x, x)
    out = np.empty(m, dtype=np.float64)
    chunk = max(1, _CHUNK_ELEMENTS // max(m, 1))
    for start in range(0, m, chunk):
        stop = min(m, start + chunk)
        d2 = sq[start:stop, None] + sq[None, :] - 2.0 * (x[start:stop] @ x.T)
        np.maximum(d2, 0.0, out=d2)
        d2[np.arange(stop - start), np.arange(start, stop)] = np.inf
        nearest = np.partition(d2, n_neighbors - 1, axis=1)[:, :n_neighbors]
        out[start:stop] = np.sqrt(nearest).mean(axis=1)
    return out


def typiclust_neighbors(cluster_size: int, knn: int) -> int:
    """Neighbours used for typicality in a cluster of this size: ``min(knn, size // 2)``, >= 1."""
    if cluster_size < 2:
        return 0
    return max(1, min(knn, cluster_size // 2))


class TypiClustSampling(Strategy):
    """Most typical unlabeled item of each least covered k-means cluster."""

    name: ClassVar[str] = "typiclust"
    requires = frozenset({"embeddings"})

    def __init__(
        self,
        max_clusters: int = 500,
        knn: int = 20,
        min_cluster_size: int = 5,
        kmeans_niter: int = 20,
        speaker_norm: bool | None = None,
    ) -> None:
        self.speaker_norm = check_speaker_norm(self.name, speaker_norm)
        self.max_clusters = check_positive_int(self.name, "max_clusters", max_clusters)
        self.knn = check_positive_int(self.name, "knn", knn)
        self.min_cluster_size = check_positive_int(
            self.name, "min_cluster_size", min_cluster_size, minimum=0
        )
        self.kmeans_niter = check_positive_int(self.name, "kmeans_niter", kmeans_niter)

    def params(self) -> dict[str, Any]:
        return {
            "max_clusters": self.max_clusters,
            "knn": self.knn,
            "min_cluster_size": self.min_cluster_size,
            "kmeans_niter": self.kmeans_niter,
            "speaker_norm": self.speaker_norm,
        }

    def n_clusters(self, pool: PoolView, k: int) -> int:
        n_labeled = len(pool) - pool.n_unlabeled
        return max(1, min(self.max_clusters, n_labeled + k, len(pool)))

    def cluster(self, pool: PoolView, k: int, seed: int, x: np.ndarray | None = None) -> np.ndarray:
        """``[N]`` cluster id of every row (k-means on the embeddings, or on ``x``)."""
        from after_ray.al.kernels.clustering import kmeans

        if x is None:
            x = distance_embeddings(pool, self.speaker_norm, self.name)
        _, assignment = kmeans(x, self.n_clusters(pool, k), seed=seed, niter=self.kmeans_niter)
        return np.asarray(assignment, dtype=np.int64)

    def _select(self, pool: PoolView, k: int, seed: int) -> np.ndarray:
        x = distance_embeddings(pool, self.speaker_norm, self.name)  # once for both steps
        assignment = self.cluster(pool, k, seed, x)
        return self.select_with_clusters(pool, assignment, k, x)

    def select_with_clusters(
        self, pool: PoolView, assignment: np.ndarray, k: int, x: np.ndarray | None = None
    ) -> np.ndarray:
        """Steps 2-3 of the module docstring for a given ``[N]`` cluster assignment."""
        assignment = np.asarray(assignment, dtype=np.int64)
        if x is None:
            x = distance_embeddings(pool, self.speaker_norm, self.name)

        def most_typical_first(cluster: int, unlabeled_members: np.ndarray) -> np.ndarray:
            members = np.flatnonzero(assignment == cluster)
            n_neighbors = typiclust_neighbors(members.shape[0], self.knn)
            spread = mean_knn_distance(x[members], n_neighbors)
            keep = ~pool.labeled[members]
            members, spread = members[keep], spread[keep]
            return members[np.lexsort((pool.utt_ids[members], spread))]

        return cover_clusters(
            assignment,
            pool.labeled,
            k,
            most_typical_first,
            min_cluster_size=self.min_cluster_size,
        )
