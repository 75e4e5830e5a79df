"""Random sampling: the baseline every other strategy has to beat.

``k`` items drawn uniformly without replacement from the unlabeled ones with
``numpy.random.default_rng(seed)``. The draw is over the unlabeled utt_ids in sorted order, so
the selection depends only on (set of unlabeled ids, k, seed), not on the pool's row order.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from after_ray.al.pool import PoolView
from after_ray.al.strategies.base import Strategy


class RandomSampling(Strategy):
    """Uniform random unlabeled items (seeded)."""

    name: ClassVar[str] = "random"
    requires = frozenset()

    def _select(self, pool: PoolView, k: int, seed: int) -> np.ndarray:
        unl = pool.unlabeled_positions
        unl = unl[np.argsort(pool.utt_ids[unl], kind="stable")]
        rng = np.random.default_rng(seed)
        return unl[rng.choice(unl.shape[0], size=k, replace=False)]
