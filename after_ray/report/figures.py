"""The figures of a report: learning curves, UA against wall time, confusion matrices, and the
class balance of each round's selection.

Every ``plot_*`` function takes plain data (the small dataclasses below hold strings, numbers
and lists, never run objects) and an output path, and writes one PNG atomically (a reader sees
the old figure or the new one); :func:`write_figures` turns a report's groups into that data,
one drawing function per figure, and names the files (:data:`FIGURES`). Figures are drawn on
the Agg canvas of this module: each one is a ``matplotlib.figure.Figure`` attached to a
``FigureCanvasAgg`` instead of a ``pyplot`` figure, so no display is needed, the process-wide
backend is left alone (a notebook that imports this keeps its own), and no figure stays
registered in pyplot's global list after it is saved.

Colors: a strategy has the same color in every figure and every report (a fixed palette for the
strategies after-ray ships, a stable hash of the name into matplotlib's tab20b for any other);
variants of one strategy (e.g. with and without TAPT) differ by line style and marker. Emotion
classes have fixed colors as well.
"""

from __future__ import annotations

import io
import math
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from after_ray.report.aggregate import GroupSummary, MeanStd, Report
from after_ray.report.load import AL_KIND, RunSummary
from after_ray.store.atomic import atomic_write_bytes

LABELED_FRACTION_LABEL = "labeled fraction of the pool"
UA_LABEL = "UA (mean per-class recall, %)"
WA_LABEL = "WA (overall accuracy, %)"
MACRO_F1_LABEL = "macro-F1 (%)"
WALL_TIME_LABEL = "cumulative wall time since the run started"

FULL_DATA_COLOR = "#000000"
# The strategies after-ray ships (after_ray.al.strategies) and the full-data reference.
STRATEGY_COLORS = {
    "random": "#7f7f7f",
    "entropy": "#1f77b4",
    "least_confidence": "#17becf",
    "margin": "#9467bd",
    "bald": "#8c564b",
    "coreset": "#2ca02c",
    "badge": "#ff7f0e",
    "cluster_margin": "#e377c2",
    "typiclust": "#bcbd22",
    "after": "#d62728",
    "after_init": "#ff9896",
    "full_data": FULL_DATA_COLOR,
}
CLASS_COLORS = {
    "neutral": "#9e9e9e",
    "happy": "#f2c12e",
    "angry": "#d62728",
    "sad": "#1f77b4",
    "fear": "#9467bd",
    "disgust": "#2ca02c",
    "surprise": "#ff7f0e",
    "calm": "#17becf",
    "excited": "#e377c2",
    "frustrated": "#8c564b",
    "contempt": "#bcbd22",
    "boredom": "#c7c7c7",
    "other": "#393b79",
}
_LINE_STYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
_DPI = 110


def _normalise_name(name: str) -> str:
    return str(name).strip().lower().replace("-", "_")


def strategy_color(strategy: str) -> str:
    """The color of a strategy in every figure (stable across runs and reports)."""
    key = _normalise_name(strategy)
    if key in STRATEGY_COLORS:
        return STRATEGY_COLORS[key]
    # crc32, not hash(): Python salts str hashes per process, and colors must not change.
    # tab20b: hues apart from the tab10 colors the known strategies use.
    palette = colormaps["tab20b"].colors
    rgb = palette[zlib.crc32(key.encode("utf-8")) % len(palette)]
    return "#{:02x}{:02x}{:02x}".format(*(round(c * 255) for c in rgb[:3]))


def class_color(name: str, index: int) -> str:
    """Fixed colors for the canonical emotion names; other classes by their position."""
    key = _normalise_name(name)
    if key in CLASS_COLORS:
        return CLASS_COLORS[key]
    rgb = colormaps["tab10"].colors[index % 10]
    return "#{:02x}{:02x}{:02x}".format(*(round(c * 255) for c in rgb[:3]))


# --------------------------------------------------------------------------- plain data


