"""The synthesized demo corpus: espeak voices reading English sentences with emotional prosody.

It demonstrates the machinery (a labelled, noisy, multi-speaker corpus in the generic CSV layout),
not the paper's numbers. Layout written under ``out_dir``::

    wav/<speaker>/<speaker>_<emotion>_<NNN>.wav   16-bit PCM mono at ``sample_rate``
    labels.csv          path,label,speaker,gender (paths relative to out_dir; generic CSV layout)
    render_params.csv   what each file was rendered with (voice, sentence, prosody, gain, SNR, noise)
    SYNTH_INFO.json     the build parameters, seed and espeak version; "complete" once done

How an emotion is rendered: each emotion has a prosody profile (rate in wpm, pitch, pitch range,
volume, word gap; ``EMOTION_PROFILES``); the profile is moved away from neutral by ``separation``
(1 = the profile as written, 0 = every emotion sounds neutral), then shifted by the speaker's own
base pitch and rate and jittered per utterance. Each file then gets silence padding, a random gain
(``gain_db_range``) and background noise (coloured noise between white and brown, sometimes with
mains hum) at a random SNR (``snr_db_range``); a file that would clip is scaled down as a whole.

Determinism: every random draw comes from a numpy Generator seeded by (seed, speaker, emotion,
utterance index), so the same parameters give byte-identical WAVs whatever the number of processes.
espeak carries some state from one utterance to the next inside a process (see ``espeak.py``), so
each speaker is rendered in a new Python process (``sys.executable -c ...``), which replays the
same call sequence each time. The caller's process never initialises espeak, and, unlike
multiprocessing's spawn, the caller's ``__main__`` is not re-imported (no main guard is needed).

What makes it behave like a natural SER corpus where it matters for active learning (each
configurable, see ``synthesize_corpus``):

* **Skewed class priors.** ``class_priors`` splits each speaker's ``utterances_per_speaker`` over
  the emotions by largest remainder (``NATURAL_CLASS_PRIORS``: neutral dominates, angry and sad are
  rare, as in acted-then-natural corpora such as IEMOCAP and MSP-Podcast). ``None`` keeps every
  emotion at ``utterances_per_emotion`` per speaker.
* **Near-duplicates.** A ``duplicate_fraction`` of the files re-read an earlier file of the same
  speaker and emotion (same sentence, prosody and espeak seed) with fresh gain, padding and noise;
  ``render_params.csv`` names the original in ``duplicate_of``. A k-center or uncertainty pick of
  both is a wasted label.
* **Low-quality items.** A ``low_quality_fraction`` of the files get an SNR drawn from
  ``LOW_QUALITY_SNR_DB`` instead of ``snr_db_range``, and half of those are band-limited to a
  telephone channel (``TELEPHONE_BAND_HZ``); ``band`` and ``snr_db`` record it. These are the
  outliers a distance-based strategy is drawn to.

Rebuilds are skipped: when ``SYNTH_INFO.json`` is marked complete, records the same parameters,
format version and espeak version, and every file in ``labels.csv`` exists, ``synthesize_corpus``
returns at once without touching any file (it does not re-hash the audio). Any difference, or an
interrupted build, removes the previous synthesized files and renders everything again.
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import math
import os
import shutil
import subprocess
import sys
import time
import zlib
from collections import Counter, deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from after_ray.errors import ConfigError, CorpusError
from after_ray.store.atomic import atomic_write_text

# Bump when a change to this module changes the audio, so older builds are not reused.
FORMAT_VERSION = 2
INFO_NAME = "SYNTH_INFO.json"
LABELS_NAME = "labels.csv"
RENDER_PARAMS_NAME = "render_params.csv"
WAV_DIR_NAME = "wav"
_PARTS_DIR_NAME = ".parts"

# Prosody profiles (rate wpm, pitch 0-100, pitch range 0-100, volume 0-200, word gap in 10 ms).
# Sad: slow, low, flat, quiet, pauses; angry: fast, loud, some pauses; happy: fast, high, lively.
EMOTION_PROFILES: dict[str, tuple[float, float, float, float, float]] = {
    "neutral": (165.0, 50.0, 45.0, 100.0, 0.0),
    "happy": (190.0, 68.0, 85.0, 115.0, 0.0),
    "angry": (200.0, 55.0, 65.0, 150.0, 1.0),
    "sad": (125.0, 35.0, 12.0, 75.0, 3.0),
}

# Per-utterance jitter: log-normal sigma for rate and volume, standard deviation for the others.
RATE_JITTER_SIGMA = 0.06
PITCH_JITTER_SD = 4.0
RANGE_JITTER_SD = 6.0
VOLUME_JITTER_SIGMA = 0.08
WORD_GAP_JITTER_SD = 0.6

# espeak clips its own 16-bit output for loud voices (several variants peak at full scale at
# volume 100), so the profile volume is scaled down before it reaches espeak; the loudness
# contrast between emotions survives because espeak's amplitude is close to linear in volume.
ESPEAK_VOLUME_SCALE = 0.4
# Active-speech RMS of a speaker's neutral reference sentence after calibration (about -30 dBFS):
# the variants differ by up to 13 dB on their own, which would drown the emotion loudness cue.
CALIBRATION_TARGET_RMS = 0.03
PEAK_LIMIT = 0.95
PAD_SECONDS_RANGE = (0.15, 0.5)
HUM_PROBABILITY = 0.4

LOW_QUALITY_SNR_DB = (-5.0, 5.0)
TELEPHONE_BAND_HZ = (300.0, 3400.0)
TELEPHONE_SHARE = 0.5  # of the low-quality files
FULL_BAND = "full"
TELEPHONE_BAND = "telephone"
_DEGRADATION_SALT = 0xD0B1E

_ACCENTS = (
    "en-us",
    "en",  # British English (espeak's "en" is en-GB)
    "en-gb-scotland",
    "en-gb-x-rp",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-029",
    "en-us-nyc",
)
_FEMALE_VARIANTS = (
    "f1", "f2", "f3", "f4", "f5", "Alicia", "Andrea", "Annie", "anika", "aunty", "belinda", "steph",
)  # fmt: skip
_MALE_VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "Andy", "Denis", "antonio", "travis", "victor",
)  # fmt: skip
MAX_SPEAKERS = 2 * len(_FEMALE_VARIANTS) * len(_ACCENTS)
_SPEAKER_TABLE_SEED = 0x5EED5
_UTTERANCE_SALT = 0xA17E4
_CALIBRATION_SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank."

# Short everyday sentences in the style of the Harvard sentences (written for this project).
SENTENCES = (
    "The old boat drifted slowly past the harbor wall.",
    "A cold wind swept across the empty market square.",
    "She placed the blue jar on the kitchen shelf.",
    "Bring the papers to the office before noon.",
    "The dog chased a red ball down the hill.",
    "Fresh bread smells best early in the morning.",
    "He fixed the broken gate with a length of wire.",
    "The train was late again this evening.",
    "Our neighbors painted their fence a pale green.",
    "Keep the window shut when the rain starts.",
    "The children built a tall tower out of blocks.",
    "A small bird landed on the garden bench.",
    "Please hand me the pencil on the desk.",
    "The river rose after three days of heavy rain.",
    "They sold the farm and moved to the city.",
    "The lamp threw long shadows across the floor.",
    "We found an old coin buried in the sand.",
    "The soup needs more salt and a little pepper.",
    "Turn left at the church and follow the road.",
    "His watch stopped at exactly half past nine.",
    "The meeting will start as soon as everyone arrives.",
    "A thick fog covered the valley at dawn.",
    "She wrote the address on the back of the card.",
    "The plane landed smoothly on the wet runway.",
    "Leave your muddy boots outside the door.",
    "The box was too heavy to lift alone.",
    "The baker sold every loaf before lunch.",
    "Tall grass grew along the edge of the path.",
    "He told the same story at every dinner.",
    "The clock on the tower chimed twelve times.",
    "Wash the cups and stack them by the sink.",
    "The letter arrived two weeks after it was sent.",
    "A bright moon rose over the quiet lake.",
    "The price of coffee went up again today.",
    "We waited an hour for the bus to come.",
    "The cat slept all afternoon in the warm sun.",
    "Pack a sweater in case the night turns cold.",
    "The new bridge opens to traffic next month.",
    "Her garden was full of roses and tall lilies.",
    "The team practiced every day before the final game.",
)


@dataclass(frozen=True)
class SpeakerVoice:
    """One synthetic speaker: an espeak voice plus its own base pitch and rate."""

    speaker_id: str
    voice: str  # "<accent>+<variant>"
    gender: str  # "F" / "M"
    pitch_offset: float  # added to every emotion's pitch (espeak 0-100 scale)
    rate_factor: float  # multiplies every emotion's rate


@dataclass(frozen=True)
class UtterancePlan:
    """Everything random about one file, drawn before any audio is made."""

    sentence_index: int
    rate_wpm: int
    pitch: int
    pitch_range: int
    volume: int  # the emotion's volume before ESPEAK_VOLUME_SCALE
    word_gap: int
    espeak_seed: int
    gain_db: float
    snr_db: float
    lead_pad_s: float
    tail_pad_s: float
    noise_colour: float  # spectral exponent: 0 white, 1 pink, 2 brown
    hum_hz: float  # 0 when the file has no hum
    hum_share: float  # hum RMS relative to the broadband noise RMS
    duplicate_of: int = -1  # index of the same speaker's and emotion's file it re-reads, or -1
    band: str = FULL_BAND  # FULL_BAND or TELEPHONE_BAND


@dataclass(frozen=True)
class _SpeakerJob:
    speaker_index: int
    speaker: SpeakerVoice
    emotion_counts: dict[str, int]
    separation: float
    duplicate_fraction: float
    low_quality_fraction: float
    snr_db_range: tuple[float, float]
    gain_db_range: tuple[float, float]
    sample_rate: int
    seed: int
    out_dir: str


def speaker_table(n_speakers: int) -> list[SpeakerVoice]:
    """The first ``n_speakers`` speakers, alternating F/M, each with a distinct espeak voice.

    The table does not depend on the corpus seed: "spk01" is the same voice in every build.
    """
    if not 1 <= n_speakers <= MAX_SPEAKERS:
        raise ConfigError(f"n_speakers must be between 1 and {MAX_SPEAKERS}, got {n_speakers}")
    width = max(2, len(str(n_speakers)))
    speakers = []
    for k in range(n_speakers):
        gender = "F" if k % 2 == 0 else "M"
        variants = _FEMALE_VARIANTS if gender == "F" else _MALE_VARIANTS
        j = k // 2
        # Step the accent by one extra place per pass over the variants, so (variant, accent)
        # pairs do not repeat before every combination is used (5 is coprime with 8 accents).
        accent = _ACCENTS[(j + j // len(variants)) % len(_ACCENTS)]
        rng = np.random.default_rng([_SPEAKER_TABLE_SEED, k])
        speakers.append(
            SpeakerVoice(
                speaker_id=f"spk{k + 1:0{width}d}",
                voice=f"{accent}+{variants[j % len(variants)]}",
                gender=gender,
                pitch_offset=round(float(rng.uniform(-10.0, 10.0)), 3),
                rate_factor=round(float(rng.uniform(0.92, 1.08)), 4),
            )
        )
    return speakers


def emotion_profile(emotion: str, separation: float) -> tuple[float, ...]:
    """The emotion's (rate, pitch, range, volume, word gap) moved away from neutral by separation."""
    neutral = EMOTION_PROFILES["neutral"]
    target = EMOTION_PROFILES[emotion]
    return tuple(n + separation * (t - n) for n, t in zip(neutral, target, strict=True))


