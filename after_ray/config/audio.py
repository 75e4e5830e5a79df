"""Settings of decoding, checking and cutting audio (the ``audio:`` section of the config).

Torch-, soundfile- and soxr-free on purpose: reading and validating a config must not import
the audio stack (``after_ray.data.audio`` does the work).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# The wav2vec2 / HuBERT / WavLM convolutional feature encoder needs 400 input samples (25 ms at
# 16 kHz) to produce one frame; anything shorter crashes or yields no frame at all.
ENCODER_MIN_SAMPLES = 400


@dataclass
class AudioConfig:
    """How audio is decoded, checked and cut for the model (the ``audio:`` config section)."""

    # Rate the backbone expects; every file is resampled to it.
    sample_rate: int = 16000
    # Training: a random crop of this length per utterance per epoch; shorter ones are padded.
    train_crop_s: float = 4.0
    # Scoring: longer utterances are split into equal chunks no longer than this; consumers
    # average the chunk outputs per utt_id.
    score_chunk_s: float = 10.0
    # Quarantine files longer than this (checked from the header, before decoding).
    max_duration_s: float = 60.0
    # Quarantine files shorter than this (must cover one encoder frame: 400 samples).
    min_duration_s: float = 0.05
    # Quarantine files whose mono RMS is below this level (dB re full scale); -.inf disables.
    silence_dbfs: float = -60.0
    # Zero mean / unit variance per crop or chunk, as wav2vec2-style backbones expect.
    normalize: bool = True
    # Files with more channels than this are quarantined; fewer are averaged to mono.
    max_channels: int = 8
    # Native rates outside [min_input_rate, max_input_rate] Hz are quarantined.
    min_input_rate: int = 4000
    max_input_rate: int = 384000

    @property
    def train_crop_samples(self) -> int:
        return int(round(self.train_crop_s * self.sample_rate))

    @property
    def score_chunk_samples(self) -> int:
        return int(round(self.score_chunk_s * self.sample_rate))

    def validate(self) -> list[str]:
        problems: list[str] = []
        if self.sample_rate < 1000:
            problems.append(
                f"audio.sample_rate: {self.sample_rate} Hz is not a usable model rate "
                "(use the backbone's rate, 16000 for wav2vec2/HuBERT/WavLM)"
            )
        for name in ("train_crop_s", "score_chunk_s", "max_duration_s", "min_duration_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                problems.append(f"audio.{name}: must be a positive number of seconds, got {value}")
        if self.min_duration_s >= self.max_duration_s:
            problems.append(
                f"audio.min_duration_s: {self.min_duration_s} s must be below "
                f"audio.max_duration_s ({self.max_duration_s} s) or every file is quarantined"
            )
        if (
            self.sample_rate >= 1000
            and self.min_duration_s * self.sample_rate < ENCODER_MIN_SAMPLES
        ):
            shortest = ENCODER_MIN_SAMPLES / self.sample_rate
            problems.append(
                f"audio.min_duration_s: {self.min_duration_s} s is shorter than one encoder frame "
                f"({ENCODER_MIN_SAMPLES} samples at {self.sample_rate} Hz); use >= {shortest:g}"
            )
        for name in ("train_crop_s", "score_chunk_s"):
            value = getattr(self, name)
            if value > 0 and value < self.min_duration_s:
                problems.append(
                    f"audio.{name}: {value} s is shorter than audio.min_duration_s "
                    f"({self.min_duration_s} s); make it at least that long"
                )
        if not self.silence_dbfs < 0:
            problems.append(
                f"audio.silence_dbfs: {self.silence_dbfs} dBFS would quarantine normal speech "
                "(a full-scale sine is -3 dBFS); use a negative level such as -60, or -.inf to "
                "turn the check off"
            )
        if self.max_channels < 1:
            problems.append(f"audio.max_channels: must be at least 1, got {self.max_channels}")
        if self.min_input_rate < 1 or self.min_input_rate >= self.max_input_rate:
            problems.append(
                f"audio.min_input_rate/max_input_rate: need 0 < min < max, got "
                f"{self.min_input_rate}..{self.max_input_rate} Hz"
            )
        return problems
