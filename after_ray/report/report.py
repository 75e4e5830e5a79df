"""Reports of AL runs: learning curves, seed bands, AULC, confusion matrices, selection class
balance and stage times, as ``report.md`` (+ PNGs) for people and ``report.json`` for machines.

What a report reads (lock-free, never written to; a run may still be running or have been killed
mid-way, and is reported up to its last evaluated round)::

    <run_dir>/run_info.json                   kind ("al" | "full_data" | any other curve kind,
                                              e.g. a feature baseline), name, strategy,
                                              cold_start, seed, corpus, backbone, tapt,
                                              pool_size, class_names, started
    <run_dir>/state.json                      "timings": [{round, stage, seconds, at}]
    <run_dir>/labels.jsonl                    class balance of a round when its metrics lack it
    <run_dir>/rounds/round_NNN/metrics.json   the evaluation of the model trained after round N

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
* **AULC** (:func:`area_under_curve`): trapezoid area under the metric over the labeled
  fraction, divided by the fraction range, so it is on the metric's scale (a curve constant at
  60% has AULC 60%). Of a run: over the fractions it reached. Of a group: each seed over the
  fractions *every* seed of the group reached (so a killed seed does not drag the mean), then mean
  and std; the range is printed next to it. Compare AULCs only over the same range.
* **Total time** of a run: its largest ``cumulative_wall_s`` (wall time from the start of the
  run, TAPT included, to the end of the last evaluation); when no round recorded it, the sum of
  the stage timings in ``state.json``.

Error policy: :func:`load_run` raises :class:`~after_ray.errors.RunStateError` naming the file
when ``run_info.json`` is missing or unreadable (without it a run cannot be identified).
Problems inside a run that still has a usable description (a round without ``metrics.json``, an
unreadable ``metrics.json`` or ``state.json``) never raise: the round is left out and the
problem is listed in ``RunSummary.warnings`` and in the report's notes. When a report is built
from several directories, a directory that fails to load is skipped with a logged warning and
listed under "Skipped run directories" (a sweep report is not lost to one run killed before it
started); ``strict=True`` raises instead, and a report with no loadable run raises.
"""

from __future__ import annotations

import itertools
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
from after_ray.report import figures as plots
from after_ray.store.atomic import atomic_write_json, atomic_write_text
from after_ray.store.layout import (
    LABELS_FILE,
    METRICS_FILE,
    ROUNDS_DIR,
    STATE_FILE,
    round_dir_name,
)
from after_ray.store.run_state import list_rounds, read_labels_file

logger = logging.getLogger(__name__)

RUN_INFO_FILE = "run_info.json"
REPORT_MD = "report.md"
REPORT_JSON = "report.json"
FIGURES = {
    "learning_curves": "learning_curves.png",
    "ua_vs_time": "ua_vs_time.png",
    "confusion": "confusion.png",
    "selection_balance": "selection_balance.png",
}
FULL_DATA_KIND = "full_data"
AL_KIND = "al"
# run_info.json fields that differ between the seeds of one configuration.
SEED_DEPENDENT_FIELDS = frozenset({"seed", "name", "started", "pool_size"})
FRACTION_DECIMALS = 6  # points of different seeds are aligned on the fraction rounded to 1e-6
# Stage names of state.json timings, in pipeline order. "score_<what>" stages (the round loop
# times "score_pool" and "score_test") sort right after "score" and are shown as
# "scoring (<what>)"; any other stage comes last, by name.
STAGE_ORDER = ("prepare", "tapt", "features", "embed", "finetune", "score", "select", "label")
# Stages computed once and reused by every run over the same corpus and backbone (demo arms,
# sweep trials): reported apart, never in a run's AL loop time, so arms compare like with like.
SHARED_STAGES = ("prepare", "tapt", "features")
STAGE_NAMES = {
    "prepare": "data preparation",
    "tapt": "TAPT",
    "features": "feature pass",
    "embed": "embedding",
    "finetune": "fine-tune",
    "score": "scoring",
    "score_pool": "pool scoring",
    "score_test": "test evaluation",
    "select": "selection",
    "label": "labeling",
}
METRICS = ("ua", "wa", "macro_f1")
_DASH = "–"


# --------------------------------------------------------------------------- data


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
class RoundRow:
    """One evaluated round of a run (fractions in [0, 1]; None where metrics.json lacks it)."""

    round: int
    n_labeled: int | None
    labeled_fraction: float | None
    ua: float | None
    wa: float | None
    macro_f1: float | None
    val_ua: float | None
    best_epoch: int | None
    annotator_seconds: float | None
    cumulative_wall_s: float | None
    class_names: list[str]
    confusion: list[list[int]] | None
    selected_class_counts: dict[str, int]
    stage_seconds: dict[str, float]  # this round's timings, summed per stage

    def metric(self, name: str) -> float | None:
        return getattr(self, name)


