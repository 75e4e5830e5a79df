"""Reading run directories for a report: :func:`load_run` turns one into a :class:`RunSummary`
(its evaluated rounds as :class:`RoundRow`s), :func:`discover_run_dirs` finds the run directories
of a sweep directory.

What a report reads (lock-free, never written to; a run may still be running or have been killed
mid-way, and is reported up to its last evaluated round)::

    <run_dir>/run_info.json                   kind ("al" | "full_data" | any other curve kind,
                                              e.g. a feature baseline), name, strategy,
                                              cold_start, seed, corpus, backbone, tapt,
                                              pool_size, class_names, started
    <run_dir>/state.json                      "timings": [{round, stage, seconds, at}]
    <run_dir>/labels.jsonl                    class balance of a round when its metrics lack it
    <run_dir>/rounds/round_NNN/metrics.json   the evaluation of the model trained after round N

(The names come from :mod:`after_ray.store.layout`.)

* **Total time** of a run: its largest ``cumulative_wall_s`` (wall time from the start of the
  run, TAPT included, to the end of the last evaluation); when no round recorded it, the sum of
  the stage timings in ``state.json``.

Error policy: :func:`load_run` raises :class:`~after_ray.errors.RunStateError` naming the file
when ``run_info.json`` is missing or unreadable (without it a run cannot be identified).
Problems inside a run that still has a usable description (a round without ``metrics.json``, an
unreadable ``metrics.json`` or ``state.json``) never raise: the round is left out and the
problem is listed in ``RunSummary.warnings`` and in the report's notes. (What a report made of
several directories does with one that fails to load: see :func:`after_ray.report.aggregate.
build_report`.)
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from after_ray.errors import RunStateError
from after_ray.metrics import area_under_curve
from after_ray.store.layout import LABELS_FILE, RUN_INFO_FILE, STATE_FILE, round_metrics_path
from after_ray.store.run_state import list_rounds, read_labels_file

FULL_DATA_KIND = "full_data"
AL_KIND = "al"
# Stages computed once and reused by every run over the same corpus and backbone (demo arms,
# sweep trials): reported apart, never in a run's AL loop time, so arms compare like with like.
SHARED_STAGES = ("prepare", "tapt", "features")


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
        path = round_metrics_path(run_dir, round_index)
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
