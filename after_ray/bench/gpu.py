"""`after-ray bench gpu`: the GPU paths once, end to end, with their speed and memory.

On a CUDA device, for each base-shaped backbone (``base`` = wav2vec2-base, ``base-hubert``;
random weights, their own recipes), three stages run in mixed precision (``--precision``,
default ``auto`` = bf16 on CUDA, the rule of ``after_ray.training.precision``):

* ``tapt``: ``tapt_loop`` for 1 warm-up + N optimizer steps (``bench backbone``'s TAPT phase);
* ``finetune``: ``finetune`` for 1 + N one-batch epochs (``bench backbone``'s fine-tuning phase;
  the base recipes freeze the CNN, so it trains on cached CNN features built on the GPU);
* ``score``: ``score_batch`` (pool scoring: probabilities, embeddings, MC-dropout samples) on
  1 + N batches under autocast.

Each prints utterances per second, the real-time factor (seconds of audio per wall-clock
second) over the N timed steps, and the stage's peak CUDA memory (``max_memory_allocated``).
Step counts are fixed and small (``--quick``: wav2vec2 only, 1 timed step) so that the whole check
ends in a few minutes. Exit status: 0 when every stage ran and gave finite values,
``EXIT_STAGE_FAILED`` (1) with a message naming the backbone and stage when one failed, and
``EXIT_NO_CUDA`` (3) with "no CUDA device: ..." when torch sees no CUDA device.

TAPT has no fp16 path (``tapt.precision`` is auto|fp32|bf16): ``--precision fp16`` runs TAPT in
bf16 and fine-tuning in fp16 with its GradScaler.
"""

from __future__ import annotations

import math
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

EXIT_STAGE_FAILED = 1
EXIT_NO_CUDA = 3
STAGES = ("tapt", "finetune", "score")
MC_SAMPLES = 4  # MC-dropout passes per scored batch (al.mc_dropout_samples defaults to 10)


class NoCudaError(RuntimeError):
    """torch sees no CUDA device."""


@dataclass(frozen=True)
class GpuPlan:
    """Where and how the check runs: the device and what each precision resolved to."""

    device: str
    device_name: str
    finetune_precision: str  # fp32 | bf16 | fp16, after "auto" was resolved
    tapt_precision: str  # fp32 | bf16 (TAPT has no fp16)
    fp16_scaler: bool  # fine-tuning scales its loss with torch.amp.GradScaler


def gpu_plan(precision: str = "auto") -> GpuPlan:
    """The plan on this machine's first CUDA device; NoCudaError when there is none."""
    import torch

    from after_ray.training.precision import resolve_precision

    if not torch.cuda.is_available():
        raise NoCudaError(
            f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda or 'none'}); bench gpu checks the GPU code "
            "paths and has nothing to run here"
        )
    device = "cuda:0"
    finetune_precision = resolve_precision(precision, device)
    return GpuPlan(
        device=device,
        device_name=torch.cuda.get_device_name(0),
        finetune_precision=finetune_precision,
        tapt_precision="bf16" if finetune_precision == "fp16" else finetune_precision,
        fp16_scaler=finetune_precision == "fp16",
    )


def run_gpu_check(
    config_path: str | None = None,
    overrides: Sequence[str] = (),
    *,
    quick: bool = False,
    precision: str = "auto",
    batch_size: int = 8,
    seconds: float = 4.0,
    steps: int | None = None,
) -> int:
    """Run every stage on the GPU, print one row per stage; return the exit status."""
    try:
        plan = gpu_plan(precision)
    except NoCudaError as exc:
        print(f"bench gpu: {exc}", file=sys.stderr)
        return EXIT_NO_CUDA
    presets = ("base",) if quick else ("base", "base-hubert")
    steps = steps if steps is not None else (1 if quick else 3)
    print(
        f"bench gpu on {plan.device} ({plan.device_name}): TAPT {plan.tapt_precision}, "
        f"fine-tuning {plan.finetune_precision} (GradScaler {'on' if plan.fp16_scaler else 'off'}"
        f"), scoring {plan.finetune_precision}; batch {batch_size} x {seconds:g} s, "
        f"{steps} timed step(s) after 1 warm-up"
    )
    try:
        rows = run_stages(
            plan,
            presets,
            config_path=config_path,
            overrides=overrides,
            batch_size=batch_size,
            seconds=seconds,
            steps=steps,
        )
    except StageFailed as exc:
        print(f"bench gpu: {exc}", file=sys.stderr)
        return EXIT_STAGE_FAILED
    print_rows(rows)
    return 0


class StageFailed(RuntimeError):
    """One stage of one backbone failed; the message names both."""