def plan_utterance(
    rng: np.random.Generator,
    speaker: SpeakerVoice,
    emotion: str,
    *,
    separation: float,
    snr_db_range: tuple[float, float],
    gain_db_range: tuple[float, float],
) -> UtterancePlan:
    """Draw one utterance's sentence, prosody and acoustics (a pure function of ``rng``)."""
    rate, pitch, pitch_range, volume, word_gap = emotion_profile(emotion, separation)
    rate *= speaker.rate_factor * math.exp(rng.normal(0.0, RATE_JITTER_SIGMA))
    pitch += speaker.pitch_offset + rng.normal(0.0, PITCH_JITTER_SD)
    pitch_range += rng.normal(0.0, RANGE_JITTER_SD)
    volume *= math.exp(rng.normal(0.0, VOLUME_JITTER_SIGMA))
    word_gap += rng.normal(0.0, WORD_GAP_JITTER_SD)
    has_hum = rng.random() < HUM_PROBABILITY
    return UtterancePlan(
        sentence_index=int(rng.integers(len(SENTENCES))),
        rate_wpm=int(np.clip(round(rate), 80, 450)),
        pitch=int(np.clip(round(pitch), 0, 100)),
        pitch_range=int(np.clip(round(pitch_range), 0, 100)),
        volume=int(np.clip(round(volume), 1, 200 / ESPEAK_VOLUME_SCALE)),
        word_gap=int(np.clip(round(word_gap), 0, 20)),
        espeak_seed=int(rng.integers(1, 2**31 - 1)),
        gain_db=float(rng.uniform(*gain_db_range)),
        snr_db=float(rng.uniform(*snr_db_range)),
        lead_pad_s=float(rng.uniform(*PAD_SECONDS_RANGE)),
        tail_pad_s=float(rng.uniform(*PAD_SECONDS_RANGE)),
        noise_colour=float(rng.uniform(0.0, 2.0)),
        hum_hz=float(rng.choice([50.0, 60.0])) if has_hum else 0.0,
        hum_share=float(rng.uniform(0.3, 1.0)) if has_hum else 0.0,
    )


