"""The scoring cache: per-utterance model outputs on disk, and their memory-bounded read.

One directory per (checkpoint weights, MC settings, audio settings) key, holding

``scores.parquet``  ``utt_id`` (string), ``probs`` [C], ``embedding`` [D], ``penultimate`` [P],
                    and ``mc_probs`` [T*C] when there are MC-dropout samples, every vector a
                    ``fixed_size_list<float32>``; row groups of a few thousand rows
``_DONE.json``      ``{"format": 2, "rows": N, "mc_shape": [T, C]}``, written last

The directory is staged and swapped in whole (``atomic.staged_directory``), so a cache either
exists completely or not at all. Reading goes through ``al.embedding_store``: each column is
streamed record batch by record batch into a preallocated float32 matrix in ``utt_id`` order,
so a pool of millions of rows costs its matrices plus one row group of Arrow buffers, not the
two or three full copies of a ``read_table().to_numpy()`` + ``np.stack`` (or ``to_pylist``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from after_ray.store.atomic import staged_directory

DONE = "_DONE.json"
SCORES_FILE = "scores.parquet"
FORMAT = 2
ARRAY_KEYS = ("probs", "embedding", "penultimate", "mc_probs")
ROW_GROUP_ROWS = 8192


@dataclass
class PoolScores:
    """Per-utterance scores, rows in ``utt_ids`` order."""

    utt_ids: np.ndarray
    probs: np.ndarray
    embedding: np.ndarray
    penultimate: np.ndarray
    mc_probs: np.ndarray  # [N, T, C]; T = 0 without MC-dropout samples

    def take(self, utt_ids) -> PoolScores:
        index = {u: i for i, u in enumerate(self.utt_ids)}
        missing = [u for u in utt_ids if u not in index]
        if missing:
            raise KeyError(f"{len(missing)} utterances were not scored, e.g. {missing[:3]}")
        rows = np.array([index[u] for u in utt_ids], dtype=np.int64)
        return PoolScores(
            np.asarray(list(utt_ids), dtype=object),
            self.probs[rows],
            self.embedding[rows],
            self.penultimate[rows],
            self.mc_probs[rows],
        )


def _vectors(matrix: np.ndarray) -> pa.FixedSizeListArray:
    flat = np.ascontiguousarray(matrix, dtype=np.float32).reshape(len(matrix), -1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])


class ScoresCacheWriter:
    """Writes a cache directory in parts (``add`` per chunk of rows), swapped in on ``close``.

    Use as a context manager: leaving the block with an exception leaves no cache behind.
    """

    def __init__(self, cache_dir: str | os.PathLike, mc_shape: tuple[int, int]):
        self.cache_dir = Path(cache_dir)
        self.mc_shape = (int(mc_shape[0]), int(mc_shape[1]))
        self.rows = 0
        self._stage = None
        self._writer: pq.ParquetWriter | None = None

    def __enter__(self) -> ScoresCacheWriter:
        self._stage = staged_directory(self.cache_dir, what="the score cache")
        self._staging = self._stage.__enter__()
        return self

    def add(self, utt_ids: Iterable[str], arrays: dict[str, np.ndarray]) -> None:
        ids = [str(u) for u in utt_ids]
        columns = {"utt_id": pa.array(ids, pa.string())}
        for key in ARRAY_KEYS:
            if key == "mc_probs" and self.mc_shape[0] == 0:
                continue  # a zero-length vector column would only complicate readers
            columns[key] = _vectors(arrays[key])
        table = pa.table(columns)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._staging / SCORES_FILE, table.schema)
        self._writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
        self.rows += len(ids)

    def __exit__(self, exc_type, exc, tb) -> bool | None:
        if self._writer is not None:
            self._writer.close()
        if exc_type is None:
            done = {"format": FORMAT, "rows": self.rows, "mc_shape": list(self.mc_shape)}
            (self._staging / DONE).write_text(json.dumps(done))
        return self._stage.__exit__(exc_type, exc, tb)


def write_scores(cache_dir: str | os.PathLike, scores: PoolScores) -> Path:
    """Write ``scores`` as a complete cache directory; returns it."""
    t, c = scores.mc_probs.shape[1:] if scores.mc_probs.ndim == 3 else (0, scores.probs.shape[1])
    with ScoresCacheWriter(cache_dir, (t, c)) as writer:
        writer.add(
            scores.utt_ids,
            {
                "probs": scores.probs,
                "embedding": scores.embedding,
                "penultimate": scores.penultimate,
                "mc_probs": scores.mc_probs,
            },
        )
    return Path(cache_dir)


def read_scores(cache_dir: str | os.PathLike, wanted: set[str] | None = None) -> PoolScores | None:
    """The cached scores in ``utt_id`` order, or None when the cache is absent, incomplete, of
    an older format, or lacks one of ``wanted`` (then the caller scores again)."""
    from after_ray.store.embedding_store import read_embeddings

    cache_dir = Path(cache_dir)
    try:
        done = json.loads((cache_dir / DONE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(done, dict) or done.get("format") != FORMAT:
        return None
    path = cache_dir / SCORES_FILE
    ids = np.sort(pq.read_table(path, columns=["utt_id"]).column("utt_id").to_numpy())
    ids = ids.astype(object)
    if wanted is not None and not wanted <= set(ids.tolist()):
        return None
    t, c = (int(v) for v in done["mc_shape"])
    arrays = {}
    for key in ARRAY_KEYS:
        if key == "mc_probs" and t == 0:
            arrays[key] = np.zeros((len(ids), 0, c), dtype=np.float32)
            continue
        _, matrix = read_embeddings(path, column=key, order=ids, batch_rows=ROW_GROUP_ROWS)
        arrays[key] = matrix.reshape(len(ids), t, c) if key == "mc_probs" else matrix
        # Arrow's allocator keeps freed decode buffers for reuse; hand them back so that what
        # stays resident after the read is the pool's matrices.
        pa.default_memory_pool().release_unused()
    return PoolScores(utt_ids=ids, **arrays)
