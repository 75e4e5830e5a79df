"""Out-of-core reading of the embedding shards written by the scoring stage.

A shard is either

- a Parquet file with an ``utt_id`` string column and an ``embedding`` column holding one vector
  per row: ``fixed_size_list<float>`` (what :func:`write_embedding_shards` writes), a
  variable-size ``list<float>`` of constant length, or an extension type stored as one of those
  (Ray Data's tensor columns, Arrow's ``fixed_shape_tensor``); or
- a ``.npy`` matrix ``NAME.npy`` ``[rows, D]`` with its ids in ``NAME.ids.npy`` (a string array).

:func:`read_embeddings` preallocates the ``[N, D]`` result (float32, or float16 to halve it) from
the shards' metadata, then streams record batches of ``batch_rows`` rows straight into it. Peak
memory is the matrix, the ids, and Arrow's buffers for one Parquet row group (Parquet decodes a
row group's pages at a time, so write shards with row groups of a few thousand rows, as
:func:`write_embedding_shards` does); no full intermediate copy is ever made (a naive
``read_table().to_numpy()`` + ``np.stack`` holds three copies). With ``sort_by_id`` (or an
explicit ``order``) the rows are scattered into their final positions as they arrive, which
costs one extra pass over the (small) id column and no extra copy of the matrix.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from after_ray.errors import AfterRayError

__all__ = [
    "EmbeddingStoreError",
    "list_embedding_shards",
    "read_embeddings",
    "write_embedding_shards",
]

_IDS_SUFFIX = ".ids.npy"
_ROW_GROUP_ROWS = 8192  # bounds Arrow's decode buffers when reading back


class EmbeddingStoreError(AfterRayError):
    """Embedding shards are missing, malformed or inconsistent with each other."""


def list_embedding_shards(path: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """The shard files under a directory (sorted by name), or the given file(s) as paths."""
    if isinstance(path, str | os.PathLike):
        p = Path(path)
        if p.is_dir():
            files = sorted(
                f
                for f in p.iterdir()
                if f.suffix == ".parquet"
                or (f.suffix == ".npy" and not f.name.endswith(_IDS_SUFFIX))
            )
            if not files:
                raise EmbeddingStoreError(
                    f"no embedding shards (*.parquet or *.npy) in {p}; run the scoring stage first"
                )
            return files
        paths = [p]
    else:
        paths = [Path(f) for f in path]
    missing = [str(f) for f in paths if not f.is_file()]
    if missing:
        raise EmbeddingStoreError(f"embedding shard(s) not found: {missing[:3]}")
    return paths


def _ids_path(npy: Path) -> Path:
    return npy.with_name(npy.name[: -len(".npy")] + _IDS_SUFFIX)


def _vector_storage(arr):
    """The list-typed storage of an Arrow column (unwrapping extension types)."""
    import pyarrow as pa

    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    while isinstance(arr.type, pa.BaseExtensionType):
        arr = arr.storage
    return arr


def _batch_matrix(arr, dim: int, where: str) -> np.ndarray:
    """``[rows, dim]`` numpy view (zero copy when possible) of a list-typed Arrow array."""
    import pyarrow as pa

    arr = _vector_storage(arr)
    if arr.null_count:
        raise EmbeddingStoreError(f"{where}: {arr.null_count} null embedding(s)")
    if pa.types.is_fixed_size_list(arr.type):
        if arr.type.list_size != dim:
            raise EmbeddingStoreError(
                f"{where}: vectors of size {arr.type.list_size}, expected {dim}"
            )
        flat = arr.flatten()
    elif pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        offsets = np.asarray(arr.offsets)
        if len(arr) and not np.all(np.diff(offsets) == dim):
            raise EmbeddingStoreError(f"{where}: embeddings of unequal length (expected {dim})")
        flat = arr.flatten()
    else:
        raise EmbeddingStoreError(f"{where}: embedding column has type {arr.type}, expected a list")
    values = flat.to_numpy(zero_copy_only=False)
    return values.reshape(len(arr), dim)


def _parquet_dim(pf, column: str, where: str) -> int:
    import pyarrow as pa

    names = pf.schema_arrow.names
    if column not in names:
        raise EmbeddingStoreError(f"{where}: no column {column!r} (columns: {names})")
    typ = pf.schema_arrow.field(column).type
    while isinstance(typ, pa.BaseExtensionType):
        typ = typ.storage_type
    if pa.types.is_fixed_size_list(typ):
        return int(typ.list_size)
    # Variable-size lists: the length of the first row is the dimension (checked per batch).
    for batch in pf.iter_batches(batch_size=1, columns=[column]):
        if batch.num_rows:
            return len(_vector_storage(batch.column(0))[0].values)
    return 0


def _scan(files: list[Path], column: str, id_column: str) -> tuple[list[int], int]:
    """Rows per shard and the common dimension, from metadata only."""
    import pyarrow.parquet as pq

    rows, dims = [], set()
    for f in files:
        if f.suffix == ".npy":
            mat = np.load(f, mmap_mode="r")
            if mat.ndim != 2:
                raise EmbeddingStoreError(f"{f}: expected a 2-D matrix, got shape {mat.shape}")
            if not _ids_path(f).is_file():
                raise EmbeddingStoreError(f"{f}: its ids file {_ids_path(f).name} is missing")
            rows.append(mat.shape[0])
            if mat.shape[0]:
                dims.add(mat.shape[1])
        else:
            pf = pq.ParquetFile(f, pre_buffer=False)
            if id_column not in pf.schema_arrow.names:
                raise EmbeddingStoreError(f"{f}: no column {id_column!r}")
            rows.append(pf.metadata.num_rows)
            if pf.metadata.num_rows:
                dims.add(_parquet_dim(pf, column, str(f)))
    if len(dims) > 1:
        raise EmbeddingStoreError(f"embedding shards disagree on the dimension: {sorted(dims)}")
    return rows, (dims.pop() if dims else 0)


def _iter_shard(f: Path, column: str, id_column: str, batch_rows: int, dim: int, ids_only: bool):
    """Yield ``(ids (object array), matrix view or None)`` batches of one shard."""
    import pyarrow.parquet as pq

    if f.suffix == ".npy":
        ids = np.load(_ids_path(f), allow_pickle=False)
        mat = None if ids_only else np.load(f, mmap_mode="r")
        if mat is not None and len(ids) != mat.shape[0]:
            raise EmbeddingStoreError(f"{f}: {mat.shape[0]} rows but {len(ids)} ids")
        for s in range(0, len(ids), batch_rows):
            e = min(len(ids), s + batch_rows)
            yield ids[s:e].astype(object), (None if mat is None else mat[s:e])
        return
    pf = pq.ParquetFile(f, pre_buffer=False)
    cols = [id_column] if ids_only else [id_column, column]
    for batch in pf.iter_batches(batch_size=batch_rows, columns=cols):
        ids = batch.column(id_column)
        if ids.null_count:
            raise EmbeddingStoreError(f"{f}: {ids.null_count} null utt_id(s)")
        ids = ids.to_numpy(zero_copy_only=False)
        vec = None if ids_only else _batch_matrix(batch.column(column), dim, str(f))
        yield ids, vec


def read_embeddings(
    path: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    dtype: str | np.dtype = np.float32,
    column: str = "embedding",
    id_column: str = "utt_id",
    batch_rows: int = 65536,
    sort_by_id: bool = False,
    order: Sequence[str] | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Read all shards into ``(utt_ids [N] object array of str, matrix [N, D] of dtype)``.

    Rows come in shard order (files sorted by name), unless ``sort_by_id`` (rows sorted by
    ``utt_id``) or ``order`` (rows in exactly that id order; every id must be present once).
    """
    files = list_embedding_shards(path)
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise EmbeddingStoreError(f"embedding dtype must be a float type, got {dtype}")
    rows, dim = _scan(files, column, id_column)
    n = int(sum(rows))
    target = None  # position in the output of each incoming row, in reading order
    if sort_by_id or order is not None:
        ids_in = np.empty(n, dtype=object)
        pos = 0
        for f in files:
            for ids, _ in _iter_shard(f, column, id_column, batch_rows, dim, ids_only=True):
                ids_in[pos : pos + len(ids)] = ids
                pos += len(ids)
        if order is None:
            perm = np.argsort(ids_in.astype(str), kind="stable")
            out_ids = ids_in[perm]
            if n > 1 and np.any(out_ids[1:] == out_ids[:-1]):
                dup = out_ids[1:][out_ids[1:] == out_ids[:-1]][0]
                raise EmbeddingStoreError(f"the shards contain duplicate utt_ids (e.g. {dup!r})")
            target = np.empty(n, dtype=np.int64)
            target[perm] = np.arange(n)
        else:
            out_ids = np.asarray(order, dtype=object)
            if len(out_ids) != n:
                raise EmbeddingStoreError(
                    f"order has {len(out_ids)} ids but the shards hold {n} rows"
                )
            where = {u: i for i, u in enumerate(out_ids)}
            if len(where) != n:
                raise EmbeddingStoreError("order contains duplicate utt_ids")
            try:
                target = np.fromiter((where[u] for u in ids_in), dtype=np.int64, count=n)
            except KeyError as exc:
                raise EmbeddingStoreError(
                    f"utt_id {exc.args[0]!r} of the shards is not in order"
                ) from None
        del ids_in
        if np.unique(target).shape[0] != n:
            raise EmbeddingStoreError("the shards contain duplicate utt_ids")
    else:
        out_ids = np.empty(n, dtype=object)
    matrix = np.empty((n, dim), dtype=dtype)
    pos = 0
    for f in files:
        for ids, vec in _iter_shard(f, column, id_column, batch_rows, dim, ids_only=False):
            m = len(ids)
            if target is None:
                out_ids[pos : pos + m] = ids
                matrix[pos : pos + m] = vec  # casts in place (float32 -> float16 too)
            else:
                matrix[target[pos : pos + m]] = vec
            pos += m
    if pos != n:
        raise EmbeddingStoreError(f"shards changed while reading: expected {n} rows, read {pos}")
    return out_ids, matrix


