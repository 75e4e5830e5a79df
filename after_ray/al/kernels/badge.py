"""BADGE k-means++ seeding on gradient embeddings that are never materialised.

BADGE (Ash et al., ICLR 2020) embeds item ``i`` as ``g_i = a_i (x) h_i`` with ``a_i = p_i -
onehot(argmax p_i)`` (``C`` values) and ``h_i`` the penultimate activations (``H`` values), and
picks a batch by k-means++ seeding on the ``g_i``. The ``C*H`` vectors are never formed here:

    ||g_i||^2       = ||a_i||^2 ||h_i||^2
    ||g_i - g_j||^2 = ||g_i||^2 + ||g_j||^2 - 2 (a_i . a_j)(h_i . h_j)

The seeding rule (what :func:`badge_kmeanspp` returns; :func:`~after_ray.al.kernels.reference.badge_kmeanspp_explicit`
reproduces it on materialised ``g`` for small inputs)
---------------------------------------------------------------------------------------
``U`` = candidate positions in increasing order (all rows when ``candidates`` is None),
``argmax p_i`` takes the first maximum, all arithmetic is float64.

1. The first center is the candidate with the largest ``||g_i||^2`` (tie: lowest position).
2. ``D2(i) = min over chosen centers c of ||g_i - g_c||^2`` (a chosen center has ``D2 = 0``);
   a distance below ``1e-12 * (||g_i||^2 + ||g_c||^2)`` counts as 0 (duplicates must give exactly
   0, and the factorised formula is only accurate to about 1e-16 of that scale).
3. Every further center is a D2-weighted draw made with an *exponential race*, which samples
   exactly ``P(i) = D2(i) / sum D2``: ``rng = np.random.default_rng(seed)`` is created once; for
   each pick after the first, ``u = rng.random(len(U))`` (one float64 per candidate, in the
   order of ``U``, picked or not) and the pick is ``argmin over U of -log(u_i) / D2(i)``
   (``D2 = 0`` or ``u = 0`` gives ``+inf``; tie: lowest position). If every key is ``+inf``
   (all remaining candidates coincide with a center), the pick is the lowest-position candidate
   not yet chosen.
4. ``k`` larger than ``|U|`` returns all of ``U``.

Why a race instead of ``rng.random()`` against a cumulative sum: the race lets almost every
``D2`` stay stale. ``D2`` only decreases, so a stale value is an upper bound and
``(1 - u_i) / D2_stale(i)`` is a lower bound of the key (``-log u >= 1 - u``); only the few
candidates whose lower bound can beat the best key are brought up to date (against the centers
they have not seen) and get their exact key. A pick costs one pass of cheap float64 vector
operations over ``U`` (draw, subtract, divide, argmin) instead of a pass over ``N x H``
activations. Memory: ``O(N (C + 4))`` float64 plus one ``chunk_rows x H`` chunk; nothing is
``O(N C H)``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np

__all__ = ["BadgeStats", "badge_kmeanspp"]


_ZERO_REL = 1e-12  # distances below this fraction of ||g_i||^2 + ||g_c||^2 are exact zeros
# Values per [rows x centers] temporary in a refresh block (512 kB of float64).
_BLOCK_VALUES = 65_536


class BadgeStats:
    """Work counters (refreshed rows, exact keys) for the benchmark."""

    def __init__(self) -> None:
        self.picks = 0
        self.refreshed_rows = 0
        self.refresh_pairs = 0
        self.exact_keys = 0
        self.setup_s = 0.0  # norms and the pass against the first center
        self.picks_s = 0.0


def _residual(probs: np.ndarray) -> np.ndarray:
    """a = p - onehot(argmax p) in float64 (first maximum on ties)."""
    a = np.asarray(probs, dtype=np.float64).copy()
    a[np.arange(len(a)), a.argmax(axis=1)] -= 1.0
    return a


def _check_inputs(probs, penultimate, candidates) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p = np.asarray(probs)
    h = np.asarray(penultimate)
    if p.ndim != 2 or h.ndim != 2 or len(p) != len(h):
        raise ValueError(
            f"probs [N, C] and penultimate [N, H] must share N; got {p.shape}, {h.shape}"
        )
    n = len(p)
    if candidates is None:
        cand = np.arange(n)
    else:
        mask = np.asarray(candidates, dtype=bool)
        if mask.shape != (n,):
            raise ValueError(f"candidates mask has shape {mask.shape}, expected ({n},)")
        cand = np.flatnonzero(mask)
    return p, h, cand


def badge_kmeanspp(
    probs: np.ndarray,
    penultimate: np.ndarray,
    k: int,
    *,
    seed: int = 0,
    candidates: np.ndarray | None = None,
    chunk_rows: int = 8192,
    stats: BadgeStats | None = None,
) -> np.ndarray:
    """BADGE seeding (positions in pick order) by the rule in the module docstring."""
    p, h, cand = _check_inputs(probs, penultimate, candidates)
    m = len(cand)
    k = min(int(k), m)
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    st = stats if stats is not None else BadgeStats()
    t_start = time.perf_counter()
    seeding = _Seeding(p, h, cand, k, chunk_rows, st)

    rng = np.random.default_rng(seed)
    t_loop = time.perf_counter()
    st.setup_s = t_loop - t_start
    # Per-pick work over all m candidates reuses these buffers: allocating three m-sized
    # arrays per pick cost more in page faults than the arithmetic.
    u = np.empty(m, dtype=np.float64)
    lb = np.empty(m, dtype=np.float64)
    below = np.empty(m, dtype=bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        for j in range(1, k):
            rng.random(out=u)  # the same draws as rng.random(m)
            i = _race_winner(seeding, j, u, lb, below)
            seeding.add_center(j, i)
            seeding.d2[i] = 0.0
            seeding.ep[i] = j + 1
            st.picks += 1
    st.picks_s = time.perf_counter() - t_loop
    return seeding.picks


def _h_blocks(
    h: np.ndarray, cand: np.ndarray, full: bool, chunk_rows: int
) -> Iterator[tuple[int, np.ndarray]]:
    """(start, float64 activations of candidates start..start+chunk_rows), in order: a pass
    over the activations that holds one chunk at a time, never all of ``h`` in float64."""
    m = len(cand)
    for s in range(0, m, chunk_rows):
        e = min(m, s + chunk_rows)
        yield s, np.asarray(h[s:e] if full else h[cand[s:e]], np.float64)


class _Seeding:
    """k-means++ state on factored gradient embeddings.

    Candidate ``i`` (a position in ``cand``) has its residual ``a[i]`` and ``gn[i] = ||g_i||^2``;
    centers are kept as factors (``c_a``, ``c_h``, ``c_g``). ``d2[i]`` is exact against centers
    ``0..ep[i]-1`` only, an upper bound of the true D2 (see the module docstring).
    Construction picks the first center and makes every ``d2`` exact against it.
    """

    def __init__(
        self,
        p: np.ndarray,
        h: np.ndarray,
        cand: np.ndarray,
        k: int,
        chunk_rows: int,
        stats: BadgeStats,
    ) -> None:
        m = len(cand)
        self.h, self.cand, self.stats = h, cand, stats
        full = m == len(p)
        self.a = _residual(p if full else p[cand])  # [m, C]
        hn = np.empty(m, dtype=np.float64)
        for s, blk in _h_blocks(h, cand, full, chunk_rows):
            hn[s : s + len(blk)] = np.einsum("ij,ij->i", blk, blk)
        self.gn = np.einsum("ij,ij->i", self.a, self.a) * hn  # ||g||^2

        # Centers as factors: a (C), h (H, float64), ||g||^2.
        self.c_a = np.empty((k, self.a.shape[1]), dtype=np.float64)
        self.c_h = np.empty((k, h.shape[1]), dtype=np.float64)
        self.c_g = np.empty(k, dtype=np.float64)
        self.picks = np.empty(k, dtype=np.int64)
        self.chosen = np.zeros(m, dtype=bool)

        first = int(np.argmax(self.gn))
        self.add_center(0, first)
        # Exact D2 to the first center: one pass over the activations.
        self.d2 = np.empty(m, dtype=np.float64)
        aa0 = self.a @ self.c_a[0]
        for s, blk in _h_blocks(h, cand, full, chunk_rows):
            e = s + len(blk)
            self.d2[s:e] = self.gn[s:e] + self.c_g[0] - 2.0 * aa0[s:e] * (blk @ self.c_h[0])
        self.d2[self.d2 < _ZERO_REL * (self.gn + self.c_g[0])] = 0.0
        self.d2[first] = 0.0
        self.ep = np.ones(m, dtype=np.int32)  # centers already folded into d2
        stats.picks = 1

    def h_rows(self, idx: np.ndarray) -> np.ndarray:
        return np.asarray(self.h[self.cand[idx]], dtype=np.float64)

    def add_center(self, j: int, i: int) -> None:
        self.picks[j] = self.cand[i]
        self.chosen[i] = True
        self.c_a[j] = self.a[i]
        self.c_h[j] = self.h_rows(np.array([i]))[0]
        self.c_g[j] = self.gn[i]

    def refresh(self, idx: np.ndarray, j: int) -> None:
        """Exact d2 for rows idx against centers ep[idx]..j-1.

        In blocks of rows whose [rows x centers] temporaries stay a few MB: larger ones are
        fresh mmap'd memory every time, and their page faults cost more than the arithmetic."""
        ep, d2 = self.ep, self.d2
        stale = idx[ep[idx] < j]
        if not len(stale):
            return
        lo = int(ep[stale].min())
        block = max(1, _BLOCK_VALUES // (j - lo))
        for s in range(0, len(stale), block):
            rows = stale[s : s + block]
            dist = (self.h_rows(rows) @ self.c_h[lo:j].T) * (self.a[rows] @ self.c_a[lo:j].T)
            dist *= -2.0
            scale = self.gn[rows][:, None] + self.c_g[lo:j][None, :]
            dist += scale
            dist[dist < _ZERO_REL * scale] = 0.0
            d2[rows] = np.minimum(d2[rows], dist.min(axis=1))
        ep[stale] = j
        self.stats.refreshed_rows += len(stale)
        self.stats.refresh_pairs += len(stale) * (j - lo)


def _race_winner(
    seeding: _Seeding, j: int, u: np.ndarray, lb: np.ndarray, below: np.ndarray
) -> int:
    """Position of center ``j``: the argmin over candidates of ``-log(u) / D2``.

    Only candidates whose lower bound ``(1 - u) / d2`` can beat the best exact key so far are
    refreshed and get their exact key; ``lb`` and ``below`` are scratch buffers of length m.
    """
    d2 = seeding.d2
    # lb <= -log(u) / d2_exact because -log(u) >= 1 - u and d2 >= d2_exact; chosen rows
    # (d2 == 0) and exact duplicates of centers get +inf.
    np.subtract(1.0, u, out=lb)
    np.divide(lb, d2, out=lb)
    while True:
        i = int(np.argmin(lb))
        if not np.isfinite(lb[i]):
            # Every candidate left has d2 == 0 (stale values are upper bounds).
            return int(np.argmin(seeding.chosen))
        seeding.refresh(np.array([i]), j)
        key_i = -np.log(u[i]) / d2[i] if d2[i] > 0 else np.inf
        lb[i] = key_i
        if not np.isfinite(key_i):
            continue  # it coincides with a center; look again
        rivals = np.flatnonzero(np.less_equal(lb, key_i, out=below))  # sorted; has i
        if len(rivals) == 1:
            return i
        seeding.refresh(rivals, j)
        keys = -np.log(u[rivals]) / d2[rivals]
        keys[d2[rivals] <= 0] = np.inf
        lb[rivals] = keys
        seeding.stats.exact_keys += len(rivals)
        w = int(np.argmin(keys))  # ties: the lowest position, as in the reference
        return int(rivals[w])  # keys[w] <= key_i is finite
