"""``after-ray bench audio`` compares real outputs: the Ray side equals a decode made here with
soundfile + soxr directly, and a pipeline that returns a wrong signal makes the benchmark fail.

Uses the session ``ray_session`` fixture.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
import soxr

import after_ray.bench.audio as bench_audio
from after_ray.config.audio import AudioConfig

N_FILES, SECONDS = 6, 1.0


def _reference(path: str, cfg: AudioConfig) -> np.ndarray:
    """The documented preprocessing, written out here: decode, average the channels, resample
    (soxr HQ), keep it whole (1 s < the 4 s training crop), zero mean / unit variance."""
    x, sr = sf.read(path, dtype="float32", always_2d=True)
    mono = x.mean(axis=1, dtype=np.float64).astype(np.float32)
    y = soxr.resample(mono, sr, cfg.sample_rate, quality="HQ").astype(np.float64)
    return (y - y.mean()) / math.sqrt(y.var() + 1e-7)


def test_bench_audio_ray_outputs_equal_an_independent_decode(ray_session, tmp_path, monkeypatch):
    cfg = AudioConfig()
    assert SECONDS < cfg.train_crop_s  # so the crop keeps the whole file, as _reference does
    seen: dict[str, tuple[float, ...]] = {}
    real_pipeline = bench_audio._ray_pipeline

    def recording_pipeline(rows, cfg):
        out = real_pipeline(rows, cfg)
        seen.update(out)
        return out

    monkeypatch.setattr(bench_audio, "_ray_pipeline", recording_pipeline)
    result = bench_audio.run_audio_benchmark(n_files=N_FILES, seconds=SECONDS, out_dir=tmp_path)
    assert result["n_files"] == N_FILES
    assert result["plain"]["files_per_s"] > 0 and result["ray"]["files_per_s"] > 0
    wavs = sorted(tmp_path.glob("*.wav"))
    assert len(wavs) == N_FILES and len(seen) == N_FILES
    for wav in wavs:
        reference = _reference(str(wav), cfg)
        assert len(reference) == cfg.sample_rate  # 1 s at the model rate
        got = seen[f"bench/{wav.stem}"]
        want = bench_audio.signature(reference)
        assert got[0] == want[0]
        assert got[1:] == pytest.approx(want[1:], rel=1e-4, abs=1e-3), wav.name
    # The files differ, so their signatures do: the check compares something.
    assert len({round(s[1], 3) for s in seen.values()}) == N_FILES


@pytest.mark.parametrize("damage", ["reversed", "shifted"])
def test_bench_audio_fails_when_the_pipeline_returns_a_wrong_signal(
    ray_session, tmp_path, monkeypatch, damage
):
    """Zero-mean damage (time-reversed, or shifted by one sample) has the same plain sum as the
    right output; the benchmark must still name the file."""
    from after_ray.distributed.audio_data import audio_dataset

    def damaged_pipeline(rows, cfg):
        out = {}
        ds = audio_dataset(rows, cfg, mode="train", seed=bench_audio.SEED, epoch=0)
        for batch in ds.iter_batches(batch_size=64, batch_format="numpy"):
            for utt_id, audio in zip(batch["utt_id"], batch["audio"], strict=True):
                if str(utt_id) == rows[1]["utt_id"]:
                    audio = audio[::-1] if damage == "reversed" else np.roll(audio, 1)
                out[str(utt_id)] = bench_audio.signature(audio)
        return out

    monkeypatch.setattr(bench_audio, "_ray_pipeline", damaged_pipeline)
    with pytest.raises(
        RuntimeError, match=r"outputs differ from the plain loop for \['bench/utt00001"
    ):
        bench_audio.run_audio_benchmark(n_files=3, seconds=SECONDS, out_dir=tmp_path)