@dataclass(frozen=True)
class Curve:
    """One line: a run, or the mean of a seed group with its +-1 std band.

    ``y`` and ``std`` are fractions in [0, 1] (drawn as percent). ``std`` entries that are None
    (a point only one seed reached) get no band. ``n`` is the number of runs behind each point;
    points with fewer runs than the curve's maximum are annotated ``n=k``.
    """

    label: str
    strategy: str
    x: Sequence[float]
    y: Sequence[float]
    std: Sequence[float | None] | None = None
    n: Sequence[int] | None = None
    variant: int = 0  # position among the curves of the same strategy: line style and marker
    dashed: bool = False  # a reference curve (e.g. a feature baseline), not an AL run


@dataclass(frozen=True)
class Level:
    """A horizontal reference line (the full-data fine-tune), with an optional +-1 std band."""

    label: str
    value: float
    std: float | None = None
    variant: int = 0


@dataclass(frozen=True)
class RefPoint:
    """A single reference point (the full-data fine-tune at its total wall time)."""

    label: str
    x: float
    y: float
    variant: int = 0


@dataclass(frozen=True)
class Panel:
    """One axes: curves against a common x, plus reference levels and points."""

    y_label: str
    curves: Sequence[Curve]
    levels: Sequence[Level] = ()
    points: Sequence[RefPoint] = ()
    chance: float | None = None  # drawn as a dotted line (1 / number of classes for UA)


@dataclass(frozen=True)
class ConfusionPanel:
    """Counts, rows = true class, columns = predicted class."""

    title: str
    class_names: Sequence[str]
    matrix: Sequence[Sequence[int]]


@dataclass(frozen=True)
class BalancePanel:
    """``counts[i][c]``: how many items of class ``class_names[c]`` round ``rounds[i]`` acquired."""

    title: str
    class_names: Sequence[str]
    rounds: Sequence[int]
    counts: Sequence[Sequence[float]] = field(default_factory=list)


# --------------------------------------------------------------------------- helpers


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, out_path: str | Path) -> Path:
    buffer = io.BytesIO()
    # "tight" keeps rotated tick labels and the outside legend inside the image.
    figure.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight", pad_inches=0.15)
    return atomic_write_bytes(out_path, buffer.getvalue(), what="a report figure")


def _grid(n_panels: int, max_cols: int = 3) -> tuple[int, int]:
    cols = max(1, min(max_cols, n_panels))
    return math.ceil(n_panels / cols), cols


def _style(strategy: str, variant: int, dashed: bool) -> dict:
    line = "--" if dashed else _LINE_STYLES[variant % len(_LINE_STYLES)]
    return {
        "color": strategy_color(strategy),
        "linestyle": line,
        "marker": _MARKERS[variant % len(_MARKERS)],
    }


def _time_unit(max_seconds: float) -> tuple[float, str]:
    if max_seconds >= 3 * 3600:
        return 3600.0, "h"
    if max_seconds >= 5 * 60:
        return 60.0, "min"
    return 1.0, "s"