def active_rms(samples: np.ndarray, sample_rate: int, floor_db: float = -35.0) -> float:
    """RMS over the 20 ms frames within ``floor_db`` of the loudest frame (speech, not pauses)."""
    frame = max(1, int(0.02 * sample_rate))
    n_frames = len(samples) // frame
    if n_frames == 0:
        return (
            float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) if len(samples) else 0.0
        )
    power = np.mean(
        np.square(samples[: n_frames * frame].reshape(n_frames, frame), dtype=np.float64), axis=1
    )
    loudest = float(power.max())
    if loudest <= 0.0:
        return 0.0
    active = power[power >= loudest * 10.0 ** (floor_db / 10.0)]
    return float(np.sqrt(active.mean()))


def _fast_fft_length(n: int) -> int:
    """The smallest 2**a * 3**b * 5**c >= n (FFTs of other lengths are several times slower)."""
    best = 1 << max(0, (n - 1).bit_length())
    power5 = 1
    while power5 < best:
        power35 = power5
        while power35 < best:
            size = power35
            while size < n:
                size *= 2
            best = min(best, size)
            power35 *= 3
        power5 *= 5
    return best


def coloured_noise(
    rng: np.random.Generator, n_samples: int, sample_rate: int, colour: float
) -> np.ndarray:
    """Unit-RMS noise whose power falls as 1/f**colour (0 white, 1 pink, 2 brown), DC removed."""
    fft_length = _fast_fft_length(max(n_samples, 2))
    n_bins = fft_length // 2 + 1
    spectrum = rng.normal(size=n_bins) + 1j * rng.normal(size=n_bins)
    freqs = np.fft.rfftfreq(fft_length, d=1.0 / sample_rate)
    # Below 20 Hz the shape stays flat: a brown spectrum would otherwise put most power at DC.
    shaped = spectrum / np.maximum(freqs, 20.0) ** (colour / 2.0)
    shaped[0] = 0.0
    noise = np.fft.irfft(shaped, n=fft_length)[:n_samples]
    noise -= noise.mean()
    rms = float(np.sqrt(np.mean(noise**2)))
    return noise / rms if rms > 0 else noise


