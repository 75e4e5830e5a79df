"""k-center greedy over a pool split into shards held by Ray actors.

Each actor owns a contiguous range of rows (from an in-memory matrix put in the object store, or
read by the actor itself from embedding shard files) and one
:class:`after_ray.al.kernels.kcenter.LazyKCenter` over its candidates.

``mode="exact"``: the picks of :func:`after_ray.al.kernels.kcenter.kcenter_greedy` on the whole pool.
Every round each actor first applies the previous pick (its vector is broadcast) to its own
bounds, then proposes its farthest candidate with the float64 value of the rule (so proposals of
different shards compare exactly); the driver takes the largest value, a tie to the lowest global
position (the first pick without labeled rows: the smallest distance to the global candidate mean).
One round trip to all actors per pick: k picks cost k round trips, so this mode suits k up to
about 10^4 on a local cluster; beyond that use ``two_round``.

``mode="two_round"`` (composable coreset; Malkomes et al., NeurIPS 2015): each actor runs the
greedy for ``k`` picks on its shard (labeled rows count as centers everywhere), then the driver
runs the greedy for ``k`` picks over the union of the ``shards * k`` local picks. The result is a
**4-approximation** of the optimal k-center radius (the largest distance from a candidate to the
labeled rows and picks), against 2 for the exact greedy: every local greedy covers its shard within
2 r* (Gonzalez's argument with the global optimal balls), and the second greedy covers the union
within 2 r*, so every row is within 4 r* of a pick. The picks generally differ from the exact ones;
only two rounds of communication are needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from after_ray.al.kernels.kcenter import LazyKCenter, RowSource, as_positions, kcenter_greedy

__all__ = ["KCenterShard", "sharded_kcenter_greedy", "split_rows"]


def split_rows(n: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous ``(start, stop)`` row ranges of near-equal size covering ``n`` rows."""
    shards = max(1, min(int(shards), max(n, 1)))
    bounds = np.linspace(0, n, shards + 1).round().astype(int)
    return [(int(bounds[i]), int(bounds[i + 1])) for i in range(shards)]


