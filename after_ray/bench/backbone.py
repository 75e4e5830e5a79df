"""`after-ray bench backbone`: per-step time and peak memory of TAPT and fine-tuning per backbone.

For each preset (default tiny, base = wav2vec2-base, base-hubert; random weights built from the
transformers config), with the preset's own recipe (``backbone.recipe: auto``), two phases are
measured, each in a fresh Python process so that its peak RSS is its own:

* TAPT: ``tapt_loop`` (the loop a TAPT worker runs) for 1 + N optimizer steps; time per step is
  the loop's own ``seconds_per_step`` (``log_every: 1``), the median of the N after the first.
* fine-tuning: ``finetune`` (the loop a fine-tuning worker runs) for 1 + N epochs of one batch
  each; time per step is the epoch's training time, the median of the N after the first. With
  the CNN frozen (the base recipes) the step trains on cached CNN features, as a real run does;
  building the cache is outside the step.

Batches are ``--batch-size`` synthetic utterances of ``--seconds`` each (no padding). The peak
RSS is the whole process's (``ru_maxrss``): Python, torch and transformers included. Torch runs
``--threads`` threads, by default ``ray.cpus_per_worker`` (what a training worker sets).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

N_CLASSES = 4
_RESULT_PREFIX = "BENCH-BACKBONE-RESULT "


def run_backbone_benchmark(
    config_path: str | None = None,
    overrides: Sequence[str] = (),
    *,
    presets: Sequence[str] = ("tiny", "base", "base-hubert"),
    batch_size: int = 2,
    seconds: float = 2.0,
    steps: int = 3,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Measure every preset's TAPT and fine-tuning step; print and return the table's rows."""
    from after_ray.config.sections import load_config

    if steps < 1 or batch_size < 1 or not seconds > 0:
        raise ValueError("need --steps >= 1, --batch-size >= 1 and --seconds > 0")
    # A training worker runs ray.cpus_per_worker torch threads (worker loops in distributed/).
    threads = threads or load_config(config_path, list(overrides)).ray.cpus_per_worker
    load_before = os.getloadavg()[0]
    results = []
    for preset in presets:
        row: dict[str, Any] = {"backbone": preset}
        for phase in ("tapt", "finetune"):
            job = {
                "phase": phase,
                "preset": preset,
                "config_path": config_path,
                "overrides": list(overrides),
                "batch_size": batch_size,
                "seconds": seconds,
                "steps": steps,
                "threads": threads,
            }
            row[phase] = _in_fresh_process(job)
        results.append(row)
    load = (load_before, os.getloadavg()[0])
    _print_table(results, batch_size=batch_size, seconds=seconds, steps=steps, threads=threads)
    print(f"(1-minute load average of the machine: {load[0]:.1f} before, {load[1]:.1f} after)")
    return results