@dataclass
class RunSummary:
    """What a report knows about one run directory."""

    run_dir: Path
    info: dict[str, Any]
    rounds: list[RoundRow]  # evaluated rounds, ascending
    stage_seconds: dict[str, float]  # all timings summed per stage (run-wide ones included)
    selection_counts: dict[int, dict[str, int]]  # round -> true class -> items acquired
    unevaluated_rounds: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return str(self.info.get("kind") or AL_KIND)

    @property
    def name(self) -> str:
        return str(self.info.get("name") or self.run_dir.name)

    @property
    def strategy(self) -> str:
        value = self.info.get("strategy")
        if value:
            return str(value)
        return FULL_DATA_KIND if self.kind == FULL_DATA_KIND else "unknown"

    @property
    def seed(self) -> Any:
        return self.info.get("seed")

    @property
    def class_names(self) -> list[str]:
        names = self.info.get("class_names")
        if isinstance(names, list) and names:
            return [str(n) for n in names]
        for row in self.rounds:
            if row.class_names:
                return list(row.class_names)
        return []

    @property
    def last_round(self) -> RoundRow | None:
        return self.rounds[-1] if self.rounds else None

    @property
    def total_seconds(self) -> float | None:
        walls = [r.cumulative_wall_s for r in self.rounds if r.cumulative_wall_s is not None]
        if walls:
            return max(walls)
        if self.stage_seconds:
            return float(sum(self.stage_seconds.values()))
        return None

    @property
    def loop_seconds(self) -> float | None:
        """Wall time of the AL loop itself: every stage but the shared ones (SHARED_STAGES)."""
        if not self.stage_seconds:
            return None
        return float(sum(v for k, v in self.stage_seconds.items() if k not in SHARED_STAGES))

    @property
    def shared_seconds(self) -> float:
        """Time of the shared stages this run computed (0 when it reused them)."""
        return float(sum(v for k, v in self.stage_seconds.items() if k in SHARED_STAGES))

    def curve(self, metric: str) -> tuple[list[float], list[float]]:
        """(labeled fractions, metric values) of the rounds that have both."""
        xs, ys = [], []
        for row in self.rounds:
            value = row.metric(metric)
            if row.labeled_fraction is not None and value is not None:
                xs.append(row.labeled_fraction)
                ys.append(value)
        return xs, ys

    def aulc(self, metric: str = "ua") -> float | None:
        xs, ys = self.curve(metric)
        return area_under_curve(xs, ys) if xs else None


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


