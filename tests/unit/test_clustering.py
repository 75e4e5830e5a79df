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


# ------------------------------------------------------------------ values the mutation check asks for


def test_sample_rows_and_gather():
    from after_ray.al.kernels.clustering import _gather, sample_rows

    assert sample_rows(10, None, 0) is None and sample_rows(10, 10, 0) is None
    rows = sample_rows(100, 50, 7)
    assert rows.tolist() == sorted(set(rows.tolist())) and len(rows) == 50  # no repeats
    np.testing.assert_array_equal(rows, np.sort(np.random.default_rng(7).choice(100, 50, False)))
    x = np.arange(40, dtype=np.float64).reshape(20, 2)
    got = _gather(x, None, chunk_rows=3)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, x.astype(np.float32))
    np.testing.assert_array_equal(_gather(x, np.array([1, 5, 19]), 2), x[[1, 5, 19]])


def test_cluster_assign_l2_by_default_inner_product_when_spherical():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((500, 6)) * rng.uniform(0.1, 5.0, size=(500, 1))  # unnormalised
    c = rng.standard_normal((7, 6))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    a, d = cluster_assign(x, c, chunk_rows=64)
    assert a.dtype == np.int64 and d.dtype == np.float32
    dist = _sq_dists(x, c)
    np.testing.assert_array_equal(a, dist.argmin(1))
    np.testing.assert_allclose(d, dist.min(1), rtol=1e-5, atol=1e-5)
    a, d = cluster_assign(x, c, spherical=True, chunk_rows=64)
    ip = x @ c.T
    np.testing.assert_array_equal(a, ip.argmax(1))
    np.testing.assert_allclose(d, ip.max(1), rtol=1e-5, atol=1e-5)
    # k-means with spherical=True assigns raw rows by inner product too.
    cs, asph = kmeans(x, 5, seed=0, spherical=True)
    np.testing.assert_array_equal(asph, np.argmax(x @ cs.astype(np.float64).T, axis=1))


