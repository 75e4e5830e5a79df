"""Aggregating loaded runs into a :class:`Report`: seed groups (:func:`aggregate`), their
mean/std at every labeled fraction, AULC (:func:`after_ray.metrics.area_under_curve`), times, and
:func:`build_report`, which loads the run directories and aggregates them.

Definitions used everywhere below (and written into the report):

* UA = mean per-class recall, WA = overall accuracy, macro-F1: as in ``after_ray.metrics``, on
  the test split of the model selected on the validation split.
* **Seed groups.** :func:`aggregate` groups runs whose ``run_info.json`` agrees on every field
  except :data:`SEED_DEPENDENT_FIELDS` (``seed``, ``name``, ``started``, ``pool_size``: a seeded
  split may change the pool size by a few items), or on the fields given in ``by``. Points are
  aligned on the labeled fraction rounded to 1e-6; a fraction that only some seeds reached (a
  killed run) is averaged over the seeds that have it, and that count is reported.
* **Standard deviation** across seeds is the sample standard deviation (``ddof=1``, the ``n-1``
  denominator), and is undefined (``None`` / "–") for a single seed.
* **AULC** (:func:`after_ray.metrics.area_under_curve`): trapezoid area under the metric over the labeled
  fraction, divided by the fraction range, so it is on the metric's scale (a curve constant at
  60% has AULC 60%). Of a run: over the fractions it reached. Of a group: each seed over the
  fractions *every* seed of the group reached (so a killed seed does not drag the mean), then mean
  and std; the range is printed next to it. Compare AULCs only over the same range.
* **Total time** of a run: see :mod:`after_ray.report.load`.

Error policy (what one run directory raises: see :mod:`after_ray.report.load`): when a report is
built from several directories, a directory that fails to load is skipped with a logged warning
and listed under "Skipped run directories" (a sweep report is not lost to one run killed before
it started); ``strict=True`` raises instead, and a report with no loadable run raises.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from after_ray.errors import RunStateError
from after_ray.metrics import area_under_curve
from after_ray.report.load import AL_KIND, FULL_DATA_KIND, RoundRow, RunSummary, load_run

logger = logging.getLogger(__name__)

# run_info.json fields that differ between the seeds of one configuration.
SEED_DEPENDENT_FIELDS = frozenset({"seed", "name", "started", "pool_size"})
FRACTION_DECIMALS = 6  # points of different seeds are aligned on the fraction rounded to 1e-6
# Stage names of state.json timings, in pipeline order. "score_<what>" stages (the round loop
# times "score_pool" and "score_test") sort right after "score" (the report shows them as
# "scoring (<what>)"); any other stage comes last, by name.
STAGE_ORDER = ("prepare", "tapt", "features", "embed", "finetune", "score", "select", "label")
METRICS = ("ua", "wa", "macro_f1")


class MeanStd(NamedTuple):
    """Mean and sample standard deviation (ddof=1) of ``n`` values; std is None for n < 2."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Iterable[float | None]) -> MeanStd:
        finite = [float(v) for v in values if v is not None and math.isfinite(v)]
        if not finite:
            return cls(None, None, 0)
        if len(finite) == 1:
            return cls(finite[0], None, 1)
        return cls(float(np.mean(finite)), float(np.std(finite, ddof=1)), len(finite))


@dataclass(frozen=True)
class GroupPoint:
    """A seed group at one labeled fraction."""

    labeled_fraction: float
    n_runs: int  # runs of the group that have an evaluated round at this fraction
    n_labeled: MeanStd
    ua: MeanStd
    wa: MeanStd
    macro_f1: MeanStd
    cumulative_wall_s: MeanStd

    def metric(self, name: str) -> MeanStd:
        return getattr(self, name)


@dataclass
class GroupSummary:
    """Runs that differ only by seed, with their mean/std at every labeled fraction."""

    key: dict[str, Any]
    label: str
    runs: list[RunSummary]  # sorted by seed
    points: list[GroupPoint]  # ascending labeled fraction
    aulc: dict[str, MeanStd]  # metric -> AULC over aulc_range, across seeds
    aulc_range: tuple[float, float] | None
    total_seconds: MeanStd
    stage_seconds: dict[str, MeanStd]
    loop_seconds: MeanStd = field(default_factory=lambda: MeanStd.of([]))

    @property
    def kind(self) -> str:
        return self.runs[0].kind

    @property
    def strategy(self) -> str:
        return self.runs[0].strategy

    @property
    def seeds(self) -> list[Any]:
        return [run.seed for run in self.runs]

    @property
    def legend_label(self) -> str:
        if len(self.runs) > 1:
            return f"{self.label} ({len(self.runs)} seeds)"
        seed = self.runs[0].seed
        return self.label if seed is None else f"{self.label} (seed {seed})"


