"""FAISS k-means, chunked assignment and PCA for pools of millions of embeddings.

- :func:`kmeans` trains on a seeded sample (FAISS itself would subsample at 256 points per
  centroid with its own generator; sampling here makes the sample explicit and reproducible;
  the default is 128 per centroid),
  then assigns *every* row to its nearest centroid in chunks, so memory stays at the matrix plus
  one chunk.
- :func:`cluster_assign` is that chunked assignment on its own (Cluster-Margin and TypiClust
  reuse a clustering across rounds and only need to assign new rows).
- :func:`closest_to_centroids` gives, per cluster, the member nearest to its centroid (the
  AFTER cold start labels those first).
- :func:`reduce_dims` is a FAISS ``PCAMatrix`` (optionally whitening) trained on a seeded sample
  and applied in chunks.

Determinism: the same input, arguments and seed give the same centroids and assignment (FAISS
k-means is deterministic for a given seed and thread count; ties in the assignment go to the
lowest centroid id).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "PCAReducer",
    "closest_to_centroids",
    "cluster_assign",
    "kmeans",
    "reduce_dims",
    "sample_rows",
]

_DEFAULT_CHUNK = 65536
_POINTS_PER_CENTROID = 128  # default training sample per centroid (FAISS: 39 to 256)
# Whitening leaves components with less spread than this fraction of the largest unscaled.
_WHITEN_FLOOR = 1e-6


def _as_float32(block: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(block, dtype=np.float32)


def sample_rows(n: int, sample: int | None, seed: int) -> np.ndarray | None:
    """Sorted positions of a seeded sample of ``sample`` rows, or None when that is all rows."""
    if sample is None or sample >= n:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=int(sample), replace=False))


def _gather(x: np.ndarray, rows: np.ndarray | None, chunk_rows: int) -> np.ndarray:
    """float32 copy of rows (all rows when None), converted chunk by chunk."""
    n = x.shape[0] if rows is None else len(rows)
    out = np.empty((n, x.shape[1]), dtype=np.float32)
    for s in range(0, n, chunk_rows):
        e = min(n, s + chunk_rows)
        out[s:e] = x[s:e] if rows is None else x[rows[s:e]]
    return out


def cluster_assign(
    x: np.ndarray,
    centroids: np.ndarray,
    *,
    spherical: bool = False,
    chunk_rows: int = _DEFAULT_CHUNK,
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every row: ``(assignment [N] int64, distance [N] float32)``.

    Squared L2 distance (``spherical=True``: largest inner product, and ``distance`` is that
    inner product). Exact (FAISS flat index), chunk by chunk, any float dtype in.
    """
    import faiss

    cen = _as_float32(centroids)
    index = faiss.IndexFlatIP(cen.shape[1]) if spherical else faiss.IndexFlatL2(cen.shape[1])
    index.add(cen)
    n = x.shape[0]
    assignment = np.empty(n, dtype=np.int64)
    distance = np.empty(n, dtype=np.float32)
    for s in range(0, n, chunk_rows):
        e = min(n, s + chunk_rows)
        dist, idx = index.search(_as_float32(x[s:e]), 1)
        assignment[s:e] = idx[:, 0]
        distance[s:e] = dist[:, 0]
    return assignment, distance


