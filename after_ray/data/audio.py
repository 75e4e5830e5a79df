"""Audio in, model input out: decode, downmix, resample, quality checks, crop/pad, normalise, chunk.

Pure functions on numpy arrays; no Ray, no torch. Decoding uses ``soundfile`` (libsndfile) and
resampling ``soxr`` (HQ), never torchaudio (see the README).

Arrays: ``decode`` returns float32 ``[channels, samples]`` at the file's native rate; everything
after ``to_mono`` works on float32 1-D arrays.

Quality reason codes (stable strings: they are written to the quarantine table and may be
filtered on by users, so never rename one):

==================  =========================================================================
reason              meaning
==================  =========================================================================
missing_file        the path does not exist
unreadable          libsndfile cannot open or decode it (corrupt file, text file named .wav,
                    bad header, unsupported codec, permission denied), it is not a regular file
                    (a directory, a named pipe, a device), or it is a truncated WAV (its header
                    declares more audio than the file holds: an interrupted copy); ``detail``
                    carries the OS / libsndfile message or the two lengths
empty               0-byte file, or a valid header with 0 samples
unsupported_rate    native sample rate outside [min_input_rate, max_input_rate] (default
                    4 kHz..384 kHz): below 4 kHz there is no speech band left to resample
                    up to 16 kHz; above 384 kHz the header is almost surely wrong
too_many_channels   more than ``max_channels`` (default 8, i.e. 7.1 surround): an average of a
                    large mic array or of mis-labelled raw data is not one speech signal
too_long            longer than ``max_duration_s`` (checked from the header, nothing decoded)
too_short           shorter than ``min_duration_s``: not one frame of the CNN encoder
non_finite          NaN or +-inf samples (float WAV/FLAC written by a broken pipeline)
silent              RMS of the mean-removed mono mix below ``silence_dbfs`` (dB re full scale;
                    a full-scale sine is -3 dBFS); a constant (DC) signal counts as silent
==================  =========================================================================

Handled, not quarantined: any channel count up to ``max_channels`` (downmixed by averaging), any
rate in bounds (resampled to ``sample_rate``), files up to ``max_duration_s`` (scored in chunks of
``score_chunk_s``), float samples beyond +-1 (kept: normalisation rescales them).
"""

from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass
from typing import Literal

import numpy as np
import soundfile as sf
import soxr

from after_ray.config.audio import AudioConfig
from after_ray.errors import CorpusError

Mode = Literal["train", "score"]

MISSING_FILE = "missing_file"
UNREADABLE = "unreadable"
EMPTY = "empty"
UNSUPPORTED_RATE = "unsupported_rate"
TOO_MANY_CHANNELS = "too_many_channels"
TOO_LONG = "too_long"
TOO_SHORT = "too_short"
NON_FINITE = "non_finite"
SILENT = "silent"
REASONS = (
    MISSING_FILE,
    UNREADABLE,
    EMPTY,
    UNSUPPORTED_RATE,
    TOO_MANY_CHANNELS,
    TOO_LONG,
    TOO_SHORT,
    NON_FINITE,
    SILENT,
)

# Extra native-rate samples read on each side of a training crop, trimmed after resampling, so
# the resampler's edge transient never lands inside the crop.
_RESAMPLE_MARGIN_S = 0.01


class AudioProblem(CorpusError):
    """One file cannot be used; ``reason`` is one of ``REASONS``, ``detail`` says why."""

    def __init__(self, reason: str, detail: str, path: str | os.PathLike | None = None):
        self.reason = reason
        self.detail = detail
        self.path = None if path is None else os.fspath(path)
        where = f" ({self.path})" if self.path else ""
        super().__init__(f"{reason}: {detail}{where}")


@dataclass(frozen=True)
class ProbeResult:
    """What the prepare stage learns about one file. ``reason`` is None for a usable file."""

    duration_s: float | None
    sample_rate: int | None
    channels: int | None
    reason: str | None = None
    detail: str | None = None


# ---------------------------------------------------------------------------------------------
# decoding


