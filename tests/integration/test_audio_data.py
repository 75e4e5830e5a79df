"""The Ray Data audio pipeline: probe/quarantine split, padded batches, score chunks, streaming.

Uses the session ``ray_session`` fixture (200 MiB object store, 4 logical CPUs).
"""

from __future__ import annotations

import threading
import time
from itertools import zip_longest
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from after_ray.config.audio import AudioConfig
from after_ray.distributed.audio_data import (
    PadCollate,
    audio_dataset,
    decode_batch,
    label_targets,
    pad_batch,
    probe_audio,
)

pytestmark = pytest.mark.ray

CFG = AudioConfig(train_crop_s=2.0, score_chunk_s=1.5)
CLASSES = {"angry": 0, "happy": 1, "neutral": 2, "sad": 3}


def noise_wav(path: Path, seconds: float, sr: int, channels: int = 1, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    data = 0.1 * rng.standard_normal((int(round(seconds * sr)), channels))
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, data.astype(np.float32), sr, subtype="PCM_16")
    return str(path)


def manifest_row(utt_id: str, path: str, label=None, votes=None) -> dict:
    return {
        "utt_id": utt_id,
        "path": path,
        "label": label,
        "votes": votes,
        "speaker": "t/spk1",
        "corpus": "t",
    }