def mains_hum(
    rng: np.random.Generator, n_samples: int, sample_rate: int, hum_hz: float
) -> np.ndarray:
    """Unit-RMS mains hum: the fundamental and four harmonics with falling, random amplitudes."""
    t = np.arange(n_samples) / sample_rate
    hum = np.zeros(n_samples)
    for harmonic in range(1, 6):
        amplitude = rng.uniform(0.3, 1.0) / harmonic
        hum += amplitude * np.sin(2 * np.pi * hum_hz * harmonic * t + rng.uniform(0, 2 * np.pi))
    rms = float(np.sqrt(np.mean(hum**2)))
    return hum / rms if rms > 0 else hum


def render_acoustics(
    rng: np.random.Generator, speech: np.ndarray, plan: UtterancePlan, sample_rate: int
) -> tuple[np.ndarray, float]:
    """Pad, apply gain, add noise at the planned SNR and keep the peak below full scale.

    ``speech`` is the calibrated float waveform at ``sample_rate``. Returns the float32 mix and the
    scale applied to avoid clipping (1.0 when none was needed).
    """
    speech = speech.astype(np.float64) * 10.0 ** (plan.gain_db / 20.0)
    lead = int(round(plan.lead_pad_s * sample_rate))
    tail = int(round(plan.tail_pad_s * sample_rate))
    padded = np.concatenate([np.zeros(lead), speech, np.zeros(tail)])
    noise = coloured_noise(rng, len(padded), sample_rate, plan.noise_colour)
    if plan.hum_hz > 0:
        noise = noise + plan.hum_share * mains_hum(rng, len(padded), sample_rate, plan.hum_hz)
        noise /= float(np.sqrt(np.mean(noise**2)))
    # SNR against the speech frames only, so the padding and word gaps do not inflate it.
    noise_rms = active_rms(speech, sample_rate) / 10.0 ** (plan.snr_db / 20.0)
    mixed = padded + noise_rms * noise
    if plan.band == TELEPHONE_BAND:
        mixed = band_limit(mixed, sample_rate, TELEPHONE_BAND_HZ)
    peak = float(np.max(np.abs(mixed)))
    limiter_scale = min(1.0, PEAK_LIMIT / peak) if peak > 0 else 1.0
    return (mixed * limiter_scale).astype(np.float32), limiter_scale


def band_limit(samples: np.ndarray, sample_rate: int, band_hz: tuple[float, float]) -> np.ndarray:
    """Keep only ``band_hz`` (an ideal FFT mask: a telephone channel's 300-3400 Hz)."""
    fft_length = _fast_fft_length(max(len(samples), 2))
    spectrum = np.fft.rfft(samples, n=fft_length)
    freqs = np.fft.rfftfreq(fft_length, d=1.0 / sample_rate)
    spectrum[(freqs < band_hz[0]) | (freqs > band_hz[1])] = 0.0
    return np.fft.irfft(spectrum, n=fft_length)[: len(samples)]


def emotion_counts(
    emotions: tuple[str, ...],
    utterances_per_emotion: int,
    class_priors: dict[str, float] | None,
    utterances_per_speaker: int | None,
) -> dict[str, int]:
    """Files per emotion of every speaker: balanced, or ``utterances_per_speaker`` split over the
    priors by largest remainder (ties to the earlier emotion), so the skew is the same per voice."""
    if not class_priors:
        return {e: utterances_per_emotion for e in emotions}
    total = utterances_per_speaker or utterances_per_emotion * len(emotions)
    weight = sum(class_priors[e] for e in emotions)
    exact = [total * class_priors[e] / weight for e in emotions]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(emotions)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return dict(zip(emotions, counts, strict=True))