def _check_path(path: str) -> None:
    """Problems visible before libsndfile runs, with the OS's own words."""
    try:
        st = os.stat(path)
    except FileNotFoundError:  # also a symlink whose target is gone
        raise AudioProblem(MISSING_FILE, "no such file", path) from None
    except OSError as exc:  # permission denied on a parent, name too long, ...
        raise AudioProblem(UNREADABLE, f"cannot stat: {exc.strerror or exc}", path) from None
    if stat.S_ISDIR(st.st_mode):
        raise AudioProblem(UNREADABLE, "is a directory, not an audio file", path)
    if not stat.S_ISREG(st.st_mode):
        # A named pipe or a device reports size 0 (it was called "empty") and opening a pipe
        # blocks until something writes to it: never hand one to libsndfile.
        raise AudioProblem(UNREADABLE, f"not a regular file ({_file_kind(st.st_mode)})", path)
    # Open before the size check: an entry nobody may read is "unreadable", whatever its size
    # (procfs files report 0 bytes), and the OS's message beats libsndfile's "System error.".
    try:
        with open(path, "rb") as handle:
            if st.st_size == 0:
                raise AudioProblem(EMPTY, "0-byte file", path)
            shortfall = _wav_shortfall(handle, st.st_size)
    except PermissionError:
        who = f"uid {os.geteuid()}" if hasattr(os, "geteuid") else "this user"
        raise AudioProblem(UNREADABLE, f"permission denied for {who}", path) from None
    except OSError as exc:
        raise AudioProblem(UNREADABLE, f"cannot read: {exc.strerror or exc}", path) from None
    if shortfall is not None:
        declared, present, rate = shortfall
        raise AudioProblem(
            UNREADABLE,
            f"truncated: the WAV header declares {declared / rate:.3f} s of audio but the file "
            f"holds {present / rate:.3f} s (an interrupted copy or download?)",
            path,
        )


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return f"mode {stat.filemode(mode)}"


# 'data' chunk sizes that mean "unknown length", not "truncated": writers that cannot seek back
# (ffmpeg or sox on a pipe) leave 0, 0xFFFFFFFF or a value near 2**31 there, and libsndfile
# reads such a file to its end. 0xFFFFFFFF is also RF64's marker (not parsed here).
_WAV_UNKNOWN_SIZE = 0x7FFF0000


def _wav_shortfall(handle, file_size: int) -> tuple[int, int, int] | None:
    """``(declared, present, sample_rate)`` in frames when a RIFF WAV's ``data`` chunk declares
    at least one frame more than the file holds, else None (also for any other format).

    libsndfile silently clamps such a file to the bytes present, so a copy cut short would pass
    as a shorter, valid utterance; FLAC and others already fail to decode when cut short.
    """
    head = handle.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos, block_align, rate = 12, 0, 0
    for _ in range(64):  # a WAV has a handful of chunks: bound the walk on garbage
        handle.seek(pos)
        header = handle.read(8)
        if len(header) < 8:
            return None
        chunk_id, size = header[:4], int.from_bytes(header[4:], "little")
        if chunk_id == b"fmt ":
            fmt = handle.read(16)
            if len(fmt) >= 14:
                rate = int.from_bytes(fmt[4:8], "little")
                block_align = int.from_bytes(fmt[12:14], "little")
        elif chunk_id == b"data":
            if size == 0 or size >= _WAV_UNKNOWN_SIZE or block_align <= 0 or rate <= 0:
                return None  # unknown length, or a broken fmt chunk libsndfile will report
            present = file_size - pos - 8
            if size - present >= block_align:
                return size // block_align, max(0, present) // block_align, rate
            return None
        pos += 8 + size + (size & 1)  # chunks are word-aligned
        if pos >= file_size:
            return None
    return None


def _unreadable(path: str, exc: Exception) -> AudioProblem:
    message = str(exc)
    if not os.access(path, os.R_OK):
        # libsndfile only says "System error." for this case.
        message = f"permission denied ({message})"
    return AudioProblem(UNREADABLE, message, path)


def _open(path: str) -> sf.SoundFile:
    _check_path(path)
    try:
        snd = sf.SoundFile(path)
    except Exception as exc:  # LibsndfileError, and anything odd a broken header triggers
        raise _unreadable(path, exc) from None
    if snd.samplerate <= 0 or snd.channels <= 0:
        snd.close()
        raise AudioProblem(
            UNREADABLE,
            f"header declares {snd.samplerate} Hz and {snd.channels} channels",
            path,
        )
    return snd


def _read(snd: sf.SoundFile, path: str, frames: int = -1) -> np.ndarray:
    try:
        data = snd.read(frames, dtype="float32", always_2d=True)
    except Exception as exc:  # corrupt data blocks surface here, after a valid header
        raise _unreadable(path, exc) from None
    return np.ascontiguousarray(data.T)


def read_header(path: str | os.PathLike) -> tuple[int, int, int]:
    """``(frames, sample_rate, channels)`` from the header, decoding nothing.

    Raises ``AudioProblem`` (missing_file, empty, unreadable).
    """
    path = os.fspath(path)
    with _open(path) as snd:
        return int(snd.frames), int(snd.samplerate), int(snd.channels)


