"""FAISS k-means / assignment / PCA helpers and the out-of-core embedding store."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from after_ray.al.kernels.clustering import (
    closest_to_centroids,
    cluster_assign,
    kmeans,
    reduce_dims,
)
from after_ray.store.embedding_store import (
    EmbeddingStoreError,
    read_embeddings,
    write_embedding_shards,
)


def _blobs(n=6000, d=16, k=8, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d)) * 6
    return (centers[rng.integers(0, k, n)] + rng.standard_normal((n, d))).astype(np.float32)


def _sq_dists(x, c):
    return ((x.astype(np.float64)[:, None, :] - c.astype(np.float64)[None]) ** 2).sum(-1)


def test_kmeans_is_deterministic_and_assigns_every_row_to_its_nearest_centroid():
    x = _blobs()
    c1, a1 = kmeans(x, 8, seed=3, sample=1500, chunk_rows=1000)  # most rows outside the sample
    c2, a2 = kmeans(x, 8, seed=3, sample=1500, chunk_rows=1000)
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_array_equal(a1, a2)
    c3, _ = kmeans(x, 8, seed=4, sample=1500)
    assert not np.array_equal(c1, c3)
    assert c1.dtype == np.float32 and c1.shape == (8, 16) and a1.dtype == np.int64
    dist = _sq_dists(x, c1)
    np.testing.assert_allclose(dist[np.arange(len(x)), a1], dist.min(1), rtol=1e-5, atol=1e-4)
    # The blobs are well separated: every centroid got a blob.
    assert len(np.unique(a1)) == 8


def test_spherical_assign_and_errors():
    x = _blobs(2000, 8, 4, 1)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    c, a = kmeans(xn, 4, seed=0, spherical=True)
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(a, np.argmax(xn @ c.T, axis=1))
    a_small, d_small = cluster_assign(x, c, chunk_rows=128)
    a_big, d_big = cluster_assign(x, c)
    np.testing.assert_array_equal(a_small, a_big)
    np.testing.assert_array_equal(d_small, d_big)
    with pytest.raises(ValueError):
        kmeans(x[:3], 4, seed=0)


def test_closest_to_centroids_matches_brute_force():
    x = _blobs(3000, 8, 5, 2)
    c, a = kmeans(x, 5, seed=1)
    got = closest_to_centroids(x, c, a, chunk_rows=700)
    dist = _sq_dists(x, c)[np.arange(len(x)), a]
    for g in range(5):
        members = np.flatnonzero(a == g)
        assert got[g] == members[np.argmin(dist[members])]


def test_reduce_dims_pca_and_whitening():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((4000, 12)) * np.arange(1, 13)).astype(np.float32)
    red, reducer = reduce_dims(x, 4, seed=0, sample=2000)
    assert red.shape == (4000, 4) and red.dtype == np.float32
    np.testing.assert_allclose(reducer.apply(x[:50]), red[:50], rtol=1e-5, atol=1e-5)
    # PCA keeps the largest-variance directions: the top component has the largest variance.
    var = red.var(0)
    assert var[0] == pytest.approx(var.max()) and var[0] > 100
    white, _ = reduce_dims(x, 4, whiten=True, seed=0, sample=None)
    np.testing.assert_allclose(white.std(0), 1.0, rtol=1e-3)


@pytest.mark.parametrize("fmt", ["parquet", "npy"])
def test_embedding_store_round_trip(tmp_path, fmt):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2500, 12)).astype(np.float32)
    ids = np.array([f"c/{i:05d}" for i in rng.permutation(2500)])
    write_embedding_shards(ids, x, tmp_path, 700, fmt=fmt)
    got_ids, mat = read_embeddings(tmp_path, batch_rows=300)
    np.testing.assert_array_equal(got_ids.astype(str), ids)
    np.testing.assert_array_equal(mat, x)
    got_ids, mat16 = read_embeddings(tmp_path, dtype="float16", sort_by_id=True)
    order = np.argsort(ids)
    np.testing.assert_array_equal(got_ids.astype(str), ids[order])
    np.testing.assert_array_equal(mat16, x[order].astype(np.float16))
    _, mat_o = read_embeddings(tmp_path, order=ids[::-1])
    np.testing.assert_array_equal(mat_o, x[::-1])


def test_embedding_store_reads_lists_and_tensor_columns_and_rejects_bad_input(tmp_path):
    x = np.arange(60, dtype=np.float32).reshape(10, 6)
    ids = [f"u{i}" for i in range(10)]
    pq.write_table(
        pa.table({"utt_id": ids, "embedding": pa.array(list(x), pa.list_(pa.float32()))}),
        tmp_path / "a.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "utt_id": [f"v{i}" for i in range(10)],
                "embedding": pa.FixedShapeTensorArray.from_numpy_ndarray(x + 100),
            }
        ),
        tmp_path / "b.parquet",
    )
    got_ids, mat = read_embeddings(tmp_path)
    np.testing.assert_array_equal(mat, np.concatenate([x, x + 100]))
    assert list(got_ids[:2]) == ["u0", "u1"]
    with pytest.raises(EmbeddingStoreError):
        read_embeddings(tmp_path / "missing")
    bad = tmp_path / "bad"
    write_embedding_shards(ids, x, bad, 5)
    write_embedding_shards(ids, x[:, :4], bad / "sub", 5)
    (bad / "sub" / "part-00000.parquet").rename(bad / "part-00009.parquet")
    with pytest.raises(EmbeddingStoreError, match="dimension"):
        read_embeddings(bad)
    dup = tmp_path / "dup"
    write_embedding_shards(["a", "a", "b"], x[:3], dup, 2)
    with pytest.raises(EmbeddingStoreError, match="duplicate"):
        read_embeddings(dup, sort_by_id=True)


def test_embedding_store_memory_is_the_matrix_plus_one_batch(tmp_path):
    n, d = 40_000, 32
    x = np.random.default_rng(5).standard_normal((n, d)).astype(np.float32)
    ids = np.array([f"c/{i:06d}" for i in range(n)])
    write_embedding_shards(ids, x, tmp_path, 10_000)
    del x
    pool = pa.proxy_memory_pool(pa.default_memory_pool())
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pool)
    try:
        tracemalloc.start()
        got_ids, mat = read_embeddings(tmp_path, batch_rows=2000)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    finally:
        pa.set_memory_pool(previous)
    ids_bytes = got_ids.nbytes + sum(len(s) + 49 for s in got_ids)  # array + str objects
    batch_bytes = 2000 * d * 4
    # numpy/Python: the matrix, the ids and a few batches of scratch; never a second matrix.
    assert peak < mat.nbytes + ids_bytes + 4 * batch_bytes
    assert peak < 1.5 * mat.nbytes + ids_bytes
    # Arrow: one row group's buffers (8192 rows), not the whole file or table.
    assert pool.max_memory() < 4 * 8192 * (d * 4 + 16)