def area_under_curve(fractions: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoid area under ``values`` over ``fractions``, divided by the fraction range.

    The result is on the metric's scale: a constant curve at v gives v, whatever the range.
    Points are sorted by fraction first. A single point (zero range) gives its value, the limit
    of the normalised area. Raises ValueError for empty, mismatched or non-finite input.
    """
    x = np.asarray(fractions, dtype=float)
    y = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(
            f"fractions and values must be 1-D and of equal length, got {x.shape} and {y.shape}"
        )
    if x.size == 0:
        raise ValueError("area_under_curve needs at least one point")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("area_under_curve needs finite fractions and values (drop missing ones)")
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    span = x[-1] - x[0]
    if span == 0:
        return float(y.mean())
    return float(np.trapezoid(y, x) / span)


# --------------------------------------------------------------------------- loading


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunStateError(
            f"{what} {str(path)!r} cannot be read ({exc}): restore the file, or leave this "
            "run directory out of the report"
        ) from exc


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _int(value: Any) -> int | None:
    number = _num(value)
    return int(number) if number is not None and number == int(number) else None


def _counts(value: Any) -> dict[str, int]:
    if not isinstance(value, Mapping):
        return {}
    out = {}
    for name, count in value.items():
        number = _int(count)
        if number is not None:
            out[str(name)] = number
    return out


def _confusion(value: Any) -> list[list[int]] | None:
    if not isinstance(value, list) or not value:
        return None
    try:
        matrix = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        return None
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or not np.isfinite(matrix).all():
        return None
    return matrix.astype(np.int64).tolist()


def _read_timings(run_dir: Path, warnings: list[str]) -> list[dict[str, Any]]:
    path = run_dir / STATE_FILE
    if not path.exists():
        warnings.append(f"no {STATE_FILE}: stage times are unknown")
        return []
    try:
        state = _read_json(path, "the run state")
    except RunStateError as exc:
        warnings.append(f"{exc}; stage times are left out")
        return []
    timings = state.get("timings") if isinstance(state, dict) else None
    if not isinstance(timings, list):
        warnings.append(f"{path} has no 'timings' list: stage times are unknown")
        return []
    good = []
    for entry in timings:
        if (
            isinstance(entry, dict)
            and isinstance(entry.get("stage"), str)
            and _num(entry.get("seconds")) is not None
        ):
            good.append(entry)
    return good


def _sum_stages(timings: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for entry in timings:
        stage = entry["stage"]
        totals[stage] = totals.get(stage, 0.0) + float(entry["seconds"])
    return totals


def _label_counts_by_round(run_dir: Path, warnings: list[str]) -> dict[int, dict[str, int]]:
    parsed = read_labels_file(run_dir / LABELS_FILE)
    if parsed.bad_lines:
        warnings.append(
            f"{LABELS_FILE}: {len(parsed.bad_lines)} malformed line(s) left out of the class "
            f"balance (first: line {parsed.bad_lines[0][0]}, {parsed.bad_lines[0][1]})"
        )
    counts: dict[int, Counter] = {}
    for _, entry in parsed.entries:
        counts.setdefault(entry["round"], Counter())[entry["label"]] += 1
    return {r: dict(c) for r, c in counts.items()}


def _round_row(
    round_index: int,
    metrics: Mapping[str, Any],
    info: Mapping[str, Any],
    timings: Sequence[Mapping[str, Any]],
) -> RoundRow:
    test = metrics.get("test") if isinstance(metrics.get("test"), Mapping) else {}
    val = metrics.get("val") if isinstance(metrics.get("val"), Mapping) else {}
    n_labeled = _int(metrics.get("n_labeled"))
    fraction = _num(metrics.get("labeled_fraction"))
    pool_size = _int(info.get("pool_size"))
    if fraction is None and n_labeled is not None and pool_size:
        fraction = n_labeled / pool_size
    names = test.get("class_names")
    return RoundRow(
        round=round_index,
        n_labeled=n_labeled,
        labeled_fraction=fraction,
        ua=_num(test.get("ua")),
        wa=_num(test.get("wa")),
        macro_f1=_num(test.get("macro_f1")),
        val_ua=_num(val.get("ua")),
        best_epoch=_int(metrics.get("best_epoch")),
        annotator_seconds=_num(metrics.get("annotator_seconds")),
        cumulative_wall_s=_num(metrics.get("cumulative_wall_s")),
        class_names=[str(n) for n in names] if isinstance(names, list) else [],
        confusion=_confusion(test.get("confusion")),
        selected_class_counts=_counts(metrics.get("selected_class_counts")),
        stage_seconds=_sum_stages(t for t in timings if t.get("round") == round_index),
    )


def load_run(run_dir: str | Path) -> RunSummary:
    """Read one run directory (lock-free) into a :class:`RunSummary`.

    Raises RunStateError when the directory or its ``run_info.json`` is missing or unreadable;
    anything wrong further in is a warning on the summary (see the module docstring).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunStateError(f"run directory {str(run_dir)!r} does not exist: check the path")
    info_path = run_dir / RUN_INFO_FILE
    if not info_path.is_file():
        raise RunStateError(
            f"{str(info_path)!r} is missing: {str(run_dir)!r} is not an after-ray run directory, "
            "or its run was stopped before it wrote its description; check the path, or leave "
            "this directory out of the report"
        )
    info = _read_json(info_path, "the run description")
    if not isinstance(info, dict):
        raise RunStateError(
            f"the run description {str(info_path)!r} is not a JSON object: restore the file, or "
            "leave this run directory out of the report"
        )
    warnings: list[str] = []
    timings = _read_timings(run_dir, warnings)
    label_counts = _label_counts_by_round(run_dir, warnings)
    rows: list[RoundRow] = []
    unevaluated: list[int] = []
    for round_index in list_rounds(run_dir):
        path = run_dir / ROUNDS_DIR / round_dir_name(round_index) / METRICS_FILE
        if not path.is_file():
            unevaluated.append(round_index)
            continue
        try:
            metrics = _read_json(path, f"the metrics of round {round_index}")
        except RunStateError as exc:
            warnings.append(f"{exc}; round {round_index} is left out")
            unevaluated.append(round_index)
            continue
        if not isinstance(metrics, dict):
            warnings.append(f"{path} is not a JSON object; round {round_index} is left out")
            unevaluated.append(round_index)
            continue
        rows.append(_round_row(round_index, metrics, info, timings))
    selection_counts = dict(label_counts)
    for row in rows:  # metrics.json is the authority for the rounds that have it
        if row.selected_class_counts:
            selection_counts[row.round] = dict(row.selected_class_counts)
    return RunSummary(
        run_dir=run_dir,
        info=info,
        rounds=rows,
        stage_seconds=_sum_stages(timings),
        selection_counts=dict(sorted(selection_counts.items())),
        unevaluated_rounds=unevaluated,
        warnings=warnings,
    )


def discover_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Expand each path to the run directories it holds: itself when it has ``run_info.json``,
    else its children (and grandchildren) that have one, sorted; a path holding none is kept as
    it is, so loading it reports what is missing. For ``after-ray report SWEEP_DIR``."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if (path / RUN_INFO_FILE).is_file() or not path.is_dir():
            found.append(path)
            continue
        nested = sorted(p.parent for p in path.glob(f"*/{RUN_INFO_FILE}"))
        nested += sorted(p.parent for p in path.glob(f"*/*/{RUN_INFO_FILE}"))
        found.extend(nested or [path])
    return found


# --------------------------------------------------------------------------- aggregation


def _hashable(value: Any) -> Any:
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, sort_keys=True, default=str)
    return value