def decode(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Decode a whole file: float32 ``[channels, samples]`` in [-1, 1) for PCM, and its rate.

    Raises ``AudioProblem`` (missing_file, empty for a 0-byte file, unreadable) when no array can
    be produced; a valid file with 0 samples gives a ``[channels, 0]`` array (see
    ``check_quality``).
    """
    path = os.fspath(path)
    with _open(path) as snd:
        return _read(snd, path), int(snd.samplerate)


def decode_window(
    path: str | os.PathLike, seconds: float, rng: np.random.Generator, margin_s: float = 0.0
) -> tuple[np.ndarray, int, int]:
    """Decode a random window of ``seconds`` (+ ``margin_s`` each side where the file allows).

    Returns ``(x [channels, samples], sample_rate, left_margin_samples)``. A file no longer than
    the window is decoded whole (left margin 0). Reading only the window keeps training I/O and
    resampling cost proportional to the crop, not to the file.
    """
    path = os.fspath(path)
    with _open(path) as snd:
        sr = int(snd.samplerate)
        total = int(snd.frames)
        want = int(math.ceil(seconds * sr))
        if total <= want:
            return _read(snd, path), sr, 0
        start = int(rng.integers(0, total - want + 1))
        margin = int(round(margin_s * sr))
        first = max(0, start - margin)
        last = min(total, start + want + margin)
        try:
            snd.seek(first)
        except Exception as exc:
            raise _unreadable(path, exc) from None
        return _read(snd, path, last - first), sr, start - first


def to_mono(x: np.ndarray) -> np.ndarray:
    """``[channels, samples]`` (or 1-D) -> float32 ``[samples]`` by averaging the channels."""
    if x.ndim == 1:
        return x.astype(np.float32, copy=False)
    if x.shape[0] == 1:
        return np.ascontiguousarray(x[0], dtype=np.float32)
    return x.mean(axis=0, dtype=np.float64).astype(np.float32)


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Band-limited resampling of a mono float32 signal with soxr (HQ). Same rate: unchanged."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if sr_in == sr_out or x.size == 0:
        return x
    return soxr.resample(x, sr_in, sr_out, quality="HQ")


# ---------------------------------------------------------------------------------------------
# quality


def rms_dbfs(x: np.ndarray) -> float:
    """RMS level of the mean-removed signal in dB re full scale (-inf for a constant signal)."""
    if x.size == 0:
        return -math.inf
    rms = float(np.std(x, dtype=np.float64))
    return 20.0 * math.log10(rms) if rms > 0 else -math.inf


def header_problem(
    frames: int, sample_rate: int, channels: int, cfg: AudioConfig
) -> AudioProblem | None:
    """Checks that need only the header: empty, unsupported_rate, too_many_channels, too_long."""
    if frames <= 0:
        return AudioProblem(EMPTY, "0 samples")
    if not cfg.min_input_rate <= sample_rate <= cfg.max_input_rate:
        return AudioProblem(
            UNSUPPORTED_RATE,
            f"{sample_rate} Hz is outside audio.min_input_rate..max_input_rate "
            f"({cfg.min_input_rate}..{cfg.max_input_rate} Hz)",
        )
    if channels > cfg.max_channels:
        return AudioProblem(
            TOO_MANY_CHANNELS,
            f"{channels} channels > audio.max_channels={cfg.max_channels}",
        )
    duration = frames / sample_rate
    if duration > cfg.max_duration_s:
        return AudioProblem(
            TOO_LONG, f"{duration:.2f} s > audio.max_duration_s={cfg.max_duration_s:g}"
        )
    return None


def quality_problem(x: np.ndarray, sr: int, cfg: AudioConfig) -> AudioProblem | None:
    """All checks on a decoded ``[channels, samples]`` array, first failing one wins."""
    x2 = x if x.ndim == 2 else x[None, :]
    problem = header_problem(x2.shape[1], sr, x2.shape[0], cfg)
    if problem is not None:
        return problem
    if not np.isfinite(x2).all():
        bad = int(x2.size - np.isfinite(x2).sum())
        return AudioProblem(NON_FINITE, f"{bad} NaN/inf samples")
    duration = x2.shape[1] / sr
    if duration < cfg.min_duration_s:
        return AudioProblem(
            TOO_SHORT, f"{duration:.4f} s < audio.min_duration_s={cfg.min_duration_s:g}"
        )
    level = rms_dbfs(to_mono(x2))
    if level < cfg.silence_dbfs:
        shown = "-inf" if math.isinf(level) else f"{level:.1f}"
        return AudioProblem(SILENT, f"RMS {shown} dBFS < audio.silence_dbfs={cfg.silence_dbfs:g}")
    return None


def check_quality(x: np.ndarray, sr: int, cfg: AudioConfig) -> str | None:
    """The reason code for a decoded ``[channels, samples]`` array, or None when usable."""
    problem = quality_problem(x, sr, cfg)
    return None if problem is None else problem.reason


def probe_file(path: str | os.PathLike, cfg: AudioConfig) -> ProbeResult:
    """Header + one full decode + quality checks. Never raises: a bad file gets a reason."""
    path = os.fspath(path)
    frames = sr = channels = None
    try:
        frames, sr, channels = read_header(path)
        problem = header_problem(frames, sr, channels, cfg)
        if problem is None:  # too_long files are never decoded
            x, sr = decode(path)
            frames = x.shape[1]
            problem = quality_problem(x, sr, cfg)
    except AudioProblem as exc:
        problem = exc
    except Exception as exc:  # noqa: BLE001 - the contract is "never raises for a bad file"
        problem = AudioProblem(UNREADABLE, f"{type(exc).__name__}: {exc}")
    duration = frames / sr if frames is not None and sr else None
    if problem is None:
        return ProbeResult(duration, sr, channels)
    return ProbeResult(duration, sr, channels, problem.reason, problem.detail)


# ---------------------------------------------------------------------------------------------
# model input


def crop(
    x: np.ndarray,
    n: int,
    mode: Literal["random", "start"] = "random",
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """At most ``n`` samples of ``x``: a random window (``rng``) or the first ``n``."""
    if len(x) <= n:
        return x
    if mode == "start":
        return x[:n]
    if mode != "random":
        raise ValueError(f"crop mode must be 'random' or 'start', got {mode!r}")
    rng = rng if rng is not None else np.random.default_rng()
    start = int(rng.integers(0, len(x) - n + 1))
    return x[start : start + n]


def crop_or_pad(
    x: np.ndarray,
    n: int,
    mode: Literal["random", "start"] = "random",
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, int]:
    """Exactly ``n`` samples (zero-padded at the end) and the number of real samples."""
    piece = crop(x, n, mode, rng)
    out = np.zeros(n, dtype=np.float32)
    out[: len(piece)] = piece
    return out, len(piece)


def normalize(x: np.ndarray, valid: int | None = None) -> np.ndarray:
    """Zero mean / unit variance over the first ``valid`` samples; padding stays zero.

    A constant signal becomes all zeros (the 1e-7 floor, as in the HF wav2vec2 feature
    extractor, keeps the division finite).
    """
    valid = len(x) if valid is None else valid
    out = np.zeros(len(x), dtype=np.float32)
    if valid == 0:
        return out
    real = x[:valid]
    # Statistics accumulate in float64 (long files), the arithmetic stays float32 (speed).
    mean = real.mean(dtype=np.float64)
    scale = 1.0 / math.sqrt(float(real.var(dtype=np.float64)) + 1e-7)
    np.multiply(real - np.float32(mean), np.float32(scale), out=out[:valid])
    return out


def chunk(x: np.ndarray, n: int) -> list[np.ndarray]:
    """Split into the fewest equal pieces no longer than ``n`` (no tiny tail chunk)."""
    if n <= 0:
        raise ValueError(f"chunk length must be positive, got {n}")
    if len(x) <= n:
        return [x]
    return np.array_split(x, math.ceil(len(x) / n))


def load_for_model(
    path: str | os.PathLike,
    cfg: AudioConfig,
    mode: Mode = "train",
    rng: np.random.Generator | None = None,
) -> list[np.ndarray]:
    """Decoded, mono, resampled, cut and normalised float32 segments for one file.

    ``train``: one random crop of at most ``train_crop_s`` (only that window is decoded);
    ``score``: the whole utterance split by ``chunk`` into pieces of at most ``score_chunk_s``.
    Raises ``AudioProblem`` when the file cannot be decoded or holds NaN/inf samples; other
    quality checks belong to the prepare stage (``probe_file``).
    """
    path = os.fspath(path)
    if mode == "train":
        rng = rng if rng is not None else np.random.default_rng()
        x, sr, left = decode_window(path, cfg.train_crop_s, rng, margin_s=_RESAMPLE_MARGIN_S)
        mono = resample(to_mono(x), sr, cfg.sample_rate)
        n = cfg.train_crop_samples
        # Start where the drawn window starts; rounding can leave one sample short near the
        # end of the file, so borrow it from the left margin rather than return n - 1.
        skip = min(int(round(left * cfg.sample_rate / sr)), max(0, len(mono) - n))
        pieces = [crop(mono[skip:], n, "start")]
    elif mode == "score":
        x, sr = decode(path)
        mono = resample(to_mono(x), sr, cfg.sample_rate)
        pieces = chunk(mono, cfg.score_chunk_samples)
    else:
        raise ValueError(f"mode must be 'train' or 'score', got {mode!r}")
    if x.shape[1] == 0:
        raise AudioProblem(EMPTY, "0 samples", path)
    if not np.isfinite(x).all():
        raise AudioProblem(NON_FINITE, "NaN/inf samples", path)
    if cfg.normalize:
        return [normalize(p) for p in pieces]
    return [np.ascontiguousarray(p, dtype=np.float32) for p in pieces]
