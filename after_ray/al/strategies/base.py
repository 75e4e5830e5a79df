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


#: Floor of a speaker's per-dimension std in :func:`speaker_standardize`: a dimension that is
#: constant over a speaker's utterances is centred (to 0), never divided by ~0.
SPEAKER_STD_FLOOR = 1e-6
# float64 scratch values per column block of speaker_standardize (bounds its extra memory at
# about 4 x 8 MiB x 8 B whatever N and D are).
_SPEAKER_BLOCK_ELEMENTS = 1 << 23


def speaker_standardize(
    embeddings: np.ndarray, speakers: np.ndarray, *, std_floor: float = SPEAKER_STD_FLOOR
) -> np.ndarray:
    """``[N, D]`` float32: every dimension z-scored over each speaker's rows.

    Per speaker ``s`` and dimension ``j``: ``(x - mean_s[j]) / max(std_s[j], std_floor)`` with the
    population std (ddof 0), so each speaker has mean 0 and std 1 in every dimension that varies.
    A speaker with one row is only centred (it becomes the zero vector: there is no spread to
    scale by). Rows whose speaker id is ``""`` (unknown) form one group together, so they end on
    the same scale as the others instead of staying in raw units.

    Why: in SER embeddings the speaker is the largest source of variance (voice, channel,
    loudness), so raw distances, k-means and k-center cover *voices*; z-scoring per speaker is
    the standard SER normalisation and leaves what varies inside a voice: its emotions. It reads
    no label; done over the whole pool (labeled and unlabeled) it is a fixed map of the pool.
    Idempotent up to the floor (also for features that were already speaker-normalised and then
    re-scaled per dimension, as ``finetune.speaker_norm`` + the head's standardisation do).
    Mean and variance are two-pass float64, in column blocks so the scratch stays small.
    """
    x = np.asarray(embeddings)
    if x.ndim != 2:
        raise PoolError(f"speaker_standardize expects [N, D] embeddings, got shape {x.shape}")
    spk = np.asarray(speakers).astype(str)
    n, d = x.shape
    if spk.shape != (n,):
        raise PoolError(
            f"speaker_standardize: {spk.shape[0] if spk.ndim else 0} speaker ids for {n} rows"
        )
    out = np.empty((n, d), dtype=np.float32)
    if n == 0:
        return out
    _, group = np.unique(spk, return_inverse=True)
    group = group.reshape(-1)
    order = np.argsort(group, kind="stable")
    counts = np.bincount(group).astype(np.float64)
    starts = np.concatenate(([0], np.cumsum(counts[:-1]).astype(np.int64)))
    single = counts[:, None] < 2
    step = max(1, _SPEAKER_BLOCK_ELEMENTS // n)
    for lo in range(0, d, step):
        block = np.asarray(x[:, lo : lo + step], dtype=np.float64)
        mean = np.add.reduceat(block[order], starts, axis=0) / counts[:, None]
        centred = block - mean[group]
        var = np.add.reduceat(np.square(centred)[order], starts, axis=0) / counts[:, None]
        scale = np.where(single, 1.0, np.maximum(np.sqrt(var), std_floor))
        out[:, lo : lo + step] = centred / scale[group]
    return out


def check_speaker_norm(strategy: str, value: Any) -> bool | None:
    """``speaker_norm``: None (on when the pool has speaker ids), False (off), True (required)."""
    if value is not None and not isinstance(value, bool):
        raise ConfigError(
            f"parameter 'speaker_norm' of strategy {strategy!r} must be true, false or null "
            f"(null: on when the pool has speaker ids), got {value!r}"
        )
    return value


def distance_embeddings(pool: PoolView, speaker_norm: bool | None, strategy: str) -> np.ndarray:
    """The embeddings a distance-based strategy measures: speaker-z-scored or as stored.

    ``speaker_norm`` None: z-score per speaker (:func:`speaker_standardize`) when the pool has
    speaker ids and at least one speaker has two or more rows (ids that are all distinct, e.g.
    a corpus that fills the speaker with the utt_id, would map every row to zero and leave no
    geometry at all). False: the stored embeddings. True: z-score, and a pool without speaker ids
    is an error rather than a silent fall back to voice-dominated distances.
    """
    if speaker_norm is False:
        return pool.embeddings
    if pool.speakers is None:
        if speaker_norm:
            raise PoolError(
                f"strategy {strategy!r} has speaker_norm=true, but the pool has no speaker ids "
                "(PoolView.speakers is None: the manifest's speaker column is missing or empty). "
                "Give the corpus speaker ids, or set speaker_norm to null (normalise when ids "
                "exist) or false"
            )
        return pool.embeddings
    if speaker_norm is None and np.unique(pool.speakers).shape[0] == len(pool):
        return pool.embeddings
    return speaker_standardize(pool.embeddings, pool.speakers)


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
