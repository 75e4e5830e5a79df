"""Audio decoding, quality reason codes, resampling, crop/pad/normalise/chunk, quarantine table.

Pure functions only: no Ray here (the Ray Data pipeline is tested in test_audio_data.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pytest
import soundfile as sf

from after_ray.config.audio import AudioConfig
from after_ray.data import audio
from after_ray.data.audio import (
    AudioProblem,
    check_quality,
    chunk,
    crop,
    crop_or_pad,
    decode,
    load_for_model,
    normalize,
    probe_file,
    resample,
    to_mono,
)
from after_ray.data.quarantine import (
    QUARANTINE_COLUMNS,
    csv_twin,
    read_quarantine,
    summary_line,
    write_quarantine,
)
from after_ray.seeding import utterance_epoch_rng

CFG = AudioConfig()


def tone(seconds: float, sr: int, freq: float = 220.0, channels: int = 1, amp: float = 0.3):
    """A harmonic-rich tone plus a little noise, [samples, channels] as soundfile writes it."""
    rng = np.random.default_rng(int(seconds * 1000) + sr + channels)
    t = np.arange(int(round(seconds * sr))) / sr
    x = amp * (np.sin(2 * np.pi * freq * t) + 0.03 * rng.standard_normal(len(t)))
    return np.stack([x * (1 + 0.1 * c) for c in range(channels)], axis=1).astype(np.float32)


def write(path: Path, data: np.ndarray, sr: int, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, data, sr, **kwargs)
    return path


# --------------------------------------------------------------------------------------------
# reason codes


def _bad_files(root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, expected reason) for every kind of bad file."""
    files: dict[str, tuple[Path, str]] = {}
    files["missing"] = (root / "nope.wav", "missing_file")

    zero = root / "zero_bytes.wav"
    zero.write_bytes(b"")
    files["zero_bytes"] = (zero, "empty")

    text = root / "notes.wav"
    text.write_text("this is a text file, not audio\n" * 20)
    files["text_named_wav"] = (text, "unreadable")

    good_flac = write(root / "ok.flac", tone(1.0, 16000), 16000)
    raw = bytearray(good_flac.read_bytes())
    raw[8:42] = b"\xff" * 34  # STREAMINFO block: rate, channels, bits, total samples
    corrupt = root / "corrupt_header.flac"
    corrupt.write_bytes(bytes(raw))
    files["flac_corrupt_header"] = (corrupt, "unreadable")

    files["zero_length_wav"] = (
        write(root / "no_samples.wav", np.zeros((0, 1), np.float32), 16000),
        "empty",
    )
    files["silent"] = (
        write(root / "silent.wav", np.zeros((16000, 1), np.float32), 16000),
        "silent",
    )
    quiet = tone(1.0, 16000, amp=1e-4)  # about -83 dBFS: below the -60 dBFS default
    files["quiet"] = (write(root / "quiet.wav", quiet, 16000), "silent")
    dc = np.full((16000, 1), 0.5, np.float32)  # constant offset: loud, but no signal
    files["dc_only"] = (write(root / "dc.wav", dc, 16000, subtype="FLOAT"), "silent")

    nan = tone(1.0, 16000)
    nan[100:110] = np.nan
    files["nan"] = (write(root / "nan.wav", nan, 16000, subtype="FLOAT"), "non_finite")
    inf = tone(1.0, 16000)
    inf[5] = np.inf
    files["inf"] = (write(root / "inf.wav", inf, 16000, subtype="FLOAT"), "non_finite")

    files["too_short"] = (write(root / "short.wav", tone(0.02, 16000), 16000), "too_short")
    files["too_long"] = (write(root / "long.wav", tone(3.0, 16000), 16000), "too_long")
    files["too_many_channels"] = (
        write(root / "array.wav", tone(0.5, 16000, channels=9), 16000),
        "too_many_channels",
    )
    files["rate_too_low"] = (write(root / "2k.wav", tone(0.5, 2000, 200), 2000), "unsupported_rate")
    return files


