"""The feature baseline: logistic regression on hand-made utterance statistics.

A stable reference curve for the demo report (the BRIEF's measurement on the demo corpus:
5% -> 57, 10% -> 63, 20% -> 69, 50% -> 75% UA). One seed of an AL run moves by about +-5 UA
points; this baseline is cheap enough to average over several random draws per labeled fraction,
so it shows where a curve should be, whatever one AL run happens to do.

Features per utterance (all numpy; decoded, downmixed and resampled as for the model, but not
normalised, since loudness is one of the cues):
duration; frame log-energy mean, std, 10th/50th/90th percentiles; pitch from the normalised
autocorrelation of voiced frames (log F0 mean, std, 10th/90th percentiles, voiced fraction); and
the mean and std of 40 log-mel bands. The classifier is an L2-regularised multinomial logistic
regression on standardised features with class-balanced weights (UA is the metric), fitted with
L-BFGS in torch.

Each draw is written as a run directory of kind ``feature_baseline`` (run_info.json, state.json,
rounds/round_NNN/metrics.json), so ``after-ray report`` draws the draws as one dashed curve with
its +-1 std band beside the AL runs, with no code of its own.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from after_ray.config.audio import AudioConfig
from after_ray.data.audio import decode, resample, to_mono
from after_ray.metrics import classification_report
from after_ray.store import layout
from after_ray.store.atomic import atomic_write_json

KIND = "feature_baseline"
N_MELS = 40
_WIN_S, _HOP_S = 0.025, 0.010
_F0_MIN, _F0_MAX = 60.0, 400.0


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int = N_MELS) -> np.ndarray:
    """Triangular mel filters ``[n_mels, n_fft // 2 + 1]`` (HTK mel scale, 20 Hz to Nyquist)."""

    def mel(hz):
        return 2595.0 * np.log10(1.0 + np.asarray(hz) / 700.0)

    def hz(m):
        return 700.0 * (10.0 ** (np.asarray(m) / 2595.0) - 1.0)

    edges = hz(np.linspace(mel(20.0), mel(sample_rate / 2), n_mels + 2))
    bins = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    low, centre, high = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None, :] - low) / (centre - low)
    falling = (high - bins[None, :]) / (high - centre)
    return np.maximum(0.0, np.minimum(rising, falling))


def utterance_features(wave: np.ndarray, sample_rate: int) -> np.ndarray:
    """The feature vector of one mono utterance (see the module docstring)."""
    win, hop = int(_WIN_S * sample_rate), int(_HOP_S * sample_rate)
    x = np.asarray(wave, dtype=np.float64)
    if len(x) < win:
        x = np.pad(x, (0, win - len(x)))
    n_frames = 1 + (len(x) - win) // hop
    frames = np.lib.stride_tricks.sliding_window_view(x, win)[::hop][:n_frames]
    frames = frames - frames.mean(axis=1, keepdims=True)
    n_fft = 1 << (win - 1).bit_length()
    power = np.abs(np.fft.rfft(frames * np.hanning(win), n=n_fft, axis=1)) ** 2
    log_mel = np.log(power @ mel_filterbank(sample_rate, n_fft).T + 1e-10)
    energy = np.log(np.mean(frames**2, axis=1) + 1e-10)

    # Pitch: the autocorrelation peak between the lags of 400 Hz and 60 Hz, on frames louder than
    # the median; a frame is voiced when its normalised peak is above 0.3.
    spectrum = np.fft.rfft(frames, n=2 * n_fft, axis=1)
    autocorr = np.fft.irfft(np.abs(spectrum) ** 2, axis=1)[:, :n_fft]
    lo, hi = int(sample_rate / _F0_MAX), min(int(sample_rate / _F0_MIN), win - 1)
    peak_lag = lo + np.argmax(autocorr[:, lo:hi], axis=1)
    strength = autocorr[np.arange(n_frames), peak_lag] / np.maximum(autocorr[:, 0], 1e-12)
    voiced = (strength > 0.3) & (energy > np.median(energy))
    log_f0 = np.log(sample_rate / peak_lag[voiced]) if voiced.any() else np.zeros(1)

    return np.concatenate(
        [
            [len(wave) / sample_rate],
            [energy.mean(), energy.std(), *np.percentile(energy, [10, 50, 90])],
            [log_f0.mean(), log_f0.std(), *np.percentile(log_f0, [10, 90]), voiced.mean()],
            log_mel.mean(axis=0),
            log_mel.std(axis=0),
        ]
    ).astype(np.float32)