def run_stages(
    plan: GpuPlan,
    presets: Sequence[str],
    *,
    config_path: str | None = None,
    overrides: Sequence[str] = (),
    batch_size: int = 8,
    seconds: float = 4.0,
    steps: int = 3,
) -> list[dict[str, Any]]:
    """Every stage of every preset on ``plan.device`` (a CPU plan runs them on the CPU: what
    the tests do); StageFailed at the first stage that raises or gives a non-finite value."""
    if steps < 1 or batch_size < 1 or not seconds > 0:
        raise ValueError("need --steps >= 1, --batch-size >= 1 and --seconds > 0")
    rows = []
    for preset in presets:
        job = {
            "preset": preset,
            "config_path": config_path,
            "overrides": [
                *overrides,
                f"tapt.precision={plan.tapt_precision}",
                f"finetune.precision={plan.finetune_precision}",
            ],
            "batch_size": batch_size,
            "seconds": seconds,
            "steps": steps,
            "device": plan.device,
            "precision": plan.finetune_precision,
        }
        for stage in STAGES:
            rows.append(_run_stage(stage, job))
    return rows


def _run_stage(stage: str, job: dict[str, Any]) -> dict[str, Any]:
    import torch

    cuda = job["device"].startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        measured = _STAGE_FUNCTIONS[stage](job)
        if cuda:
            torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - any failure of a GPU path is the finding
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        raise StageFailed(
            f"stage {stage} of backbone {job['preset']!r} failed on {job['device']}: {detail}"
        ) from exc
    step_s = float(measured["step_s"])
    if not (math.isfinite(step_s) and step_s > 0):
        raise StageFailed(f"stage {stage} of backbone {job['preset']!r}: step time {step_s}")
    audio_s = job["batch_size"] * job["seconds"]
    return {
        "backbone": job["preset"],
        "stage": stage,
        "precision": job["precision"] if stage != "tapt" else _tapt_precision(job),
        "step_s": step_s,
        "utterances_per_s": job["batch_size"] / step_s,
        "real_time_factor": audio_s / step_s,
        "peak_cuda_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
        "detail": measured.get("detail", ""),
    }


def _tapt_precision(job: dict[str, Any]) -> str:
    return next(o.split("=", 1)[1] for o in job["overrides"] if o.startswith("tapt.precision="))


def _tapt(job: dict[str, Any]) -> dict[str, Any]:
    from after_ray.bench.backbone import _measure_tapt

    result = _measure_tapt(job)  # raises on a non-finite loss
    return {"step_s": result["step_s"], "detail": result["objective"]}


def _finetune(job: dict[str, Any]) -> dict[str, Any]:
    from after_ray.bench.backbone import _measure_finetune

    result = _measure_finetune(job)  # raises on a non-finite loss
    return {"step_s": result["step_s"], "detail": result["input"]}


def _score(job: dict[str, Any]) -> dict[str, Any]:
    import statistics

    import numpy as np
    import torch

    from after_ray.bench.backbone import N_CLASSES, _batches, _config
    from after_ray.models.backbones import load_backbone
    from after_ray.models.classifier import build_classifier
    from after_ray.training.precision import autocast_for

    config, _ = _config(job)
    device = torch.device(job["device"])
    model = build_classifier(
        load_backbone(config.backbone, for_pretraining=False), N_CLASSES, config.finetune
    ).to(device)
    batches = _batches(int(job["steps"]) + 1, job["batch_size"], job["seconds"], seed=3)
    per_step = []
    for index, batch in enumerate(batches):
        tick = time.perf_counter()
        with torch.no_grad(), autocast_for(job["precision"], device):  # type: ignore[arg-type]
            out = score_batch_on(model, batch, index, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        per_step.append(time.perf_counter() - tick)
        for key in ("probs", "mc_probs", "embeddings"):
            if key in out and not np.isfinite(np.asarray(out[key], dtype=np.float64)).all():
                raise RuntimeError(f"pool scoring gave non-finite {key}")
    return {"step_s": statistics.median(per_step[1:]), "detail": f"MC dropout x {MC_SAMPLES}"}


def score_batch_on(model: Any, batch: dict[str, Any], seed: int, device: Any) -> dict[str, Any]:
    from after_ray.training.scoring import score_batch

    return score_batch(model, batch, mc_samples=MC_SAMPLES, seed=seed, device=device)


_STAGE_FUNCTIONS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "tapt": _tapt,
    "finetune": _finetune,
    "score": _score,
}


def print_rows(rows: Sequence[dict[str, Any]]) -> None:
    print(
        "| backbone | stage | precision | s/step | utterances/s | real-time factor "
        "| peak CUDA memory (GB) | input |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        peak = "-" if r["peak_cuda_gb"] is None else f"{r['peak_cuda_gb']:.2f}"
        print(
            f"| {r['backbone']} | {r['stage']} | {r['precision']} | {r['step_s']:.3f} | "
            f"{r['utterances_per_s']:.1f} | {r['real_time_factor']:.1f} | {peak} | "
            f"{r['detail']} |"
        )
