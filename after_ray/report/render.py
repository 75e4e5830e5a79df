"""The text of a report: ``report.md`` for people (:func:`render_markdown`), ``report.json``
for machines (:func:`report_to_dict`), and the entry points that write them with the figures
(:func:`write_report`, :func:`report_json`); :func:`outcome_view` and :func:`compare_outcomes`
compare two report.json files by their outcomes.

What is read and the error policy: :mod:`after_ray.report.load`; the definitions (seed groups,
standard deviation, AULC): :mod:`after_ray.report.aggregate`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from after_ray.report.aggregate import (
    METRICS,
    GroupPoint,
    GroupSummary,
    MeanStd,
    Report,
    build_report,
    fraction_key,
    stage_sort_key,
)
from after_ray.report.figures import write_figures
from after_ray.report.load import FULL_DATA_KIND, SHARED_STAGES, RunSummary
from after_ray.store.atomic import atomic_write_json, atomic_write_text

REPORT_MD = "report.md"
REPORT_JSON = "report.json"
# How the report names the stages of state.json timings ("score_<what>" stages not listed here
# are "scoring (<what>)"; the order is aggregate.STAGE_ORDER).
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
_DASH = "–"


# --------------------------------------------------------------------------- Markdown


def _pct(value: float | None) -> str:
    return _DASH if value is None else f"{value * 100:.1f}"


def _mean_std_text(value: MeanStd, number: Callable[[float | None], str]) -> str:
    """``mean ± std`` with ``number`` for each (just the mean for one seed, a dash for none)."""
    if value.mean is None:
        return _DASH
    if value.std is None:
        return number(value.mean)
    return f"{number(value.mean)} ± {number(value.std)}"


def _pct_ms(value: MeanStd) -> str:
    return _mean_std_text(value, _pct)


def _frac(value: float | None) -> str:
    return _DASH if value is None else f"{value * 100:.1f}%"


def _secs(value: float | None) -> str:
    if value is None:
        return _DASH
    # Selection and labeling can take milliseconds: keep them from reading as zero.
    return f"{value:.2f}" if abs(value) < 1 else f"{value:.1f}"


def _secs_ms(value: MeanStd) -> str:
    return _mean_std_text(value, _secs)


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
    return _frac(low) if fraction_key(low) == fraction_key(high) else f"{_frac(low)}–{_frac(high)}"


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
    stages = sorted(run.stage_seconds, key=stage_sort_key)
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


def _times_text(n: int) -> str:
    return "once" if n == 1 else f"{n} times"


def _failed_trial_entries(failed: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The failed trials of a sweep as report.json lists them (name, error, last_round,
    error_file: the path of the full traceback, or None)."""
    return [
        {
            "name": trial["name"],
            "error": trial.get("error"),
            "last_round": trial.get("last_round"),
            "error_file": str(trial["error_file"]) if trial.get("error_file") else None,
        }
        for trial in failed
    ]


def _failed_trials_section(failed: Sequence[Mapping[str, Any]], retries: int | None) -> list[str]:
    """Which trials of a sweep failed and why: without it, a failed trial's curve just stops
    early (or, with no evaluated round, is missing) with no explanation."""
    retried = "" if retries is None else f" (each retried {_times_text(retries)} first)"
    lines = [
        "## Failed trials",
        "",
        f"{len(failed)} trial(s) failed{retried}; the table above and the sections below show "
        "them up to their last evaluated round, if any. Resuming the sweep (the same command) "
        "runs them again from their run directories.",
        "",
    ]
    for trial in _failed_trial_entries(failed):
        last = trial["last_round"]
        reached = "no round evaluated" if last is None else f"last evaluated round: {last}"
        lines.append(f"- **{trial['name']}** ({reached}): {trial['error']}")
        if trial["error_file"]:
            lines.append(f"  (traceback: `{trial['error_file']}`)")
    lines.append("")
    return lines


def render_markdown(
    report: Report,
    figures: Mapping[str, str],
    failed_trials: Sequence[Mapping[str, Any]] | None = None,
    *,
    trial_retries: int | None = None,
) -> str:
    """The Markdown text of ``report``; ``figures`` maps figure keys to relative file names.
    ``failed_trials`` (of a sweep, see :func:`write_report`) are listed right after the summary
    table, where a failed trial's empty or short row is read."""
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
    if failed_trials:
        lines += _failed_trials_section(failed_trials, trial_retries)
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


def report_to_dict(
    report: Report,
    figures: Mapping[str, str] | None = None,
    failed_trials: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The report's numbers as plain data (fractions in [0, 1], times in seconds); a sweep's
    ``failed_trials`` (see :func:`write_report`) under "failed_trials" when there are any."""
    data = {
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
    if failed_trials:
        data["failed_trials"] = _failed_trial_entries(failed_trials)
    return data


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
    failed_trials: Sequence[Mapping[str, Any]] | None = None,
    trial_retries: int | None = None,
) -> Path:
    """Write ``report.md``, its PNGs and ``report.json`` into ``out_dir``; returns report.md's
    path. See the module docstring for what is read, the definitions and the error policy.

    ``failed_trials``: the trials of a sweep that failed, as mappings with ``name``, ``error``
    (one line), ``last_round`` (the last evaluated round, or None) and ``error_file`` (the full
    traceback, or None); listed under "Failed trials" after the summary and in report.json.
    ``trial_retries``: how many times the sweep retried each of them first."""
    out_dir = Path(out_dir)
    report = build_report(
        run_dirs, title=title, reference_dirs=reference_dirs, by=by, strict=strict
    )
    figures = write_figures(report, out_dir)
    atomic_write_json(
        out_dir / REPORT_JSON, report_to_dict(report, figures, failed_trials), what="the report"
    )
    markdown = render_markdown(report, figures, failed_trials, trial_retries=trial_retries)
    return atomic_write_text(out_dir / REPORT_MD, markdown, what="the report")


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
