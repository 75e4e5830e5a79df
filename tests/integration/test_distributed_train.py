"""TAPT and fine-tuning on Ray Train: a real 2-worker DDP run that loses a worker and resumes
from its checkpoint to the same weights, exact resume of a killed TAPT driver, a fine-tuning
worker killed mid-epoch that resumes from its epoch checkpoint, and fine-tuning that learns the
synthesized emotions (better than chance on held-out speakers)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from after_ray import faults
from after_ray.config.sections import load_config
from after_ray.data.corpora import load_corpus
from after_ray.data.corpora.synth import synthesize_corpus
from after_ray.distributed.train import run_finetune, run_tapt

REPO = Path(__file__).resolve().parents[2]


def rows_with_durations(root: Path) -> list[dict]:
    import soundfile as sf

    rows = load_corpus("csv", root, corpus_name="t")
    for row in rows:
        row["duration_s"] = sf.info(row["path"]).duration
    return rows


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    root = synthesize_corpus(
        tmp_path_factory.mktemp("c") / "synth",
        n_speakers=8,
        utterances_per_emotion=4,
        separation=2.0,
        seed=5,
    )
    return rows_with_durations(root)


TAPT_OVERRIDES = ["tapt.warmup_steps=1", "tapt.checkpoint_every=2", "tapt.batch_size=4"]


def tapt_config(steps: int, *extra: str):
    return load_config(None, [f"tapt.steps={steps}", *TAPT_OVERRIDES, *extra])


def weights(model_dir: Path) -> dict[str, np.ndarray]:
    return load_file(str(model_dir / "model.safetensors"))


def weights_of(classifier_dir: Path) -> dict[str, np.ndarray]:
    return load_file(str(classifier_dir / "classifier.safetensors"))


def assert_same_weights(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    """Bit-identical: the same tensors with the same values."""
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_worker_ddp_tapt_survives_a_worker_killed_mid_run(
    ray_session, small_corpus, tmp_path, monkeypatch
):
    """A real 2-worker DDP run; then the same run with one worker SIGKILLed once after step 3:
    FailureConfig restarts the group, it resumes from the step-2 checkpoint, same weights."""
    config = tapt_config(4)
    ray_cfg = dataclasses.replace(config.ray, num_workers=2, max_failures=1)
    common = dict(
        rows=small_corpus[:32],
        tapt=config.tapt,
        backbone=config.backbone,
        audio=config.audio,
        ray_cfg=ray_cfg,
    )
    summary = run_tapt(
        **common, storage_path=tmp_path / "ray", name="ddp", out_dir=tmp_path / "model"
    )
    assert summary["steps"] == 4 and len(summary["loss_history"]) == 4
    assert all(np.isfinite(summary["loss_history"])) and summary["resumed_from_step"] == 0
    trained = weights(tmp_path / "model")
    assert trained and all(np.isfinite(v).all() for v in trained.values())

    marker = tmp_path / "worker-killed"
    monkeypatch.setenv(faults.ENV, "tapt_step@3")  # after the 3rd batch, one worker only
    monkeypatch.setenv(faults.ONCE_ENV, str(marker))
    summary = run_tapt(
        **common,
        storage_path=tmp_path / "ray-killed",
        name="ddp",
        out_dir=tmp_path / "model-killed",
    )
    assert marker.exists()  # a worker really died
    assert summary["steps"] == 4 and summary["resumed_from_step"] == 2
    assert_same_weights(trained, weights(tmp_path / "model-killed"))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_tapt_killed_after_first_checkpoint_resumes_to_the_same_weights(
    ray_session, small_corpus, tmp_path
):
    # num_workers=0: the loop runs in the driver, so the failpoint kills the whole run (a lost
    # driver or machine), not just a worker that Ray Train would restart. 300 steps, killed at
    # step 100 in another process: long enough that float drift between processes, which once
    # parted two runs within 150 steps, would show in the weights.
    extra = ["ray.num_workers=0", "tapt.checkpoint_every=100"]
    overrides = [*TAPT_OVERRIDES, "tapt.steps=300", *extra]
    config = tapt_config(300, *extra)
    rows = small_corpus[:24]
    common = dict(
        rows=rows,
        tapt=config.tapt,
        backbone=config.backbone,
        audio=config.audio,
        ray_cfg=config.ray,
    )
    run_tapt(
        **common, storage_path=tmp_path / "ray-a", name="t", out_dir=tmp_path / "uninterrupted"
    )

    # The same TAPT in a subprocess that SIGKILLs itself right after its first checkpoint.
    args = json.dumps(
        {
            "rows": rows,
            "storage": str(tmp_path / "ray-b"),
            "out": str(tmp_path / "resumed"),
            "overrides": overrides,
        }
    )
    script = (
        "import json, sys; from after_ray.config.sections import load_config; "
        "from after_ray.distributed.train import run_tapt; a = json.loads(sys.argv[1]); "
        "c = load_config(None, a['overrides']); "
        "run_tapt(rows=a['rows'], tapt=c.tapt, backbone=c.backbone, audio=c.audio, "
        "ray_cfg=c.ray, storage_path=a['storage'], name='t', out_dir=a['out'])"
    )
    env = {**os.environ, "AFTER_RAY_FAILPOINT": "tapt_checkpoint", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-c", script, args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (tmp_path / "resumed").exists()
    summary = run_tapt(
        **common, storage_path=tmp_path / "ray-b", name="t", out_dir=tmp_path / "resumed"
    )
    assert summary["steps"] == 300 and summary["resumed_from_step"] == 100
    assert_same_weights(weights(tmp_path / "uninterrupted"), weights(tmp_path / "resumed"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_finetuning_the_tiny_preset_beats_chance_on_held_out_speakers(
    ray_session, small_corpus, tmp_path
):
    from after_ray.distributed.worker_audio import InMemoryAudio
    from after_ray.metrics import classification_report
    from after_ray.models.classifier_io import load_classifier
    from after_ray.training.scoring import score_batch

    speakers = sorted({r["speaker"] for r in small_corpus})
    test_speakers, val_speakers = set(speakers[:2]), {speakers[2]}
    train = [r for r in small_corpus if r["speaker"] not in test_speakers | val_speakers]
    val = [r for r in small_corpus if r["speaker"] in val_speakers]
    test = [r for r in small_corpus if r["speaker"] in test_speakers]
    classes = ["angry", "happy", "neutral", "sad"]
    config = load_config(
        None, ["finetune.epochs=12", "finetune.early_stopping_patience=0", "finetune.batch_size=8"]
    )
    summary = run_finetune(
        train_rows=train,
        val_rows=val,
        class_names=classes,
        finetune_cfg=config.finetune,
        backbone=config.backbone,
        audio=config.audio,
        ray_cfg=config.ray,
        storage_path=tmp_path / "ray",
        name="ft",
        out_dir=tmp_path / "model",
    )
    losses = [h["train_loss"] for h in summary["history"]]
    assert losses[-1] < losses[0]
    model, names = load_classifier(tmp_path / "model")
    assert names == classes
    audio = InMemoryAudio(test, config.audio, {c: i for i, c in enumerate(classes)})
    y_true, y_pred = [], []
    for batch in audio.eval_batches(batch_size=16):
        out = score_batch(model, batch, mc_samples=0, seed=0)
        y_true += batch["label_index"].tolist()
        y_pred += out["probs"].argmax(axis=1).tolist()
    report = classification_report(np.array(y_true), np.array(y_pred), classes)
    assert report["ua"] > 0.40, report  # chance is 0.25 on these 4 balanced classes


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_finetune_worker_killed_mid_epoch_resumes_from_its_epoch_checkpoint(
    ray_session, small_corpus, tmp_path, monkeypatch
):
    """One Ray Train worker (its own process) is SIGKILLed in epoch 2; FailureConfig restarts
    it, it continues from the epoch-1 checkpoint and ends with the weights of an uninterrupted
    run (the same loop run in the driver: Ray Train's local mode, world size 1 as well)."""
    classes = ["angry", "happy", "neutral", "sad"]
    speakers = sorted({r["speaker"] for r in small_corpus})
    train = [r for r in small_corpus if r["speaker"] in speakers[:3]]
    val = [r for r in small_corpus if r["speaker"] == speakers[3]]
    config = load_config(
        None, ["finetune.epochs=3", "finetune.early_stopping_patience=0", "finetune.batch_size=8"]
    )
    steps_per_epoch = -(-len(train) // 8)

    def fine_tune(num_workers: int, name: str) -> dict:
        ray_cfg = dataclasses.replace(config.ray, num_workers=num_workers, max_failures=1)
        return run_finetune(
            train_rows=train,
            val_rows=val,
            class_names=classes,
            finetune_cfg=config.finetune,
            backbone=config.backbone,
            audio=config.audio,
            ray_cfg=ray_cfg,
            storage_path=tmp_path / "ray",
            name=name,
            out_dir=tmp_path / name,
        )

    reference = fine_tune(0, "local")
    marker = tmp_path / "worker-killed"
    # Mid epoch 2 (the second epoch, index 1): after its second batch.
    monkeypatch.setenv(faults.ENV, f"finetune_step@{steps_per_epoch + 2}")
    monkeypatch.setenv(faults.ONCE_ENV, str(marker))
    summary = fine_tune(1, "worker")
    assert marker.exists()
    assert summary["resumed_from_epoch"] == 1
    assert [h["train_loss"] for h in summary["history"]] == [
        h["train_loss"] for h in reference["history"]
    ]
    assert_same_weights(weights_of(tmp_path / "local"), weights_of(tmp_path / "worker"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_disk_full_at_a_training_checkpoint_is_a_clear_error_and_the_run_resumes(
    ray_session, small_corpus, tmp_path, monkeypatch
):
    """The second TAPT checkpoint hits a full disk: a RunStateError saying so, no partial
    checkpoint left, the first one intact; once there is room, the same call resumes from it."""
    import errno

    from after_ray.distributed.train import local_checkpoint_dir
    from after_ray.errors import RunStateError
    from after_ray.store import torch_state

    config = tapt_config(6, "ray.num_workers=0")
    real_save = torch_state.save_training_state
    calls = []

    def save_on_a_disk_that_fills(state, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(state, path)

    monkeypatch.setattr(torch_state, "save_training_state", save_on_a_disk_that_fills)
    common = dict(
        rows=small_corpus[:16],
        tapt=config.tapt,
        backbone=config.backbone,
        audio=config.audio,
        ray_cfg=config.ray,
        storage_path=tmp_path / "ray",
        name="full",
        out_dir=tmp_path / "model",
    )
    with pytest.raises(RunStateError, match="No space left on device") as info:
        run_tapt(**common)
    assert "untouched" in str(info.value) and "resume" in str(info.value)
    kept = sorted(p.name for p in local_checkpoint_dir(tmp_path / "ray", "full").iterdir())
    assert kept == ["000000"]  # the step-2 checkpoint, and no partial one
    assert not (tmp_path / "model").exists()

    monkeypatch.setattr(torch_state, "save_training_state", real_save)
    summary = run_tapt(**common)
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 6


def test_streamed_batches_come_in_the_in_memory_order_with_the_same_crops(
    ray_session, small_corpus, monkeypatch
):
    """The streamed path (TAPT and fine-tuning above ``ray.in_memory_audio_max_hours``) gives the
    batches of the in-memory path, in order: decode tasks that finish out of order must not
    reorder them (they did, and two TAPT runs of one seed parted at step 36 on the demo)."""
    from after_ray.distributed import audio_data
    from after_ray.distributed.worker_audio import InMemoryAudio, StreamedAudio

    config = load_config(None, ["audio.train_crop_s=0.5"])
    # Many small decode tasks of uneven duration, so that some finish before earlier ones (a
    # closure: Ray pickles it by value, the workers run it).
    monkeypatch.setattr(audio_data, "TRAIN_ROWS_PER_TASK", 2)
    decode = audio_data.decode_batch

    def uneven_decode(batch, **kwargs):
        import time
        import zlib

        time.sleep((zlib.crc32(str(batch["utt_id"][0]).encode()) % 5) * 0.02)
        return decode(batch, **kwargs)

    monkeypatch.setattr(audio_data, "decode_batch", uneven_decode)
    streamed = StreamedAudio(small_corpus, config.audio)
    in_memory = InMemoryAudio(small_corpus, config.audio)

    def ids_and_values(source, epoch: int) -> tuple[list[str], list[np.ndarray]]:
        ids, values = [], []
        for batch in source.train_batches(seed=11, epoch=epoch, batch_size=4):
            ids += [str(u) for u in batch["utt_id"]]
            values.append(np.asarray(batch["input_values"]))
        return ids, values

    for epoch in (0, 1):
        expected_ids, expected_values = ids_and_values(in_memory, epoch)
        got_ids, got_values = ids_and_values(streamed, epoch)
        assert got_ids == expected_ids
        for got, expected in zip(got_values, expected_values, strict=True):
            np.testing.assert_allclose(got, expected, atol=1e-6)