def degrade_plan(
    plan: UtterancePlan,
    rng: np.random.Generator,
    originals: list[tuple[int, UtterancePlan]],
    *,
    duplicate_fraction: float,
    low_quality_fraction: float,
) -> UtterancePlan:
    """Turn a plan into a near-duplicate of an earlier one and/or a low-quality file.

    ``rng`` is the file's own degradation stream (separate from the plan's), so with both fractions
    at 0 every file is what it was before degradations existed.
    """
    import dataclasses

    is_duplicate = rng.random() < duplicate_fraction
    pick = int(rng.integers(len(originals))) if originals else -1
    is_low_quality = rng.random() < low_quality_fraction
    is_telephone = rng.random() < TELEPHONE_SHARE
    low_snr = float(rng.uniform(*LOW_QUALITY_SNR_DB))
    changes: dict[str, Any] = {}
    if is_duplicate and pick >= 0:
        # The same reading (sentence, prosody, espeak's own seed); fresh acoustics.
        original, source = originals[pick]
        changes |= {
            name: getattr(source, name)
            for name in ("sentence_index", "rate_wpm", "pitch", "pitch_range", "volume",
                         "word_gap", "espeak_seed")
        }  # fmt: skip
        changes["duplicate_of"] = original
    if is_low_quality:
        changes["snr_db"] = low_snr
        changes["band"] = TELEPHONE_BAND if is_telephone else FULL_BAND
    return dataclasses.replace(plan, **changes) if changes else plan


def degradation_rng(
    seed: int, speaker_index: int, emotion: str, utterance_index: int
) -> np.random.Generator:
    """The file's degradation stream (duplicate, quality): a function of these four values."""
    emotion_key = zlib.crc32(emotion.encode())
    return np.random.default_rng(
        [seed, _DEGRADATION_SALT, speaker_index, emotion_key, utterance_index]
    )