def _seed_sort_key(run: RunSummary) -> tuple:
    seed = run.seed
    numeric = isinstance(seed, int | float) and not isinstance(seed, bool)
    return (seed is None, not numeric, seed if numeric else str(seed), run.name)


def _fraction_key(fraction: float) -> float:
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
            curves.append({_fraction_key(x): y for x, y in zip(xs, ys, strict=True)})
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
                rows[_fraction_key(row.labeled_fraction)] = row  # a later round wins
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
    stages = sorted({s for run in runs for s in run.stage_seconds}, key=_stage_sort_key)
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


def _stage_sort_key(stage: str) -> tuple[int, str]:
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


def _variants(groups: Sequence[GroupSummary]) -> dict[int, int]:
    """id(group) -> its position among the groups of the same strategy (line style)."""
    count: Counter = Counter()
    out = {}
    for group in groups:
        out[id(group)] = count[group.strategy]
        count[group.strategy] += 1
    return out


def _common_chance(runs: Sequence[RunSummary]) -> float | None:
    sizes = {len(run.class_names) for run in runs if run.class_names}
    return 1.0 / sizes.pop() if len(sizes) == 1 else None


def _last_value(group: GroupSummary, metric: str) -> MeanStd:
    """Of a reference group: the metric of each run's last evaluated round."""
    return MeanStd.of(r.last_round.metric(metric) for r in group.runs if r.last_round)


