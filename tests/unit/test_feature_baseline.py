"""The demo's feature baseline: pitch and spectrum statistics separate classes that differ in
pitch, and its draws become one dashed reference group in the report."""

from __future__ import annotations

import numpy as np
import soundfile as sf

from after_ray.config.audio import AudioConfig
from after_ray.experiments.feature_baseline import (
    KIND,
    extract_features,
    fit_logistic,
    predict,
    utterance_features,
    write_baseline_runs,
)
from after_ray.report.aggregate import aggregate
from after_ray.report.load import load_run

CLASSES = ["low", "mid", "high"]
PITCH = {"low": 120.0, "mid": 220.0, "high": 350.0}


def voice(f0: float, seconds: float, rng) -> np.ndarray:
    """A buzzy harmonic tone with vibrato and noise: pitch is its only class cue."""
    t = np.arange(int(16000 * seconds)) / 16000
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.03 * np.sin(2 * np.pi * 5 * t))) / 16000
    x = sum(np.sin(h * phase) / h for h in range(1, 6))
    return (0.3 * x + 0.05 * rng.standard_normal(len(t))).astype(np.float32)


def make_rows(tmp_path, n_per_class: int, seed: int, split: str) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for label in CLASSES:
        for i in range(n_per_class):
            path = tmp_path / f"{split}-{label}-{i}.wav"
            f0 = PITCH[label] * rng.uniform(0.9, 1.1)
            sf.write(path, voice(f0, rng.uniform(0.6, 1.2), rng), 16000)
            rows.append({"utt_id": path.stem, "path": str(path), "label": label, "split": split})
    return rows


def test_features_are_finite_and_track_pitch():
    rng = np.random.default_rng(0)
    low, high = (utterance_features(voice(f, 1.0, rng), 16000) for f in (120.0, 350.0))
    assert low.shape == high.shape and np.isfinite(low).all() and np.isfinite(high).all()
    assert low[0] == 1.0  # duration in seconds
    mean_log_f0 = 6  # position after duration (1) and the five energy statistics
    assert 100 < np.exp(low[mean_log_f0]) < 140 and 300 < np.exp(high[mean_log_f0]) < 400


def test_baseline_learns_pitch_classes_and_reports_as_one_reference_group(tmp_path):
    pool = make_rows(tmp_path, 12, 1, "train")
    test = make_rows(tmp_path, 6, 2, "test")
    audio = AudioConfig()
    x, xt = extract_features(pool, audio), extract_features(test, audio)
    y = np.asarray([CLASSES.index(r["label"]) for r in pool])
    yt = np.asarray([CLASSES.index(r["label"]) for r in test])
    accuracy = float(np.mean(predict(fit_logistic(x, y, 3), xt) == yt))
    assert accuracy > 0.9  # chance is 1/3

    dirs = write_baseline_runs(
        tmp_path / "fb",
        pool_rows=pool,
        test_rows=test,
        class_names=CLASSES,
        fractions=[0.25, 0.5],
        audio=audio,
        draws=3,
        seed=0,
        corpus="tones",
    )
    runs = [load_run(d) for d in dirs]
    assert all(not r.warnings for r in runs)
    (group,) = aggregate(runs)
    assert group.kind == KIND and group.label == "feature baseline (random labels)"
    assert [p.labeled_fraction for p in group.points] == [0.25, 0.5]
    assert [p.n_runs for p in group.points] == [3, 3]
    assert group.points[-1].metric("ua").mean > 0.6
