"""Uncertainty sampling: entropy, least confidence and margin of the current model's softmax.

Every strategy here scores the unlabeled items with one number, **higher = picked first**, and
takes the top ``k`` (ties by ``utt_id``, see ``base.py``). Scores are computed in float64:

- ``entropy``: ``H[p] = -sum_c p_c log p_c`` (natural log, ``0 log 0 = 0``);
- ``least_confidence``: ``1 - max_c p_c``;
- ``margin``: ``-(p_(1) - p_(2))``, the negated gap between the two largest probabilities, so the
  smallest margin comes first ("breaking ties" in small-text).

They are single-item scores: a batch of the top ``k`` can be redundant (near-duplicates are
equally uncertain). The ``after`` hybrid (``hybrid.py``) adds diversity on top of them.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from after_ray.al.pool import PoolView
from after_ray.al.strategies.base import Strategy, top_k


def entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each row of ``probs`` ``[..., C]``, in float64."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 0.0, None)
    safe = np.where(p > 0.0, p, 1.0)  # log(1) = 0 makes 0 log 0 = 0
    return -(p * np.log(safe)).sum(axis=-1)


def least_confidence(probs: np.ndarray) -> np.ndarray:
    """``1 - max_c p_c`` per row, in float64."""
    return 1.0 - np.asarray(probs, dtype=np.float64).max(axis=-1)


def top2_margin(probs: np.ndarray) -> np.ndarray:
    """``p_(1) - p_(2)``: the gap between the two largest probabilities of each row (float64)."""
    p = np.asarray(probs, dtype=np.float64)
    top2 = np.partition(p, p.shape[-1] - 2, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


class ScoreStrategy(Strategy):
    """Top-``k`` unlabeled items by a per-item score (higher first, ties by ``utt_id``)."""

    def _select(self, pool: PoolView, k: int, seed: int) -> np.ndarray:
        del seed  # deterministic
        unl = pool.unlabeled_positions
        return top_k(self.score(pool)[unl], unl, pool.utt_ids, k)


class EntropySampling(ScoreStrategy):
    """Highest predictive entropy first."""

    name: ClassVar[str] = "entropy"
    requires = frozenset({"probs"})

    def score(self, pool: PoolView) -> np.ndarray:
        return entropy(pool.probs)


class LeastConfidenceSampling(ScoreStrategy):
    """Lowest top-class probability first."""

    name: ClassVar[str] = "least_confidence"
    requires = frozenset({"probs"})

    def score(self, pool: PoolView) -> np.ndarray:
        return least_confidence(pool.probs)


class MarginSampling(ScoreStrategy):
    """Smallest gap between the two most probable classes first (score = -margin)."""

    name: ClassVar[str] = "margin"
    requires = frozenset({"probs"})

    def score(self, pool: PoolView) -> np.ndarray:
        return -top2_margin(pool.probs)
