"""The audio a Ray Train worker trains on: streamed per epoch, or decoded once and kept.

``StreamedAudio`` builds a Ray Data pipeline per epoch over the worker's rows
(``audio_dataset(..., epoch=e)``): fresh random crops every epoch, each a pure function of
(seed, epoch, utt_id), decoded block by block under backpressure. That is the right path for a
corpus larger than a worker's memory, but each pass costs a pipeline start (seconds on a small
machine), which dominates when the labeled set is a few hundred utterances.

``InMemoryAudio`` decodes the worker's rows once (mono, resampled) and cuts the same kind of
per-epoch random crops in process. ``worker_audio`` picks it when the rows hold less audio than
``max_hours``. Both yield batches in the audio-batch contract through ``PadCollate``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from after_ray.config.audio import AudioConfig
from after_ray.data.audio import (
    EMPTY,
    NON_FINITE,
    AudioProblem,
    chunk,
    crop,
    decode,
    normalize,
    resample,
    to_mono,
)
from after_ray.distributed.audio_data import PadCollate, audio_dataset, in_order, label_targets
from after_ray.seeding import utterance_epoch_rng

log = logging.getLogger(__name__)


class StreamedAudio:
    def __init__(self, rows: Sequence[Mapping[str, Any]], cfg: AudioConfig, label_to_index=None):
        self.rows = list(rows)
        self.cfg = cfg
        self.label_to_index = label_to_index

    def _iterate(self, ds, batch_size: int) -> Iterator[dict]:
        return in_order(ds).iter_torch_batches(batch_size=batch_size, collate_fn=PadCollate())

    def train_batches(self, *, seed: int, epoch: int, batch_size: int) -> Iterator[dict]:
        ds = audio_dataset(
            self.rows,
            self.cfg,
            mode="train",
            seed=seed,
            epoch=epoch,
            shuffle=True,
            label_to_index=self.label_to_index,
        )
        return self._iterate(ds, batch_size)

    def eval_batches(self, *, batch_size: int) -> Iterator[dict]:
        ds = audio_dataset(self.rows, self.cfg, mode="score", label_to_index=self.label_to_index)
        return self._iterate(ds, batch_size)


class InMemoryAudio:
    def __init__(self, rows: Sequence[Mapping[str, Any]], cfg: AudioConfig, label_to_index=None):
        self.cfg = cfg
        self.utt_ids: list[str] = []
        self.audio: list[np.ndarray] = []
        keep = []
        for row in rows:
            try:
                x, sr = decode(row["path"])
                # The same reason codes as the streamed path (load_for_model), never an ad hoc one.
                if x.shape[1] == 0:
                    raise AudioProblem(EMPTY, "0 samples", row["path"])
                if not np.isfinite(x).all():
                    raise AudioProblem(NON_FINITE, "NaN/inf samples", row["path"])
                self.audio.append(resample(to_mono(x), sr, cfg.sample_rate))
            except AudioProblem as exc:  # deleted or damaged since prepare: drop, never crash
                log.warning("dropped %s at load: %s", row["utt_id"], exc)
                continue
            self.utt_ids.append(str(row["utt_id"]))
            keep.append(row)
        self.labels: dict[str, np.ndarray] = {}
        if label_to_index is not None:
            label_index, soft = label_targets(
                [r.get("label") for r in keep],
                [r.get("votes") for r in keep] if any("votes" in r for r in keep) else None,
                label_to_index,
            )
            self.labels["label_index"] = np.asarray(label_index, dtype=np.int64)
            if soft is not None:
                self.labels["soft_target"] = np.asarray(soft, dtype=np.float32)
        self.collate = PadCollate()

    def _normalised(self, x: np.ndarray) -> np.ndarray:
        return normalize(x) if self.cfg.normalize else np.ascontiguousarray(x, dtype=np.float32)

    def _batch(self, idx: list[int], pieces: list[np.ndarray], chunk_index=None) -> dict:
        batch: dict[str, Any] = {
            "utt_id": np.array([self.utt_ids[i] for i in idx], dtype=object),
            "audio": pieces,
        }
        for key, values in self.labels.items():
            batch[key] = values[idx]
        if chunk_index is not None:
            batch["chunk_index"] = np.asarray(chunk_index, dtype=np.int64)
        return self.collate(batch)

    def train_batches(self, *, seed: int, epoch: int, batch_size: int) -> Iterator[dict]:
        order = np.random.default_rng([seed & 0xFFFFFFFF, epoch]).permutation(len(self.audio))
        n = self.cfg.train_crop_samples
        for start in range(0, len(order), batch_size):
            idx = [int(i) for i in order[start : start + batch_size]]
            pieces = [
                self._normalised(
                    crop(
                        self.audio[i],
                        n,
                        "random",
                        utterance_epoch_rng(seed, epoch, self.utt_ids[i]),
                    )
                )
                for i in idx
            ]
            yield self._batch(idx, pieces)

    def eval_batches(self, *, batch_size: int) -> Iterator[dict]:
        idx_all, pieces_all, chunks_all = [], [], []
        for i, x in enumerate(self.audio):
            for k, piece in enumerate(chunk(x, self.cfg.score_chunk_samples)):
                idx_all.append(i)
                pieces_all.append(self._normalised(piece))
                chunks_all.append(k)
        for start in range(0, len(idx_all), batch_size):
            sl = slice(start, start + batch_size)
            yield self._batch(idx_all[sl], pieces_all[sl], chunks_all[sl])


def worker_audio(
    rows: Sequence[Mapping[str, Any]],
    cfg: AudioConfig,
    *,
    label_to_index=None,
    max_hours: float,
) -> InMemoryAudio | StreamedAudio:
    """In memory when the rows hold less than ``max_hours`` of audio, streamed otherwise."""
    hours = sum(float(r.get("duration_s") or 0.0) for r in rows) / 3600.0
    known = all(r.get("duration_s") for r in rows)
    if known and hours <= max_hours:
        return InMemoryAudio(rows, cfg, label_to_index)
    return StreamedAudio(rows, cfg, label_to_index)
