"""`after-ray demo`: the whole AFTER method on the synthesized corpus, with its comparisons.

Three runs share the prepared corpus and one TAPT model: the AFTER loop (clustering-informed
cold start, then the informative-and-diverse hybrid), the same loop with random selection, and
a fine-tune on the whole labeled pool (the horizontal reference). A feature baseline (logistic
regression on energy/pitch/log-mel statistics, five random draws per labeled fraction) gives a
stable reference curve. The report puts them side by side. One seed shows the machinery; a claim that one strategy beats another needs the seed
bands of a sweep, which the report says.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from after_ray.config import Config
from after_ray.runner import run_active_learning, run_full_data


def arm_configs(config: Config) -> dict[str, Config]:
    """The AFTER arm (as configured) and the random-selection arm, each in its own run dir."""
    after = dataclasses.replace(
        config, run=dataclasses.replace(config.run, name=f"{config.run.name}-after")
    )
    random_al = dataclasses.replace(
        config.al,
        strategy="random",
        cold_start="random",
        strategy_params={},
        cold_start_params={},
    )
    random_arm = dataclasses.replace(
        config, al=random_al, run=dataclasses.replace(config.run, name=f"{config.run.name}-random")
    )
    return {"after": after, "random": random_arm}


def feature_baseline(config: Config, run_dir: Path, draws: int = 5) -> list[Path]:
    """The feature baseline at the AL arm's labeled fractions, one run dir per draw
    (reused when already written: it depends only on the prepared corpus and the schedule)."""
    import json

    from after_ray import manifest
    from after_ray.al.state import list_rounds
    from after_ray.feature_baseline import write_baseline_runs

    out_root = Path(config.run.output_dir) / f"{config.run.name}-feature-baseline"
    existing = sorted(out_root.glob("feature-baseline-*/run_info.json"))
    if len(existing) == draws:
        print(f"feature baseline: reusing {out_root}", flush=True)
        return [p.parent for p in existing]
    table = manifest.read_manifest(run_dir / "manifest.parquet")
    rows = table.to_pylist()
    fractions = []
    for r in list_rounds(run_dir):
        metrics = run_dir / "rounds" / f"round_{r:03d}" / "metrics.json"
        if metrics.is_file():
            fractions.append(json.loads(metrics.read_text())["labeled_fraction"])
    tick = time.perf_counter()
    dirs = write_baseline_runs(
        out_root,
        pool_rows=[r for r in rows if r["split"] == "train"],
        test_rows=[r for r in rows if r["split"] == "test" and r["label"] is not None],
        class_names=manifest.class_names_of(table, config.corpus.classes),
        fractions=fractions,
        audio=config.audio,
        draws=draws,
        seed=config.run.seed,
        corpus=config.corpus.name,
    )
    print(f"feature baseline: {draws} draws in {time.perf_counter() - tick:.0f} s", flush=True)
    return dirs


def run_demo(config: Config) -> Path:
    started = time.perf_counter()
    arms = arm_configs(config)
    run_dirs = []
    for label, arm in arms.items():
        print(
            f"\n=== {label}: strategy={arm.al.strategy}, cold start={arm.al.cold_start} ===",
            flush=True,
        )
        outcome = run_active_learning(arm)
        run_dirs.append(outcome.run_dir)
    print("\n=== full-data fine-tune (reference) ===", flush=True)
    full = run_full_data(config)
    print("\n=== feature baseline (logistic regression, 5 random draws) ===", flush=True)
    baseline_dirs = feature_baseline(config, run_dirs[0])
    from after_ray.report import write_report

    out_dir = Path(config.run.output_dir) / f"{config.run.name}-report"
    report = write_report(
        [*run_dirs, *baseline_dirs],
        out_dir,
        title="after-ray demo (synthesized corpus, one seed)",
        reference_dirs=[full.run_dir],
    )
    minutes = (time.perf_counter() - started) / 60
    print(f"\ndemo finished in {minutes:.1f} min; report: {report}", flush=True)
    return report