def write_figures(report: Report, out_dir: str | Path) -> dict[str, str]:
    """Draw the report's figures into ``out_dir``; returns figure key -> file name. A figure with
    nothing to show is not drawn, and a stale file of that name is removed."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    variants = _variants(report.groups)
    ref_variants = _variants(report.references)
    written: dict[str, str] = {}

    # (a) UA and WA against the labeled fraction.
    panels = []
    for metric, y_label in (("ua", plots.UA_LABEL), ("wa", plots.WA_LABEL)):
        curves = []
        for group in report.groups:
            points = [p for p in group.points if p.metric(metric).mean is not None]
            if not points:
                continue
            curves.append(
                plots.Curve(
                    label=group.legend_label,
                    strategy=group.strategy,
                    x=[p.labeled_fraction for p in points],
                    y=[p.metric(metric).mean for p in points],
                    std=[p.metric(metric).std for p in points],
                    n=[p.metric(metric).n for p in points],
                    variant=variants[id(group)],
                    dashed=group.kind != AL_KIND,
                )
            )
        levels = []
        for ref in report.references:
            value = _last_value(ref, metric)
            if value.mean is not None:
                levels.append(
                    plots.Level(ref.legend_label, value.mean, value.std, ref_variants[id(ref)])
                )
        chance = _common_chance(report.runs) if metric == "ua" else None
        panels.append(plots.Panel(y_label, curves, levels, chance=chance))
    if any(p.curves or p.levels for p in panels):
        plots.plot_learning_curves(
            panels,
            out_dir / FIGURES["learning_curves"],
            title="Test UA and WA against the labeled fraction (mean ± 1 std over seeds)",
        )
        written["learning_curves"] = FIGURES["learning_curves"]

    # (b) UA against cumulative wall time, per run (seeds do not share time stamps).
    time_curves, time_points = [], []
    for group in report.groups:
        for run in group.runs:
            rows = [r for r in run.rounds if r.cumulative_wall_s is not None and r.ua is not None]
            if rows:
                time_curves.append(
                    plots.Curve(
                        label=group.legend_label,
                        strategy=group.strategy,
                        x=[r.cumulative_wall_s for r in rows],
                        y=[r.ua for r in rows],
                        variant=variants[id(group)],
                        dashed=group.kind != AL_KIND,
                    )
                )
    for ref in report.references:
        for run in ref.runs:
            last = run.last_round
            if last is not None and last.ua is not None and run.total_seconds is not None:
                time_points.append(
                    plots.RefPoint(
                        ref.legend_label, run.total_seconds, last.ua, ref_variants[id(ref)]
                    )
                )
    if time_curves or time_points:
        plots.plot_metric_vs_time(
            plots.Panel(plots.UA_LABEL, time_curves, points=time_points),
            out_dir / FIGURES["ua_vs_time"],
            title="Test UA against wall time (TAPT included)",
        )
        written["ua_vs_time"] = FIGURES["ua_vs_time"]

    # (c) Confusion matrix of the last round of the first run (lowest seed) of each group.
    confusion_panels = []
    for group in [*report.groups, *report.references]:
        for run in group.runs:
            last = run.last_round
            if last is not None and last.confusion is not None:
                names = last.class_names or run.class_names
                if len(names) != len(last.confusion):
                    names = [str(i) for i in range(len(last.confusion))]
                where = f"round {last.round}"
                if last.labeled_fraction is not None:
                    where += f", {_frac(last.labeled_fraction)} labeled"
                seed = "" if run.seed is None else f"seed {run.seed}, "
                confusion_panels.append(
                    plots.ConfusionPanel(f"{group.label}\n{seed}{where}", names, last.confusion)
                )
                break
    if confusion_panels:
        plots.plot_confusion_matrices(
            confusion_panels,
            out_dir / FIGURES["confusion"],
            title="Test confusion matrices, last evaluated round",
        )
        written["confusion"] = FIGURES["confusion"]

    # (d) Class balance of each round's selection (first run of each curve group).
    balance_panels = []
    for group in report.groups:
        for run in group.runs:
            if run.selection_counts:
                names = list(run.class_names)
                for counts in run.selection_counts.values():
                    names += [n for n in counts if n not in names]
                rounds = list(run.selection_counts)
                matrix = [[run.selection_counts[r].get(n, 0) for n in names] for r in rounds]
                seed = "" if run.seed is None else f", seed {run.seed}"
                balance_panels.append(
                    plots.BalancePanel(f"{group.label}{seed}", names, rounds, matrix)
                )
                break
    if balance_panels:
        plots.plot_selection_balance(
            balance_panels,
            out_dir / FIGURES["selection_balance"],
            title="True classes of the items each round acquired",
        )
        written["selection_balance"] = FIGURES["selection_balance"]

    for key, name in FIGURES.items():
        if key not in written:
            (out_dir / name).unlink(missing_ok=True)
    return written


# --------------------------------------------------------------------------- Markdown


def _pct(value: float | None) -> str:
    return _DASH if value is None else f"{value * 100:.1f}"


def _pct_ms(value: MeanStd) -> str:
    if value.mean is None:
        return _DASH
    return _pct(value.mean) if value.std is None else f"{_pct(value.mean)} ± {_pct(value.std)}"


def _frac(value: float | None) -> str:
    return _DASH if value is None else f"{value * 100:.1f}%"


def _secs(value: float | None) -> str:
    if value is None:
        return _DASH
    # Selection and labeling can take milliseconds: keep them from reading as zero.
    return f"{value:.2f}" if abs(value) < 1 else f"{value:.1f}"


def _secs_ms(value: MeanStd) -> str:
    if value.mean is None:
        return _DASH
    return _secs(value.mean) if value.std is None else f"{_secs(value.mean)} ± {_secs(value.std)}"


def _int_text(value: float | None) -> str:
    return _DASH if value is None else f"{value:.0f}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines.extend("| " + " | ".join(_cell(c) for c in row) + " |" for row in rows)
    return lines


def _range_text(lo_hi: tuple[float, float] | None) -> str:
    if lo_hi is None:
        return _DASH
    low, high = lo_hi
    return (
        _frac(low) if _fraction_key(low) == _fraction_key(high) else f"{_frac(low)}–{_frac(high)}"
    )


def _stage_label(stage: str) -> str:
    if stage in STAGE_NAMES:
        return STAGE_NAMES[stage]
    if stage.startswith("score_"):
        return f"scoring ({stage[len('score_') :]})"
    return stage


def _final_point(group: GroupSummary) -> GroupPoint | None:
    points = [p for p in group.points if p.ua.mean is not None]
    return points[-1] if points else None


def _with_n(text: str, n: int, total: int) -> str:
    return text if n >= total or text == _DASH else f"{text} (n={n})"


def _summary_rows(report: Report) -> list[list[str]]:
    reference_time = report.references[0].loop_seconds.mean if report.references else None
    rows = []
    for group in [*report.groups, *report.references]:
        final = _final_point(group)
        total = len(group.runs)
        fractions = [p.labeled_fraction for p in group.points]
        if final is None:
            ua = wa = f1 = _DASH
        else:
            ua = _with_n(_pct_ms(final.ua), final.ua.n, total)
            wa = _with_n(_pct_ms(final.wa), final.wa.n, total)
            f1 = _with_n(_pct_ms(final.macro_f1), final.macro_f1.n, total)
        is_reference = group.kind == FULL_DATA_KIND  # one point: an area says nothing more
        time_share = _DASH
        if reference_time and group.loop_seconds.mean is not None:
            time_share = f"{group.loop_seconds.mean / reference_time * 100:.0f}%"
        rows.append(
            [
                group.label,
                _seeds_text(group),
                _range_text((fractions[0], fractions[-1])) if fractions else _DASH,
                ua,
                wa,
                f1,
                _DASH if is_reference else _pct_ms(group.aulc["ua"]),
                _DASH if is_reference else _pct_ms(group.aulc["wa"]),
                _DASH if is_reference else _range_text(group.aulc_range),
                _secs_ms(group.loop_seconds),
                time_share,
            ]
        )
    return rows


def _shared_stage_seconds(report: Report) -> dict[str, float]:
    """Per shared stage, the time of the run that computed it (the largest; reusers ~0)."""
    out: dict[str, float] = {}
    for run in report.runs:
        for stage in SHARED_STAGES:
            value = run.stage_seconds.get(stage)
            if value is not None and value > out.get(stage, 0.0):
                out[stage] = value
    return {k: out[k] for k in SHARED_STAGES if k in out}


def _seeds_text(group: GroupSummary) -> str:
    seeds = [str(s) for s in group.seeds if s is not None]
    if not seeds:
        return str(len(group.runs))
    return f"{len(group.runs)} ({', '.join(seeds)})"


def _run_heading(run: RunSummary) -> str:
    return run.name if run.seed is None else f"{run.name} (seed {run.seed})"


def _run_description(run: RunSummary) -> str:
    info = run.info
    parts = [f"`{run.run_dir}`", f"kind {run.kind}"]
    for name, text in (
        ("strategy", "strategy"),
        ("cold_start", "cold start"),
        ("backbone", "backbone"),
        ("tapt", "TAPT"),
        ("corpus", "corpus"),
        ("pool_size", "pool"),
        ("started", "started"),
    ):
        if info.get(name) is not None:
            parts.append(f"{text} {info[name]}")
    return ", ".join(parts) + "."


def _run_section(run: RunSummary, level: str) -> list[str]:
    lines = [f"{level} {_run_heading(run)}", "", _run_description(run), ""]
    if run.rounds:
        lines += _table(
            ["round", "labeled fraction", "n labeled", "UA", "WA", "macro-F1", "wall time (s)"],
            (
                [
                    r.round,
                    _frac(r.labeled_fraction),
                    _int_text(r.n_labeled),
                    _pct(r.ua),
                    _pct(r.wa),
                    _pct(r.macro_f1),
                    _secs(r.cumulative_wall_s),
                ]
                for r in run.rounds
            ),
        )
        xs, _ = run.curve("ua")
        aulc = run.aulc("ua")
        if aulc is not None and run.kind != FULL_DATA_KIND:
            rounds_text = "1 round" if len(xs) == 1 else f"{len(xs)} rounds"
            lines += [
                "",
                f"AULC over {_range_text((min(xs), max(xs)))} of the pool ({rounds_text}): "
                f"UA {_pct(aulc)}, WA {_pct(run.aulc('wa'))}, macro-F1 "
                f"{_pct(run.aulc('macro_f1'))}.",
            ]
    else:
        lines.append("No evaluated round yet.")
    if run.unevaluated_rounds:
        rounds = ", ".join(str(r) for r in run.unevaluated_rounds)
        stop = " The table stops at the last evaluated round." if run.rounds else ""
        lines += ["", f"Not evaluated (yet): round {rounds}.{stop}"]
    stages = sorted(run.stage_seconds, key=_stage_sort_key)
    lines.append("")
    if stages:
        lines += _table(
            [f"{_stage_label(s)} (s)" for s in stages] + ["total, wall (s)"],
            [[_secs(run.stage_seconds[s]) for s in stages] + [_secs(run.total_seconds)]],
        )
    else:
        total = run.total_seconds
        total_text = "unknown" if total is None else f"{_secs(total)} s"
        lines.append(f"Total time: {total_text} (no stage timings recorded).")
    for warning in run.warnings:
        lines += ["", f"Note: {warning}"]
    lines.append("")
    return lines


def _group_section(group: GroupSummary) -> list[str]:
    total = len(group.runs)
    if total == 1:
        run = group.runs[0]
        return _run_section(run, f"### {group.label}:")
    lines = [f"### {group.label}", ""]
    lines.append(
        "Seeds: " + ", ".join(f"{_run_heading(r)} `{r.run_dir}`" for r in group.runs) + "."
    )
    lines.append("")
    lines += _table(
        ["labeled fraction", "n labeled", "seeds", "UA", "WA", "macro-F1", "wall time (s)"],
        (
            [
                _frac(p.labeled_fraction),
                _int_text(p.n_labeled.mean),
                f"{p.n_runs}/{total}",
                _pct_ms(p.ua),
                _pct_ms(p.wa),
                _pct_ms(p.macro_f1),
                _secs_ms(p.cumulative_wall_s),
            ]
            for p in group.points
        ),
    )
    lines += [
        "",
        f"AULC over {_range_text(group.aulc_range)} of the pool (the fractions every seed "
        f"reached; {group.aulc['ua'].n} seeds): UA {_pct_ms(group.aulc['ua'])}, "
        f"WA {_pct_ms(group.aulc['wa'])}, macro-F1 {_pct_ms(group.aulc['macro_f1'])}.",
        "",
    ]
    if group.stage_seconds:
        lines += _table(
            ["stage", "mean ± std (s)", "runs"],
            [[_stage_label(s), _secs_ms(v), v.n] for s, v in group.stage_seconds.items()]
            + [["total, wall", _secs_ms(group.total_seconds), group.total_seconds.n]],
        )
        lines.append("")
    for run in group.runs:
        lines += _run_section(run, "####")
    return lines


def render_markdown(report: Report, figures: Mapping[str, str]) -> str:
    """The Markdown text of ``report``; ``figures`` maps figure keys to relative file names."""
    n_runs = len(report.runs)
    lines = [f"# {report.title}", ""]
    lines.append(
        f"{n_runs} run(s): {len(report.groups)} curve group(s), {len(report.references)} "
        f"full-data reference(s). Generated {report.generated}."
    )
    lines += [
        "",
        "UA = mean per-class recall, WA = overall accuracy, macro-F1, in % on the test split. "
        "With several seeds: mean ± sample standard deviation (n-1). AULC = area under the curve "
        "over the labeled fraction divided by the fraction range (in %, on the metric's scale; "
        "compare only over the same range). Loop time = the run's own stages (fine-tuning, "
        "evaluation, scoring, selection, labels) summed; the shared stages (data preparation, "
        "TAPT, the feature pass), computed once and reused by every run, are listed apart.",
        "",
        "## Summary",
        "",
    ]
    header = [
        "run / group",
        "seeds",
        "labeled fraction",
        "UA (last)",
        "WA (last)",
        "macro-F1 (last)",
        "AULC UA",
        "AULC WA",
        "AULC range",
        "loop time (s)",
        "loop time vs full data",
    ]
    lines += _table(header, _summary_rows(report))
    if report.references:
        lines += [
            "",
            f'"loop time vs full data" divides by the loop time of {report.references[0].label}.',
        ]
    shared = _shared_stage_seconds(report)
    if shared:
        lines += [
            "",
            "Shared stages, once for all runs: "
            + ", ".join(f"{_stage_label(k)} {v:.0f} s" for k, v in shared.items())
            + ".",
        ]
    lines.append("")
    captions = {
        "learning_curves": (
            "Learning curves",
            "UA and WA against the labeled fraction of the pool (bands: ±1 std over seeds)",
        ),
        "ua_vs_time": ("UA against wall time", "UA against cumulative wall time"),
        "confusion": (
            "Confusion matrices",
            "Confusion matrices of the last evaluated round (first seed of each group)",
        ),
        "selection_balance": (
            "Class balance of the selections",
            "True classes of the items acquired in each round (first seed of each group)",
        ),
    }
    for key, (heading, caption) in captions.items():
        if key in figures:
            lines += [f"## {heading}", "", f"![{caption}]({figures[key]})", ""]
    lines += ["## Runs", ""]
    for group in [*report.groups, *report.references]:
        lines += _group_section(group)
    if report.skipped:
        lines += ["## Skipped run directories", ""]
        lines += [f"- `{path}`: {reason}" for path, reason in report.skipped]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- JSON


def _ms_dict(value: MeanStd) -> dict[str, Any]:
    return {"mean": value.mean, "std": value.std, "n": value.n}


def _run_dict(run: RunSummary) -> dict[str, Any]:
    return {
        "run_dir": str(run.run_dir),
        "name": run.name,
        "kind": run.kind,
        "strategy": run.strategy,
        "seed": run.seed,
        "info": run.info,
        "rounds": [
            {
                "round": r.round,
                "n_labeled": r.n_labeled,
                "labeled_fraction": r.labeled_fraction,
                "ua": r.ua,
                "wa": r.wa,
                "macro_f1": r.macro_f1,
                "val_ua": r.val_ua,
                "best_epoch": r.best_epoch,
                "annotator_seconds": r.annotator_seconds,
                "cumulative_wall_s": r.cumulative_wall_s,
                "selected_class_counts": r.selected_class_counts,
                "stage_seconds": r.stage_seconds,
                "confusion": r.confusion,
            }
            for r in run.rounds
        ],
        "aulc": {m: run.aulc(m) for m in METRICS},
        "stage_seconds": run.stage_seconds,
        "total_seconds": run.total_seconds,
        "loop_seconds": run.loop_seconds,
        "selection_counts": {str(r): c for r, c in run.selection_counts.items()},
        "unevaluated_rounds": run.unevaluated_rounds,
        "warnings": run.warnings,
    }


def _group_dict(group: GroupSummary) -> dict[str, Any]:
    return {
        "label": group.label,
        "key": group.key,
        "kind": group.kind,
        "strategy": group.strategy,
        "seeds": group.seeds,
        "run_dirs": [str(r.run_dir) for r in group.runs],
        "points": [
            {
                "labeled_fraction": p.labeled_fraction,
                "n_runs": p.n_runs,
                **{
                    name: _ms_dict(p.metric(name))
                    for name in ("n_labeled", *METRICS, "cumulative_wall_s")
                },
            }
            for p in group.points
        ],
        "aulc": {m: _ms_dict(v) for m, v in group.aulc.items()},
        "aulc_range": list(group.aulc_range) if group.aulc_range else None,
        "total_seconds": _ms_dict(group.total_seconds),
        "loop_seconds": _ms_dict(group.loop_seconds),
        "stage_seconds": {s: _ms_dict(v) for s, v in group.stage_seconds.items()},
    }


def report_to_dict(report: Report, figures: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The report's numbers as plain data (fractions in [0, 1], times in seconds)."""
    return {
        "title": report.title,
        "generated": report.generated,
        "definitions": {
            "ua": "mean per-class recall on the test split",
            "wa": "overall accuracy on the test split",
            "std": "sample standard deviation across seeds (ddof=1); null for one seed",
            "aulc": "trapezoid area over the labeled fraction / fraction range; groups: "
            "per seed over the fractions every seed reached (aulc_range)",
            "total_seconds": "largest cumulative_wall_s, else the sum of stage timings",
            "loop_seconds": "sum of the stage timings except the shared stages "
            + ", ".join(SHARED_STAGES),
        },
        "groups": [_group_dict(g) for g in report.groups],
        "references": [_group_dict(g) for g in report.references],
        "runs": [_run_dict(r) for r in report.runs],
        "skipped": [{"run_dir": p, "reason": r} for p, r in report.skipped],
        "figures": dict(figures or {}),
    }


