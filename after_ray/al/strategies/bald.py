"""BALD: mutual information between the prediction and the model weights (Houlsby et al. 2011).

With ``T`` Monte-Carlo dropout passes ``p_t`` (``PoolView.mc_probs``, shape ``[N, T, C]``)::

    BALD(x) = H[mean_t p_t(x)] - mean_t H[p_t(x)]

(entropies in nats, float64). High BALD means the dropout samples disagree confidently, i.e.
uncertainty that more labels can reduce, unlike plain entropy, which also rewards items that are
ambiguous for every sample. The passes must be real MC dropout (dropout on, different masks);
the AFTER code's "samples" were DC-offset copies that GroupNorm cancels (after-method.md, bug 3).
Needs ``T >= 2``: with one sample BALD is 0 everywhere. Top ``k``, ties by ``utt_id``.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from after_ray.al.pool import PoolError, PoolView
from after_ray.al.strategies.uncertainty import ScoreStrategy, entropy


def bald_scores(mc_probs: np.ndarray) -> np.ndarray:
    """``H[mean_t p] - mean_t H[p_t]`` per item of ``mc_probs`` ``[N, T, C]`` (float64)."""
    mc = np.asarray(mc_probs, dtype=np.float64)
    return entropy(mc.mean(axis=1)) - entropy(mc).mean(axis=1)


class BALDSampling(ScoreStrategy):
    """Highest mutual information over MC-dropout samples first."""

    name: ClassVar[str] = "bald"
    requires = frozenset({"mc_probs"})

    def score(self, pool: PoolView) -> np.ndarray:
        if pool.mc_probs.shape[1] < 2:
            raise PoolError(
                f"strategy 'bald' needs at least 2 Monte-Carlo dropout samples per item, the "
                f"pool has {pool.mc_probs.shape[1]}; set al.mc_dropout_samples >= 2"
            )
        return bald_scores(pool.mc_probs)
