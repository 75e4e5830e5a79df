"""Reference kernels: the textbook versions our fast kernels are held to, and benchmarked against.

- :func:`kcenter_greedy_naive`: incremental k-center greedy, one float32 pass over every
  candidate per pick (the same rule as ``kcenter.kcenter_greedy``).
- :func:`gradient_embedding` / :func:`badge_kmeanspp_explicit`: BADGE's k-means++ seeding on
  materialised gradient embeddings (the same rule as ``badge.badge_kmeanspp``).

Not used by any strategy: tests compare against them and ``after-ray bench select`` times them.
"""

from __future__ import annotations

import numpy as np

from after_ray.al.kernels.badge import _ZERO_REL, _check_inputs, _residual
from after_ray.al.kernels.kcenter import _sqnorms, as_positions, candidate_positions


def kcenter_greedy_naive(
    embeddings: np.ndarray,
    labeled: np.ndarray,
    k: int,
    *,
    candidates: np.ndarray | None = None,
    chunk_rows: int = 65536,
    timings: dict | None = None,
) -> np.ndarray:
    """The textbook incremental greedy: one float32 pass over every candidate per pick.

    Same rule as :func:`kcenter_greedy` (float32 arithmetic, ``np.argmax`` ties), O(N D) per pick.
    Used as the baseline in ``after_ray.bench.select``; it keeps a float32 norm vector and reads
    the stored matrix directly, so its memory is the matrix plus O(N). ``timings`` (a dict) gets
    ``setup_s`` (norms, labeled minimum, first pick) and ``picks_s`` / ``timed_picks`` (the rest).
    """
    import time

    t0 = time.perf_counter()
    x = np.asarray(embeddings)
    n = x.shape[0]
    lab = as_positions(labeled, n)
    cand_pos = candidate_positions(n, lab, candidates)
    k = min(int(k), len(cand_pos))
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    full = len(cand_pos) == n

    def rows(s: int, e: int) -> np.ndarray:
        blk = x[s:e] if full else x[cand_pos[s:e]]
        return blk if blk.dtype == np.float32 else blk.astype(np.float32)

    m = len(cand_pos)
    norms = np.empty(m, dtype=np.float32)
    for s in range(0, m, chunk_rows):
        norms[s : s + chunk_rows] = _sqnorms(rows(s, min(m, s + chunk_rows)))

    def dist_to(c: np.ndarray) -> np.ndarray:
        c = c.astype(np.float32)
        out = np.empty(m, dtype=np.float32)
        cn = np.float32(c @ c)
        for s in range(0, m, chunk_rows):
            e = min(m, s + chunk_rows)
            out[s:e] = norms[s:e] + cn - 2.0 * (rows(s, e) @ c)
        return np.maximum(out, 0.0, out=out)

    d2 = np.full(m, np.inf, dtype=np.float32)
    # Minimum over the labeled rows with chunked GEMMs (what pairwise_distances_chunked does).
    for ls in range(0, len(lab), 4096):
        lrows = x[lab[ls : ls + 4096]].astype(np.float32)
        ln = _sqnorms(lrows)
        for s in range(0, m, 8192):
            e = min(m, s + 8192)
            dist = norms[s:e, None] + ln[None, :] - 2.0 * (rows(s, e) @ lrows.T)
            np.minimum(d2[s:e], np.maximum(dist.min(axis=1), 0.0), out=d2[s:e])
    picks = np.empty(k, dtype=np.int64)
    i = 0
    if not len(lab):
        mean = np.zeros(x.shape[1], dtype=np.float64)
        for s in range(0, m, chunk_rows):
            mean += rows(s, min(m, s + chunk_rows)).sum(axis=0, dtype=np.float64)
        mean /= m
        first = int(np.argmin(dist_to(mean)))
        picks[0] = cand_pos[first]
        d2 = dist_to(x[cand_pos[first]])
        d2[first] = -np.inf
        i = 1
    t1 = time.perf_counter()
    first_timed = i
    while i < k:
        b = int(np.argmax(d2))
        picks[i] = cand_pos[b]
        np.minimum(d2, dist_to(x[cand_pos[b]]), out=d2)
        d2[b] = -np.inf
        i += 1
    if timings is not None:
        timings["setup_s"] = t1 - t0
        timings["picks_s"] = time.perf_counter() - t1
        timings["timed_picks"] = k - first_timed
    return picks


def gradient_embedding(probs: np.ndarray, penultimate: np.ndarray) -> np.ndarray:
    """The explicit ``[N, C*H]`` float64 BADGE embedding (small inputs and tests only)."""
    a = _residual(probs)
    h = np.asarray(penultimate, dtype=np.float64)
    return (a[:, :, None] * h[:, None, :]).reshape(len(a), -1)


def badge_kmeanspp_explicit(
    probs: np.ndarray,
    penultimate: np.ndarray,
    k: int,
    *,
    seed: int = 0,
    candidates: np.ndarray | None = None,
    g: np.ndarray | None = None,
    method: str = "float64",
) -> np.ndarray:
    """Reference: the same rule on materialised gradient embeddings, O(N C H) memory and time
    per pick. ``g`` may be passed precomputed (float32 or float64).

    ``method="float64"`` (tests): distances as float64 sums of squared differences, the rule
    exactly. ``method="gemv"`` (the benchmark's speed baseline, how explicit BADGE code computes
    them): ``|g|^2 + |g_c|^2 - 2 g.g_c`` in float32 with one matrix-vector product per pick; it
    may resolve float32 near-ties differently.
    """
    if method not in ("float64", "gemv"):
        raise ValueError(f"method must be 'float64' or 'gemv', got {method!r}")
    p, h, cand = _check_inputs(probs, penultimate, candidates)
    m = len(cand)
    k = min(int(k), m)
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    if g is None:
        g = gradient_embedding(p[cand], h[cand])
    gn = np.einsum("ij,ij->i", g, g, dtype=np.float64)
    first = int(np.argmax(gn))
    picks = [first]
    chosen = np.zeros(m, dtype=bool)
    chosen[first] = True
    gn32 = gn.astype(np.float32)

    def dist_to(c: int) -> np.ndarray:
        if method == "gemv":
            out = (gn32 + gn32[c] - 2.0 * (g @ g[c])).astype(np.float64)
        else:
            diff = g - g[c]
            out = np.einsum("ij,ij->i", diff, diff, dtype=np.float64)
        out[out < _ZERO_REL * (gn + gn[c])] = 0.0
        return out

    d2 = dist_to(first)
    rng = np.random.default_rng(seed)
    with np.errstate(divide="ignore"):
        for _ in range(1, k):
            u = rng.random(m)
            keys = -np.log(u) / d2
            keys[(d2 <= 0) | chosen] = np.inf
            i = int(np.argmin(keys)) if np.isfinite(keys.min()) else int(np.argmin(chosen))
            picks.append(i)
            chosen[i] = True
            np.minimum(d2, dist_to(i), out=d2)
    return cand[np.asarray(picks, dtype=np.int64)]