def _in_fresh_process(job: dict[str, Any]) -> dict[str, Any]:
    code = "import sys; from after_ray.bench.backbone import _child; _child(sys.argv[1])"
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(job)],
        capture_output=True,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        check=False,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_PREFIX):
            return json.loads(line[len(_RESULT_PREFIX) :])
    raise RuntimeError(
        f"bench backbone: measuring {job['phase']} of {job['preset']!r} failed "
        f"(exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    )


def _print_table(
    results: list[dict[str, Any]], *, batch_size: int, seconds: float, steps: int, threads: int
) -> None:
    import torch

    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores, {threads} torch threads, CPU, "
        f"torch {torch.__version__.split('+')[0]}"
    )
    print(
        f"per-step time (median of {steps} after 1 warm-up) and peak RSS, batch {batch_size} x "
        f"{seconds:g} s ({machine}):"
    )
    print(
        "| backbone | parameters (TAPT / fine-tune) | recipe | TAPT s/step (range) "
        "| TAPT peak RSS (GB) | fine-tune s/step (range) | fine-tune peak RSS (GB) "
        "| fine-tune input |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        tapt, ft = r["tapt"], r["finetune"]
        print(
            f"| {r['backbone']} | {tapt['parameters'] / 1e6:.2f}M / {ft['parameters'] / 1e6:.2f}M | "
            f"{tapt['recipe']} | "
            f"{_spread(tapt)} | {tapt['peak_rss_gb']:.2f} | {_spread(ft)} | "
            f"{ft['peak_rss_gb']:.2f} | {ft['input']} |"
        )
    baseline = min(min(r["tapt"]["start_rss_gb"], r["finetune"]["start_rss_gb"]) for r in results)
    print(f"(a process holds {baseline:.2f} GB after importing torch and transformers)")


def _spread(phase: dict[str, Any]) -> str:
    timed = phase["steps_s"][1:]
    return f"{phase['step_s']:.3f} ({min(timed):.3f}-{max(timed):.3f})"


# ------------------------------------------------------------------------------- child side
def _child(job_json: str) -> None:
    """Entry point of the measuring process: one phase of one preset; prints one JSON line."""
    job = json.loads(job_json)
    import torch
    import transformers  # noqa: F401  (in the baseline below)

    torch.set_num_threads(int(job["threads"]))
    start_rss = _peak_rss_gb()
    measure = _measure_tapt if job["phase"] == "tapt" else _measure_finetune
    result = measure(job)
    result["peak_rss_gb"] = _peak_rss_gb()
    result["start_rss_gb"] = start_rss
    print(_RESULT_PREFIX + json.dumps(result), flush=True)


def _peak_rss_gb() -> float:
    import resource

    # Linux reports ru_maxrss in KiB (macOS in bytes).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9


def _config(job: dict[str, Any]):
    from after_ray.config.recipes import choose_recipe
    from after_ray.config.sections import load_config

    n = int(job["steps"]) + 1
    sizes = [
        f"backbone.name_or_path={job['preset']}",
        f"tapt.steps={n}",
        "tapt.log_every=1",
        "tapt.warmup_steps=1",  # the tiny recipe's 40 would exceed the steps
        f"tapt.batch_size={job['batch_size']}",
        f"finetune.epochs={n}",
        "finetune.early_stopping_patience=0",
        f"finetune.batch_size={job['batch_size']}",
        f"finetune.max_duration_s={job['seconds']}",
        f"audio.train_crop_s={job['seconds']}",
    ]
    config = load_config(job["config_path"], [*job["overrides"], *sizes])
    choice = choose_recipe(dataclasses.asdict(config.backbone))
    return config, choice.recipe.name if choice.recipe else "none"


def _batches(n: int, batch_size: int, seconds: float, seed: int) -> list[dict[str, Any]]:
    """``n`` batches of ``batch_size`` normalised noisy harmonic tones, labels cycling."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    samples = int(round(seconds * 16000))
    t = np.arange(samples) / 16000
    batches = []
    for b in range(n):
        values = np.zeros((batch_size, samples), np.float32)
        for i in range(batch_size):
            f0 = rng.uniform(90, 320)
            wave = sum(np.sin(2 * np.pi * h * f0 * t) / h for h in range(1, 6))
            wave = wave + 0.3 * rng.standard_normal(samples)
            values[i] = (wave - wave.mean()) / wave.std()
        batches.append(
            {
                "input_values": torch.from_numpy(values),
                "attention_mask": torch.ones(batch_size, samples, dtype=torch.long),
                "lengths": torch.full((batch_size,), samples, dtype=torch.long),
                "utt_id": [f"bench/{b}/{i}" for i in range(batch_size)],
                "label_index": torch.tensor(
                    [(b * batch_size + i) % N_CLASSES for i in range(batch_size)]
                ),
            }
        )
    return batches


def _measure_tapt(job: dict[str, Any]) -> dict[str, Any]:
    import math

    from after_ray.models.backbones import count_parameters, frames_for_samples, load_backbone
    from after_ray.training.tapt import objective_of, tapt_loop

    config, recipe = _config(job)
    cfg = config.tapt
    model = load_backbone(config.backbone, for_pretraining=True)
    n_batches = cfg.steps
    if objective_of(model) == "masked_prediction":
        # k-means reads up to hubert_kmeans_batches batches of the first pass: enough frames.
        frames = job["batch_size"] * frames_for_samples(model, int(job["seconds"] * 16000))
        n_batches = max(
            n_batches, min(cfg.hubert_kmeans_batches, 1 + cfg.hubert_num_clusters // max(1, frames))
        )
    batches = _batches(n_batches, job["batch_size"], job["seconds"], seed=0)
    per_step: list[float] = []
    losses: list[float] = []

    def on_metrics(metrics: dict[str, Any]) -> None:
        per_step.append(float(metrics["seconds_per_step"]))
        losses.append(float(metrics["loss"]))

    tick = time.perf_counter()
    tapt_loop(cfg, model, batches, on_metrics=on_metrics, device=job.get("device", "cpu"), rank=0)
    total = time.perf_counter() - tick
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"bench backbone: TAPT of {job['preset']!r} gave losses {losses}")
    return {
        "parameters": count_parameters(model),
        "recipe": recipe,
        "step_s": statistics.median(per_step[1:]),
        "steps_s": per_step,
        "setup_s": total - sum(per_step),
        "objective": objective_of(model),
    }


def _measure_finetune(job: dict[str, Any]) -> dict[str, Any]:
    import itertools
    import math

    import torch

    from after_ray.models.backbones import count_parameters, load_backbone
    from after_ray.models.classifier import build_classifier
    from after_ray.training.finetune import finetune, make_cached_providers

    config, recipe = _config(job)
    cfg = config.finetune
    device = job.get("device", "cpu")  # bench gpu runs these on "cuda"
    torch.manual_seed(cfg.seed)
    model = build_classifier(load_backbone(config.backbone, for_pretraining=False), N_CLASSES, cfg)
    n = cfg.epochs
    train = _batches(n, job["batch_size"], job["seconds"], seed=1)
    val = _batches(1, job["batch_size"], job["seconds"], seed=2)
    cache_s = 0.0
    if cfg.cache_features and model.feature_encoder_frozen:
        tick = time.perf_counter()
        cached_train, cached_val, _ = make_cached_providers(
            cfg, model, train, val, device=device, sampling_rate=config.audio.sample_rate
        )
        cache_s = time.perf_counter() - tick
        # One batch per epoch: the epoch's training time is one optimizer step.
        epochs = [list(itertools.islice(cached_train(e), 1)) for e in range(n)]
        train_batches, val_batches = (lambda e: epochs[e]), cached_val
        what = "cached CNN features (CNN frozen)"
    else:
        train_batches, val_batches = (lambda e: [train[e]]), (lambda: val)
        frozen = model.feature_encoder_frozen
        what = "audio (CNN frozen)" if frozen else "audio (CNN trained)"
    classes = [f"c{i}" for i in range(N_CLASSES)]
    result = finetune(
        cfg,
        model,
        train_batches,
        val_batches,
        classes,
        class_counts=[1.0] * N_CLASSES,
        device=device,
    )
    per_step = [r.train_s for r in result.history]
    losses = [r.train_loss for r in result.history]
    if len(per_step) != n or not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"bench backbone: fine-tuning of {job['preset']!r} gave {losses}")
    return {
        "parameters": count_parameters(model),
        "recipe": recipe,
        "step_s": statistics.median(per_step[1:]),
        "steps_s": per_step,
        "cache_build_s": cache_s,
        "input": what,
    }