# --------------------------------------------------------------------------- entry points


def report_json(
    run_dirs: Iterable[str | Path],
    out_dir: str | Path,
    *,
    title: str | None = None,
    reference_dirs: Iterable[str | Path] = (),
    by: Sequence[str] | None = None,
    strict: bool = False,
) -> Path:
    """Write only ``report.json`` (no figures) into ``out_dir``; returns its path."""
    report = build_report(
        run_dirs, title=title, reference_dirs=reference_dirs, by=by, strict=strict
    )
    return atomic_write_json(Path(out_dir) / REPORT_JSON, report_to_dict(report), what="the report")


def write_report(
    run_dirs: Iterable[str | Path],
    out_dir: str | Path,
    *,
    title: str | None = None,
    reference_dirs: Iterable[str | Path] = (),
    by: Sequence[str] | None = None,
    strict: bool = False,
) -> Path:
    """Write ``report.md``, its PNGs and ``report.json`` into ``out_dir``; returns report.md's
    path. See the module docstring for what is read, the definitions and the error policy."""
    out_dir = Path(out_dir)
    report = build_report(
        run_dirs, title=title, reference_dirs=reference_dirs, by=by, strict=strict
    )
    figures = write_figures(report, out_dir)
    atomic_write_json(out_dir / REPORT_JSON, report_to_dict(report, figures), what="the report")
    return atomic_write_text(
        out_dir / REPORT_MD, render_markdown(report, figures), what="the report"
    )