def extract_features(rows: Sequence[dict[str, Any]], audio: AudioConfig) -> np.ndarray:
    """``[len(rows), F]`` features of the manifest rows' files (decoded as for the model)."""
    out = []
    for row in rows:
        x, sr = decode(row["path"])
        x = resample(to_mono(x), sr, audio.sample_rate)
        out.append(utterance_features(x, audio.sample_rate))
    return np.stack(out)


def fit_logistic(
    x: np.ndarray, y: np.ndarray, n_classes: int, *, l2: float = 1e-2
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class-balanced L2 logistic regression; returns ``(mean, scale, weights [F+1, C])``."""
    import torch

    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
    features = torch.tensor((x - mean) / scale, dtype=torch.float64)
    labels = torch.tensor(y, dtype=torch.long)
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    class_weight = torch.tensor(
        np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 0.0)
    )
    weights = torch.zeros(features.shape[1] + 1, n_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        logits = features @ weights[:-1] + weights[-1]
        loss = torch.nn.functional.cross_entropy(logits, labels, weight=class_weight)
        loss = loss + l2 * (weights[:-1] ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return mean, scale, weights.detach().numpy()


def predict(model: tuple[np.ndarray, np.ndarray, np.ndarray], x: np.ndarray) -> np.ndarray:
    mean, scale, weights = model
    return (((x - mean) / scale) @ weights[:-1] + weights[-1]).argmax(axis=1)


def write_baseline_runs(
    out_root: str | Path,
    *,
    pool_rows: Sequence[dict[str, Any]],
    test_rows: Sequence[dict[str, Any]],
    class_names: Sequence[str],
    fractions: Sequence[float],
    audio: AudioConfig,
    draws: int = 5,
    seed: int = 0,
    corpus: str = "",
) -> list[Path]:
    """Fit the baseline on ``draws`` random labeled subsets of the pool per fraction (nested:
    a draw's 20% contains its 10%, as an AL run's labels do) and write one run directory per
    draw under ``out_root``; returns them."""
    started = time.perf_counter()
    index = {c: i for i, c in enumerate(class_names)}
    pool_x = extract_features(pool_rows, audio)
    pool_y = np.asarray([index[r["label"]] for r in pool_rows])
    test_x = extract_features(test_rows, audio)
    test_y = np.asarray([index[r["label"]] for r in test_rows])
    extract_s = time.perf_counter() - started
    run_dirs = []
    for draw in range(draws):
        run_dir = Path(out_root) / f"feature-baseline-{draw}"
        order = np.random.default_rng([seed, draw]).permutation(len(pool_rows))
        timings = [{"stage": "features", "round": None, "seconds": extract_s}]
        for round_index, fraction in enumerate(fractions):
            n = max(len(class_names), math.ceil(fraction * len(pool_rows)))
            chosen = order[:n]
            tick = time.perf_counter()
            model = fit_logistic(pool_x[chosen], pool_y[chosen], len(class_names))
            report = classification_report(test_y, predict(model, test_x), list(class_names))
            timings.append(
                {"stage": "fit", "round": round_index, "seconds": time.perf_counter() - tick}
            )
            atomic_write_json(
                layout.round_metrics_path(run_dir, round_index),
                {
                    "round": round_index,
                    "n_labeled": int(n),
                    "labeled_fraction": n / len(pool_rows),
                    "strategy": "random",
                    "test": report,
                    "cumulative_wall_s": sum(t["seconds"] for t in timings),
                },
            )
        _record_timings(run_dir, timings)
        atomic_write_json(
            run_dir / layout.RUN_INFO_FILE,
            {
                "kind": KIND,
                "name": run_dir.name,
                "strategy": "random",
                "cold_start": "random",
                "seed": draw,
                "corpus": corpus,
                "backbone": "energy/pitch/log-mel statistics + logistic regression",
                "tapt": False,
                "pool_size": len(pool_rows),
                "class_names": list(class_names),
            },
        )
        run_dirs.append(run_dir)
    return run_dirs


def _record_timings(run_dir: Path, timings: list[dict[str, Any]]) -> None:
    """The stage times in the run directory's own ``state.json``, written by ``RunState`` (the
    report reads them from there), replacing those of an earlier baseline in the directory."""
    from after_ray.store.run_state import RunState

    (run_dir / layout.STATE_FILE).unlink(missing_ok=True)  # a fresh baseline: fresh times
    with RunState.open(run_dir) as state:
        for timing in timings:
            state.record_timing(timing["round"], timing["stage"], timing["seconds"])