@dataclass
class Report:
    title: str
    generated: str
    runs: list[RunSummary]
    groups: list[GroupSummary]  # curves: every kind except full_data
    references: list[GroupSummary]  # full-data fine-tunes: horizontal lines
    skipped: list[tuple[str, str]]  # (run dir, reason)


# --------------------------------------------------------------------------- AULC


# --------------------------------------------------------------------------- aggregation


def _hashable(value: Any) -> Any:
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, sort_keys=True, default=str)
    return value


def _seed_sort_key(run: RunSummary) -> tuple:
    seed = run.seed
    numeric = isinstance(seed, int | float) and not isinstance(seed, bool)
    return (seed is None, not numeric, seed if numeric else str(seed), run.name)


def fraction_key(fraction: float) -> float:
    return round(float(fraction), FRACTION_DECIMALS)


def _group_aulc(
    runs: Sequence[RunSummary], metric: str
) -> tuple[MeanStd, tuple[float, float] | None]:
    # Each seed over the fractions every seed reached: a killed seed must not shorten the range
    # of the others in one place and lengthen it in another.
    curves = []
    for run in runs:
        xs, ys = run.curve(metric)
        if xs:
            curves.append({fraction_key(x): y for x, y in zip(xs, ys, strict=True)})
    if not curves:
        return MeanStd(None, None, 0), None
    common = sorted(set.intersection(*(set(c) for c in curves)))
    if not common:
        return MeanStd(None, None, 0), None
    areas = [area_under_curve(common, [c[x] for x in common]) for c in curves]
    return MeanStd.of(areas), (common[0], common[-1])


def _group_label(key: Mapping[str, Any], varying: Sequence[str], kind: str) -> str:
    parts = []
    if kind == FULL_DATA_KIND:
        parts.append("full-data fine-tune")
    elif kind != AL_KIND:
        # A reference curve of another kind (e.g. the feature baseline): named by its kind.
        parts.append(kind.replace("_", " "))
        if "strategy" in key:
            parts[-1] += f" ({key['strategy']} labels)"
    elif "strategy" in key:
        parts.append(str(key["strategy"]))
    shown = [n for n in varying if n not in ("strategy", "kind")]
    if not parts and not shown:  # grouped on fields that are equal everywhere (e.g. by=("kind",))
        shown = [n for n in key if n != "kind"]
    parts += [f"{name}={key.get(name)}" for name in shown]
    return ", ".join(parts) or "all runs"


def aggregate(runs: Sequence[RunSummary], by: Sequence[str] | None = None) -> list[GroupSummary]:
    """Group runs that differ only by seed and summarise each group.

    ``by=None`` groups on every ``run_info.json`` field except :data:`SEED_DEPENDENT_FIELDS`;
    ``by=("strategy", "tapt")`` groups on those fields only (``kind`` is always added, so a
    full-data run never joins an AL group). Groups come back AL first, then other curve kinds,
    then full-data references, each sorted by strategy and label.
    """
    buckets: dict[tuple, list[RunSummary]] = {}
    keys: dict[tuple, dict[str, Any]] = {}
    for run in runs:
        if by is None:
            fields = sorted(k for k in run.info if k not in SEED_DEPENDENT_FIELDS)
        else:
            fields = list(dict.fromkeys(["kind", *by]))
        key = {name: run.info.get(name) for name in fields}
        key["kind"] = run.kind
        if "strategy" in key or by is None:
            key["strategy"] = run.strategy
        identity = tuple(sorted((k, _hashable(v)) for k, v in key.items()))
        buckets.setdefault(identity, []).append(run)
        keys.setdefault(identity, key)

    # Labels name the fields that tell groups apart (within AL-like groups and within the
    # full-data references separately, so "cold_start" does not label every AL curve).
    def varying_fields(identities: list[tuple]) -> list[str]:
        names = sorted({k for i in identities for k in keys[i]})
        return [n for n in names if len({_hashable(keys[i].get(n)) for i in identities}) > 1]

    # Families: the AL runs, each other curve kind (a feature baseline's backbone is not a
    # difference worth naming on every AL curve), and the full-data references.
    families: dict[str, list[tuple]] = {}
    for identity in buckets:
        families.setdefault(keys[identity]["kind"], []).append(identity)
    groups: list[GroupSummary] = []
    for family in families.values():
        varying = varying_fields(family)
        for identity in family:
            members = sorted(buckets[identity], key=_seed_sort_key)
            kind = members[0].kind
            groups.append(_summarise_group(keys[identity], members, varying, kind))

    kind_rank = {AL_KIND: 0, FULL_DATA_KIND: 2}
    groups.sort(key=lambda g: (kind_rank.get(g.kind, 1), g.strategy, g.label))
    seen: Counter = Counter()
    for group in groups:  # labels must tell groups apart in legends and headings
        seen[group.label] += 1
        if seen[group.label] > 1:
            group.label = f"{group.label} #{seen[group.label]}"
    return groups


