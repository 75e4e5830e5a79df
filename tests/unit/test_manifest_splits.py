"""Manifest schema round trip and deterministic, speaker-disjoint splits."""

from __future__ import annotations

import random

import pytest

from after_ray.data import manifest, splits
from after_ray.errors import ConfigError, CorpusError


def make_rows(n_speakers=10, per_speaker=6, sessions=None, shuffle_seed=None):
    rows = []
    for s in range(n_speakers):
        for u in range(per_speaker):
            rows.append(
                {
                    "utt_id": f"c/spk{s:02d}_{u}",
                    "path": f"/data/spk{s:02d}_{u}.wav",
                    "label": ["neutral", "happy", "angry"][u % 3],
                    "votes": ["neutral", "happy"] if u == 0 else None,
                    "speaker": f"c/spk{s:02d}",
                    "session": f"Session{s // 2 + 1}" if sessions else None,
                    "gender": "F" if s % 2 else "M",
                    "corpus": "c",
                    "split": None,
                }
            )
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(rows)
    return rows


def test_manifest_round_trip(tmp_path):
    rows = make_rows(3, 2)
    for r in rows:
        r.update(duration_s=1.5, sample_rate=16000)
    path = manifest.write_manifest(rows, tmp_path / "m.parquet")
    table = manifest.read_manifest(path)
    assert table.schema == manifest.MANIFEST_SCHEMA
    back = table.to_pylist()
    assert [r["utt_id"] for r in back] == sorted(r["utt_id"] for r in rows)
    assert back[0]["votes"] == ["neutral", "happy"]
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write left no temporary file


def test_duplicate_ids_are_rejected_with_a_reason():
    rows = make_rows(3, 1)
    rows.append(dict(rows[0]))
    with pytest.raises(CorpusError, match="duplicate utt_id"):
        manifest.rows_to_table(rows)


def test_missing_manifest_says_how_to_fix(tmp_path):
    with pytest.raises(CorpusError, match="after-ray prepare"):
        manifest.read_manifest(tmp_path / "none.parquet")


def by_split(rows):
    out = {}
    for r in rows:
        out.setdefault(r["split"], set()).add(r["speaker"])
    return out


def test_speaker_split_is_disjoint_and_deterministic_regardless_of_row_order():
    a = splits.speaker_split(make_rows(shuffle_seed=1), val_fraction=0.1, test_fraction=0.2, seed=3)
    b = splits.speaker_split(make_rows(shuffle_seed=2), val_fraction=0.1, test_fraction=0.2, seed=3)
    sa, sb = by_split(a), by_split(b)
    assert sa == sb
    assert len(sa["test"]) == 2 and len(sa["val"]) == 1 and len(sa["train"]) == 7
    assert not (sa["test"] & sa["val"]) and not (sa["train"] & (sa["test"] | sa["val"]))
    c = splits.speaker_split(make_rows(), val_fraction=0.1, test_fraction=0.2, seed=4)
    assert by_split(c) != sa  # the seed matters


def test_speaker_split_needs_three_speakers():
    with pytest.raises(CorpusError, match="at least 3 speakers"):
        splits.speaker_split(make_rows(2), val_fraction=0.1, test_fraction=0.2, seed=0)


def test_leave_one_session_out_folds():
    rows = make_rows(10, 3, sessions=True)
    folds = dict(splits.loso_folds(rows, val_fraction=0.2, seed=0))
    assert sorted(folds) == [f"Session{i}" for i in range(1, 6)]
    for session, fold in folds.items():
        test = {r["utt_id"] for r in fold if r["split"] == "test"}
        assert test == {r["utt_id"] for r in rows if r["session"] == session}
        groups = by_split(fold)
        assert not (groups["val"] & groups["test"])
        assert groups["val"] and groups["train"]
        assert all(r["session"] != session for r in fold if r["split"] == "val")


def test_loso_unknown_session_is_a_config_error():
    with pytest.raises(ConfigError, match="Session9"):
        splits.leave_one_session_out(
            make_rows(4, 2, sessions=True), test_session="Session9", val_fraction=0.2, seed=0
        )


def test_predefined_split_keeps_corpus_splits():
    rows = make_rows(3, 2)
    rows[0]["split"] = "test"
    out = splits.predefined_split(rows)
    assert out[0]["split"] == "test" and all(r["split"] == "train" for r in out[1:])