# Good files of different rates, channel counts and lengths (seconds), with their labels.
GOOD = [
    ("t/a_8k", 8000, 1, 1.0, "happy", ["happy", "happy", "sad"]),
    ("t/b_44k_stereo", 44100, 2, 2.5, "angry", None),
    ("t/c_48k", 48000, 1, 3.0, None, None),
    ("t/d_16k_6ch", 16000, 6, 0.7, "neutral", ["neutral", "calm"]),
    ("t/e_22k", 22050, 1, 1.2, "sad", None),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("corpus")
    rows = []
    for i, (utt_id, sr, ch, seconds, label, votes) in enumerate(GOOD):
        path = noise_wav(root / f"{utt_id.split('/')[1]}.wav", seconds, sr, ch, seed=i)
        rows.append(manifest_row(utt_id, path, label, votes))
    return rows


@pytest.fixture(scope="module")
def bad_rows(tmp_path_factory) -> dict[str, str]:
    """utt_id -> expected reason."""
    root = tmp_path_factory.mktemp("bad")
    (root / "text.wav").write_text("not audio\n" * 50)
    (root / "zero.wav").write_bytes(b"")
    sf.write(root / "silent.wav", np.zeros((8000, 1), np.float32), 16000)
    nan = np.full((4000, 1), 0.1, np.float32)
    nan[7] = np.nan
    sf.write(root / "nan.wav", nan, 16000, subtype="FLOAT")
    noise_wav(root / "long.wav", 4.0, 16000)
    return {
        str(root / "missing.wav"): "missing_file",
        str(root / "text.wav"): "unreadable",
        str(root / "zero.wav"): "empty",
        str(root / "silent.wav"): "silent",
        str(root / "nan.wav"): "non_finite",
        str(root / "long.wav"): "too_long",
    }


def test_probe_splits_good_and_quarantined_rows(ray_session, corpus, bad_rows):
    cfg = AudioConfig(max_duration_s=3.5)
    bad = [manifest_row(f"t/bad{i}", p) for i, p in enumerate(bad_rows)]
    rows = [r for pair in zip_longest(corpus, bad) for r in pair if r is not None]
    good, quarantined = probe_audio(rows, cfg, rows_per_task=3)

    assert good.column("utt_id").to_pylist() == [r["utt_id"] for r in corpus]  # input order
    by_id = {r["utt_id"]: r for r in good.to_pylist()}
    for utt_id, sr, _, seconds, label, votes in GOOD:
        assert by_id[utt_id]["sample_rate"] == sr  # the native rate
        assert by_id[utt_id]["duration_s"] == pytest.approx(seconds, abs=1e-3)
        assert (by_id[utt_id]["label"], by_id[utt_id]["votes"]) == (label, votes)
    assert good.schema.field("sample_rate").type == pa.int32()

    got = {r["path"]: r for r in quarantined.to_pylist()}
    assert {p: r["reason"] for p, r in got.items()} == bad_rows
    assert all(r["detail"] and r["stage"] == "probe" for r in got.values())
    assert (
        "Format not recognised"
        in got[next(p for p in bad_rows if p.endswith("text.wav"))]["detail"]
    )


def test_label_targets():
    index, soft = label_targets(
        ["happy", None, "calm", "sad", None],
        [["happy", "sad", "happy", "calm"], None, None, None, ["angry"]],
        CLASSES,
    )
    assert index.tolist() == [1, -1, -1, 3, -1]
    assert np.allclose(soft[0], [0, 2 / 3, 0, 1 / 3])  # unknown vote 'calm' is ignored
    assert not soft[1].any() and not soft[2].any()  # unlabeled / not a class: all zeros
    assert np.allclose(soft[3], [0, 0, 0, 1])  # no votes: one-hot of the label
    assert np.allclose(soft[4], [1, 0, 0, 0])  # votes without a label still give a target


def test_decode_batch_drops_a_file_that_vanished_without_raising(corpus, tmp_path):
    batch = {
        "utt_id": np.array(["t/gone", corpus[0]["utt_id"]], dtype=object),
        "path": np.array([str(tmp_path / "gone.wav"), corpus[0]["path"]], dtype=object),
    }
    out = decode_batch(
        batch, cfg=CFG, mode="train", seed=0, epoch=0, label_to_index=None, soft_targets=False
    )
    assert out.column("utt_id").to_pylist() == [corpus[0]["utt_id"]]
    batch["utt_id"], batch["path"] = batch["utt_id"][:1], batch["path"][:1]
    empty = decode_batch(
        batch, cfg=CFG, mode="score", seed=0, epoch=0, label_to_index=CLASSES, soft_targets=True
    )
    assert empty.num_rows == 0
    assert empty.schema.names == [
        "utt_id",
        "audio",
        "length",
        "chunk_index",
        "label_index",
        "soft_target",
    ]


def _collect(ds, batch_size=2):
    batches = list(ds.iter_torch_batches(batch_size=batch_size, collate_fn=PadCollate()))
    assert batches
    return batches


def test_train_batches_are_resampled_cropped_padded_and_labeled(ray_session, corpus, tmp_path):
    gone = manifest_row("t/gone", str(tmp_path / "deleted_since_prepare.wav"), "sad")
    ds = audio_dataset(
        corpus + [gone], CFG, mode="train", seed=3, label_to_index=CLASSES, shuffle=True
    )
    seen = {}
    for b in _collect(ds, batch_size=2):
        lengths = b["lengths"]
        assert (
            b["input_values"].dtype.is_floating_point and b["attention_mask"].dtype == lengths.dtype
        )
        assert b["input_values"].shape == b["attention_mask"].shape
        assert b["input_values"].shape[1] == int(lengths.max())
        assert b["attention_mask"].sum(dim=1).tolist() == lengths.tolist()
        assert len(b["utt_id"]) == len(lengths) == len(b["label_index"]) == len(b["soft_target"])
        for i, utt_id in enumerate(b["utt_id"]):
            n = int(lengths[i])
            row = b["input_values"][i]
            assert not row[n:].any()  # padding is zeros
            assert b["attention_mask"][i, :n].all()
            assert float(row[:n].mean()) == pytest.approx(0, abs=1e-3)
            assert float(row[:n].std()) == pytest.approx(1, abs=1e-2)
            seen[utt_id] = (
                n,
                int(b["label_index"][i]),
                b["soft_target"][i].numpy(),
                row[:n].numpy().copy(),
            )

    assert set(seen) == {r["utt_id"] for r in corpus}  # the vanished file was dropped
    crop = CFG.train_crop_samples
    for utt_id, _, _, seconds, label, _ in GOOD:
        n, index, soft, _ = seen[utt_id]
        assert n == min(crop, round(seconds * CFG.sample_rate)), utt_id  # resampled to 16 kHz
        assert index == (CLASSES[label] if label else -1)
        assert soft.sum() == pytest.approx(1.0 if label else 0.0)
    assert np.allclose(seen["t/a_8k"][2], [0, 2 / 3, 0, 1 / 3])
    assert np.allclose(seen["t/d_16k_6ch"][2], [0, 0, 1, 0])  # 'calm' is not a class

    # Same seed and epoch: the same crops; another epoch: the long files are cropped elsewhere.
    again = audio_dataset(corpus, CFG, mode="train", seed=3, label_to_index=CLASSES)
    other = audio_dataset(corpus, CFG, mode="train", seed=3, epoch=1)
    same = {
        u: v for b in _collect(again) for u, v in zip(b["utt_id"], b["input_values"], strict=True)
    }
    moved = {
        u: v for b in _collect(other) for u, v in zip(b["utt_id"], b["input_values"], strict=True)
    }
    for utt_id in ("t/b_44k_stereo", "t/c_48k"):
        assert np.array_equal(same[utt_id].numpy()[: len(seen[utt_id][3])], seen[utt_id][3])
        assert not np.allclose(moved[utt_id].numpy()[: len(seen[utt_id][3])], seen[utt_id][3])


def test_score_mode_chunks_whole_utterances_from_a_parquet_manifest(ray_session, corpus, tmp_path):
    path = tmp_path / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(corpus), path)
    ds = audio_dataset(str(path), CFG, mode="score", label_to_index=CLASSES)
    chunks: dict[str, dict[int, int]] = {}
    for b in _collect(ds, batch_size=3):
        assert b["attention_mask"].sum(dim=1).tolist() == b["lengths"].tolist()
        for utt_id, k, n in zip(
            b["utt_id"], b["chunk_index"].tolist(), b["lengths"].tolist(), strict=True
        ):
            chunks.setdefault(utt_id, {})[k] = n
    limit = CFG.score_chunk_samples
    for utt_id, _, _, seconds, _, _ in GOOD:
        total = round(seconds * CFG.sample_rate)
        got = chunks[utt_id]
        assert sorted(got) == list(range(-(-total // limit)))  # chunk_index 0..k-1
        assert sum(got.values()) == pytest.approx(total, abs=1)  # nothing lost or duplicated
        assert max(got.values()) <= limit and max(got.values()) - min(got.values()) <= 1
    assert len(chunks["t/c_48k"]) == 2  # 3.0 s in chunks of at most 1.5 s


def test_pad_batch_contract_without_labels():
    out = pad_batch(
        {
            "utt_id": np.array(["x", "y"], dtype=object),
            "audio": np.array([np.ones(3, np.float32), np.ones(5, np.float32)], dtype=object),
        },
        pad_to_multiple_of=4,
    )
    assert out["input_values"].shape == (2, 8)
    assert out["lengths"].tolist() == [3, 5]
    assert out["attention_mask"].sum(axis=1).tolist() == [3, 5]
    assert set(out) == {"input_values", "attention_mask", "lengths", "utt_id"}


def _store_stats():
    # Aggregate plasma stats from the raylet (what `ray memory --stats-only` prints).
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    # This session's instance by address: other Ray instances may run on the machine.
    address = ray.get_runtime_context().gcs_address
    return get_memory_info_reply(get_state_from_address(address)).store_stats


def test_a_corpus_several_times_the_object_store_streams_through_it(ray_session, tmp_path):
    # Two 60 s files on disk (2 MiB each), referenced by 180 manifest rows: decoded, the corpus
    # is 180 x 60 s x 16 kHz x 4 B = 659 MiB, 3.3x the session's object store (200 MiB).
    paths = [noise_wav(tmp_path / f"long{k}.wav", 60.0, 16000, seed=k) for k in range(2)]
    rows = [{"utt_id": f"m/{i:04d}", "path": paths[i % 2]} for i in range(180)]
    cfg = AudioConfig(score_chunk_s=10.0)
    store_bytes = ray_session.cluster_resources()["object_store_memory"]

    before = _store_stats()
    peak_primary = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak_primary[0] = max(peak_primary[0], _store_stats().object_store_bytes_primary_copy)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    consumed = n_rows = 0
    try:
        for batch in audio_dataset(rows, cfg, mode="score").iter_batches(
            batch_size=12, batch_format="numpy"
        ):
            consumed += sum(a.nbytes for a in batch["audio"])
            n_rows += len(batch["audio"])
    finally:
        stop.set()
        sampler.join()
    after = _store_stats()

    assert n_rows == 180 * 6  # every file, in six 10 s chunks
    assert consumed > 3 * store_bytes
    # Why these assertions: plasma "bytes used" is not a measure of live data (freed objects are
    # reclaimed lazily, so it climbs to ~95% of the store even while streaming). What cannot
    # hide is spilling: data that does not fit in the store must go to disk (or to the fallback
    # mmap). Materialising this corpus spills ~660 MiB; streaming spills nothing, and the live
    # (primary-copy) bytes sampled during the run stay below the store size (measured ~90 MiB).
    assert after.spilled_bytes_total == before.spilled_bytes_total
    assert after.object_store_bytes_fallback == 0
    assert 0 < peak_primary[0] < store_bytes


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_batches_reach_two_ray_train_workers_through_get_dataset_shard(
    ray_session, corpus, tmp_path
):
    """Two real Ray Train workers: each sees world size 2 and its own rank, and gets a non-empty
    shard of the padded batches; the shards are disjoint and together are the dataset, labels
    intact. Four rows: Ray Train splits with ``streaming_split(equal=True)``, which drops the
    rows that do not divide evenly among the workers."""
    import json

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    rows = corpus[:4]
    out = str(tmp_path / "shards")

    # Defined inside the test so it is pickled by value: pytest modules are not importable on
    # Ray workers.
    def train_loop(config):
        import json
        import os

        import ray.train

        ctx = ray.train.get_context()
        shard = ray.train.get_dataset_shard("train")
        seen = {}
        for b in shard.iter_torch_batches(batch_size=2, collate_fn=PadCollate()):
            assert b["attention_mask"].sum(dim=1).tolist() == b["lengths"].tolist()
            seen.update(zip(b["utt_id"], b["label_index"].tolist(), strict=True))
        os.makedirs(config["out"], exist_ok=True)
        record = {"rank": ctx.get_world_rank(), "world": ctx.get_world_size(), "seen": seen}
        with open(os.path.join(config["out"], f"rank-{ctx.get_world_rank()}.json"), "w") as f:
            json.dump(record, f)

    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"out": out},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        datasets={"train": audio_dataset(rows, CFG, mode="train", label_to_index=CLASSES)},
        run_config=RunConfig(storage_path=str(tmp_path), name="audio_shard"),
    )
    trainer.fit()
    records = [json.loads((tmp_path / "shards" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world"]) for r in records] == [(0, 2), (1, 2)]
    shards = [r["seen"] for r in records]
    assert all(shards) and not shards[0].keys() & shards[1].keys()
    expected = {r["utt_id"]: r["label"] for r in rows}
    assert {**shards[0], **shards[1]} == {
        u: (CLASSES[label] if label else -1) for u, label in expected.items()
    }
