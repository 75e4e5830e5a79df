"""`after-ray demo`: the whole AFTER method on the synthesized corpus, with its comparisons.

For each of ``DEMO_SEEDS`` seeds, three runs share the prepared corpus, one TAPT model and (in
``finetune.mode: head``, the demo's setting) one cached feature pass: the AFTER loop
(clustering-informed cold start, then the informative-and-diverse hybrid), the same loop with
random selection, and a fine-tune on the whole labeled pool (the horizontal reference). A
feature baseline (logistic regression on energy/pitch/log-mel statistics, five random draws per
labeled fraction) gives a reference curve from hand-made features. The report puts them side by
side with seed bands; the paired statistics (intervals, wins, labels saved) are
``after-ray bench al``'s.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from after_ray.config.sections import Config
from after_ray.pipeline.runner import run_active_learning, run_full_data
from after_ray.store import layout


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

    from after_ray.data import manifest
    from after_ray.experiments.feature_baseline import write_baseline_runs
    from after_ray.store.run_state import list_rounds

    out_root = Path(config.run.output_dir) / f"{config.run.name}-feature-baseline"
    existing = sorted(out_root.glob(f"feature-baseline-*/{layout.RUN_INFO_FILE}"))
    if len(existing) == draws:
        print(f"feature baseline: reusing {out_root}", flush=True)
        return [p.parent for p in existing]
    splits = manifest.SplitRows.of(
        manifest.read_manifest(layout.manifest_path(run_dir)), config.corpus.classes
    )
    fractions = []
    for r in list_rounds(run_dir):
        metrics = layout.round_metrics_path(run_dir, r)
        if metrics.is_file():
            fractions.append(json.loads(metrics.read_text())["labeled_fraction"])
    tick = time.perf_counter()
    dirs = write_baseline_runs(
        out_root,
        pool_rows=splits.pool,
        test_rows=splits.test,
        class_names=splits.class_names,
        fractions=fractions,
        audio=config.audio,
        draws=draws,
        seed=config.run.seed,
        corpus=config.corpus.name,
    )
    print(f"feature baseline: {draws} draws in {time.perf_counter() - tick:.0f} s", flush=True)
    return dirs


# Seeds of the demo: enough for seed bands; `after-ray bench al` runs more arms with intervals.
DEMO_SEEDS = 5


def seed_config(config: Config, offset: int) -> Config:
    """The config with run.seed + offset, written to its own run dirs (``<name>-s<seed>``)."""
    seed = config.run.seed + offset
    run = dataclasses.replace(config.run, seed=seed, name=f"{config.run.name}-s{seed}")
    return dataclasses.replace(config, run=run)


def run_demo(config: Config, *, seeds: int = DEMO_SEEDS) -> Path:
    started = time.perf_counter()
    run_dirs: list[Path] = []
    full_dirs: list[Path] = []
    for offset in range(seeds):
        seeded = seed_config(config, offset)
        for label, arm in arm_configs(seeded).items():
            print(
                f"\n=== seed {seeded.run.seed}, {label}: strategy={arm.al.strategy}, "
                f"cold start={arm.al.cold_start} ===",
                flush=True,
            )
            run_dirs.append(run_active_learning(arm).run_dir)
        print(f"\n=== seed {seeded.run.seed}, full-data fine-tune (reference) ===", flush=True)
        full_dirs.append(run_full_data(seeded).run_dir)
    print("\n=== feature baseline (logistic regression, 5 random draws) ===", flush=True)
    baseline_dirs = feature_baseline(config, run_dirs[0])
    from after_ray.report.render import write_report

    out_dir = Path(config.run.output_dir) / f"{config.run.name}-report"
    report = write_report(
        [*run_dirs, *baseline_dirs],
        out_dir,
        title=f"after-ray demo (synthesized corpus, {seeds} seeds)",
        reference_dirs=full_dirs,
    )
    minutes = (time.perf_counter() - started) / 60
    print(f"\ndemo finished in {minutes:.1f} min; report: {report}", flush=True)
    _compare_with_committed(config, report.parent / "report.json")
    return report


# The report committed with the code (docs/demo-report/), made by `make demo` with the defaults.
COMMITTED_REPORT = Path(__file__).resolve().parents[2] / "docs" / "demo-report" / "report.json"


def _compare_with_committed(config: Config, report_json: Path) -> None:
    """Say whether this run reproduced the committed demo report exactly (same seeds, same
    code: every round's metrics and selections must be equal)."""
    import json

    from after_ray.config.sections import load_config
    from after_ray.report.render import compare_outcomes

    if not COMMITTED_REPORT.is_file() or not report_json.is_file():
        return
    demo_yaml = COMMITTED_REPORT.parent.parent.parent / "configs" / "demo.yaml"
    if not demo_yaml.is_file() or config.to_dict() != load_config(demo_yaml, []).to_dict():
        print("(not compared with docs/demo-report: the config differs from demo.yaml)")
        return
    problems = compare_outcomes(
        json.loads(COMMITTED_REPORT.read_text()), json.loads(report_json.read_text())
    )
    if problems:
        print(f"differs from {COMMITTED_REPORT}: " + "; ".join(problems[:10]), flush=True)
    else:
        print(f"reproduces {COMMITTED_REPORT} exactly (every round's metrics and selections)")