class KCenterShard:
    """One shard of the pool and its k-center state (wrapped as a Ray actor by the driver)."""

    def __init__(self, source, *, dtype: str = "float32"):
        """``source``: a ``[rows, D]`` array (an object-store ref resolves to one) or a list
        of embedding shard files read with :func:`after_ray.store.embedding_store.read_embeddings`."""
        if isinstance(source, np.ndarray):
            self.x = source
        else:
            from after_ray.store.embedding_store import read_embeddings

            _, self.x = read_embeddings(list(source), dtype=dtype)
        self.n = self.x.shape[0]
        self.state: LazyKCenter | None = None

    def num_rows(self) -> int:
        return self.n

    def rows(self, local_positions: np.ndarray) -> np.ndarray:
        return np.asarray(self.x[np.asarray(local_positions, dtype=np.int64)])

    def configure(
        self,
        offset: int,
        cand_mask: np.ndarray | None,
        labeled_local: np.ndarray,
        capacity: int,
        hot_size: int,
        chunk_rows: int,
    ) -> tuple[np.ndarray, int]:
        """Create the state over this shard's candidates; returns their float64 sum and count."""
        mask = np.ones(self.n, dtype=bool) if cand_mask is None else np.asarray(cand_mask, bool)
        mask = mask.copy()
        mask[np.asarray(labeled_local, dtype=np.int64)] = False
        self.offset = int(offset)
        self.cand = np.flatnonzero(mask)
        source = RowSource(self.x, None if len(self.cand) == self.n else self.cand)
        self.state = LazyKCenter(
            source, capacity=max(1, capacity), chunk_rows=chunk_rows, hot_size=hot_size
        )
        return self.state.mu64 * len(self.cand), len(self.cand)

    def setup(self, labeled_rows: np.ndarray | None, center_mean: np.ndarray | None) -> bool:
        lab = None if labeled_rows is None or not len(labeled_rows) else RowSource(labeled_rows)
        self.state.setup(lab, center_mean)
        return True

    def step(self, center: np.ndarray | None, local_idx: int | None):
        """Apply the previous pick (if any), then propose ``(value, global position, row,
        local index)`` of this shard's best candidate, or None when it has none left."""
        st = self.state
        if center is not None:
            st.commit(center, local_idx)
        if st.n == 0 or st.stats.picks >= st.n:
            return None
        prop = st.propose(need_value=True)
        if prop is None:
            return None
        value, local = prop
        pos = int(self.cand[local])
        return float(value), self.offset + pos, np.asarray(self.x[pos]), int(local)

    def local_greedy(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Greedy on this shard alone: ``(global positions, rows)`` of up to k picks."""
        st = self.state
        picks = []
        for _ in range(min(k, st.n)):
            prop = st.propose()
            if prop is None:
                break
            local = prop[1]
            pos = int(self.cand[local])
            st.commit(self.x[pos], local)
            picks.append(pos)
        picks = np.asarray(picks, dtype=np.int64)
        return picks + self.offset, np.asarray(self.x[picks])


def sharded_kcenter_greedy(
    embeddings: np.ndarray | None,
    labeled: np.ndarray,
    k: int,
    *,
    candidates: np.ndarray | None = None,
    shards: int = 2,
    mode: str = "exact",
    shard_files: Sequence[Sequence[str]] | None = None,
    num_cpus_per_shard: float = 1.0,
    hot_size: int = 4096,
    chunk_rows: int = 16384,
    dtype: str = "float32",
) -> np.ndarray:
    """k-center greedy picks (global positions, in pick order) computed by Ray actors.

    Either ``embeddings`` (split into ``shards`` contiguous ranges, each put in the object
    store) or ``shard_files`` (one list of embedding shard files per actor; global positions
    follow that order). Ray must already be initialised (``after_ray.distributed.session``).
    See the module docstring for ``mode``.
    """
    import ray

    if mode not in ("exact", "two_round"):
        raise ValueError(f"mode must be 'exact' or 'two_round', got {mode!r}")
    actor_cls = ray.remote(num_cpus=num_cpus_per_shard)(KCenterShard)
    if shard_files is not None:
        actors = [actor_cls.remote(list(files), dtype=dtype) for files in shard_files]
    else:
        x = np.asarray(embeddings)
        ranges = split_rows(x.shape[0], shards)
        actors = [actor_cls.remote(ray.put(np.ascontiguousarray(x[a:b]))) for a, b in ranges]
    try:
        sizes = ray.get([a.num_rows.remote() for a in actors])
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        n = int(offsets[-1])
        lab = as_positions(labeled, n)
        cand_mask = None if candidates is None else np.asarray(candidates, dtype=bool)
        if cand_mask is not None and cand_mask.shape != (n,):
            raise ValueError(f"candidates mask has shape {cand_mask.shape}, expected ({n},)")
        k = int(k)
        sums = ray.get(
            [
                a.configure.remote(
                    int(offsets[s]),
                    None if cand_mask is None else cand_mask[offsets[s] : offsets[s + 1]],
                    lab[(lab >= offsets[s]) & (lab < offsets[s + 1])] - offsets[s],
                    k,
                    hot_size,
                    chunk_rows,
                )
                for s, a in enumerate(actors)
            ]
        )
        n_cand = sum(c for _, c in sums)
        k = min(k, n_cand)
        if k <= 0:
            return np.empty(0, dtype=np.int64)
        center_mean = sum(t for t, _ in sums) / n_cand
        # Labeled rows, gathered from their owners, broadcast to every shard.
        lab_rows = None
        if len(lab):
            owner = np.searchsorted(offsets, lab, side="right") - 1
            parts = ray.get(
                [a.rows.remote(lab[owner == s] - offsets[s]) for s, a in enumerate(actors)]
            )
            lab_rows = np.concatenate(parts)  # in increasing position order, like `lab`
        lab_ref = ray.put(lab_rows)
        ray.get([a.setup.remote(lab_ref, center_mean) for a in actors])
        if mode == "two_round":
            return _two_round(actors, lab_rows, k, chunk_rows, hot_size)
        return _exact(actors, k, first_by_mean=not len(lab))
    finally:
        for a in actors:
            ray.kill(a)


def _exact(actors, k: int, *, first_by_mean: bool) -> np.ndarray:
    import ray

    picks = np.empty(k, dtype=np.int64)
    props = ray.get([a.step.remote(None, None) for a in actors])
    for j in range(k):
        live = [(p, s) for s, p in enumerate(props) if p is not None]
        if not live:
            return picks[:j]
        if j == 0 and first_by_mean:
            (value, pos, row, local), owner = min(live, key=lambda t: (t[0][0], t[0][1]))
        else:
            (value, pos, row, local), owner = min(live, key=lambda t: (-t[0][0], t[0][1]))
        picks[j] = pos
        if j + 1 == k:
            break
        props = ray.get(
            [a.step.remote(row, local if s == owner else None) for s, a in enumerate(actors)]
        )
    return picks


def _two_round(actors, lab_rows, k: int, chunk_rows: int, hot_size: int) -> np.ndarray:
    import ray

    results = ray.get([a.local_greedy.remote(k) for a in actors])
    union_pos = np.concatenate([r[0] for r in results])
    union_rows = np.concatenate([r[1] for r in results])
    n_lab = 0 if lab_rows is None else len(lab_rows)
    mat = (
        union_rows if not n_lab else np.concatenate([lab_rows.astype(union_rows.dtype), union_rows])
    )
    sel = kcenter_greedy(mat, np.arange(n_lab), k, chunk_rows=chunk_rows, hot_size=hot_size)
    return union_pos[sel - n_lab]