def _summarise_group(
    key: dict[str, Any], runs: list[RunSummary], varying: Sequence[str], kind: str
) -> GroupSummary:
    by_fraction: dict[float, list[RoundRow]] = {}
    for run in runs:
        rows: dict[float, RoundRow] = {}
        for row in run.rounds:
            if row.labeled_fraction is not None:
                rows[fraction_key(row.labeled_fraction)] = row  # a later round wins
        for fraction, row in rows.items():
            by_fraction.setdefault(fraction, []).append(row)
    points = [
        GroupPoint(
            labeled_fraction=fraction,
            n_runs=len(rows),
            n_labeled=MeanStd.of(r.n_labeled for r in rows),
            ua=MeanStd.of(r.ua for r in rows),
            wa=MeanStd.of(r.wa for r in rows),
            macro_f1=MeanStd.of(r.macro_f1 for r in rows),
            cumulative_wall_s=MeanStd.of(r.cumulative_wall_s for r in rows),
        )
        for fraction, rows in sorted(by_fraction.items())
    ]
    aulc: dict[str, MeanStd] = {}
    aulc_range = None
    for metric in METRICS:
        aulc[metric], metric_range = _group_aulc(runs, metric)
        if metric == "ua":
            aulc_range = metric_range
    stages = sorted({s for run in runs for s in run.stage_seconds}, key=stage_sort_key)
    return GroupSummary(
        key=key,
        label=_group_label(key, varying, kind),
        runs=runs,
        points=points,
        aulc=aulc,
        aulc_range=aulc_range,
        total_seconds=MeanStd.of(run.total_seconds for run in runs),
        loop_seconds=MeanStd.of(run.loop_seconds for run in runs),
        stage_seconds={
            stage: MeanStd.of(run.stage_seconds.get(stage) for run in runs) for stage in stages
        },
    )


def stage_sort_key(stage: str) -> tuple[int, str]:
    base = "score" if stage.startswith("score_") else stage
    return (STAGE_ORDER.index(base) if base in STAGE_ORDER else len(STAGE_ORDER), stage)


# --------------------------------------------------------------------------- building


def build_report(
    run_dirs: Iterable[str | Path],
    *,
    title: str | None = None,
    reference_dirs: Iterable[str | Path] = (),
    by: Sequence[str] | None = None,
    strict: bool = False,
) -> Report:
    """Load the runs and aggregate them. ``reference_dirs`` are loaded like ``run_dirs`` (use it
    for the full-data fine-tune or feature baseline shared by several reports); any
    ``kind: full_data`` run among either becomes a horizontal reference line."""
    paths: list[Path] = []
    seen: set[Path] = set()
    for raw in [*run_dirs, *reference_dirs]:
        path = Path(raw)
        resolved = path.resolve()
        if resolved not in seen:
            seen.add(resolved)
            paths.append(path)
    runs: list[RunSummary] = []
    skipped: list[tuple[str, str]] = []
    for path in paths:
        try:
            runs.append(load_run(path))
        except RunStateError as exc:
            if strict:
                raise
            logger.warning("skipping %s: %s", path, exc)
            skipped.append((str(path), str(exc)))
    if not runs:
        reasons = "; ".join(reason for _, reason in skipped) or "no run directory was given"
        raise RunStateError(f"no run could be loaded for the report: {reasons}")
    groups = aggregate(runs, by)
    return Report(
        title=title or "after-ray report",
        generated=datetime.now(UTC).isoformat(timespec="seconds"),
        runs=runs,
        groups=[g for g in groups if g.kind != FULL_DATA_KIND],
        references=[g for g in groups if g.kind == FULL_DATA_KIND],
        skipped=skipped,
    )
