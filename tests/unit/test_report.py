"""Reports: run loading, seed aggregation, AULC, and the Markdown / JSON / PNG files.

The run directories are written here by hand in the layout the round loop writes (run_info.json,
state.json timings, labels.jsonl, rounds/round_NNN/{selection.parquet, metrics.json}), with
numbers chosen so every figure in the report can be checked against a hand computation.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from after_ray.errors import RunStateError
from after_ray.metrics import area_under_curve
from after_ray.report import figures as plots
from after_ray.report.aggregate import aggregate, build_report
from after_ray.report.figures import FIGURES
from after_ray.report.load import discover_run_dirs, load_run
from after_ray.report.render import report_json, write_report
from after_ray.store.run_state import SELECTION_SCHEMA

CLASSES = ["neutral", "happy", "angry", "sad"]
POOL = 400
TAPT_S = 100.0
# Stage names as the round loop (after_ray/runner.py) records them.
FINETUNE_S, SCORE_S, SELECT_S, EVAL_S = 20.0, 5.0, 1.0, 3.0

# (strategy, seed) -> per evaluated round: (labeled fraction, UA, WA, macro-F1, wall s)
CURVES = {
    ("entropy", 0): [
        (0.1, 0.500, 0.52, 0.48, 200.0),
        (0.2, 0.600, 0.61, 0.59, 300.0),
        (0.3, 0.625, 0.64, 0.61, 400.0),
    ],
    # 1e-9 off the other seeds' fractions: must still align (rounding to 1e-6).
    ("entropy", 1): [
        (0.1 + 1e-9, 0.450, 0.47, 0.44, 210.0),
        (0.2, 0.580, 0.60, 0.57, 310.0),
        (0.3, 0.660, 0.67, 0.65, 420.0),
    ],
    # Killed after round 1 was evaluated; round 2 has a selection but no metrics.
    ("entropy", 2): [(0.1, 0.400, 0.41, 0.39, 190.0), (0.2, 0.550, 0.56, 0.54, 290.0)],
    ("random", 0): [
        (0.1, 0.420, 0.43, 0.41, 180.0),
        (0.2, 0.500, 0.52, 0.49, 260.0),
        (0.3, 0.570, 0.58, 0.56, 340.0),
    ],
    ("random", 1): [
        (0.1, 0.380, 0.40, 0.37, 185.0),
        (0.2, 0.530, 0.55, 0.52, 265.0),
        (0.3, 0.590, 0.60, 0.58, 345.0),
    ],
}
FULL_DATA = (1.0, 0.700, 0.71, 0.69, 900.0)


def _confusion(ua: float, n_per_class: int = 20) -> list[list[int]]:
    correct = round(ua * n_per_class)
    matrix = np.zeros((4, 4), dtype=int)
    for c in range(4):
        matrix[c, c] = correct
        matrix[c, (c + 1) % 4] = n_per_class - correct
    return matrix.tolist()


def _metrics(round_index, fraction, ua, wa, f1, wall, strategy, counts):
    test = {
        "ua": ua,
        "wa": wa,
        "macro_f1": f1,
        "n": 80,
        "class_names": CLASSES,
        "per_class": {},
        "confusion": _confusion(ua),
    }
    return {
        "round": round_index,
        "n_labeled": round(fraction * POOL),
        "labeled_fraction": fraction,
        "annotator_seconds": 3.0 * fraction * POOL,
        "strategy": strategy,
        "best_epoch": 4,
        "test": test,
        "val": dict(test, ua=ua + 0.01),
        "cumulative_wall_s": wall,
        "selected_class_counts": counts,
    }


def make_run(
    root: Path,
    strategy: str,
    seed: int,
    rows,
    *,
    kind: str = "al",
    unevaluated_rounds: int = 0,
    counts_in_metrics: bool = True,
) -> Path:
    run_dir = root / f"{strategy}-s{seed}"
    (run_dir / "rounds").mkdir(parents=True)
    info = {
        "kind": kind,
        "name": run_dir.name,
        "strategy": strategy,
        "cold_start": "after_init",
        "seed": seed,
        "corpus": "synth",
        "backbone": "tiny",
        "tapt": True,
        "pool_size": POOL + seed,
        "class_names": CLASSES,
        "started": f"2025-01-0{seed + 1}",
    }
    (run_dir / "run_info.json").write_text(json.dumps(info))
    timings = [{"round": None, "stage": "tapt", "seconds": TAPT_S, "at": "t"}]
    labels = []
    previous = 0
    for r in range(len(rows) + unevaluated_rounds):
        n_total = round((0.1 * (r + 1)) * POOL)
        n_new = n_total - previous
        previous = n_total
        # Class balance of this round: skewed toward class r % 4 so rounds differ.
        counts = {name: n_new // 4 for name in CLASSES}
        counts[CLASSES[r % 4]] += n_new - sum(counts.values())
        ids = [f"synth/{strategy}/{seed}/{r}/{i}" for i in range(n_new)]
        names = [name for name, k in counts.items() for _ in range(k)]
        round_dir = run_dir / "rounds" / f"round_{r:03d}"
        round_dir.mkdir()
        table = pa.table(
            {
                "utt_id": ids,
                "rank": list(range(1, n_new + 1)),
                "score": [None] * n_new,
                "strategy": [strategy] * n_new,
            },
            schema=SELECTION_SCHEMA,
        )
        pq.write_table(table, round_dir / "selection.parquet")
        labels += [
            {"utt_id": u, "label": lab, "votes": None, "round": r, "source": "simulated"}
            for u, lab in zip(ids, names, strict=True)
        ]
        if r < len(rows):
            if r > 0:
                timings += [
                    {"round": r, "stage": "score_pool", "seconds": SCORE_S, "at": "t"},
                    {"round": r, "stage": "select", "seconds": SELECT_S, "at": "t"},
                ]
            timings += [
                {"round": r, "stage": "finetune", "seconds": FINETUNE_S, "at": "t"},
                {"round": r, "stage": "score_test", "seconds": EVAL_S, "at": "t"},
            ]
            metrics = _metrics(r, *rows[r], strategy, counts if counts_in_metrics else None)
            (round_dir / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / "labels.jsonl").write_text("".join(json.dumps(x) + "\n" for x in labels))
    (run_dir / "state.json").write_text(json.dumps({"schema_version": 1, "timings": timings}))
    return run_dir


def make_full_data_run(root: Path) -> Path:
    run_dir = root / "full-data"
    round_dir = run_dir / "rounds" / "round_000"
    round_dir.mkdir(parents=True)
    info = {
        "kind": "full_data",
        "name": "full-data",
        "strategy": None,
        "cold_start": None,
        "seed": 0,
        "corpus": "synth",
        "backbone": "tiny",
        "tapt": True,
        "pool_size": POOL,
        "class_names": CLASSES,
        "started": "2025-01-01",
    }
    (run_dir / "run_info.json").write_text(json.dumps(info))
    metrics = _metrics(0, *FULL_DATA, "full_data", {})
    metrics["n_labeled"] = POOL
    (round_dir / "metrics.json").write_text(json.dumps(metrics))
    timings = [
        {"round": None, "stage": "tapt", "seconds": TAPT_S, "at": "t"},
        {"round": 0, "stage": "finetune", "seconds": 700.0, "at": "t"},
    ]
    (run_dir / "state.json").write_text(json.dumps({"schema_version": 1, "timings": timings}))
    return run_dir


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    for (strategy, seed), rows in CURVES.items():
        make_run(
            root,
            strategy,
            seed,
            rows,
            unevaluated_rounds=1 if seed == 2 else 0,
            counts_in_metrics=strategy == "entropy",
        )
    make_full_data_run(root)
    broken = root / "broken"
    broken.mkdir()
    (broken / "run_info.json").write_text('{"kind": "al", "strategy": ')
    return root


def _al_dirs(root: Path) -> list[Path]:
    return [root / f"{s}-s{seed}" for s, seed in CURVES]


@pytest.fixture(scope="module")
def written_report(runs_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    return write_report(
        [*_al_dirs(runs_root), runs_root / "broken"],
        out,
        title="Test sweep",
        reference_dirs=[runs_root / "full-data"],
    )


# --------------------------------------------------------------------------- AULC


def test_area_under_curve_is_the_normalised_trapezoid():
    # (0.1, 0.5) -> (0.2, 0.6) -> (0.4, 0.7): 0.1 * 0.55 + 0.2 * 0.65 = 0.185 over a range of 0.3
    assert area_under_curve([0.1, 0.2, 0.4], [0.5, 0.6, 0.7]) == pytest.approx(0.185 / 0.3)
    assert area_under_curve([0.4, 0.1, 0.2], [0.7, 0.5, 0.6]) == pytest.approx(0.185 / 0.3)
    assert area_under_curve([0.1, 0.5], [0.6, 0.6]) == pytest.approx(0.6)  # metric's scale
    assert area_under_curve([0.3], [0.42]) == pytest.approx(0.42)
    with pytest.raises(ValueError, match="at least one point"):
        area_under_curve([], [])
    with pytest.raises(ValueError, match="equal length"):
        area_under_curve([0.1, 0.2], [0.5])
    with pytest.raises(ValueError, match="finite"):
        area_under_curve([0.1, 0.2], [0.5, float("nan")])


# --------------------------------------------------------------------------- loading


def test_load_run_reads_rounds_timings_and_stops_at_the_last_evaluated_round(runs_root):
    run = load_run(runs_root / "entropy-s2")
    assert [r.round for r in run.rounds] == [0, 1]
    assert run.unevaluated_rounds == [2]
    assert [r.ua for r in run.rounds] == [0.4, 0.55]
    assert [r.n_labeled for r in run.rounds] == [40, 80]
    assert run.rounds[1].stage_seconds == {
        "score_pool": SCORE_S,
        "select": SELECT_S,
        "finetune": FINETUNE_S,
        "score_test": EVAL_S,
    }
    assert run.stage_seconds == {
        "tapt": TAPT_S,
        "finetune": 2 * FINETUNE_S,
        "score_pool": SCORE_S,
        "score_test": 2 * EVAL_S,
        "select": SELECT_S,
    }
    assert run.total_seconds == 290.0
    # Round 2's class balance still comes from labels.jsonl (it has no metrics.json).
    assert sorted(run.selection_counts) == [0, 1, 2]
    assert sum(run.selection_counts[2].values()) == 40
    assert run.selection_counts[2]["angry"] == 10  # 40 // 4, the skew goes to class 2 % 4 = angry


def test_class_balance_falls_back_to_labels_jsonl(runs_root):
    run = load_run(runs_root / "random-s0")  # written without selected_class_counts
    assert all(not r.selected_class_counts for r in run.rounds)
    assert run.selection_counts[0] == {"neutral": 10, "happy": 10, "angry": 10, "sad": 10}


def test_broken_or_missing_run_info_raises_naming_the_file(runs_root, tmp_path):
    with pytest.raises(RunStateError, match=r"broken/run_info\.json.*cannot be read"):
        load_run(runs_root / "broken")
    (tmp_path / "not-a-run").mkdir()
    with pytest.raises(RunStateError, match=r"not-a-run/run_info\.json.*is missing"):
        load_run(tmp_path / "not-a-run")
    with pytest.raises(RunStateError, match="does not exist"):
        load_run(tmp_path / "nowhere")
    # Several dirs: skipped with a note; strict: raised; nothing loadable: raised.
    report = build_report([runs_root / "entropy-s0", runs_root / "broken"])
    assert [r.name for r in report.runs] == ["entropy-s0"]
    assert report.skipped[0][0] == str(runs_root / "broken")
    with pytest.raises(RunStateError, match="broken"):
        build_report([runs_root / "entropy-s0", runs_root / "broken"], strict=True)
    with pytest.raises(RunStateError, match="no run could be loaded.*broken"):
        report_json([runs_root / "broken"], tmp_path / "out")


def test_unreadable_round_metrics_is_a_warning_not_a_crash(runs_root, tmp_path):
    run_dir = make_run(tmp_path, "margin", 0, CURVES[("random", 0)])
    (run_dir / "rounds" / "round_001" / "metrics.json").write_text("{oops")
    run = load_run(run_dir)
    assert [r.round for r in run.rounds] == [0, 2]
    assert run.unevaluated_rounds == [1]
    assert any("round_001/metrics.json" in w and "left out" in w for w in run.warnings)


def test_discover_run_dirs_expands_a_sweep_directory(runs_root):
    found = discover_run_dirs([runs_root])
    assert runs_root / "entropy-s0" in found and runs_root / "full-data" in found
    assert runs_root / "broken" in found  # has a (broken) run_info.json: reported, not hidden
    assert discover_run_dirs([runs_root / "entropy-s1"]) == [runs_root / "entropy-s1"]


# --------------------------------------------------------------------------- aggregation


def test_aggregate_mean_std_equal_numpy_on_the_same_numbers(runs_root):
    runs = [load_run(d) for d in [*_al_dirs(runs_root), runs_root / "full-data"]]
    groups = aggregate(runs)
    assert [(g.kind, g.strategy, len(g.runs)) for g in groups] == [
        ("al", "entropy", 3),
        ("al", "random", 2),
        ("full_data", "full_data", 1),
    ]
    entropy = groups[0]
    assert entropy.seeds == [0, 1, 2]
    assert [p.labeled_fraction for p in entropy.points] == [0.1, 0.2, 0.3]
    assert [p.n_runs for p in entropy.points] == [3, 3, 2]
    for index, point in enumerate(entropy.points):
        seeds = [s for s in (0, 1, 2) if index < len(CURVES[("entropy", s)])]
        for metric, column in (("ua", 1), ("wa", 2), ("macro_f1", 3), ("cumulative_wall_s", 4)):
            values = [CURVES[("entropy", s)][index][column] for s in seeds]
            stat = point.metric(metric)
            assert stat.n == len(values)
            assert stat.mean == pytest.approx(np.mean(values))
            assert stat.std == pytest.approx(np.std(values, ddof=1))
    # AULC over the fractions every seed reached (10-20%), per seed, then mean / std.
    assert entropy.aulc_range == (0.1, 0.2)
    per_seed = [
        (CURVES[("entropy", s)][0][1] + CURVES[("entropy", s)][1][1]) / 2 for s in (0, 1, 2)
    ]
    assert entropy.aulc["ua"].mean == pytest.approx(np.mean(per_seed))
    assert entropy.aulc["ua"].std == pytest.approx(np.std(per_seed, ddof=1))
    assert entropy.total_seconds.mean == pytest.approx(np.mean([400.0, 420.0, 290.0]))
    assert entropy.stage_seconds["tapt"].mean == TAPT_S
    assert entropy.stage_seconds["finetune"].mean == pytest.approx(np.mean([60.0, 60.0, 40.0]))
    # One seed: no std.
    full = groups[2]
    assert full.label == "full-data fine-tune"
    assert full.points[0].ua.mean == 0.7 and full.points[0].ua.std is None


def test_aggregate_by_fields_merges_what_the_key_leaves_out(runs_root):
    runs = [load_run(d) for d in _al_dirs(runs_root)]
    merged = aggregate(runs, by=("corpus",))
    assert len(merged) == 1 and len(merged[0].runs) == 5
    assert merged[0].label == "corpus=synth"
    assert [p.n_runs for p in merged[0].points] == [5, 5, 4]


# --------------------------------------------------------------------------- files


def test_report_files_exist_and_figures_are_real_images(written_report):
    out = written_report.parent
    assert written_report.name == "report.md" and (out / "report.json").is_file()
    for name in FIGURES.values():
        path = out / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert path.stat().st_size > 15_000, name
        pixels = mpimg.imread(path)
        assert pixels.ndim == 3 and pixels.shape[0] > 300 and pixels.shape[1] > 300
        assert float(pixels[..., :3].std()) > 0.02, f"{name} looks blank"
        assert f"]({name})" in written_report.read_text()  # embedded with a relative link


def test_markdown_tables_hold_the_numbers_written(written_report):
    text = written_report.read_text()
    assert text.startswith("# Test sweep\n")
    lines = text.splitlines()
    # The per-run row of entropy seed 0, round 2: UA 0.625 -> 62.5.
    assert "| 2 | 30.0% | 120 | 62.5 | 64.0 | 61.0 | 400.0 |" in lines
    # The group row at 30%: two of three seeds reached it; mean +- sample std.
    ua = [0.625, 0.66]
    expected = f"{np.mean(ua) * 100:.1f} ± {np.std(ua, ddof=1) * 100:.1f}"
    row = next(line for line in lines if line.startswith("| 30.0% | 120 | 2/3 |"))
    assert row.split(" | ")[3] == expected
    # The incomplete run: rounds 0 and 1 in its table, round 2 named as not evaluated.
    section = text[text.index("#### entropy-s2 (seed 2)") :]
    section = section[: section.index("\n### ")]
    table_rounds = re.findall(r"^\| (\d+) \| \d+\.\d%", section, flags=re.MULTILINE)
    assert table_rounds == ["0", "1"]
    assert "Not evaluated (yet): round 2" in section
    # Stage times of a run, then total wall time.
    header = "| TAPT (s) | fine-tune (s) | pool scoring (s) | test evaluation (s) | selection (s) |"
    assert f"{header} total, wall (s) |" in lines
    assert "| 100.0 | 60.0 | 10.0 | 9.0 | 2.0 | 400.0 |" in lines
    # Summary: the full-data reference and the loop-time share against it. Loop time leaves the
    # shared TAPT out: full data 700 s of fine-tuning; a 3-round AL run 3 x (fine-tune + test
    # evaluation) + 2 x (pool scoring + selection).
    summary = next(line for line in lines if line.startswith("| full-data fine-tune | 1 (0) |"))
    assert "| 70.0 |" in summary and "| 700.0 | 100% |" in summary
    random_row = next(line for line in lines if line.startswith("| random | 2 (0, 1) |"))
    loop = 3 * (FINETUNE_S + EVAL_S) + 2 * (SCORE_S + SELECT_S)
    assert f"| {loop:.1f} ± 0.00 | {loop / 700 * 100:.0f}% |" in random_row
    assert f"Shared stages, once for all runs: TAPT {TAPT_S:.0f} s." in lines
    # The broken directory is listed, with the reason.
    skipped = text[text.index("## Skipped run directories") :]
    assert "broken" in skipped and "cannot be read" in skipped


def test_report_json_has_the_same_numbers(written_report):
    data = json.loads((written_report.parent / "report.json").read_text())
    assert [g["label"] for g in data["groups"]] == ["entropy", "random"]
    entropy = data["groups"][0]
    assert entropy["points"][2]["ua"] == {
        "mean": pytest.approx(np.mean([0.625, 0.66])),
        "std": pytest.approx(np.std([0.625, 0.66], ddof=1)),
        "n": 2,
    }
    assert data["references"][0]["points"][0]["ua"]["mean"] == 0.7
    run = next(r for r in data["runs"] if r["name"] == "entropy-s2")
    assert [r["round"] for r in run["rounds"]] == [0, 1] and run["unevaluated_rounds"] == [2]
    assert run["aulc"]["ua"] == pytest.approx(area_under_curve([0.1, 0.2], [0.4, 0.55]))
    assert set(data["figures"]) == set(FIGURES)
    assert len(data["skipped"]) == 1


def test_strategy_colors_are_stable_and_distinct():
    known = ["random", "entropy", "margin", "bald", "coreset", "badge", "after", "typiclust"]
    assert len({plots.strategy_color(s) for s in known}) == len(known)
    assert plots.strategy_color("Cluster-Margin") == plots.strategy_color("cluster_margin")
    assert plots.strategy_color("my_new_strategy") == plots.strategy_color("my_new_strategy")
    assert re.fullmatch(r"#[0-9a-f]{6}", plots.strategy_color("my_new_strategy"))
