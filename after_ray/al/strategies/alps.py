"""``alps``: ALPS (Yuan, Lin & Boyd-Graber, EMNLP 2020), adapted to speech without labels.

ALPS is a cold start: embed every unlabeled item by its *surprisal* (the masked-LM loss vector of
a BERT on the item), L2-normalise, run k-means with ``K = k`` (the batch size) and label the item
nearest to each centroid. Two things change here, both on purpose:

- **No surprisal embeddings.** They need per-token MLM losses, which a speech model does not
  have (wav2vec 2.0's contrastive loss is over masked frames of one utterance, and the scoring
  stage does not keep it). The documented adaptation (after-method.md §7.4, item 3: "ALPS ... as
  batch-level selection on embeddings") uses ``PoolView.embeddings`` instead: in the pipeline's
  cold start that is the TAPT model's pooled output, i.e. the representation the self-supervised
  objective shaped on this very pool, which is the role surprisal plays in ALPS.
- **No labels, ever.** AFTER's ``alps(logits, label)`` scored pool items with their ground-truth
  labels (after-method.md §2.3, weak point 2): label leakage that makes it an oracle, not a
  strategy. This class reads only ``embeddings`` (and ``speakers`` for ``speaker_norm``); it
  needs no model outputs at all, so it works before any label exists.

The rule:

1. ``x`` = the embeddings, z-scored per speaker over the whole pool when ``speaker_norm``
   (None: when the pool has speaker ids; False: never; True: required;
   :func:`~after_ray.al.strategies.base.speaker_standardize`), then L2-normalised as ALPS
   normalises its surprisal vectors (Euclidean distance then ranks like cosine similarity).
2. FAISS k-means (``after_ray.al.kernels.clustering.kmeans``, seeded, ``kmeans_niter`` iterations) of the
   **unlabeled** rows into ``K = k`` clusters, as ALPS clusters the unlabeled pool; the lowest-
   inertia of ``kmeans_n_init`` seeded runs (:func:`~after_ray.al.strategies.cold_start.best_kmeans`;
   ALPS used scikit-learn's 10 restarts): one start often merges two groups and splits another,
   and then a group gets no pick.
3. From each cluster, the member nearest to its centroid (squared Euclidean, float64; ties by
   ``utt_id``), clusters from the largest to the smallest (equal sizes: lower cluster id). ALPS
   takes the nearest item over the whole pool, so one item could be nearest to two centroids
   and the batch come out short; taking members avoids that. When a cluster is empty (exactly
   duplicated rows) the round-robin goes on to the second-nearest members, largest cluster
   first, so the batch always has ``k`` distinct items.

Cost: k-means with K = k, O(N K D) per iteration: fine for cold-start batches; for large rounds
(k in the tens of thousands at N ~ 10^6) prefer ``typiclust`` or ``coreset``. Deterministic for a
given seed (the seed drives k-means).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from after_ray.al.pool import PoolView
from after_ray.al.strategies.base import (
    Strategy,
    check_positive_int,
    check_speaker_norm,
    distance_embeddings,
    l2_normalize,
)
from after_ray.al.strategies.cold_start import best_kmeans, nearest_to_centroid_round_robin


class ALPSSampling(Strategy):
    """k-means (K = batch size) of the unlabeled embeddings; the item nearest each centroid."""

    name: ClassVar[str] = "alps"
    requires = frozenset({"embeddings"})

    def __init__(
        self, kmeans_niter: int = 20, kmeans_n_init: int = 3, speaker_norm: bool | None = None
    ) -> None:
        self.kmeans_niter = check_positive_int(self.name, "kmeans_niter", kmeans_niter)
        self.kmeans_n_init = check_positive_int(self.name, "kmeans_n_init", kmeans_n_init)
        self.speaker_norm = check_speaker_norm(self.name, speaker_norm)

    def params(self) -> dict[str, Any]:
        return {
            "kmeans_niter": self.kmeans_niter,
            "kmeans_n_init": self.kmeans_n_init,
            "speaker_norm": self.speaker_norm,
        }

    def cluster(
        self, pool: PoolView, k: int, seed: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(unlabeled positions, their normalised rows, centroids [k, D], assignment)``."""
        # Speaker statistics over the whole pool (labeled rows included), before subsetting.
        x = l2_normalize(distance_embeddings(pool, self.speaker_norm, self.name))
        unl = pool.unlabeled_positions
        xu = x[unl]
        centroids, assignment, _ = best_kmeans(
            xu,
            min(k, unl.shape[0]),
            seed=seed,
            niter=self.kmeans_niter,
            n_init=self.kmeans_n_init,
        )
        return unl, xu, np.asarray(centroids), np.asarray(assignment, dtype=np.int64)

    def _select(self, pool: PoolView, k: int, seed: int) -> np.ndarray:
        unl, xu, centroids, assignment = self.cluster(pool, k, seed)
        # The clustered rows are all unlabeled: a view of just them (ids for the tie rule).
        sub = PoolView(utt_ids=pool.utt_ids[unl], labeled=np.zeros(unl.shape[0], dtype=bool))
        picks = nearest_to_centroid_round_robin(xu, centroids, assignment, sub, k)
        return unl[picks]
