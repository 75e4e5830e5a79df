"""The evidence of `after-ray bench al`: does a strategy save labels over random, seed-paired?

Input: the run directories of a bench sweep (``bench/al.py``): every arm (``run_info.json``'s
``arm``, else its strategy) x every seed, plus one full-data run per seed. Output:
``bench_al.md`` (for people), ``bench_al.json`` (the same numbers) and ``bench_al.png`` (learning
curves per arm, mean +- std over seeds, full-data UA as a line).

Definitions (also written into the Markdown):

* **AULC** of a run: ``metrics.area_under_curve`` of test UA (in points, 0-100) over
  ``fraction_range``, the curve linearly interpolated at the range's ends when no round lands
  there exactly. A run that does not cover the whole range has no AULC (it is listed as such).
* **Interval of an arm's AULC**: mean +- t(0.975, n-1) x std / sqrt(n) over its seeds.
* **Paired difference** to the baseline arm: per seed, AULC(arm) - AULC(baseline) on the seeds
  both have; mean, a t-interval, and a percentile bootstrap 95% interval (``BOOTSTRAP_RESAMPLES``
  resamples of the seeds with a fixed generator, so the same runs give the same interval).
* **Verdict**: "beats random" when the bootstrap interval lies above 0, "loses" when below,
  "inconclusive" otherwise. **Wins / ties / losses**: seeds where the difference is > +TIE_POINTS,
  within +-TIE_POINTS, < -TIE_POINTS.
* **Labels to 95%**: the first labeled count at which test UA reaches 95% of the same seed's
  full-data UA, linearly interpolated between the two rounds around the crossing; "not reached"
  when no round of the run reaches it. **Labels saved** = pool size - that count (and as % of
  the pool): labels a user would not have bought to get within 5% of labelling everything.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from after_ray.metrics import area_under_curve
from after_ray.report.load import FULL_DATA_KIND, RunSummary, load_run
from after_ray.store.atomic import atomic_write_text

logger = logging.getLogger(__name__)

BENCH_MD = "bench_al.md"
BENCH_JSON = "bench_al.json"
BENCH_PNG = "bench_al.png"
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 20_240_501
TIE_POINTS = 0.1
TARGET_SHARE = 0.95  # of the full-data UA

# Two-sided 95% Student t quantiles t(0.975, df) for df = 1..30 (scipy is not a dependency);
# above 30 the normal quantile is within 2%.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_quantile_975(df: int) -> float:
    """t(0.975, df): the half-width factor of a two-sided 95% t-interval."""
    if df < 1:
        raise ValueError(f"a t-interval needs at least 2 values (df >= 1), got df={df}")
    return _T975[df - 1] if df <= len(_T975) else 1.960


@dataclass(frozen=True)
class BenchRun:
    """One run of the bench: its arm, seed, curve (fractions, UA in points) and sizes."""

    arm: str
    seed: int
    kind: str
    run_dir: str
    fractions: tuple[float, ...]
    n_labeled: tuple[int | None, ...]
    ua: tuple[float, ...]  # test UA in points (0-100), one per evaluated round
    pool_size: int | None
    loop_seconds: float | None


@dataclass
class BenchTable:
    runs: list[BenchRun]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (run dir, reason)

    def arms(self) -> list[str]:
        return sorted({r.arm for r in self.runs if r.kind != FULL_DATA_KIND})

    def of(self, arm: str) -> dict[int, BenchRun]:
        return {r.seed: r for r in self.runs if r.arm == arm and r.kind != FULL_DATA_KIND}

    def full_data(self) -> dict[int, BenchRun]:
        return {r.seed: r for r in self.runs if r.kind == FULL_DATA_KIND}


def _arm_of(summary: RunSummary) -> str:
    arm = summary.info.get("arm")
    if arm:
        return str(arm)
    return FULL_DATA_KIND if summary.kind == FULL_DATA_KIND else summary.strategy


def collect(run_dirs: Iterable[str | Path]) -> BenchTable:
    """Load every run; a directory that cannot be read is skipped and listed, never fatal."""
    table = BenchTable(runs=[])
    for run_dir in run_dirs:
        try:
            summary = load_run(run_dir)
        except Exception as error:  # noqa: BLE001 - one bad run must not lose the bench
            logger.warning("bench al: skipping %s: %s", run_dir, error)
            table.skipped.append((str(run_dir), str(error)))
            continue
        rows = [r for r in summary.rounds if r.labeled_fraction is not None and r.ua is not None]
        if summary.seed is None:
            table.skipped.append((str(run_dir), "run_info.json records no seed"))
            continue
        table.runs.append(
            BenchRun(
                arm=_arm_of(summary),
                seed=int(summary.seed),
                kind=summary.kind,
                run_dir=str(run_dir),
                fractions=tuple(float(r.labeled_fraction) for r in rows),
                n_labeled=tuple(r.n_labeled for r in rows),
                ua=tuple(100.0 * float(r.ua) for r in rows),
                pool_size=summary.info.get("pool_size"),
                loop_seconds=summary.loop_seconds,
            )
        )
    return table


def aulc_over(fractions: Sequence[float], values: Sequence[float], lo: float, hi: float):
    """AULC over [lo, hi], interpolating the curve at the ends; None if the run does not span it."""
    x = np.asarray(fractions, dtype=float)
    y = np.asarray(values, dtype=float)
    tol = 1e-6
    if x.size == 0 or x.min() > lo + tol or x.max() < hi - tol:
        return None
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    inside = (x > lo + tol) & (x < hi - tol)
    xs = np.concatenate([[lo], x[inside], [hi]])
    ys = np.interp(xs, x, y)
    return area_under_curve(xs, ys)


def labels_to_reach(run: BenchRun, target_ua: float) -> float | None:
    """Labels at which the curve first reaches ``target_ua`` (interpolated), None if never."""
    points = [
        (f, n, u) for f, n, u in zip(run.fractions, run.n_labeled, run.ua, strict=True)
        if n is not None
    ]  # fmt: skip
    points.sort()
    for i, (_, n, u) in enumerate(points):
        if u >= target_ua:
            if i == 0:
                return float(n)
            _, n0, u0 = points[i - 1]
            return float(n0 + (target_ua - u0) / (u - u0) * (n - n0))
    return None


@dataclass(frozen=True)
class Interval:
    mean: float | None
    low: float | None
    high: float | None
    n: int

    @classmethod
    def t(cls, values: Sequence[float]) -> Interval:
        v = np.asarray(values, dtype=float)
        if v.size == 0:
            return cls(None, None, None, 0)
        if v.size == 1:
            return cls(float(v[0]), None, None, 1)
        half = t_quantile_975(v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size)
        return cls(float(v.mean()), float(v.mean() - half), float(v.mean() + half), int(v.size))


def bootstrap_mean_interval(values: Sequence[float], *, resamples: int = BOOTSTRAP_RESAMPLES):
    """Percentile bootstrap 95% interval of the mean (seeds resampled with replacement)."""
    v = np.asarray(values, dtype=float)
    if v.size < 2:
        return Interval(float(v.mean()) if v.size else None, None, None, int(v.size))
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    means = v[rng.integers(0, v.size, size=(resamples, v.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return Interval(float(v.mean()), float(low), float(high), int(v.size))


@dataclass
class ArmSummary:
    arm: str
    seeds: list[int]
    aulc: Interval
    aulc_by_seed: dict[int, float]
    paired_seeds: list[int]
    diff_by_seed: dict[int, float]
    diff_t: Interval
    diff_bootstrap: Interval
    wins: int
    ties: int
    losses: int
    verdict: str
    ua_by_fraction: dict[str, tuple[float, float | None, int]]  # "0.100" -> mean, std, n
    labels_to_target: dict[int, float | None]
    labels_saved: Interval  # over seeds that reached the target
    labels_saved_share: Interval  # the same, in % of the pool
    n_reached: int
    loop_seconds: Interval


@dataclass
class BenchSummary:
    baseline: str
    fraction_range: tuple[float, float]
    arms: list[ArmSummary]
    full_data_ua: dict[int, float]
    full_data_loop_seconds: Interval
    skipped: list[tuple[str, str]]
    notes: list[str]


def _verdict(interval: Interval, arm: str, baseline: str) -> str:
    if arm == baseline:
        return "baseline"
    if interval.low is None:
        return "inconclusive (fewer than 2 paired seeds)"
    if interval.low > 0:
        return f"beats {baseline}"
    if interval.high < 0:
        return f"loses to {baseline}"
    return "inconclusive"


def summarize(
    table: BenchTable, *, baseline: str = "random", fraction_range: tuple[float, float] = (0.1, 0.2)
) -> BenchSummary:
    """Per-arm AULC, paired differences to ``baseline``, labels to 95% of full-data UA."""
    lo, hi = fraction_range
    notes: list[str] = []
    full = table.full_data()
    full_ua = {s: max(r.ua) for s, r in full.items() if r.ua}
    per_arm_aulc: dict[str, dict[int, float]] = {}
    for arm in table.arms():
        values = {}
        for seed, run in sorted(table.of(arm).items()):
            value = aulc_over(run.fractions, run.ua, lo, hi)
            if value is None:
                notes.append(f"{arm}, seed {seed}: does not cover {lo:.0%}-{hi:.0%}; no AULC")
            else:
                values[seed] = value
        per_arm_aulc[arm] = values
    if baseline not in per_arm_aulc:
        notes.append(f"no run of the baseline arm {baseline!r}: no paired differences")
    base = per_arm_aulc.get(baseline, {})
    arms = []
    for arm, values in per_arm_aulc.items():
        runs = table.of(arm)
        paired = sorted(set(values) & set(base))
        diffs = {s: values[s] - base[s] for s in paired}
        if arm != baseline and len(paired) < len(values):
            notes.append(
                f"{arm}: {len(values) - len(paired)} seed(s) without a {baseline} run left out "
                "of the paired difference"
            )
        boot = bootstrap_mean_interval(list(diffs.values()))
        by_fraction: dict[str, list[float]] = {}
        for run in runs.values():
            for f, u in zip(run.fractions, run.ua, strict=True):
                by_fraction.setdefault(f"{f:.3f}", []).append(u)
        ua_by_fraction = {
            k: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else None, len(v))
            for k, v in sorted(by_fraction.items())
        }
        to_target = {
            s: labels_to_reach(r, TARGET_SHARE * full_ua[s]) if s in full_ua else None
            for s, r in sorted(runs.items())
        }
        saved = [r.pool_size - to_target[s] for s, r in runs.items()
                 if to_target.get(s) is not None and r.pool_size]  # fmt: skip
        saved_share = [100.0 * (r.pool_size - to_target[s]) / r.pool_size for s, r in runs.items()
                       if to_target.get(s) is not None and r.pool_size]  # fmt: skip
        d = np.asarray(list(diffs.values()), dtype=float)
        arms.append(
            ArmSummary(
                arm=arm,
                seeds=sorted(runs),
                aulc=Interval.t(list(values.values())),
                aulc_by_seed=values,
                paired_seeds=paired,
                diff_by_seed=diffs,
                diff_t=Interval.t(list(diffs.values())),
                diff_bootstrap=boot,
                wins=int((d > TIE_POINTS).sum()),
                ties=int((np.abs(d) <= TIE_POINTS).sum()),
                losses=int((d < -TIE_POINTS).sum()),
                verdict=_verdict(boot, arm, baseline),
                ua_by_fraction=ua_by_fraction,
                labels_to_target=to_target,
                labels_saved=Interval.t(saved),
                labels_saved_share=Interval.t(saved_share),
                n_reached=sum(v is not None for v in to_target.values()),
                loop_seconds=Interval.t(
                    [r.loop_seconds for r in runs.values() if r.loop_seconds is not None]
                ),
            )
        )
    # Baseline first, then the best AULC first.
    arms.sort(key=lambda a: (a.arm != baseline, -(a.aulc.mean or -1e9)))
    return BenchSummary(
        baseline=baseline,
        fraction_range=(lo, hi),
        arms=arms,
        full_data_ua=full_ua,
        full_data_loop_seconds=Interval.t(
            [r.loop_seconds for r in full.values() if r.loop_seconds is not None]
        ),
        skipped=list(table.skipped),
        notes=notes,
    )


# --------------------------------------------------------------------------- writing


def _ci(interval: Interval, digits: int = 1) -> str:
    if interval.mean is None:
        return "–"
    if interval.low is None:
        return f"{interval.mean:.{digits}f}"
    return f"{interval.mean:.{digits}f} [{interval.low:.{digits}f}, {interval.high:.{digits}f}]"


def _signed_ci(interval: Interval) -> str:
    if interval.mean is None:
        return "–"
    if interval.low is None:
        return f"{interval.mean:+.2f}"
    return f"{interval.mean:+.2f} [{interval.low:+.2f}, {interval.high:+.2f}]"


def markdown(summary: BenchSummary) -> str:
    lo, hi = summary.fraction_range
    base = summary.baseline
    last = max((k for a in summary.arms for k in a.ua_by_fraction), default=None)
    full = list(summary.full_data_ua.values())
    lines = [
        "# after-ray bench al",
        "",
        f"Test UA in points (%). AULC over {lo:.0%}–{hi:.0%} of the pool; Δ = paired difference "
        f"to `{base}` on the same seeds; 95% intervals in brackets.",
        "",
        f"| arm | seeds | AULC UA {lo:.0%}–{hi:.0%} [t 95% CI] | Δ vs {base} [bootstrap 95% CI] "
        f"| Δ [t 95% CI] | wins/ties/losses | verdict | UA at {float(last):.0%} "
        "| labels to 95% of full data | labels saved (% of pool) | loop time (s) |"
        if last
        else "| arm | seeds | AULC | Δ | Δ (t) | w/t/l | verdict | UA | labels | saved | loop |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in summary.arms:
        at_last = a.ua_by_fraction.get(last) if last else None
        ua_last = (
            "–" if at_last is None
            else f"{at_last[0]:.1f} ± {at_last[1]:.1f}" if at_last[1] is not None
            else f"{at_last[0]:.1f}"
        )  # fmt: skip
        reached = [v for v in a.labels_to_target.values() if v is not None]
        to_target = (
            f"{np.mean(reached):.0f} ({a.n_reached}/{len(a.labels_to_target)} seeds)"
            if reached
            else f"not reached ({len(a.labels_to_target)} seeds)"
        )
        saved = (
            f"{_ci(a.labels_saved, 0)} ({_ci(a.labels_saved_share, 1)}%)"
            if a.labels_saved.mean is not None
            else "–"
        )
        is_base = a.arm == base
        lines.append(
            f"| {a.arm} | {len(a.seeds)} | {_ci(a.aulc, 2)} "
            f"| {'–' if is_base else _signed_ci(a.diff_bootstrap)} "
            f"| {'–' if is_base else _signed_ci(a.diff_t)} "
            f"| {'–' if is_base else f'{a.wins}/{a.ties}/{a.losses}'} | {a.verdict} "
            f"| {ua_last} | {to_target} | {saved} | {_ci(a.loop_seconds, 1)} |"
        )
    if full:
        lines += [
            "",
            f"Full-data UA (the reference, {len(full)} seeds): {np.mean(full):.1f} "
            f"± {np.std(full, ddof=1) if len(full) > 1 else 0:.1f}; its loop time "
            f"{_ci(summary.full_data_loop_seconds, 1)} s.",
        ]
    lines += ["", "## Per seed", "", f"| arm | seed | AULC | Δ vs {base} | labels to 95% |"]
    lines.append("|---|---|---|---|---|")
    for a in summary.arms:
        for s in a.seeds:
            aulc = a.aulc_by_seed.get(s)
            diff = a.diff_by_seed.get(s)
            target = a.labels_to_target.get(s)
            lines.append(
                f"| {a.arm} | {s} | {'–' if aulc is None else f'{aulc:.2f}'} "
                f"| {'–' if diff is None or a.arm == base else f'{diff:+.2f}'} "
                f"| {'not reached' if target is None else f'{target:.0f}'} |"
            )
    lines += ["", "## Definitions", ""]
    doc = (__doc__ or "").split("Definitions (also written into the Markdown):", 1)[-1]
    items = [" ".join(item.split()) for item in doc.split("\n* ") if item.strip()]
    lines += [f"- {item.removeprefix('* ')}" for item in items]
    if summary.notes or summary.skipped:
        lines += ["", "## Notes", ""]
        lines += [f"- {n}" for n in summary.notes]
        lines += [f"- skipped `{d}`: {why}" for d, why in summary.skipped]
    lines += ["", f"![learning curves]({BENCH_PNG})", ""]
    return "\n".join(lines)


def _plot(summary: BenchSummary, table_curves: dict[str, dict[str, tuple]], out: Path) -> Path:
    from after_ray.report import figures as plots

    curves = []
    for arm, points in table_curves.items():
        xs = sorted(points, key=float)
        curves.append(
            plots.Curve(
                label=arm,
                strategy=arm,
                x=[float(x) for x in xs],
                y=[points[x][0] / 100 for x in xs],
                std=[None if points[x][1] is None else points[x][1] / 100 for x in xs],
                n=[points[x][2] for x in xs],
            )
        )
    full = list(summary.full_data_ua.values())
    levels = (
        [plots.Level(label="full data", value=float(np.mean(full)) / 100,
                     std=float(np.std(full, ddof=1)) / 100 if len(full) > 1 else None)]
        if full else []
    )  # fmt: skip
    panel = plots.Panel(y_label="test UA", curves=curves, levels=levels)
    return plots.plot_learning_curves([panel], out, title="bench al: mean ± std over seeds")


def write_bench_report(summary: BenchSummary, out_dir: str | Path) -> Path:
    """Write bench_al.md, bench_al.json and bench_al.png into ``out_dir``; return the .md path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _plot(summary, {a.arm: a.ua_by_fraction for a in summary.arms}, out / BENCH_PNG)
    atomic_write_text(out / BENCH_JSON, json.dumps(_jsonable(asdict(summary)), indent=2) + "\n")
    return atomic_write_text(out / BENCH_MD, markdown(summary) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float | np.floating):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value