def test_kmeans_defaults_sample_seed_and_iterations():
    import faiss

    from after_ray.al.kernels.clustering import sample_rows

    def trained_on(x, k, seed, rows):
        train = np.ascontiguousarray(x[rows])
        ref = faiss.Kmeans(
            x.shape[1],
            k,
            niter=20,
            seed=seed,
            spherical=False,
            max_points_per_centroid=max(256, -(-len(train) // k)),
            min_points_per_centroid=1,
            verbose=False,
        )
        ref.train(train)
        return ref.centroids

    x = _blobs(6000, 8, 8, 6)
    # Default training sample: 128 rows per centroid, drawn with the seed.
    np.testing.assert_array_equal(
        kmeans(x, 8, seed=3)[0], trained_on(x, 8, 3, sample_rows(6000, 1024, 3))
    )
    # A sample below 39 per centroid is raised to it (FAISS's minimum).
    np.testing.assert_array_equal(
        kmeans(x, 8, seed=3, sample=10)[0], trained_on(x, 8, 3, sample_rows(6000, 312, 3))
    )
    small = np.random.default_rng(0).random((400, 3)).astype(np.float32)  # all rows train
    assert not np.array_equal(kmeans(small, 4, seed=3)[0], kmeans(small, 4, seed=4)[0])
    np.testing.assert_array_equal(kmeans(small, 4, seed=3)[0], kmeans(small, 4, seed=2**31 + 3)[0])
    # Default 20 iterations (on data where 20 and 21 differ), not spherical.
    u = np.random.default_rng(0).random((300, 2)).astype(np.float32)
    c20 = kmeans(u, 8, seed=1, niter=20)[0]
    assert not np.array_equal(c20, kmeans(u, 8, seed=1, niter=21)[0])
    np.testing.assert_array_equal(kmeans(u, 8, seed=1)[0], c20)
    assert np.abs(np.linalg.norm(kmeans(x, 8, seed=3)[0], axis=1) - 1).max() > 0.5
    # An explicit sample is used whole: FAISS does not subsample it again (7 x 858 >= 6000).
    cen, _ = kmeans(x, 7, seed=5, sample=6000)
    ref = faiss.Kmeans(
        8,
        7,
        niter=20,
        seed=5,
        spherical=False,
        max_points_per_centroid=858,
        min_points_per_centroid=1,
        verbose=False,
    )
    ref.train(np.ascontiguousarray(x))
    np.testing.assert_array_equal(cen, ref.centroids)


def test_kmeans_is_quiet_and_refuses_bad_shapes(capfd):
    x = _blobs(500, 4, 3, 7)
    kmeans(x, 3, seed=0)
    kmeans(x[:40], 4, seed=0)  # 10 rows per centroid: FAISS would warn below its 39
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    with pytest.raises(ValueError) as e:
        kmeans(x[:, 0], 2, seed=0)
    assert str(e.value) == "kmeans expects [N, D]; got shape (500,)"
    with pytest.raises(ValueError) as e:
        kmeans(x[:3], 4, seed=0)
    assert str(e.value) == "n_clusters must lie in [1, 3] for 3 rows; got 4"
    with pytest.raises(ValueError) as e:
        kmeans(x, 0, seed=0)
    assert str(e.value) == "n_clusters must lie in [1, 500] for 500 rows; got 0"


def test_closest_to_centroids_chunks_ties_and_empty_clusters():
    x = np.array([[5.0], [1.0], [9.0], [1.0], [4.0], [0.5], [6.0], [0.5]], dtype=np.float32)
    centroids = np.array([[0.0], [5.0], [9.5], [100.0]], dtype=np.float32)  # cluster 3 empty
    assignment = np.array([1, 0, 2, 0, 1, 0, 1, 0])
    for chunk in (1, 3, 8, 100):
        got = closest_to_centroids(x, centroids, assignment, chunk_rows=chunk)
        # rows 5 and 7 tie for cluster 0 (lowest position wins, across chunks too)
        assert got.dtype == np.int64 and got.tolist() == [5, 0, 2, -1], chunk
    # Squared L2 in float32: float64 input that differs below float32 precision is a tie.
    x64 = np.array([[1.0 + 1e-9], [1.0]])
    assert closest_to_centroids(x64, np.zeros((1, 1)), np.zeros(2, np.int64)).tolist() == [0]
    # The closest member in the last chunk.
    x2 = np.array([[3.0], [2.0], [1.0], [0.1]], dtype=np.float32)
    got = closest_to_centroids(x2, np.zeros((1, 1)), np.zeros(4, np.int64), chunk_rows=3)
    assert got.tolist() == [3]


def test_pca_apply_in_chunks_and_the_default_sample():
    from after_ray.al.kernels.clustering import sample_rows

    rng = np.random.default_rng(9)
    x = (rng.standard_normal((1000, 6)) * np.arange(1, 7)).astype(np.float32)
    red, reducer = reduce_dims(x, 3, seed=0, sample=400)
    assert reducer.d_in == 6 and reducer.d_out == 3 and reducer.scale is None
    np.testing.assert_array_equal(reducer.apply(x, chunk_rows=64), red)
    np.testing.assert_array_equal(reducer.apply(x, chunk_rows=7), red)
    # Trained on exactly the seeded sample (seed 0 by default).
    _, on_sample = reduce_dims(x[sample_rows(1000, 400, 0)], 3, sample=None)
    np.testing.assert_allclose(on_sample.apply(x), red, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(reduce_dims(x, 3, sample=400)[0], red)
    # Not whitened: component variances are the covariance's top eigenvalues.
    eig = np.sort(np.linalg.eigvalsh(np.cov(x.astype(np.float64), rowvar=False, bias=True)))[::-1]
    _, full = reduce_dims(x, 3, sample=None)
    np.testing.assert_allclose(full.apply(x).var(0), eig[:3], rtol=1e-3)
    assert reduce_dims(x, 1)[0].shape == (1000, 1) and reduce_dims(x, 6)[0].shape == (1000, 6)
    for bad in (0, 7):
        with pytest.raises(ValueError) as e:
            reduce_dims(x, bad)
        assert str(e.value) == f"pca_dim must lie in [1, 6]; got {bad}"


def test_default_pca_sample_is_100000_rows():
    from after_ray.al.kernels.clustering import sample_rows

    x = np.random.default_rng(10).standard_normal((100_001, 2)).astype(np.float32)
    x[:, 1] *= 3
    _, reducer = reduce_dims(x, 1)
    _, on_sample = reduce_dims(x[sample_rows(100_001, 100_000, 0)], 1, sample=None)
    np.testing.assert_array_equal(reducer.apply(x[:100]), on_sample.apply(x[:100]))


def test_whitening_a_rank_deficient_matrix_stays_finite():
    # pca_dim above the rank: the extra components have no variance. They stay ~0 instead of
    # NaN (FAISS's own whitening divided by sqrt(0)); the real ones get unit variance.
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((4000, 12)) * np.arange(1, 13)).astype(np.float32)
    x[:, 5] = 0.0
    x[:, 6] = 2 * x[:, 7]
    white, reducer = reduce_dims(x, 12, whiten=True, sample=None)
    assert np.isfinite(white).all() and np.isfinite(reducer.scale).all()
    np.testing.assert_allclose(white.std(0)[:10], 1.0, rtol=1e-3)
    assert np.abs(white[:, 10:]).max() < 1e-3
    plain, _ = reduce_dims(x, 12, sample=None)
    np.testing.assert_array_equal(white[:, 10:], plain[:, 10:])  # left as they are
    # Components smaller than 1 are whitened too.
    tiny, _ = reduce_dims(x * 1e-3, 4, whiten=True, sample=None)
    np.testing.assert_allclose(tiny.std(0), 1.0, rtol=1e-3)
