"""Core-set selection by k-center greedy (Sener & Savarese 2018; Gonzalez farthest-first).

Centers are the labeled items; each pick is the unlabeled item farthest (squared Euclidean on
``PoolView.embeddings``) from every labeled item and every earlier pick, which is the greedy
2-approximation of the minimax cover. The work is done by :func:`after_ray.al.kcenter.kcenter_greedy`
(exact, lazy, FAISS 1-NN for the initial distances); its module docstring states the exact rule:
ties go to the lowest row position, and with no labeled item the first pick is the unlabeled
item closest to the unlabeled mean. Deterministic: ``seed`` is not used.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from after_ray.al.pool import PoolView
from after_ray.al.strategies.base import Strategy


class CoresetSampling(Strategy):
    """k-center greedy on the embeddings, from the labeled set."""

    name: ClassVar[str] = "coreset"
    requires = frozenset({"embeddings"})

    def _select(self, pool: PoolView, k: int, seed: int) -> np.ndarray:
        from after_ray.al.kcenter import kcenter_greedy

        return kcenter_greedy(
            pool.embeddings, pool.labeled_positions, k, candidates=~pool.labeled, seed=seed
        )