# Per-round fields that are outcomes of a run (not timings, paths or dates): what must be equal
# when the same command runs again with the same seed.
OUTCOME_ROUND_FIELDS = (
    "round", "n_labeled", "labeled_fraction", "ua", "wa", "macro_f1", "val_ua", "confusion",
    "selected_class_counts",
)  # fmt: skip


def outcome_view(report_json: Mapping[str, Any]) -> dict[str, Any]:
    """A report.json reduced to its outcomes: per run name, the rounds' metrics and selections."""
    view = {}
    for run in report_json.get("runs", []):
        view[run["name"]] = {
            "rounds": [{k: r.get(k) for k in OUTCOME_ROUND_FIELDS} for r in run.get("rounds", [])],
            "selection_counts": run.get("selection_counts"),
        }
    return view


def compare_outcomes(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    """Differences between two report.json outcome views (empty = the same runs, rounds,
    metrics and selections, to the last digit)."""
    want, got = outcome_view(expected), outcome_view(actual)
    problems = [f"run {n} missing" for n in sorted(set(want) - set(got))]
    problems += [f"run {n} not in the expected report" for n in sorted(set(got) - set(want))]
    for name in sorted(set(want) & set(got)):
        if want[name]["selection_counts"] != got[name]["selection_counts"]:
            problems.append(f"run {name}: selections differ")
        for w, g in itertools.zip_longest(want[name]["rounds"], got[name]["rounds"]):
            if w != g:
                where = (w or g or {}).get("round")
                fields = [k for k in OUTCOME_ROUND_FIELDS if (w or {}).get(k) != (g or {}).get(k)]
                problems.append(f"run {name} round {where}: {', '.join(fields)} differ")
    return problems