def write_embedding_shards(
    utt_ids: Sequence[str] | np.ndarray,
    x: np.ndarray,
    out_dir: str | os.PathLike,
    rows_per_shard: int,
    *,
    fmt: str = "parquet",
    column: str = "embedding",
    id_column: str = "utt_id",
) -> list[Path]:
    """Write ``x`` ``[N, D]`` with its ids as ``part-00000.parquet`` ... (or ``.npy`` + ``.ids.npy``).

    Parquet vectors are ``fixed_size_list<float32|float16>``. Returns the written paths.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = np.asarray(x)
    ids = np.asarray(utt_ids).astype(str)
    if x.ndim != 2 or len(ids) != len(x):
        raise ValueError(f"need [N, D] embeddings and N ids; got {x.shape} and {len(ids)} ids")
    if fmt not in ("parquet", "npy"):
        raise ValueError(f"fmt must be 'parquet' or 'npy', got {fmt!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows_per_shard = max(1, int(rows_per_shard))
    paths = []
    for shard, s in enumerate(range(0, max(len(x), 1), rows_per_shard)):
        e = min(len(x), s + rows_per_shard)
        block = np.ascontiguousarray(x[s:e])
        if fmt == "npy":
            path = out / f"part-{shard:05d}.npy"
            np.save(path, block)
            np.save(_ids_path(path), ids[s:e])
        else:
            path = out / f"part-{shard:05d}.parquet"
            vec = pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), x.shape[1])
            table = pa.table({id_column: pa.array(ids[s:e].tolist(), pa.string()), column: vec})
            pq.write_table(table, path, row_group_size=_ROW_GROUP_ROWS)
        paths.append(path)
    return paths