def _draw_panel(axes, panel: Panel, x_scale: float = 1.0) -> None:
    for curve in panel.curves:
        x = np.asarray(curve.x, dtype=float) / x_scale
        y = np.asarray(curve.y, dtype=float) * 100.0
        order = np.argsort(x, kind="stable")
        x, y = x[order], y[order]
        style = _style(curve.strategy, curve.variant, curve.dashed)
        axes.plot(x, y, label=curve.label, linewidth=1.8, markersize=5, **style)
        if curve.std is not None:
            std = np.array([np.nan if s is None else s for s in curve.std], dtype=float)[order]
            has_band = np.isfinite(std)
            if has_band.any():
                spread = np.where(has_band, std, 0.0) * 100.0
                axes.fill_between(
                    x,
                    y - spread,
                    y + spread,
                    where=has_band,
                    color=style["color"],
                    alpha=0.15,
                    linewidth=0,
                )
        if curve.n is not None and len(curve.n):
            counts = np.asarray(curve.n)[order]
            most = counts.max()
            for xi, yi, count in zip(x, y, counts, strict=True):
                if count < most:
                    axes.annotate(
                        f"n={count}",
                        (xi, yi),
                        textcoords="offset points",
                        xytext=(4, -10),
                        fontsize=7,
                        color=style["color"],
                    )
    for level in panel.levels:
        line = _LINE_STYLES[level.variant % len(_LINE_STYLES)]
        value = level.value * 100.0
        axes.axhline(value, color=FULL_DATA_COLOR, linestyle=line, linewidth=1.4, label=level.label)
        if level.std is not None and math.isfinite(level.std) and level.std > 0:
            axes.axhspan(
                value - level.std * 100.0,
                value + level.std * 100.0,
                color=FULL_DATA_COLOR,
                alpha=0.08,
                linewidth=0,
            )
    for point in panel.points:
        axes.plot(
            [point.x / x_scale],
            [point.y * 100.0],
            linestyle="none",
            color=FULL_DATA_COLOR,
            marker=("*", "P", "X", "D")[point.variant % 4],
            markersize=12,
            label=point.label,
        )
    if panel.chance is not None:
        axes.axhline(
            panel.chance * 100.0,
            color="#888888",
            linestyle=":",
            linewidth=1.0,
            label="chance (1 / classes)",
        )
    axes.set_ylabel(panel.y_label)
    axes.grid(True, alpha=0.3)
    axes.margins(x=0.08)  # room for the n=k annotations of the last points


def _shared_legend(figure: Figure, axes_list) -> None:
    handles, labels, seen = [], [], set()
    for axes in axes_list:
        for handle, label in zip(*axes.get_legend_handles_labels(), strict=True):
            if label not in seen and not label.startswith("_"):
                seen.add(label)
                handles.append(handle)
                labels.append(label)
    if handles:
        figure.legend(
            handles,
            labels,
            loc="outside lower center",
            ncol=min(3, len(handles)),
            fontsize=8,
            frameon=False,
        )


def _no_data(axes, message: str) -> None:
    axes.text(0.5, 0.5, message, ha="center", va="center", transform=axes.transAxes)


# --------------------------------------------------------------------------- figures


def plot_learning_curves(
    panels: Sequence[Panel], out_path: str | Path, *, title: str | None = None
) -> Path:
    """Metrics against the labeled fraction of the pool, one axes per panel, side by side
    (typically UA and WA), all strategies on each axes with one shared legend."""
    if not panels:
        raise ValueError("plot_learning_curves needs at least one panel")
    n_legend = max(len(p.curves) + len(p.levels) + (p.chance is not None) for p in panels)
    figure = _new_figure(5.2 * len(panels), 4.2 + 0.18 * math.ceil(n_legend / 3))
    axes_list = figure.subplots(1, len(panels), squeeze=False)[0]
    for axes, panel in zip(axes_list, panels, strict=True):
        _draw_panel(axes, panel)
        axes.set_xlabel(LABELED_FRACTION_LABEL)
        # Ticks at the fractions the runs reached (AL budgets are a few round numbers); the
        # default locator would put 12.5% ticks between 10% and 15% rounds.
        fractions = sorted({round(float(x), 6) for c in panel.curves for x in c.x})
        if 0 < len(fractions) <= 12:
            axes.set_xticks(fractions)
        axes.xaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=None))
        if not panel.curves and not panel.levels:
            _no_data(axes, "no evaluated round yet")
    _shared_legend(figure, axes_list)
    if title:
        figure.suptitle(title)
    return _save(figure, out_path)


def plot_metric_vs_time(panel: Panel, out_path: str | Path, *, title: str | None = None) -> Path:
    """One metric against cumulative wall time (seconds in the data; the axis picks s, min or h).

    Curves are drawn per run (seeds do not share time stamps); reference points mark the
    full-data fine-tune at its total time."""
    xs = [float(x) for curve in panel.curves for x in curve.x] + [p.x for p in panel.points]
    scale, unit = _time_unit(max(xs) if xs else 0.0)
    n_legend = len({c.label for c in panel.curves}) + len(panel.points) + len(panel.levels)
    figure = _new_figure(7.0, 4.4 + 0.18 * math.ceil(n_legend / 3))
    axes = figure.subplots()
    _draw_panel(axes, panel, x_scale=scale)
    axes.set_xlabel(f"{WALL_TIME_LABEL} ({unit})")
    if not xs:
        _no_data(axes, "no evaluated round with a wall time yet")
    _shared_legend(figure, [axes])
    if title:
        figure.suptitle(title)
    return _save(figure, out_path)


