"""The synthesized demo corpus: layout, audio format, determinism, rendered emotion, reuse."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from after_ray.data.corpora import espeak
from after_ray.data.corpora.synth import (
    INFO_NAME,
    MAX_SPEAKERS,
    describe_corpus,
    speaker_table,
    synthesize_corpus,
)
from after_ray.errors import ConfigError, CorpusError

EMOTIONS = ("neutral", "happy", "angry", "sad")
TINY = {"n_speakers": 3, "utterances_per_emotion": 3, "emotions": EMOTIONS}


def read_labels(root: Path) -> list[dict[str, str]]:
    with (root / "labels.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def wav_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.wav"))}


def loud_frames_db(samples: np.ndarray, sample_rate: int) -> float:
    """Level of the loudest 10% of 20 ms frames: loudness of the speech, not of its pauses."""
    frame = sample_rate // 50
    n = len(samples) // frame
    power = np.mean(samples[: n * frame].reshape(n, frame) ** 2, axis=1)
    return float(10 * np.log10(np.percentile(power, 90) + 1e-12))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    initialized_before = espeak.is_initialized()
    root = synthesize_corpus(tmp_path_factory.mktemp("synth_a"), seed=0, num_processes=2, **TINY)
    # Rendering happens in child processes: the caller's espeak state is never touched.
    assert espeak.is_initialized() == initialized_before
    return root


def test_files_are_16k_mono_pcm16_speech_of_plausible_length(corpus):
    wavs = sorted(corpus.rglob("*.wav"))
    assert len(wavs) == 3 * 4 * 3
    for path in wavs:
        info = sf.info(str(path))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert 0.5 <= info.frames / info.samplerate <= 8.0
        samples, _ = sf.read(str(path), dtype="int16")
        assert np.sqrt(np.mean(samples.astype(float) ** 2)) > 100  # not silent (about -50 dBFS)
        assert np.abs(samples.astype(int)).max() < 32000  # the limiter kept it off full scale


def test_labels_csv_lists_exactly_the_files_in_the_generic_layout(corpus):
    rows = read_labels(corpus)
    assert list(rows[0]) == ["path", "label", "speaker", "gender"]
    assert {r["path"] for r in rows} == set(wav_bytes(corpus))
    for row in rows:
        speaker_dir, file_name = row["path"].split("/")[1:]
        assert speaker_dir == row["speaker"]
        assert file_name.startswith(f"{row['speaker']}_{row['label']}_")
    genders = {r["speaker"]: r["gender"] for r in rows}
    assert genders == {"spk01": "F", "spk02": "M", "spk03": "F"}
    description = describe_corpus(corpus)
    assert description["per_emotion"] == {e: 9 for e in EMOTIONS}
    assert description["per_speaker"] == {"spk01": 12, "spk02": 12, "spk03": 12}
    assert description["total_duration_s"] > 36 * 0.5


def test_emotion_is_rendered_in_the_audio(corpus):
    durations: dict[str, list[float]] = {e: [] for e in EMOTIONS}
    loudness: dict[str, list[float]] = {e: [] for e in EMOTIONS}
    for row in read_labels(corpus):
        samples, rate = sf.read(str(corpus / row["path"]))
        durations[row["label"]].append(len(samples) / rate)
        loudness[row["label"]].append(loud_frames_db(samples, rate))
    # Sad is spoken slower (and with pauses), angry louder, measured on the written audio.
    assert np.mean(durations["sad"]) > 1.3 * np.mean(durations["angry"])
    assert np.mean(loudness["angry"]) > np.mean(loudness["sad"]) + 3.0


def test_same_seed_gives_identical_bytes_and_another_seed_differs(corpus, tmp_path):
    other = tmp_path / "other"
    synthesize_corpus(other, seed=1, num_processes=1, **TINY)
    reference, changed = wav_bytes(corpus), wav_bytes(other)
    assert reference.keys() == changed.keys()
    assert all(reference[k] != changed[k] for k in reference)
    # Rebuilding the same directory with seed 0 (and another process count) replaces the
    # seed-1 build and reproduces the first corpus byte for byte.
    synthesize_corpus(other, seed=0, num_processes=1, **TINY)
    assert wav_bytes(other) == reference
    assert (other / "labels.csv").read_bytes() == (corpus / "labels.csv").read_bytes()


def test_identical_build_is_reused_and_an_incomplete_one_is_rebuilt(corpus):
    files = [corpus / INFO_NAME, corpus / "labels.csv", *sorted(corpus.rglob("*.wav"))]
    mtimes = [f.stat().st_mtime_ns for f in files]
    assert synthesize_corpus(corpus, seed=0, **TINY) == corpus
    assert [f.stat().st_mtime_ns for f in files] == mtimes

    before = wav_bytes(corpus)
    missing = files[-1]
    missing.unlink()
    synthesize_corpus(corpus, seed=0, **TINY)
    assert wav_bytes(corpus) == before
    assert (corpus / INFO_NAME).stat().st_mtime_ns != mtimes[0]


def test_refuses_a_directory_it_did_not_write(tmp_path):
    (tmp_path / "notes.txt").write_text("someone else's data")
    with pytest.raises(CorpusError, match="not written by the corpus synthesizer"):
        synthesize_corpus(tmp_path, **TINY)
    assert (tmp_path / "notes.txt").exists()


def test_bad_parameters_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="emotions"):
        synthesize_corpus(tmp_path, emotions=("neutral", "bored"))
    with pytest.raises(ConfigError, match="n_speakers"):
        synthesize_corpus(tmp_path, n_speakers=MAX_SPEAKERS + 1)
    assert not any(tmp_path.iterdir())


def test_speakers_have_distinct_voices_and_balanced_gender():
    for n in (48, MAX_SPEAKERS):
        table = speaker_table(n)
        assert len({s.voice for s in table}) == n
        assert len({s.speaker_id for s in table}) == n
        assert sum(s.gender == "F" for s in table) == n // 2
    assert speaker_table(5) == speaker_table(48)[:5]  # identity does not depend on the size


def test_espeak_initialises_once_and_synthesizes_repeatedly_in_one_process():
    first = espeak.synthesize("The train was late again.", "en-us+f3")
    engine = espeak._engine
    second = espeak.synthesize(
        "The train was late again.",
        "en-gb-scotland+m2",
        espeak.Prosody(rate_wpm=120, pitch=30, pitch_range=10, volume=60, word_gap=3),
    )
    assert espeak._engine is engine and espeak.is_initialized()
    assert first.dtype == np.float32 and second.dtype == np.float32
    assert espeak.sample_rate() == espeak.NATIVE_SAMPLE_RATE
    # Slow speech with word gaps is longer; both are real signals.
    assert len(second) > 1.2 * len(first) > 0.5 * espeak.NATIVE_SAMPLE_RATE
    assert np.sqrt(np.mean(first**2)) > 0.01 and np.sqrt(np.mean(second**2)) > 0.01


def test_espeak_rejects_unknown_voices_and_bad_prosody():
    with pytest.raises(ConfigError, match="unknown variant"):
        espeak.synthesize("Hello.", "en-us+nobody")
    with pytest.raises(ConfigError, match="no voice"):
        espeak.synthesize("Hello.", "xx-nowhere")
    with pytest.raises(ConfigError, match="rate_wpm"):
        espeak.synthesize("Hello.", "en-us", espeak.Prosody(rate_wpm=20))


# --- natural-corpus shape: skewed priors, near-duplicates, low-quality files --------------------

DEGRADED = {"duplicate_fraction": 0.3, "low_quality_fraction": 0.3}


def read_render_params(root: Path) -> dict[str, dict[str, str]]:
    with (root / "render_params.csv").open(newline="") as handle:
        return {row["path"]: row for row in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def degraded(tmp_path_factory) -> Path:
    return synthesize_corpus(tmp_path_factory.mktemp("synth_d"), seed=0, **TINY, **DEGRADED)


def test_class_priors_split_every_speaker_by_largest_remainder(tmp_path):
    root = synthesize_corpus(
        tmp_path / "skewed",
        n_speakers=2,
        emotions=EMOTIONS,
        class_priors={"neutral": 0.45, "happy": 0.25, "angry": 0.15, "sad": 0.15},
        utterances_per_speaker=12,
    )
    counts: dict[tuple[str, str], int] = {}
    for row in read_labels(root):
        counts[row["speaker"], row["label"]] = counts.get((row["speaker"], row["label"]), 0) + 1
    # 12 x (.45, .25, .15, .15) = 5.4, 3, 1.8, 1.8 -> floors 5, 3, 1, 1; the two remaining files go
    # to the largest remainders (angry .8, sad .8), not to neutral (.4).
    for speaker in ("spk01", "spk02"):
        got = {e: counts[speaker, e] for e in EMOTIONS}
        assert got == {"neutral": 5, "happy": 3, "angry": 2, "sad": 2}


def test_priors_must_name_the_emotions_and_leave_every_emotion_a_file(tmp_path):
    with pytest.raises(ConfigError, match="class_priors must name exactly"):
        synthesize_corpus(tmp_path / "a", n_speakers=3, class_priors={"neutral": 1.0})
    with pytest.raises(ConfigError, match="raise utterances_per_speaker"):
        synthesize_corpus(
            tmp_path / "b",
            n_speakers=3,
            class_priors={"neutral": 0.94, "happy": 0.02, "angry": 0.02, "sad": 0.02},
            utterances_per_speaker=8,
        )
    with pytest.raises(ConfigError, match="duplicate_fraction must be between 0 and 1"):
        synthesize_corpus(tmp_path / "c", n_speakers=3, duplicate_fraction=1.5)


def test_undegraded_files_are_planned_as_in_a_clean_build(corpus, degraded):
    """Degradations draw from their own random stream: a file they leave alone gets the plan it
    has in a clean build. (Not the same bytes: espeak's state carries over from the previous
    utterance of the speaker, see espeak.py.)"""
    dirty, clean = read_render_params(degraded), read_render_params(corpus)
    untouched = [
        p for p, row in dirty.items() if row["duplicate_of"] == "-1" and row["band"] == "full"
        and float(row["snr_db"]) >= 5.0
    ]  # fmt: skip
    assert 0 < len(untouched) < len(dirty)
    planned = [f for f in dirty[untouched[0]] if f not in ("duration_s", "limiter_scale")]
    for path in untouched:
        assert [dirty[path][f] for f in planned] == [clean[path][f] for f in planned]


def test_a_duplicate_re_reads_an_original_with_fresh_noise(degraded):
    params = read_render_params(degraded)
    duplicates = [row for row in params.values() if row["duplicate_of"] != "-1"]
    assert duplicates, "30% duplicates of 36 files drew none"
    reading = ("sentence_index", "rate_wpm", "pitch", "pitch_range", "volume", "espeak_seed")
    for row in duplicates:
        index = int(row["duplicate_of"])
        original = params[f"wav/{row['speaker']}/{row['speaker']}_{row['label']}_{index:03d}.wav"]
        assert original["duplicate_of"] == "-1"  # copies are of originals, never of copies
        assert [row[k] for k in reading] == [original[k] for k in reading]
        assert row["noise_colour"] != original["noise_colour"]


def test_low_quality_files_are_noisy_and_telephone_ones_band_limited(degraded):
    params = read_render_params(degraded)
    low = [row for row in params.values() if float(row["snr_db"]) < 5.0]
    assert low and all(-5.0 <= float(row["snr_db"]) <= 5.0 for row in low)
    telephone = [row for row in params.values() if row["band"] == "telephone"]
    assert telephone and all(row in low for row in telephone)
    for row in telephone:
        samples, rate = sf.read(str(degraded / row["path"]), dtype="float64")
        power = np.abs(np.fft.rfft(samples)) ** 2
        freqs = np.fft.rfftfreq(len(samples), 1.0 / rate)
        outside = power[(freqs < 250) | (freqs > 3500)].sum() / power.sum()
        assert outside < 1e-3  # only 16-bit rounding noise is left outside 300-3400 Hz
