"""``after-ray bench audio``: the Ray Data audio pipeline against a plain loop, in the same run.

Both sides do the same work per file: decode (libsndfile) -> mono -> resample to the model rate
(soxr HQ) -> training crop -> normalise, with the same per-utterance random crop, so their
outputs are identical and the benchmark checks that, per utt_id, with :func:`signature` (the
length, a position-weighted sum and the first samples: a plain sum would be ~0 for every
normalised output, so it could not tell a wrong pipeline from a right one).

The Ray side is timed from building the dataset to the last batch on the driver, i.e. including
pipeline start-up and worker scheduling, but after ``ray.init``; then once more with the workers
already up (the steady state a long job sees). Both numbers are printed.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from after_ray.config.audio import AudioConfig
from after_ray.data.audio import load_for_model
from after_ray.seeding import utterance_epoch_rng

SEED = 0


def write_bench_files(
    out_dir: Path, n_files: int, seconds: float, rates: tuple[int, ...], seed: int = SEED
) -> list[dict[str, Any]]:
    """Stereo PCM16 WAV files, rates alternating over ``rates``; returns manifest rows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_files):
        sr = int(rates[i % len(rates)])
        t = np.arange(int(round(seconds * sr))) / sr
        f0 = rng.uniform(100.0, 300.0)
        voiced = sum(np.sin(2 * np.pi * f0 * h * t) / h for h in range(1, 6))
        left = 0.2 * voiced + 0.02 * rng.standard_normal(len(t))
        right = 0.5 * left + 0.02 * rng.standard_normal(len(t))
        path = out_dir / f"utt{i:05d}_{sr}.wav"
        sf.write(path, np.stack([left, right], axis=1).astype(np.float32), sr, subtype="PCM_16")
        rows.append({"utt_id": f"bench/{path.stem}", "path": str(path)})
    return rows


SIGNATURE_HEAD = 4


def signature(audio: np.ndarray) -> tuple[float, ...]:
    """A few numbers that differ when the output differs: length, a sum weighted by position
    (order- and offset-sensitive, unlike a plain sum of a zero-mean signal) and the first
    ``SIGNATURE_HEAD`` samples."""
    x = np.asarray(audio, dtype=np.float64)
    ramp = np.arange(1, len(x) + 1, dtype=np.float64) / max(len(x), 1)
    return (float(len(x)), float(np.dot(x, ramp)), *map(float, x[:SIGNATURE_HEAD]))


def _plain_loop(rows: list[dict[str, Any]], cfg: AudioConfig) -> dict[str, tuple[float, ...]]:
    out = {}
    for row in rows:
        (piece,) = load_for_model(
            row["path"], cfg, "train", utterance_epoch_rng(SEED, 0, row["utt_id"])
        )
        out[row["utt_id"]] = signature(piece)
    return out


def _ray_pipeline(rows: list[dict[str, Any]], cfg: AudioConfig) -> dict[str, tuple[float, ...]]:
    from after_ray.distributed.audio_data import audio_dataset

    ds = audio_dataset(rows, cfg, mode="train", seed=SEED, epoch=0)
    out = {}
    for batch in ds.iter_batches(batch_size=64, batch_format="numpy"):
        for utt_id, audio in zip(batch["utt_id"], batch["audio"], strict=True):
            out[str(utt_id)] = signature(audio)
    return out


def _same(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return len(a) == len(b) and all(
        math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-4) for x, y in zip(a, b, strict=True)
    )


def _rates(n: int, audio_s: float, seconds: float) -> dict[str, float]:
    return {"seconds": seconds, "files_per_s": n / seconds, "audio_s_per_s": audio_s / seconds}


def run_audio_benchmark(
    n_files: int = 200,
    seconds: float = 3.0,
    rates: tuple[int, ...] = (44100, 48000),
    out_dir: str | Path | None = None,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Write the files, time both sides, print one summary, return the figures."""
    import ray

    from after_ray.distributed.session import ensure_ray

    cfg = AudioConfig()
    with tempfile.TemporaryDirectory(prefix="after-ray-bench-audio-") as tmp:
        root = Path(out_dir) if out_dir is not None else Path(tmp)
        rows = write_bench_files(root, n_files, seconds, tuple(rates))
        audio_s = n_files * seconds

        started_ray = not ray.is_initialized()
        if ray_address and started_ray:
            ray.init(address=ray_address)
        else:
            ensure_ray()
        try:
            cpus = int(ray.cluster_resources().get("CPU", 0))

            t0 = time.perf_counter()
            plain = _plain_loop(rows, cfg)
            plain_s = time.perf_counter() - t0

            t0 = time.perf_counter()
            distributed = _ray_pipeline(rows, cfg)
            ray_s = time.perf_counter() - t0

            # Again with the workers already running: the steady-state rate a long job sees,
            # separated from the one-off start-up included above.
            t0 = time.perf_counter()
            _ray_pipeline(rows, cfg)
            warm_s = time.perf_counter() - t0
        finally:
            if started_ray:
                ray.shutdown()

    if set(plain) != set(distributed):
        raise RuntimeError(
            f"bench audio: the pipeline returned {len(distributed)} of {len(plain)} files"
        )
    mismatched = [u for u in plain if not _same(plain[u], distributed[u])]
    if mismatched:
        raise RuntimeError(f"bench audio: outputs differ from the plain loop for {mismatched[:3]}")

    result = {
        "n_files": n_files,
        "seconds_per_file": seconds,
        "rates": list(rates),
        "target_rate": cfg.sample_rate,
        "crop_s": cfg.train_crop_s,
        "ray_cpus": cpus,
        "host_cpus": os.cpu_count(),
        "plain": _rates(n_files, audio_s, plain_s),
        "ray": _rates(n_files, audio_s, ray_s),
        "ray_warm": _rates(n_files, audio_s, warm_s),
        "speedup": plain_s / ray_s,
        "speedup_warm": plain_s / warm_s,
    }
    print(format_result(result))
    return result


def format_result(r: dict[str, Any]) -> str:
    rates = "/".join(str(x) for x in r["rates"])
    lines = [
        f"bench audio: {r['n_files']} files x {r['seconds_per_file']:g} s, {rates} Hz stereo "
        f"PCM16 -> {r['target_rate']} Hz mono, {r['crop_s']:g} s crop, normalised; "
        f"Ray {r['ray_cpus']} CPUs (host {r['host_cpus']})",
    ]
    for key, name in (
        ("plain", "plain loop (1 process)  "),
        ("ray", "Ray Data pipeline       "),
        ("ray_warm", "Ray Data, second pass   "),
    ):
        s = r[key]
        lines.append(
            f"  {name}: {s['files_per_s']:8.1f} files/s  {s['audio_s_per_s']:8.1f} audio-s/s  "
            f"({s['seconds']:.2f} s)"
        )
    lines.append(
        f"  speed-up: {r['speedup']:.2f}x including pipeline start, {r['speedup_warm']:.2f}x on "
        "the second pass (outputs identical to the plain loop)"
    )
    return "\n".join(lines)