def plot_confusion_matrices(
    panels: Sequence[ConfusionPanel], out_path: str | Path, *, title: str | None = None
) -> Path:
    """Confusion matrices side by side; cell color = share of the true class (row-normalised,
    so the diagonal is the per-class recall), cell text = count (and percent for small C)."""
    if not panels:
        raise ValueError("plot_confusion_matrices needs at least one panel")
    rows, cols = _grid(len(panels))
    size = max(3.6, 0.55 * max(len(p.class_names) for p in panels) + 2.0)
    figure = _new_figure(size * cols, size * rows)
    axes_grid = figure.subplots(rows, cols, squeeze=False)
    image = None
    for index, axes in enumerate(axes_grid.flat):
        if index >= len(panels):
            axes.set_axis_off()
            continue
        panel = panels[index]
        counts = np.asarray(panel.matrix, dtype=float)
        support = counts.sum(axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            share = np.where(support > 0, counts / support, 0.0)
        image = axes.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
        n_classes = len(panel.class_names)
        ticks = np.arange(n_classes)
        axes.set_xticks(ticks, panel.class_names, rotation=45, ha="right", fontsize=8)
        axes.set_yticks(ticks, panel.class_names, fontsize=8)
        axes.set_xlabel("predicted class")
        axes.set_ylabel("true class")
        axes.set_title(panel.title, fontsize=9)
        if n_classes <= 10:
            for r in range(n_classes):
                for c in range(n_classes):
                    text = f"{int(counts[r, c])}"
                    if n_classes <= 6:
                        text += f"\n{share[r, c] * 100:.0f}%"
                    axes.text(
                        c,
                        r,
                        text,
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if share[r, c] > 0.5 else "black",
                    )
    if image is not None:
        figure.colorbar(image, ax=axes_grid, shrink=0.6, label="share of the true class")
    if title:
        figure.suptitle(title)
    return _save(figure, out_path)


def plot_selection_balance(
    panels: Sequence[BalancePanel], out_path: str | Path, *, title: str | None = None
) -> Path:
    """Stacked bars per round: how many items of each (true) class each round acquired."""
    if not panels:
        raise ValueError("plot_selection_balance needs at least one panel")
    rows, cols = _grid(len(panels))
    figure = _new_figure(4.4 * cols, 3.4 * rows + 0.5)
    axes_grid = figure.subplots(rows, cols, squeeze=False)
    handles: dict[str, object] = {}
    for index, axes in enumerate(axes_grid.flat):
        if index >= len(panels):
            axes.set_axis_off()
            continue
        panel = panels[index]
        counts = np.asarray(panel.counts, dtype=float).reshape(len(panel.rounds), -1)
        positions = np.arange(len(panel.rounds))
        bottom = np.zeros(len(panel.rounds))
        for c, name in enumerate(panel.class_names):
            bars = axes.bar(
                positions,
                counts[:, c],
                bottom=bottom,
                color=class_color(name, c),
                label=name,
                width=0.7,
                edgecolor="white",
                linewidth=0.5,
            )
            handles.setdefault(name, bars)
            bottom += counts[:, c]
        axes.set_xticks(positions, [str(r) for r in panel.rounds])
        axes.set_xlabel("round (0 = cold start)")
        axes.set_ylabel("items acquired")
        axes.set_title(panel.title, fontsize=9)
        axes.grid(True, axis="y", alpha=0.3)
        if not len(panel.rounds):
            _no_data(axes, "no labels acquired yet")
    if handles:
        figure.legend(
            list(handles.values()),
            list(handles.keys()),
            loc="outside lower center",
            ncol=min(7, len(handles)),
            fontsize=8,
            frameon=False,
        )
    if title:
        figure.suptitle(title)
    return _save(figure, out_path)


# --------------------------------------------------------------------------- a report's figures
# File names of the figures write_figures draws, by figure key.
FIGURES = {
    "learning_curves": "learning_curves.png",
    "ua_vs_time": "ua_vs_time.png",
    "confusion": "confusion.png",
    "selection_balance": "selection_balance.png",
}


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


def _draw_learning_curves(report: Report, out_path: Path) -> bool:
    """UA and WA against the labeled fraction; False when there is nothing to draw."""
    variants = _variants(report.groups)
    ref_variants = _variants(report.references)
    panels = []
    for metric, y_label in (("ua", UA_LABEL), ("wa", WA_LABEL)):
        curves = []
        for group in report.groups:
            points = [p for p in group.points if p.metric(metric).mean is not None]
            if not points:
                continue
            curves.append(
                Curve(
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
                levels.append(Level(ref.legend_label, value.mean, value.std, ref_variants[id(ref)]))
        chance = _common_chance(report.runs) if metric == "ua" else None
        panels.append(Panel(y_label, curves, levels, chance=chance))
    if not any(p.curves or p.levels for p in panels):
        return False
    plot_learning_curves(
        panels,
        out_path,
        title="Test UA and WA against the labeled fraction (mean ± 1 std over seeds)",
    )
    return True


def _draw_ua_vs_time(report: Report, out_path: Path) -> bool:
    """UA against cumulative wall time, per run (seeds do not share time stamps)."""
    variants = _variants(report.groups)
    ref_variants = _variants(report.references)
    time_curves, time_points = [], []
    for group in report.groups:
        for run in group.runs:
            rows = [r for r in run.rounds if r.cumulative_wall_s is not None and r.ua is not None]
            if rows:
                time_curves.append(
                    Curve(
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
                    RefPoint(ref.legend_label, run.total_seconds, last.ua, ref_variants[id(ref)])
                )
    if not (time_curves or time_points):
        return False
    plot_metric_vs_time(
        Panel(UA_LABEL, time_curves, points=time_points),
        out_path,
        title="Test UA against wall time (TAPT included)",
    )
    return True


def _draw_confusion(report: Report, out_path: Path) -> bool:
    """The confusion matrix of the last round of the first run (lowest seed) of each group."""
    confusion_panels = []
    for group in [*report.groups, *report.references]:
        for run in group.runs:
            last = run.last_round
            if last is not None and last.confusion is not None:
                names = last.class_names or run.class_names
                if len(names) != len(last.confusion):
                    names = [str(i) for i in range(len(last.confusion))]
                where = f"round {last.round}"
                if last.labeled_fraction is not None:  # in % as the report's tables print it
                    where += f", {last.labeled_fraction * 100:.1f}% labeled"
                seed = "" if run.seed is None else f"seed {run.seed}, "
                confusion_panels.append(
                    ConfusionPanel(f"{group.label}\n{seed}{where}", names, last.confusion)
                )
                break
    if not confusion_panels:
        return False
    plot_confusion_matrices(
        confusion_panels, out_path, title="Test confusion matrices, last evaluated round"
    )
    return True


def _draw_selection_balance(report: Report, out_path: Path) -> bool:
    """The class balance of each round's selection (first run of each curve group)."""
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
                balance_panels.append(BalancePanel(f"{group.label}{seed}", names, rounds, matrix))
                break
    if not balance_panels:
        return False
    plot_selection_balance(
        balance_panels, out_path, title="True classes of the items each round acquired"
    )
    return True


_DRAWERS = {
    "learning_curves": _draw_learning_curves,
    "ua_vs_time": _draw_ua_vs_time,
    "confusion": _draw_confusion,
    "selection_balance": _draw_selection_balance,
}


def write_figures(report: Report, out_dir: str | Path) -> dict[str, str]:
    """Draw the report's figures into ``out_dir``; returns figure key -> file name. A figure with
    nothing to show is not drawn, and a stale file of that name is removed."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    for key, name in FIGURES.items():
        if _DRAWERS[key](report, out_dir / name):
            written[key] = name
        else:
            (out_dir / name).unlink(missing_ok=True)
    return written
