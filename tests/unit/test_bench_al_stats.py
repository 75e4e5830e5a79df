"""bench al's statistics on run directories with known curves: every number against a hand
computation (trapezoids, paired differences, bootstrap, interpolated labels-to-target)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from after_ray.bench.al_stats import (
    BENCH_JSON,
    BENCH_MD,
    BENCH_PNG,
    aulc_over,
    bootstrap_mean_interval,
    collect,
    summarize,
    t_quantile_975,
    write_bench_report,
)

POOL = 1000
FRACTIONS = (0.10, 0.15, 0.20, 0.30)


def write_run(root: Path, arm: str, seed: int, curve, *, kind: str = "al") -> Path:
    """A run directory as the runner writes it: run_info.json, per-round metrics, timings."""
    run_dir = root / f"{arm}-s{seed}"
    info = {"kind": kind, "name": run_dir.name, "strategy": arm if kind == "al" else None,
            "arm": arm, "seed": seed, "pool_size": POOL, "class_names": ["a", "b"]}  # fmt: skip
    (run_dir / "rounds").mkdir(parents=True)
    (run_dir / "run_info.json").write_text(json.dumps(info))
    timings = []
    for r, (fraction, ua) in enumerate(curve):
        round_dir = run_dir / "rounds" / f"round_{r:03d}"
        round_dir.mkdir()
        metrics = {"round": r, "n_labeled": round(fraction * POOL), "labeled_fraction": fraction,
                   "test": {"ua": ua, "wa": ua, "macro_f1": ua}}  # fmt: skip
        (round_dir / "metrics.json").write_text(json.dumps(metrics))
        timings.append({"round": r, "stage": "finetune", "seconds": 2.0, "at": "t"})
    (run_dir / "state.json").write_text(json.dumps({"schema_version": 1, "timings": timings}))
    return run_dir


# UA (0-1) per fraction: random flat-ish, "good" 3 points better on seeds 0-3, worse on seed 4.
RANDOM = {s: [0.50 + 0.01 * s, 0.55, 0.60, 0.62] for s in range(5)}
GOOD = {s: [u + (0.03 if s < 4 else -0.01) for u in RANDOM[s]] for s in range(5)}
FULL = {s: 0.66 for s in range(5)}


@pytest.fixture()
def bench_dirs(tmp_path) -> list[Path]:
    dirs = []
    for s in range(5):
        dirs.append(write_run(tmp_path, "random", s, list(zip(FRACTIONS, RANDOM[s], strict=True))))
        dirs.append(write_run(tmp_path, "good", s, list(zip(FRACTIONS, GOOD[s], strict=True))))
        dirs.append(write_run(tmp_path, "full_data", s, [(1.0, FULL[s])], kind="full_data"))
    return dirs


def hand_aulc(values) -> float:
    """Trapezoids over 10-15-20% (points), divided by the 10-point range."""
    u = [100 * v for v in values[:3]]
    return ((u[0] + u[1]) / 2 * 0.05 + (u[1] + u[2]) / 2 * 0.05) / 0.10


def test_aulc_is_the_trapezoid_over_the_range_and_interpolates_its_ends():
    ys = [50.0, 55.0, 60.0, 62.0]
    assert aulc_over(FRACTIONS, ys, 0.10, 0.20) == pytest.approx(55.0)
    # 12.5%-25%: ends interpolated (52.5 and 61.0), then trapezoids.
    expected = ((52.5 + 55) / 2 * 0.025 + (55 + 60) / 2 * 0.05 + (60 + 61) / 2 * 0.05) / 0.125
    assert aulc_over(FRACTIONS, ys, 0.125, 0.25) == pytest.approx(expected)
    assert aulc_over(FRACTIONS[:2], ys[:2], 0.10, 0.20) is None  # does not reach 20%


def test_paired_differences_wins_and_intervals_equal_hand_computation(bench_dirs):
    summary = summarize(collect(bench_dirs), baseline="random", fraction_range=(0.10, 0.20))
    by_arm = {a.arm: a for a in summary.arms}
    assert [a.arm for a in summary.arms] == ["random", "good"]  # baseline first
    good = by_arm["good"]
    diffs = np.array([hand_aulc(GOOD[s]) - hand_aulc(RANDOM[s]) for s in range(5)])
    assert [good.diff_by_seed[s] for s in range(5)] == pytest.approx(diffs.tolist())
    assert (good.wins, good.ties, good.losses) == (4, 0, 1)
    half = t_quantile_975(4) * diffs.std(ddof=1) / np.sqrt(5)
    assert good.diff_t.mean == pytest.approx(diffs.mean())
    assert (good.diff_t.low, good.diff_t.high) == pytest.approx(
        (diffs.mean() - half, diffs.mean() + half)
    )
    aulcs = [hand_aulc(RANDOM[s]) for s in range(5)]
    assert by_arm["random"].aulc.mean == pytest.approx(np.mean(aulcs))
    boot = good.diff_bootstrap
    assert boot.low <= boot.mean <= boot.high
    assert bootstrap_mean_interval(list(good.diff_by_seed.values())) == boot  # reproducible
    # 4 of 5 seeds +3, one -1: the bootstrap interval dips below 0 only if it resamples the bad
    # seed at least 4 times out of 5; the mean +2.2 is well inside.
    assert good.verdict in ("beats random", "inconclusive")
    assert boot.low > -1.0 and boot.high <= 3.0 + 1e-9


def test_labels_to_95_percent_of_full_data_interpolate_and_can_be_missed(bench_dirs):
    summary = summarize(collect(bench_dirs), baseline="random")
    by_arm = {a.arm: a for a in summary.arms}
    target = 0.95 * 66.0  # 62.7 points
    # good, seed 0: 53/58/63/65 -> crosses between 15% (58) and 20% (63): 150 + 4.7/5 * 50
    assert by_arm["good"].labels_to_target[0] == pytest.approx(150 + (target - 58) / 5 * 50)
    # random tops out at 62 < 62.7: never reached, so no labels saved either.
    assert all(v is None for v in by_arm["random"].labels_to_target.values())
    assert by_arm["random"].labels_saved.mean is None and by_arm["random"].n_reached == 0
    saved = [POOL - by_arm["good"].labels_to_target[s] for s in range(4)]
    assert by_arm["good"].labels_saved.mean == pytest.approx(np.mean(saved))


def test_a_seed_missing_from_the_baseline_is_left_out_of_the_pairing(bench_dirs):
    dirs = [d for d in bench_dirs if d.name != "random-s2"]
    summary = summarize(collect(dirs), baseline="random")
    good = next(a for a in summary.arms if a.arm == "good")
    assert good.paired_seeds == [0, 1, 3, 4] and len(good.seeds) == 5
    assert any("1 seed(s) without a random run" in note for note in summary.notes)


def test_unreadable_run_is_skipped_and_listed(bench_dirs, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    table = collect([*bench_dirs, broken])
    assert len(table.runs) == 15
    assert [d for d, _ in table.skipped] == [str(broken)]


def test_report_files_hold_the_summary_numbers(bench_dirs, tmp_path):
    summary = summarize(collect(bench_dirs), baseline="random")
    md = write_bench_report(summary, tmp_path / "bench")
    assert md.name == BENCH_MD
    assert (md.parent / BENCH_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((md.parent / BENCH_JSON).read_text())
    good = next(a for a in data["arms"] if a["arm"] == "good")
    assert good["diff_bootstrap"]["mean"] == pytest.approx(summary.arms[1].diff_bootstrap.mean)
    text = md.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| good |"))
    assert f"{summary.arms[1].aulc.mean:.2f}" in row and "4/0/1" in row
    assert "Full-data UA (the reference, 5 seeds): 66.0" in text
    assert "- **AULC** of a run:" in text and "- **Verdict**:" in text  # bold survives