def to_pcm16(samples: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] to int16 with rounding (no dither, so the bytes are reproducible)."""
    return np.clip(np.round(samples * 32767.0), -32768, 32767).astype(np.int16)


def utterance_rng(
    seed: int, speaker_index: int, emotion: str, utterance_index: int
) -> np.random.Generator:
    """The generator for one file: depends only on these four values, never on scheduling."""
    emotion_key = zlib.crc32(emotion.encode())
    return np.random.default_rng(
        [seed, _UTTERANCE_SALT, speaker_index, emotion_key, utterance_index]
    )


def utterance_relpath(speaker_id: str, emotion: str, index: int) -> str:
    """POSIX path of one file relative to the corpus root."""
    return f"{WAV_DIR_NAME}/{speaker_id}/{speaker_id}_{emotion}_{index:03d}.wav"


def _render_speaker(job: _SpeakerJob) -> list[dict[str, Any]]:
    """Render every file of one speaker (runs in its own fresh process) and return its rows."""
    import soundfile as sf
    import soxr

    from after_ray.data.corpora import espeak

    native_rate = espeak.sample_rate()
    speaker = job.speaker

    def to_target_rate(samples: np.ndarray) -> np.ndarray:
        if native_rate == job.sample_rate:
            return samples
        return soxr.resample(samples, native_rate, job.sample_rate, quality="HQ")

    # Calibrate the voice's loudness on a fixed neutral sentence (see CALIBRATION_TARGET_RMS).
    reference = espeak.synthesize(
        _CALIBRATION_SENTENCE,
        speaker.voice,
        espeak.Prosody(rate_wpm=165, volume=round(100 * ESPEAK_VOLUME_SCALE)),
        rand_seed=1,
    )
    calibration = CALIBRATION_TARGET_RMS / max(
        active_rms(to_target_rate(reference), job.sample_rate), 1e-6
    )

    speaker_dir = Path(job.out_dir) / WAV_DIR_NAME / speaker.speaker_id
    speaker_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for emotion, count in job.emotion_counts.items():
        plans: list[UtterancePlan] = []
        for index in range(count):
            rng = utterance_rng(job.seed, job.speaker_index, emotion, index)
            plan = plan_utterance(
                rng,
                speaker,
                emotion,
                separation=job.separation,
                snr_db_range=job.snr_db_range,
                gain_db_range=job.gain_db_range,
            )
            # Duplicates re-read only originals (an earlier file that is not itself a copy).
            plan = degrade_plan(
                plan,
                degradation_rng(job.seed, job.speaker_index, emotion, index),
                [(i, p) for i, p in enumerate(plans) if p.duplicate_of < 0],
                duplicate_fraction=job.duplicate_fraction,
                low_quality_fraction=job.low_quality_fraction,
            )
            plans.append(plan)
            prosody = espeak.Prosody(
                rate_wpm=plan.rate_wpm,
                pitch=plan.pitch,
                pitch_range=plan.pitch_range,
                volume=int(np.clip(round(plan.volume * ESPEAK_VOLUME_SCALE), 0, 200)),
                word_gap=plan.word_gap,
            )
            speech = espeak.synthesize(
                SENTENCES[plan.sentence_index], speaker.voice, prosody, rand_seed=plan.espeak_seed
            )
            speech = to_target_rate(speech) * calibration
            mixed, limiter_scale = render_acoustics(rng, speech, plan, job.sample_rate)
            relpath = utterance_relpath(speaker.speaker_id, emotion, index)
            sf.write(
                Path(job.out_dir) / relpath, to_pcm16(mixed), job.sample_rate, subtype="PCM_16"
            )
            rows.append(
                {
                    "path": relpath,
                    "label": emotion,
                    "speaker": speaker.speaker_id,
                    "gender": speaker.gender,
                    "voice": speaker.voice,
                    "duration_s": round(len(mixed) / job.sample_rate, 4),
                    **asdict(plan),
                    "limiter_scale": round(limiter_scale, 5),
                }
            )
    return rows


def _job_to_json(job: _SpeakerJob) -> str:
    return json.dumps(asdict(job))


def _job_from_json(text: str) -> _SpeakerJob:
    fields = json.loads(text)
    return _SpeakerJob(
        **{
            **fields,
            "speaker": SpeakerVoice(**fields["speaker"]),
            "snr_db_range": tuple(fields["snr_db_range"]),
            "gain_db_range": tuple(fields["gain_db_range"]),
        }
    )


def _worker_main(job_path: str) -> None:
    """Entry point of a speaker process: render one speaker, write its rows next to the job."""
    job_file = Path(job_path)
    rows = _render_speaker(_job_from_json(job_file.read_text()))
    atomic_write_text(
        job_file.with_name(job_file.name.replace(".job.json", ".rows.json")), json.dumps(rows)
    )


# A new interpreter per speaker, started with -c rather than multiprocessing's spawn: spawn
# re-imports the caller's __main__ script, which fails for stdin scripts and re-runs unguarded
# top-level code; this runs only our module, whatever the caller is.
_WORKER_COMMAND = (
    "import sys; from after_ray.data.corpora.synth import _worker_main; _worker_main(sys.argv[1])"
)


def _worker_env() -> dict[str, str]:
    """The caller's environment, with this package importable however the caller found it."""
    import after_ray

    package_parent = str(Path(after_ray.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    return env


def _run_speaker_processes(jobs: list[_SpeakerJob], workers: int, parts_dir: Path) -> None:
    """Render each speaker in its own new Python process, at most ``workers`` at a time."""
    env = _worker_env()
    pending = deque(jobs)
    running: list[tuple[subprocess.Popen, _SpeakerJob, Path]] = []
    try:
        while pending or running:
            while pending and len(running) < workers:
                job = pending.popleft()
                job_path = parts_dir / f"{job.speaker.speaker_id}.job.json"
                job_path.write_text(_job_to_json(job))
                log_path = parts_dir / f"{job.speaker.speaker_id}.log"
                with log_path.open("wb") as log:
                    process = subprocess.Popen(
                        [sys.executable, "-c", _WORKER_COMMAND, str(job_path)],
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                    )
                running.append((process, job, log_path))
            finished = [entry for entry in running if entry[0].poll() is not None]
            if not finished:
                time.sleep(0.01)
            for entry in finished:
                running.remove(entry)
                process, job, log_path = entry
                if process.returncode != 0:
                    raise CorpusError(
                        f"rendering speaker {job.speaker.speaker_id} ({job.speaker.voice}) failed "
                        f"with exit code {process.returncode}; its output:\n"
                        f"{log_path.read_text(errors='replace')[-4000:]}"
                    )
    finally:
        for process, _, _ in running:
            process.kill()
        for process, _, _ in running:
            process.wait()


def _build_params(
    n_speakers: int,
    utterances_per_emotion: int,
    emotions: tuple[str, ...],
    separation: float,
    snr_db_range: tuple[float, float],
    gain_db_range: tuple[float, float],
    sample_rate: int,
    seed: int,
    class_priors: dict[str, float] | None = None,
    utterances_per_speaker: int | None = None,
    duplicate_fraction: float = 0.0,
    low_quality_fraction: float = 0.0,
) -> dict[str, Any]:
    """Validated build parameters as a JSON-ready dict (the identity of a build)."""
    problems = []
    priors = dict(class_priors or {})
    if priors:
        if sorted(priors) != sorted(emotions):
            problems.append(
                f"class_priors must name exactly the emotions {list(emotions)}, got {sorted(priors)}"
            )
        elif not all(math.isfinite(v) and v > 0 for v in priors.values()):
            problems.append(f"class_priors must all be positive, got {priors}")
    if utterances_per_speaker is not None and utterances_per_speaker < len(emotions):
        problems.append(
            f"utterances_per_speaker must be at least the number of emotions ({len(emotions)}), "
            f"got {utterances_per_speaker}"
        )
    for name, value in (
        ("duplicate_fraction", duplicate_fraction),
        ("low_quality_fraction", low_quality_fraction),
    ):
        if not 0.0 <= value <= 1.0:
            problems.append(f"{name} must be between 0 and 1, got {value}")
    if not 1 <= n_speakers <= MAX_SPEAKERS:
        problems.append(f"n_speakers must be between 1 and {MAX_SPEAKERS}, got {n_speakers}")
    if utterances_per_emotion < 1:
        problems.append(f"utterances_per_emotion must be at least 1, got {utterances_per_emotion}")
    unknown = [e for e in emotions if e not in EMOTION_PROFILES]
    if unknown or not emotions or len(set(emotions)) != len(emotions):
        problems.append(
            f"emotions must be distinct names from {sorted(EMOTION_PROFILES)}, got {list(emotions)}"
        )
    if not separation >= 0:
        problems.append(f"separation must be >= 0, got {separation}")
    for name, (low, high) in (("snr_db_range", snr_db_range), ("gain_db_range", gain_db_range)):
        if not (math.isfinite(low) and math.isfinite(high) and low <= high):
            problems.append(f"{name} must be (low, high) with low <= high, got {(low, high)}")
    if sample_rate < 8000:
        problems.append(f"sample_rate must be at least 8000 Hz, got {sample_rate}")
    if int(seed) != seed or seed < 0:
        problems.append(f"seed must be a non-negative integer, got {seed!r}")
    if not problems and priors:
        counts = emotion_counts(emotions, utterances_per_emotion, priors, utterances_per_speaker)
        if min(counts.values()) < 1:
            problems.append(
                f"utterances_per_speaker is too small for class_priors {priors}: some emotion gets "
                f"no file per speaker ({counts}); raise utterances_per_speaker"
            )
    if problems:
        raise ConfigError("synthesized corpus: " + "; ".join(problems))
    return {
        "n_speakers": int(n_speakers),
        "utterances_per_emotion": int(utterances_per_emotion),
        "emotions": list(emotions),
        "separation": float(separation),
        "snr_db_range": [float(snr_db_range[0]), float(snr_db_range[1])],
        "gain_db_range": [float(gain_db_range[0]), float(gain_db_range[1])],
        "sample_rate": int(sample_rate),
        "seed": int(seed),
        "class_priors": {e: float(priors[e]) for e in emotions} if priors else None,
        "utterances_per_speaker": (
            int(utterances_per_speaker) if priors and utterances_per_speaker else None
        ),
        "duplicate_fraction": float(duplicate_fraction),
        "low_quality_fraction": float(low_quality_fraction),
    }


def params_emotion_counts(params: dict[str, Any]) -> dict[str, int]:
    """Files per emotion of every speaker of a build (from its validated parameters)."""
    return emotion_counts(
        tuple(params["emotions"]),
        params["utterances_per_emotion"],
        params.get("class_priors"),
        params.get("utterances_per_speaker"),
    )


def _build_identity(params: dict[str, Any]) -> dict[str, Any]:
    """What must match for an existing build to be reused."""
    from after_ray.data.corpora import espeak

    return {
        "format_version": FORMAT_VERSION,
        "params": params,
        "espeak_version": espeak.library_version(),
        "espeakng_loader_version": importlib.metadata.version("espeakng-loader"),
    }


def _read_info(out_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out_dir / INFO_NAME).read_text())
    except (OSError, ValueError):
        return None


def _is_reusable(out_dir: Path, identity: dict[str, Any]) -> bool:
    info = _read_info(out_dir)
    if info is None or not info.get("complete"):
        return False
    if any(info.get(key) != value for key, value in identity.items()):
        return False
    labels = out_dir / LABELS_NAME
    if not labels.exists():
        return False
    with labels.open(newline="") as handle:
        paths = [row["path"] for row in csv.DictReader(handle)]
    expected = identity["params"]
    n_expected = expected["n_speakers"] * sum(params_emotion_counts(expected).values())
    return len(paths) == n_expected and all((out_dir / p).is_file() for p in paths)


def _clear_previous_build(out_dir: Path) -> None:
    """Remove an earlier synthesized build; refuse to touch a directory that holds anything else."""
    if not out_dir.exists():
        return
    ours = (out_dir / INFO_NAME).exists()
    if not ours and any(out_dir.iterdir()):
        raise CorpusError(
            f"{out_dir} is not empty and holds no {INFO_NAME}, so it was not written by the corpus "
            "synthesizer; choose an empty or new directory for the synthesized corpus"
        )
    for name in (WAV_DIR_NAME, _PARTS_DIR_NAME):
        shutil.rmtree(out_dir / name, ignore_errors=True)
    for name in (LABELS_NAME, RENDER_PARAMS_NAME):
        (out_dir / name).unlink(missing_ok=True)


def _csv_text(rows: list[dict[str, Any]], columns: list[str]) -> str:
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def synthesize_corpus(
    out_dir: str | Path,
    *,
    n_speakers: int = 24,
    utterances_per_emotion: int = 10,
    emotions: tuple[str, ...] = ("neutral", "happy", "angry", "sad"),
    separation: float = 1.3,
    snr_db_range: tuple[float, float] = (5.0, 30.0),
    gain_db_range: tuple[float, float] = (-6.0, 6.0),
    sample_rate: int = 16000,
    seed: int = 0,
    class_priors: dict[str, float] | None = None,
    utterances_per_speaker: int | None = None,
    duplicate_fraction: float = 0.0,
    low_quality_fraction: float = 0.0,
    num_processes: int | None = None,
) -> Path:
    """Build the synthesized demo corpus in ``out_dir`` (or reuse an identical build); return it.

    Writes ``n_speakers * len(emotions) * utterances_per_emotion`` WAV files (with
    ``class_priors``: ``n_speakers * utterances_per_speaker``, split by the priors) plus ``labels.csv``
    (generic CSV layout), ``render_params.csv`` and ``SYNTH_INFO.json``; see the module docstring
    for the layout, the rendering and the reuse rule. ``num_processes`` (default: the CPUs this
    process may use) bounds how many speakers render at once; it does not change the output.
    """
    out = Path(out_dir)
    emotions = tuple(emotions)
    params = _build_params(
        n_speakers, utterances_per_emotion, emotions, separation,
        tuple(snr_db_range), tuple(gain_db_range), sample_rate, seed,
        class_priors, utterances_per_speaker, duplicate_fraction, low_quality_fraction,
    )  # fmt: skip
    if num_processes is not None and num_processes < 1:
        raise ConfigError(f"num_processes must be at least 1, got {num_processes}")
    identity = _build_identity(params)
    if _is_reusable(out, identity):
        return out

    _clear_previous_build(out)
    out.mkdir(parents=True, exist_ok=True)
    speakers = speaker_table(n_speakers)
    # Written first with complete=false: an interrupted build is recognised as ours and redone.
    atomic_write_text(out / INFO_NAME, json.dumps({**identity, "complete": False}, indent=2))
    parts_dir = out / _PARTS_DIR_NAME
    parts_dir.mkdir()
    jobs = [
        _SpeakerJob(
            speaker_index=k,
            speaker=speaker,
            emotion_counts=params_emotion_counts(params),
            separation=params["separation"],
            duplicate_fraction=params["duplicate_fraction"],
            low_quality_fraction=params["low_quality_fraction"],
            snr_db_range=tuple(params["snr_db_range"]),
            gain_db_range=tuple(params["gain_db_range"]),
            sample_rate=sample_rate,
            seed=params["seed"],
            out_dir=str(out),
        )
        for k, speaker in enumerate(speakers)
    ]
    workers = min(num_processes or _default_workers(), len(jobs))
    _run_speaker_processes(jobs, workers, parts_dir)

    rows = []
    for job in jobs:
        rows.extend(json.loads((parts_dir / f"{job.speaker.speaker_id}.rows.json").read_text()))
    shutil.rmtree(parts_dir)
    atomic_write_text(out / LABELS_NAME, _csv_text(rows, ["path", "label", "speaker", "gender"]))
    render_columns = ["path", "label", "speaker", "gender", "voice", "duration_s"]
    render_columns += [*UtterancePlan.__dataclass_fields__, "limiter_scale"]
    atomic_write_text(out / RENDER_PARAMS_NAME, _csv_text(rows, render_columns))
    info = {
        **identity,
        "complete": True,
        "n_utterances": len(rows),
        "total_duration_s": round(sum(r["duration_s"] for r in rows), 3),
        "speakers": [asdict(s) for s in speakers],
        "emotion_profiles": {e: list(emotion_profile(e, params["separation"])) for e in emotions},
    }
    atomic_write_text(out / INFO_NAME, json.dumps(info, indent=2))
    return out


def describe_corpus(out_dir: str | Path) -> dict[str, Any]:
    """Counts per emotion / speaker / gender and durations of a corpus in the generic CSV layout."""
    import soundfile as sf

    out = Path(out_dir)
    labels = out / LABELS_NAME
    if not labels.exists():
        raise CorpusError(f"{labels} not found: build the corpus first (synthesize_corpus)")
    with labels.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    durations: dict[str, list[float]] = {}
    total = 0.0
    for row in rows:
        info = sf.info(str(out / row["path"]))
        seconds = info.frames / info.samplerate
        durations.setdefault(row["label"], []).append(seconds)
        total += seconds
    info_json = _read_info(out) or {}
    return {
        "root": str(out),
        "n_utterances": len(rows),
        "total_duration_s": round(total, 2),
        "per_emotion": dict(sorted(Counter(r["label"] for r in rows).items())),
        "per_speaker": dict(sorted(Counter(r["speaker"] for r in rows).items())),
        "per_gender": dict(sorted(Counter(r.get("gender") or "?" for r in rows).items())),
        "mean_duration_s_per_emotion": {
            label: round(float(np.mean(values)), 3) for label, values in sorted(durations.items())
        },
        "params": info_json.get("params"),
    }
