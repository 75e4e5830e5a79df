"""`after-ray bench al`: does active learning pay? Strategies x seeds as one Ray Tune sweep.

Every arm (a strategy with its cold start) runs the same AL schedule for every seed, and every
seed also gets a full-data fine-tune: the reference for "labels needed to reach 95% of the
full-data UA". Seeds are paired across arms: seed s of every arm shares the corpus, the split,
the TAPT model and (``finetune.mode: head``) the cached features; what a seed changes is the
cold-start draw, the strategies' own randomness and the head's initialisation. The statistics
(AULC with t-intervals, paired bootstrap differences to random, wins, labels saved) are in
``bench.al_stats``; this module only plans and runs the grid and hands the run dirs over.

The grid is an ordinary sweep (``after_ray.experiments.sweep``) with ``arms``, so it resumes,
retries failed trials, and runs on a cluster like any sweep.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from after_ray.config.sections import Config
from after_ray.errors import ConfigError

DEFAULT_ARMS = ("after", "random", "entropy", "coreset")
DEFAULT_SEEDS = 5
FULL_DATA_ARM = "full_data"
BASELINE_ARM = "random"
BENCH_DIR = "bench"


def arm_overrides(config: Config, arm: str) -> dict[str, Any]:
    """Overrides of one arm. The config's own strategy keeps its cold start and parameters (the
    default pipeline as configured); ``random`` is random all the way; any other strategy starts
    from a random cold start, as uncertainty and diversity baselines do in the literature."""
    if arm == config.al.strategy:
        return {}
    if arm == FULL_DATA_ARM:
        return {"kind": "full_data"}
    return {
        "al.strategy": arm,
        "al.cold_start": "random",
        "al.strategy_params": {},
        "al.cold_start_params": {},
    }


def bench_arms(config: Config, arms: list[str]) -> dict[str, dict[str, Any]]:
    from after_ray.al.strategies import STRATEGIES

    problems = [a for a in arms if a not in STRATEGIES]
    if problems:
        raise ConfigError(
            f"bench al: unknown strategies {problems}; known: {', '.join(sorted(STRATEGIES))}"
        )
    if BASELINE_ARM not in arms:
        raise ConfigError(
            f"bench al: the arms must include {BASELINE_ARM!r}: every arm is compared with it"
        )
    if len(set(arms)) != len(arms):
        raise ConfigError(f"bench al: arms repeat: {arms}")
    out = {arm: arm_overrides(config, arm) for arm in arms}
    out[FULL_DATA_ARM] = arm_overrides(config, FULL_DATA_ARM)
    return out


def run_al_benchmark(
    config: Config,
    *,
    arms: list[str],
    seeds: list[int],
    name: str | None = None,
    max_concurrent_trials: int | None = None,
    fraction_range: tuple[float, float] = (0.10, 0.20),
) -> Path:
    """Run (or resume) the grid, then write the evidence; returns ``bench_al.md``'s path."""
    from after_ray.bench.al_stats import collect, summarize, write_bench_report
    from after_ray.experiments.sweep.driver import run_sweep
    from after_ray.experiments.sweep.plan import SweepSpec

    if len(seeds) < 2:
        raise ConfigError("bench al: give at least 2 seeds (5 or more for a claim)")
    spec = SweepSpec(
        axes={"run.seed": list(seeds)},
        arms=bench_arms(config, arms),
        max_concurrent_trials=max_concurrent_trials,
    )
    spec.check_arms("bench al")
    name = name or f"bench-al-{config.run.name}"
    started = time.perf_counter()
    result = run_sweep(config, spec, name=name)
    print("\n".join(result.summary_lines()), flush=True)
    table = collect(result.run_dirs)
    summary = summarize(table, baseline=BASELINE_ARM, fraction_range=fraction_range)
    out = write_bench_report(summary, result.sweep_dir / BENCH_DIR)
    minutes = (time.perf_counter() - started) / 60
    print(f"bench al: {len(result.trials)} runs in {minutes:.1f} min; evidence: {out}", flush=True)
    return out
