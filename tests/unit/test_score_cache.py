"""The scoring cache: what is written is read back exactly, in utt_id order, and a cache that is
incomplete, of another format or missing a wanted utterance is never used."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from after_ray.store.score_cache import (
    DONE,
    SCORES_FILE,
    PoolScores,
    ScoresCacheWriter,
    read_scores,
    write_scores,
)


def make_scores(n: int, t: int, seed: int = 0) -> PoolScores:
    rng = np.random.default_rng(seed)
    ids = np.asarray([f"spk{(i * 7) % 5}/utt{i:04d}" for i in range(n)], dtype=object)
    return PoolScores(
        utt_ids=ids,
        probs=rng.random((n, 4), dtype=np.float32),
        embedding=rng.standard_normal((n, 16), dtype=np.float32),
        penultimate=rng.standard_normal((n, 8), dtype=np.float32),
        mc_probs=rng.random((n, t, 4), dtype=np.float32),
    )


def assert_same(got: PoolScores, want: PoolScores) -> None:
    assert list(got.utt_ids) == list(want.utt_ids)
    for key in ("probs", "embedding", "penultimate", "mc_probs"):
        a, b = getattr(got, key), getattr(want, key)
        assert a.dtype == np.float32 and a.shape == b.shape, key
        np.testing.assert_array_equal(a, b, err_msg=key)


@pytest.mark.parametrize("t", [0, 3])
def test_written_in_parts_and_read_back_exactly_in_utt_id_order(tmp_path, t):
    scores = make_scores(50, t)
    with ScoresCacheWriter(tmp_path / "c", (t, 4)) as writer:
        for part in (slice(0, 20), slice(20, 50)):  # two parts, neither sorted by utt_id
            writer.add(
                scores.utt_ids[part],
                {
                    k: getattr(scores, k)[part]
                    for k in ("probs", "embedding", "penultimate", "mc_probs")
                },
            )
    got = read_scores(tmp_path / "c")
    assert_same(got, scores.take(sorted(scores.utt_ids)))
    # Fixed-size vectors in bounded row groups: what the memory-bounded reader relies on.
    schema = pq.read_schema(tmp_path / "c" / SCORES_FILE)
    vector = schema.field("embedding").type
    assert isinstance(vector, pa.FixedSizeListType) and vector.list_size == 16
    assert ("mc_probs" in schema.names) == (t > 0)


def test_a_cache_lacking_a_wanted_utterance_or_unfinished_or_old_is_not_used(tmp_path):
    scores = make_scores(10, 2)
    cache = write_scores(tmp_path / "c", scores)
    assert read_scores(cache, {"spk0/utt0000"}) is not None
    assert read_scores(cache, {"spk0/utt0000", "not/scored"}) is None
    done = json.loads((cache / DONE).read_text())
    (cache / DONE).write_text(json.dumps({**done, "format": 1}))
    assert read_scores(cache) is None  # an older layout: scored again
    (cache / DONE).unlink()
    assert read_scores(cache) is None  # no completion marker: never trusted
    assert read_scores(tmp_path / "absent") is None


def test_a_failed_write_leaves_no_cache(tmp_path):
    scores = make_scores(10, 0)
    with pytest.raises(KeyError), ScoresCacheWriter(tmp_path / "c", (0, 4)) as writer:
        writer.add(scores.utt_ids, {"probs": scores.probs})  # embedding missing
    assert not (tmp_path / "c").exists()
    assert not list(tmp_path.iterdir())  # and no staging leftovers
