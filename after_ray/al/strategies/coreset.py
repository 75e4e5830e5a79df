"""Core-set selection by k-center greedy (Sener & Savarese 2018; Gonzalez farthest-first).

Centers are the labeled items; each pick is the unlabeled item farthest (squared Euclidean on
``PoolView.embeddings``) from every labeled item and every earlier pick, which is the greedy
2-approximation of the minimax cover. The work is done by :func:`after_ray.al.kernels.kcenter.kcenter_greedy`
(exact, lazy, FAISS 1-NN for the initial distances); its module docstring states the exact rule:
ties go to the lowest row position, and with no labeled item the first pick is the unlabeled
item closest to the unlabeled mean. Deterministic: ``seed`` is not used.

``speaker_norm`` (None: on when the pool has speaker ids; False: off; True: required): the
embeddings are first z-scored per speaker over the whole pool
(:func:`~after_ray.al.strategies.base.speaker_standardize`). Without it the farthest points are
the most unusual *voices*, and a cover of the pool is a cover of its speakers: on speaker-
dominated embeddings most picks land in the majority class.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from after_ray.al.pool import PoolView
from after_ray.al.strategies.base import Strategy, check_speaker_norm, distance_embeddings


class CoresetSampling(Strategy):
    """k-center greedy on the (speaker-normalised) embeddings, from the labeled set."""

    name: ClassVar[str] = "coreset"
    requires = frozenset({"embeddings"})

    def __init__(self, speaker_norm: bool | None = None) -> None:
        self.speaker_norm = check_speaker_norm(self.name, speaker_norm)

    def params(self) -> dict[str, Any]:
        return {"speaker_norm": self.speaker_norm}

    def _select(self, pool: PoolView, k: int, seed: int) -> np.ndarray:
        from after_ray.al.kernels.kcenter import kcenter_greedy

        x = distance_embeddings(pool, self.speaker_norm, self.name)
        return kcenter_greedy(x, pool.labeled_positions, k, candidates=~pool.labeled, seed=seed)