def kmeans(
    x: np.ndarray,
    n_clusters: int,
    *,
    seed: int,
    niter: int = 20,
    sample: int | None = None,
    spherical: bool = False,
    chunk_rows: int = _DEFAULT_CHUNK,
) -> tuple[np.ndarray, np.ndarray]:
    """FAISS k-means: ``(centroids [K, D] float32, assignment [N] int64)``.

    ``sample``: train on this many seeded rows (default: ``128 * n_clusters`` when the pool is
    larger: half FAISS's own cap of 256 per centroid, which halves the training cost at scale,
    and never below the 39 per centroid FAISS asks for); every row is then assigned to its
    nearest trained centroid. ``spherical``: centroids are L2-normalised
    and rows go to the largest inner product (normalise ``x`` first for cosine k-means).
    """
    import faiss

    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"kmeans expects [N, D]; got shape {x.shape}")
    n, d = x.shape
    n_clusters = int(n_clusters)
    if not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters must lie in [1, {n}] for {n} rows; got {n_clusters}")
    if sample is None:
        sample = _POINTS_PER_CENTROID * n_clusters
    sample = max(int(sample), min(n, 39 * n_clusters), n_clusters)
    rows = sample_rows(n, sample, seed)
    train = _gather(x, rows, chunk_rows)
    km = faiss.Kmeans(
        d,
        n_clusters,
        niter=int(niter),
        seed=int(seed) % 2**31,
        spherical=bool(spherical),
        max_points_per_centroid=max(256, -(-len(train) // n_clusters)),  # no resampling inside
        min_points_per_centroid=1,
        verbose=False,
    )
    km.train(train)
    centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
    del train
    assignment, _ = cluster_assign(x, centroids, spherical=spherical, chunk_rows=chunk_rows)
    return centroids, assignment


def closest_to_centroids(
    x: np.ndarray,
    centroids: np.ndarray,
    assignment: np.ndarray,
    *,
    chunk_rows: int = _DEFAULT_CHUNK,
) -> np.ndarray:
    """Per cluster, the position of its member nearest to the centroid (-1 for an empty one).

    Squared L2 in float32; ties go to the lowest position.
    """
    cen = _as_float32(centroids)
    assignment = np.asarray(assignment, dtype=np.int64)
    n_clusters = cen.shape[0]
    best_d = np.full(n_clusters, np.inf, dtype=np.float64)
    best_i = np.full(n_clusters, -1, dtype=np.int64)
    for s in range(0, x.shape[0], chunk_rows):
        e = min(x.shape[0], s + chunk_rows)
        blk = _as_float32(x[s:e])
        lab = assignment[s:e]
        diff = blk - cen[lab]
        dist = np.einsum("ij,ij->i", diff, diff).astype(np.float64)
        # Lowest distance per cluster inside the chunk, lowest position on ties.
        order = np.lexsort((np.arange(len(lab)), dist, lab))
        first = np.ones(len(order), dtype=bool)
        first[1:] = lab[order][1:] != lab[order][:-1]
        cl, pos, dv = lab[order][first], order[first] + s, dist[order][first]
        better = dv < best_d[cl]  # strict: an earlier chunk keeps a tie (lower position)
        best_d[cl[better]] = dv[better]
        best_i[cl[better]] = pos[better]
    return best_i


@dataclass
class PCAReducer:
    """A trained FAISS PCA (``faiss.PCAMatrix``) that maps ``[N, D_in]`` to ``[N, D_out]``."""

    matrix: object  # faiss.PCAMatrix
    d_in: int
    d_out: int
    scale: np.ndarray | None = None  # per-component factor that gives unit variance (whitening)

    def apply(self, x: np.ndarray, *, chunk_rows: int = _DEFAULT_CHUNK) -> np.ndarray:
        """float32 ``[N, d_out]`` projection, computed chunk by chunk."""
        n = x.shape[0]
        out = np.empty((n, self.d_out), dtype=np.float32)
        for s in range(0, n, chunk_rows):
            e = min(n, s + chunk_rows)
            out[s:e] = self.matrix.apply_py(_as_float32(x[s:e]))
            if self.scale is not None:
                out[s:e] *= self.scale
        return out


def reduce_dims(
    x: np.ndarray,
    pca_dim: int,
    *,
    whiten: bool = False,
    seed: int = 0,
    sample: int | None = 100_000,
    chunk_rows: int = _DEFAULT_CHUNK,
) -> tuple[np.ndarray, PCAReducer]:
    """PCA to ``pca_dim`` dimensions (``whiten``: unit variance per component).

    Trained on a seeded sample of ``sample`` rows (all rows when None or when the pool is
    smaller). Returns ``(reduced [N, pca_dim] float32, reducer)``; ``reducer.apply`` maps new rows.
    """
    import faiss

    x = np.asarray(x)
    n, d = x.shape
    pca_dim = int(pca_dim)
    if not 1 <= pca_dim <= d:
        raise ValueError(f"pca_dim must lie in [1, {d}]; got {pca_dim}")
    rows = sample_rows(n, sample, seed)
    train = _gather(x, rows, chunk_rows)
    # Plain PCA; whitening is the rescale below. (FAISS's own whitening, eigen power -1/2,
    # divides by sqrt(eigenvalue): a zero-variance component, when pca_dim exceeds the rank of
    # the data, came out as NaN in every row.)
    mat = faiss.PCAMatrix(d, pca_dim, 0.0, False)
    mat.train(train)
    reducer = PCAReducer(mat, d, pca_dim)
    if whiten:
        # Unit variance per component on the training sample. A component whose spread is
        # float32 rounding noise (below 1e-6 of the largest) carries no direction: left as is.
        std = reducer.apply(train, chunk_rows=chunk_rows).std(axis=0, dtype=np.float64)
        floor = _WHITEN_FLOOR * float(std.max())
        reducer.scale = np.where(std > floor, 1.0 / np.maximum(std, 1e-30), 1.0).astype(np.float32)
    del train
    return reducer.apply(x, chunk_rows=chunk_rows), reducer
