"""The strategy interface, the contract every strategy keeps, and small shared helpers.

Interface: a strategy is a class with a ``name``, the set of ``PoolView`` fields it ``requires``,
and ``select(pool, batch_size, *, seed) -> list[str]`` returning utt_ids in selection order.
Subclasses implement only ``_select(pool, k, seed) -> positions``; :meth:`Strategy.select` checks
the inputs and the result, so the contract below holds for every strategy:

- it never returns a labeled item nor the same item twice;
- it returns exactly ``min(batch_size, number of unlabeled items)`` items (``[]`` for 0);
- the same pool, batch size and seed give the same list (no global random state is touched);
- a pool without a required field raises :class:`~after_ray.al.pool.PoolError` naming the field.

Tie rule (everywhere): items are ranked by their score, and equal scores are ordered by
``utt_id`` (lexicographic), so score-based rankings do not depend on the pool's row order. The
geometric kernels (k-center greedy, BADGE seeding, k-means) break exact ties by row position as
their modules document; build the pool with ``PoolView.sorted_by_utt_id()`` for a canonical order.
"""

from __future__ import annotations

import heapq
import numbers
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from after_ray.al.pool import PoolError, PoolView
from after_ray.errors import ConfigError


class Strategy:
    """Base class of the selection strategies (see the module docstring for the contract)."""

    #: Registry name, also used in configs (``al.strategy``).
    name: ClassVar[str] = ""
    #: ``PoolView`` fields the strategy reads. Instances may narrow or widen it from their
    #: parameters (the hybrid ``after`` needs ``mc_probs`` only with ``uncertainty="bald"``).
    requires: frozenset[str] = frozenset()

    def params(self) -> dict[str, Any]:
        """The constructor parameters, for logs and ``repr``."""
        return {}

    def score(self, pool: PoolView) -> np.ndarray | None:
        """``[N]`` float64 acquisition scores (higher = more wanted) for logs, or None.

        Strategies that rank by a per-item score return it for every row (labeled rows too);
        set-based ones (k-center, k-means++, cluster covers) have none.
        """
        del pool
        return None

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.params().items())
        return f"{type(self).__name__}({args})"

    def select(self, pool: PoolView, batch_size: int, *, seed: int) -> list[str]:
        """The utt_ids of the next batch, in selection order."""
        if not isinstance(pool, PoolView):
            raise TypeError(f"{self.name}: pool must be a PoolView, got {type(pool).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
            raise PoolError(f"{self.name}: batch_size must be an int, got {batch_size!r}")
        if batch_size < 0:
            raise PoolError(f"{self.name}: batch_size must be >= 0, got {batch_size}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise PoolError(f"{self.name}: seed must be a non-negative int, got {seed!r}")
        missing = sorted(set(self.requires) - pool.present_fields())
        if missing:
            raise PoolError(
                f"strategy {self.name!r} needs PoolView field(s) {missing}, which the pool does "
                f"not have (it has {sorted(pool.present_fields()) or 'none'}). Score the pool "
                f"with outputs for {sorted(self.requires)}, or choose another strategy"
            )
        k = min(int(batch_size), pool.n_unlabeled)
        if k == 0:
            return []
        picks = np.asarray(self._select(pool, k, int(seed)), dtype=np.int64)
        _check_picks(self.name, pool, picks, k)
        return pool.utt_ids[picks].tolist()

    def _select(self, pool: PoolView, k: int, seed: int) -> np.ndarray:
        """Positions of ``k`` distinct unlabeled items (1 <= k <= #unlabeled), in order."""
        raise NotImplementedError(f"strategy {self.name!r}: _select is not built yet")


def _check_picks(name: str, pool: PoolView, picks: np.ndarray, k: int) -> None:
    # A violated contract is a bug in the strategy, never the caller's fault: fail loudly
    # instead of labeling the wrong items (the baal / small-text index bugs in al-at-scale.md).
    if picks.shape != (k,):
        raise RuntimeError(f"strategy {name!r} returned {picks.shape[0]} items, expected {k}")
    if picks.min() < 0 or picks.max() >= len(pool):
        raise RuntimeError(f"strategy {name!r} returned a position outside the pool")
    if pool.labeled[picks].any():
        raise RuntimeError(f"strategy {name!r} returned an already labeled item")
    if np.unique(picks).shape[0] != k:
        raise RuntimeError(f"strategy {name!r} returned the same item twice")


# ---------------------------------------------------------------------------- helpers


def top_k(scores: np.ndarray, positions: np.ndarray, utt_ids: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` positions with the highest ``scores``, best first; equal scores by utt_id.

    ``scores[i]`` belongs to ``positions[i]``. Only the items tied with the k-th score are sorted
    by id, so the cost stays O(n) + O(k log k) even for a million items.
    """
    scores = np.asarray(scores, dtype=np.float64)
    positions = np.asarray(positions, dtype=np.int64)
    k = min(int(k), positions.shape[0])
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    key = -scores
    if k < key.shape[0]:
        kth = np.partition(key, k - 1)[k - 1]
        keep = np.flatnonzero(key <= kth)
    else:
        keep = np.arange(key.shape[0])
    order = keep[np.lexsort((utt_ids[positions[keep]], key[keep]))][:k]
    return positions[order]


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); all-zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0).astype(np.float32)


def cover_clusters(
    assignment: np.ndarray,
    labeled: np.ndarray,
    k: int,
    member_order: Callable[[int, np.ndarray], np.ndarray],
    *,
    min_cluster_size: int = 0,
) -> np.ndarray:
    """Pick ``k`` unlabeled items, each time from the least covered cluster.

    The next pick comes from the cluster that ranks first by (size below ``min_cluster_size``,
    number of labeled or already picked members, larger size first, lower cluster id): with no
    labeled items that is a round-robin over clusters from the largest to the smallest. Inside a
    cluster, items are taken in the order ``member_order(cluster, unlabeled_member_positions)``
    returns (positions, best first); it is called once per cluster, lazily, so only the clusters
    that get a pick pay for it. Clusters without unlabeled members are skipped.
    """
    assignment = np.asarray(assignment, dtype=np.int64)
    n_clusters = int(assignment.max()) + 1 if assignment.size else 0
    sizes = np.bincount(assignment, minlength=n_clusters)
    covered = np.bincount(assignment[labeled], minlength=n_clusters)
    unl = np.flatnonzero(~labeled)
    by_cluster = unl[np.argsort(assignment[unl], kind="stable")]
    starts = np.searchsorted(assignment[by_cluster], np.arange(n_clusters + 1))
    heap = [
        (int(sizes[c] < min_cluster_size), int(covered[c]), -int(sizes[c]), c)
        for c in range(n_clusters)
        if starts[c + 1] > starts[c]
    ]
    heapq.heapify(heap)
    queues: dict[int, np.ndarray] = {}
    taken = dict.fromkeys(range(n_clusters), 0)
    picks: list[int] = []
    while len(picks) < k and heap:
        small, cov, neg_size, c = heapq.heappop(heap)
        if c not in queues:
            members = by_cluster[starts[c] : starts[c + 1]]
            queues[c] = np.asarray(member_order(c, members), dtype=np.int64)
        picks.append(int(queues[c][taken[c]]))
        taken[c] += 1
        if taken[c] < queues[c].shape[0]:
            heapq.heappush(heap, (small, cov + 1, neg_size, c))
    return np.asarray(picks, dtype=np.int64)


def check_positive_int(strategy: str, name: str, value: Any, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(
            f"parameter {name!r} of strategy {strategy!r} must be an int >= {minimum}, "
            f"got {value!r}"
        )
    return int(value)


def check_optional_positive_int(strategy: str, name: str, value: Any) -> int | None:
    return None if value is None else check_positive_int(strategy, name, value)


def check_factor(strategy: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 1.0:
        raise ConfigError(
            f"parameter {name!r} of strategy {strategy!r} must be a number >= 1, got {value!r}"
        )
    return float(value)


def check_choice(strategy: str, name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(
            f"parameter {name!r} of strategy {strategy!r} must be one of {list(choices)}, "
            f"got {value!r}"
        )
    return str(value)
