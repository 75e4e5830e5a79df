"""``after_init``: AFTER's clustering-informed initialisation, done right.

What AFTER's code does (after-method.md §2.2): x-vectors from a speaker-verification model, an
elbow plot read by hand, ``KMeans(n_clusters=3)`` hard-coded, then a round-robin over centroids
taking the most cosine-similar not-yet-chosen point (duplicates possible when two centroids share
a nearest point; no seed). Here:

1. Embeddings: ``PoolView.embeddings`` (the TAPT model's pooled output in the pipeline), L2-
   normalised, so Euclidean distance ranks like cosine similarity. The whole pool is clustered
   (labeled items included) with FAISS k-means (``after_ray.al.kernels.clustering.kmeans``, seeded).
2. Number of clusters: ``n_clusters`` when given (capped at N). Otherwise the **elbow of the
   k-means inertia** over ``K = 1 .. max_clusters`` (capped at N), the rule AFTER applied by eye
   with Yellowbrick's ``KElbowVisualizer(k=(1, 8))``: with ``W(K)`` the inertia (sum of squared
   distances to the assigned centroid, W(1) = total scatter around the mean), the elbow is the
   interior ``K`` that lies farthest below the straight line from ``(1, W(1))`` to
   ``(K_max, W(K_max))`` (the "kneedle" criterion; equal gaps: smaller K). When no interior K
   lies below that line (no elbow: no cluster structure), ``K_max`` is used, for the most
   spread-out start. Every K keeps the lowest-inertia of ``kmeans_n_init`` seeded runs (5): a
   single random start often merges two blobs and splits another, a false elbow.
   ``elbow_n_clusters`` returns the choice and the curve for logs.
3. Selection: each pick comes from the least covered cluster (fewest labeled-or-picked members,
   then the larger cluster, then the lower id): with nothing labeled that is a round-robin over
   the clusters from the largest to the smallest. From that cluster it takes the unlabeled member
   nearest to the centroid (squared Euclidean on the normalised embeddings, float64; ties by
   ``utt_id``) that is not picked yet, so there are no duplicates. Members are the items k-means
   assigned to the cluster, which keeps every cluster represented (AFTER searched the whole pool,
   so a point near two centroids could serve both).

``speaker_norm`` (None: on when the pool has speaker ids; False: off; True: required): the
embeddings are z-scored per speaker over the whole pool before step 1
(:func:`~after_ray.al.strategies.base.speaker_standardize`). AFTER clustered x-vectors of a
speaker-verification model, i.e. voices; on SER embeddings the speaker still dominates, and a
simulation of this cold start without it drew 30 of 68 picks from the majority (neutral) class.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from after_ray.al.pool import PoolView
from after_ray.al.strategies.base import (
    Strategy,
    check_optional_positive_int,
    check_positive_int,
    check_speaker_norm,
    cover_clusters,
    distance_embeddings,
    l2_normalize,
)
from after_ray.seeding import kmeans_restart_seed


def kmeans_inertia(x: np.ndarray, centroids: np.ndarray, assignment: np.ndarray) -> float:
    """Sum of squared distances of the rows of ``x`` to their assigned centroids (float64)."""
    total = 0.0
    step = 65536
    for start in range(0, x.shape[0], step):
        diff = np.asarray(x[start : start + step], dtype=np.float64)
        diff = diff - np.asarray(centroids, dtype=np.float64)[assignment[start : start + step]]
        total += float(np.einsum("ij,ij->", diff, diff))
    return total


def elbow_index(inertias: np.ndarray) -> int:
    """Index of the elbow of a curve ``inertias[i] = W(K = i + 1)`` (see the module docstring)."""
    w = np.asarray(inertias, dtype=np.float64)
    m = w.shape[0]
    if m <= 2:
        return m - 1
    line = w[0] + (w[-1] - w[0]) * np.arange(m) / (m - 1)
    gap = line - w
    gap[0] = gap[-1] = 0.0
    best = int(np.argmax(gap))  # first maximum: the smaller K among equal gaps
    scale = max(abs(float(w[0])), 1e-300)
    if gap[best] <= 1e-9 * scale:
        return m - 1
    return best


def best_kmeans(
    x: np.ndarray, n_clusters: int, *, seed: int, niter: int = 20, n_init: int = 1
) -> tuple[np.ndarray, np.ndarray, float]:
    """The lowest-inertia of ``n_init`` k-means runs: ``(centroids, assignment, inertia)``.

    Run ``i`` uses seed ``seeding.kmeans_restart_seed(seed, n_init, i)`` (disjoint seeds for
    different ``seed``s); equal inertia: the earlier run. One random start often lands in a poor local
    optimum (two blobs merged, one split), which would put a false elbow in the curve.
    """
    from after_ray.al.kernels.clustering import kmeans

    if n_clusters == 1:
        centroids = np.asarray(x, dtype=np.float64).mean(axis=0, keepdims=True)
        assignment = np.zeros(x.shape[0], dtype=np.int64)
        return centroids, assignment, kmeans_inertia(x, centroids, assignment)
    best = None
    for i in range(n_init):
        centroids, assignment = kmeans(
            x, n_clusters, seed=kmeans_restart_seed(seed, n_init, i), niter=niter
        )
        centroids = np.asarray(centroids)
        assignment = np.asarray(assignment, dtype=np.int64)
        inertia = kmeans_inertia(x, centroids, assignment)
        if best is None or inertia < best[2]:
            best = (centroids, assignment, inertia)
    return best


def elbow_n_clusters(
    x: np.ndarray, max_clusters: int, *, seed: int, niter: int = 20, n_init: int = 1
) -> tuple[int, np.ndarray, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """The elbow ``K`` of k-means on ``x``, the inertia curve, and each K's k-means result.

    Returns ``(K, inertias for K = 1..K_max, {K: (centroids, assignment)})``; K = 1 is the mean.
    Each K keeps the best of ``n_init`` runs (:func:`best_kmeans`).
    """
    k_max = max(1, min(int(max_clusters), x.shape[0]))
    runs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    inertias = np.empty(k_max, dtype=np.float64)
    for n_clusters in range(1, k_max + 1):
        centroids, assignment, inertias[n_clusters - 1] = best_kmeans(
            x, n_clusters, seed=seed, niter=niter, n_init=n_init
        )
        runs[n_clusters] = (centroids, assignment)
    return elbow_index(inertias) + 1, inertias, runs


class AfterInit(Strategy):
    """Clustering-informed cold start: nearest-to-centroid items, round-robin over clusters."""

    name: ClassVar[str] = "after_init"
    requires = frozenset({"embeddings"})

    def __init__(
        self,
        n_clusters: int | None = None,
        max_clusters: int = 10,
        kmeans_niter: int = 20,
        kmeans_n_init: int = 5,
        speaker_norm: bool | None = None,
    ) -> None:
        self.speaker_norm = check_speaker_norm(self.name, speaker_norm)
        self.n_clusters = check_optional_positive_int(self.name, "n_clusters", n_clusters)
        self.max_clusters = check_positive_int(self.name, "max_clusters", max_clusters)
        self.kmeans_niter = check_positive_int(self.name, "kmeans_niter", kmeans_niter)
        self.kmeans_n_init = check_positive_int(self.name, "kmeans_n_init", kmeans_n_init)

    def params(self) -> dict[str, Any]:
        return {
            "n_clusters": self.n_clusters,
            "max_clusters": self.max_clusters,
            "kmeans_niter": self.kmeans_niter,
            "kmeans_n_init": self.kmeans_n_init,
            "speaker_norm": self.speaker_norm,
        }

    def cluster(self, pool: PoolView, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(normalised embeddings, centroids [K, D], assignment [N])`` for this pool."""
        x = l2_normalize(distance_embeddings(pool, self.speaker_norm, self.name))
        options = {"seed": seed, "niter": self.kmeans_niter, "n_init": self.kmeans_n_init}
        if self.n_clusters is None:
            n_clusters, _, runs = elbow_n_clusters(x, self.max_clusters, **options)
            centroids, assignment = runs[n_clusters]
        else:
            centroids, assignment, _ = best_kmeans(x, min(self.n_clusters, len(pool)), **options)
        return x, np.asarray(centroids), np.asarray(assignment, dtype=np.int64)

    def _select(self, pool: PoolView, k: int, seed: int) -> np.ndarray:
        x, centroids, assignment = self.cluster(pool, seed)
        return nearest_to_centroid_round_robin(x, centroids, assignment, pool, k)


def nearest_to_centroid_round_robin(
    x: np.ndarray, centroids: np.ndarray, assignment: np.ndarray, pool: PoolView, k: int
) -> np.ndarray:
    """Step 3 of the module docstring for a given clustering of the (normalised) rows ``x``."""
    centroids64 = np.asarray(centroids, dtype=np.float64)

    def nearest_first(cluster: int, unlabeled_members: np.ndarray) -> np.ndarray:
        diff = np.asarray(x[unlabeled_members], dtype=np.float64) - centroids64[cluster]
        d2 = np.einsum("ij,ij->i", diff, diff)
        return unlabeled_members[np.lexsort((pool.utt_ids[unlabeled_members], d2))]

    return cover_clusters(assignment, pool.labeled, k, nearest_first)
