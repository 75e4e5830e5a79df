"""BADGE (Ash et al., ICLR 2020): k-means++ seeding on last-layer gradient embeddings.

The gradient embedding of item ``i`` is ``g_i = (p_i - e_{yhat_i}) (x) h_i`` (``p`` = softmax
``PoolView.probs``, ``yhat`` = argmax class, ``h`` = ``PoolView.penultimate``): the gradient of the
cross-entropy loss w.r.t. the last linear layer if the model's own prediction were the label. Its
norm grows with uncertainty and its direction encodes the features, so k-means++ seeding (D^2
sampling) over ``g`` picks a batch that is uncertain and diverse at once.

The seeding runs in :func:`after_ray.al.kernels.badge.badge_kmeanspp`, which never forms the C*H
vectors (``||g_i - g_j||^2`` factorises into probability and feature inner products); its module
docstring states the exact seeding rule (first center, tie handling, how ``seed`` drives the D^2
draws). Only unlabeled items are candidates; the labeled set plays no part, as in the paper.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from after_ray.al.pool import PoolView
from after_ray.al.strategies.base import Strategy


class BadgeSampling(Strategy):
    """k-means++ seeding over gradient embeddings of the unlabeled items (seeded)."""

    name: ClassVar[str] = "badge"
    requires = frozenset({"probs", "penultimate"})

    def _select(self, pool: PoolView, k: int, seed: int) -> np.ndarray:
        from after_ray.al.kernels.badge import badge_kmeanspp

        return badge_kmeanspp(pool.probs, pool.penultimate, k, seed=seed, candidates=~pool.labeled)