# Quarantines anything over 2 s so the too_long case needs no minute-long file.
SMALL_CAP = AudioConfig(max_duration_s=2.0)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    return _bad_files(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize(
    "name",
    [
        "missing",
        "zero_bytes",
        "text_named_wav",
        "flac_corrupt_header",
        "zero_length_wav",
        "silent",
        "quiet",
        "dc_only",
        "nan",
        "inf",
        "too_short",
        "too_long",
        "too_many_channels",
        "rate_too_low",
    ],
)
def test_each_bad_file_gets_its_reason_code(bad_files, name):
    path, expected = bad_files[name]
    result = probe_file(path, SMALL_CAP)
    assert result.reason == expected, result
    assert result.reason in audio.REASONS
    assert result.detail  # always says why


def test_unreadable_detail_carries_the_libsndfile_message(bad_files):
    result = probe_file(bad_files["text_named_wav"][0], CFG)
    assert "Format not recognised" in result.detail
    assert probe_file(bad_files["too_long"][0], SMALL_CAP).detail.startswith("3.00 s >")


NOBODY = 65534


def _probe_as(uid: int, path) -> tuple[str, str]:
    """``probe_file`` in a forked child whose effective uid is ``uid``: root reads any file, so
    CI (which runs as root) needs another user to see a permission denied at all."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to uid, probe, report, exit without running pytest's hooks
        try:
            os.setegid(uid)
            os.seteuid(uid)
            result = probe_file(path, CFG)
            os.write(write_end, f"{result.reason}\n{result.detail}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        text = pipe.read().decode()
    os.waitpid(pid, 0)
    reason, _, detail = text.partition("\n")
    return reason, detail


def test_permission_denied_is_unreadable_with_the_reason(tmp_path):
    # A world-traversable folder (pytest's own is private to its user), a file nobody may read.
    folder = Path(tempfile.mkdtemp(prefix="after-ray-locked-"))
    try:
        folder.chmod(0o755)
        path = write(folder / "locked.wav", tone(0.5, 16000), 16000)
        path.chmod(0)
        if os.geteuid() == 0:
            reason, detail = _probe_as(NOBODY, path)
            assert detail == f"permission denied for uid {NOBODY}"
        else:
            result = probe_file(path, CFG)
            reason, detail = result.reason, result.detail
            assert detail == f"permission denied for uid {os.geteuid()}"
        assert reason == "unreadable"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_decode_raises_audio_problem_with_reason(bad_files):
    with pytest.raises(AudioProblem) as info:
        decode(bad_files["missing"][0])
    assert info.value.reason == "missing_file"
    with pytest.raises(AudioProblem) as info:
        load_for_model(bad_files["nan"][0], CFG, "score")
    assert info.value.reason == "non_finite"
    with pytest.raises(AudioProblem) as info:
        load_for_model(bad_files["zero_length_wav"][0], CFG, "train", np.random.default_rng(0))
    assert info.value.reason == "empty"


def test_check_quality_on_arrays():
    sr = 16000
    good = tone(1.0, sr).T
    assert check_quality(good, sr, CFG) is None
    assert check_quality(np.zeros((1, sr), np.float32), sr, CFG) == "silent"
    assert check_quality(np.zeros((2, 0), np.float32), sr, CFG) == "empty"
    assert check_quality(good[:, :100], sr, CFG) == "too_short"
    assert check_quality(np.tile(good, (12, 1)), sr, CFG) == "too_many_channels"
    assert check_quality(good, 1000, CFG) == "unsupported_rate"
    broken = good.copy()
    broken[0, 3] = np.nan
    assert check_quality(broken, sr, CFG) == "non_finite"
    # A threshold of -inf turns the silence check off.
    assert (
        check_quality(np.zeros((1, sr), np.float32), sr, AudioConfig(silence_dbfs=-np.inf)) is None
    )


# --------------------------------------------------------------------------------------------
# handled, not quarantined


@pytest.mark.parametrize(
    ("sr", "channels", "seconds"),
    [(8000, 1, 1.5), (96000, 2, 1.0), (44100, 6, 0.8), (16000, 8, 0.5)],
)
def test_odd_rates_and_channel_counts_are_resampled_and_downmixed(tmp_path, sr, channels, seconds):
    path = write(tmp_path / f"x_{sr}_{channels}.wav", tone(seconds, sr, channels=channels), sr)
    probe = probe_file(path, CFG)
    assert probe.reason is None
    assert (probe.sample_rate, probe.channels) == (sr, channels)
    assert probe.duration_s == pytest.approx(seconds, abs=1e-3)
    (out,) = load_for_model(path, CFG, "score")
    assert out.ndim == 1 and out.dtype == np.float32
    assert abs(len(out) - seconds * CFG.sample_rate) <= 1


def test_path_with_spaces_and_non_ascii_characters(tmp_path):
    path = write(
        tmp_path / "dir with spaces" / "Ünïcødé 音声 (take 2).wav", tone(1.0, 22050), 22050
    )
    assert probe_file(path, CFG).reason is None
    x, sr = decode(str(path))
    assert (x.shape, sr) == ((1, 22050), 22050)
    (out,) = load_for_model(path, CFG, "score")
    assert len(out) == 16000


def test_downmix_averages_channels():
    x = np.stack([np.ones(4), -np.ones(4), 3 * np.ones(4)]).astype(np.float32)
    assert np.allclose(to_mono(x), 1.0)
    assert to_mono(x[:1]).shape == (4,)


def test_resampling_keeps_the_frequency_and_the_duration():
    sr_in, sr_out = 44100, 16000
    t = np.arange(sr_in * 2) / sr_in
    x = np.sin(2 * np.pi * 1000.0 * t).astype(np.float32)
    y = resample(x, sr_in, sr_out)
    assert abs(len(y) - 2 * sr_out) <= 1
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    peak_hz = np.argmax(spectrum) * sr_out / len(y)
    assert peak_hz == pytest.approx(1000.0, abs=1.0)
    # Amplitude survives (HQ passband is flat at 1 kHz), away from the edges.
    assert np.max(np.abs(y[1000:-1000])) == pytest.approx(1.0, abs=0.01)
    # A tone above the new Nyquist frequency is filtered out, not aliased.
    high = np.sin(2 * np.pi * 12000.0 * t).astype(np.float32)
    assert np.sqrt(np.mean(resample(high, sr_in, sr_out)[1000:-1000] ** 2)) < 1e-3


# --------------------------------------------------------------------------------------------
# crop / pad / normalise / chunk


def test_crop_or_pad_shapes_and_determinism():
    x = np.arange(100, dtype=np.float32)
    short, n_short = crop_or_pad(x[:30], 50, "random", np.random.default_rng(0))
    assert short.shape == (50,) and n_short == 30
    assert np.array_equal(short[:30], x[:30]) and not short[30:].any()
    a, _ = crop_or_pad(x, 50, "random", np.random.default_rng(7))
    b, _ = crop_or_pad(x, 50, "random", np.random.default_rng(7))
    assert np.array_equal(a, b)
    assert np.array_equal(np.diff(a), np.ones(49))  # one contiguous window
    starts = {int(crop(x, 50, "random", np.random.default_rng(s))[0]) for s in range(20)}
    assert len(starts) > 5  # the window really moves
    assert np.array_equal(crop(x, 10, "start"), x[:10])


def test_row_rng_depends_on_seed_epoch_and_id_only():
    def draw(*key):
        return utterance_epoch_rng(*key).integers(0, 2**31, 4).tolist()

    assert draw(0, 0, "a/1") == draw(0, 0, "a/1")
    assert draw(0, 0, "a/1") != draw(0, 1, "a/1")
    assert draw(0, 0, "a/1") != draw(1, 0, "a/1")
    assert draw(0, 0, "a/1") != draw(0, 0, "a/2")
    assert draw(0, None, "a/1") != draw(0, None, "a/1")  # None: fresh entropy


def test_normalize_over_valid_samples_and_constant_input():
    rng = np.random.default_rng(0)
    x = np.zeros(1000, np.float32)
    x[:600] = 5 + 3 * rng.standard_normal(600)
    y = normalize(x, valid=600)
    assert y[:600].mean() == pytest.approx(0, abs=1e-5)
    assert y[:600].std() == pytest.approx(1, abs=1e-3)
    assert not y[600:].any()
    flat = normalize(np.full(50, 0.25, np.float32))
    assert np.all(np.isfinite(flat)) and not flat.any()
    assert normalize(np.zeros(0, np.float32)).shape == (0,)


def test_chunk_splits_evenly_without_a_tiny_tail():
    x = np.arange(25, dtype=np.float32)
    pieces = chunk(x, 10)
    assert [len(p) for p in pieces] == [9, 8, 8]
    assert np.array_equal(np.concatenate(pieces), x)
    assert [len(p) for p in chunk(x, 25)] == [25]
    assert [len(p) for p in chunk(x, 5)] == [5] * 5


def test_train_crop_reads_only_a_window_that_matches_the_full_decode(tmp_path):
    sr = 16000
    data = np.random.default_rng(1).uniform(-0.5, 0.5, (10 * sr, 1)).astype(np.float32)
    path = write(tmp_path / "ten_s.wav", data, sr, subtype="FLOAT")
    raw = AudioConfig(normalize=False, train_crop_s=2.0)
    (a,) = load_for_model(path, raw, "train", np.random.default_rng(3))
    (b,) = load_for_model(path, raw, "train", np.random.default_rng(3))
    assert np.array_equal(a, b) and len(a) == 2 * sr
    start = int(np.flatnonzero(data[:, 0] == a[0])[0])
    assert np.array_equal(a, data[start : start + 2 * sr, 0])
    # At another rate the crop is still exact in length and is a clean piece of the resampled
    # whole file: its first samples match as well as its middle (no resampler edge transient,
    # which is what the margin read around the window is for). Sub-sample grid offsets between
    # the window and the whole file leave a small error everywhere, hence "as well as".
    t = np.arange(3 * 48000) / 48000
    rng = np.random.default_rng(2)
    freqs, phases = rng.uniform(100, 900, 12), rng.uniform(0, 2 * np.pi, 12)
    x = sum(np.sin(2 * np.pi * f * t + p) for f, p in zip(freqs, phases, strict=True))
    path48 = write(tmp_path / "3s_48k.wav", (0.05 * x).astype(np.float32), 48000, subtype="FLOAT")
    half = AudioConfig(normalize=False, train_crop_s=0.5)
    (whole,) = load_for_model(path48, half, "score")
    for seed in range(4):
        (c,) = load_for_model(path48, half, "train", np.random.default_rng(seed))
        n = len(c)
        assert n == sr // 2
        energy = np.sqrt(np.convolve(whole**2, np.ones(n), mode="valid"))
        corr = np.correlate(whole, c, mode="valid") / (np.linalg.norm(c) * energy)
        lag = int(np.argmax(corr))
        assert corr[lag] > 0.995
        err = np.abs(c - whole[lag : lag + n]) / np.abs(whole).max()
        assert err[:50].max() <= err[100:-100].max() + 0.01, seed


def test_load_for_model_score_chunks_and_normalises(tmp_path):
    path = write(tmp_path / "25s.wav", tone(25.0, 16000), 16000)
    pieces = load_for_model(path, CFG, "score")
    assert [len(p) for p in pieces] == [133334, 133333, 133333]
    for p in pieces:
        assert p.mean() == pytest.approx(0, abs=1e-4) and p.std() == pytest.approx(1, abs=1e-3)


# --------------------------------------------------------------------------------------------
# config


def test_audio_config_validate():
    assert AudioConfig().validate() == []
    bad = AudioConfig(
        sample_rate=0, train_crop_s=-1, min_duration_s=5, max_duration_s=4, silence_dbfs=3
    )
    problems = bad.validate()
    keys = {p.split(":")[0] for p in problems}
    assert {
        "audio.sample_rate",
        "audio.train_crop_s",
        "audio.min_duration_s",
        "audio.silence_dbfs",
    } <= keys
    assert all(p.startswith("audio.") for p in problems)
    too_short = AudioConfig(min_duration_s=0.01).validate()
    assert any("encoder frame" in p for p in too_short)


# --------------------------------------------------------------------------------------------
# quarantine table


def test_quarantine_roundtrip_csv_twin_and_summary(tmp_path):
    rows = [
        {
            "utt_id": "c/a",
            "path": "/x/a.wav",
            "reason": "silent",
            "detail": "RMS -90",
            "stage": "probe",
        },
        {
            "utt_id": "c/b",
            "path": "/x/b.wav",
            "reason": "unreadable",
            "detail": "bad",
            "stage": "probe",
        },
        {
            "utt_id": "c/c",
            "path": "/x/c.wav",
            "reason": "unreadable",
            "detail": "bad",
            "stage": "probe",
        },
    ]
    path = write_quarantine(rows, tmp_path / "run" / "quarantine.parquet")
    table = read_quarantine(path)
    assert table.column_names == list(QUARANTINE_COLUMNS)
    assert table.to_pylist() == rows
    twin = pacsv.read_csv(csv_twin(path))
    assert twin.column("utt_id").to_pylist() == ["c/a", "c/b", "c/c"]
    line = summary_line(3, 960, path)
    assert line == (
        f"quarantine: 3 of 960 files (0.3%) -> {path} (reasons: silent 1, unreadable 2)"
    )
    empty = write_quarantine([], tmp_path / "empty.parquet")
    assert read_quarantine(empty).num_rows == 0
    assert summary_line(0, 10, empty) == f"quarantine: 0 of 10 files (0.0%) -> {empty}"
    assert summary_line(7, 960, "q.parquet", {"unreadable": 4, "silent": 3}) == (
        "quarantine: 7 of 960 files (0.7%) -> q.parquet (reasons: silent 3, unreadable 4)"
    )
