"""``after-ray bench load``: wired into the CLI, prints ours against the baseline, exits 2 on sizes
that cannot work; and the size options default per benchmark (load 200k x 128, select 1M x 768).
"""

from __future__ import annotations

import re

import pytest

from after_ray.cli import main

NUMBER = r"(-?\d+(?:\.\d+)?)"


def _row(out: str, label: str) -> tuple[float, float, float]:
    """(time s, peak RSS MB, peak above the phase's start MB) of one comparison line."""
    match = re.search(
        rf"^{re.escape(label)}.*?\s{NUMBER}\s+{NUMBER}\s+{NUMBER}$", out, flags=re.MULTILINE
    )
    assert match, f"no line for {label!r} in:\n{out}"
    return tuple(float(x) for x in match.groups())  # type: ignore[return-value]


def test_bench_load_prints_our_path_and_the_baseline(capsys, tmp_path):
    code = main(
        ["bench", "load", "--n", "3000", "--d", "8", "--k", "40", "--out-dir", str(tmp_path)]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = captured.out
    assert out.startswith("load benchmark: n=3,000 d=8 classes=4 k=40 rounds=2"), out
    for phase in ["write score cache", "read score cache + pool"] + [
        f"{step} {name} r{r}"
        for name in ("after", "coreset")
        for r in range(2)
        for step in ("select", "record")
    ]:
        assert re.search(
            rf"^\| {re.escape(phase)} \| {NUMBER} \| {NUMBER} \| {NUMBER} \|$", out, re.M
        ), phase
    ours = _row(out, "ours (batches into preallocated arrays)")
    baseline = _row(out, "baseline (read_table + to_numpy + np.stack)")
    for seconds, peak, _above_start in (ours, baseline):
        assert seconds > 0 and peak > 0
    assert "check: same pool arrays from both readers: True" in out
    # --out-dir keeps what the run wrote: the score cache and both strategies' run directories,
    # read back here: 2 rounds of 40 distinct picks each, one label line per pick.
    from after_ray.store.check import check_run_dir
    from after_ray.store.run_state import RunState

    for name in ("after", "coreset"):
        run_dir = tmp_path / "runs" / name
        assert check_run_dir(run_dir) == []
        with RunState.open(run_dir, create=False) as state:
            picks = [state.selection(r) for r in range(2)]
        assert [len(p) for p in picks] == [40, 40] and len({u for p in picks for u in p}) == 80
        lines = (run_dir / "labels.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(lines) == 80
    assert sorted(p.name for p in (tmp_path / "scores").iterdir()) == [
        "_DONE.json",
        "scores.parquet",
    ]


def test_bench_load_with_sizes_that_cannot_work_exits_2_with_a_message(capsys):
    code = main(["bench", "load", "--n", "100", "--d", "4", "--k", "60"])
    captured = capsys.readouterr()
    assert code == 2
    assert "bench load: k * rounds = 120 exceeds the pool size 100" in captured.err
    assert "Traceback" not in captured.err and captured.out == ""


@pytest.mark.parametrize(
    ("what", "module", "function", "expected"),
    [
        ("load", "after_ray.bench.load", "run_load_benchmark", (200_000, 128, 2000)),
        ("select", "after_ray.bench.select", "run_select_benchmark", (1_000_000, 768, 10_000)),
    ],
)
def test_bench_size_options_default_per_benchmark(monkeypatch, what, module, function, expected):
    import importlib

    calls = []
    monkeypatch.setattr(
        importlib.import_module(module), function, lambda **kwargs: calls.append(kwargs)
    )
    assert main(["bench", what]) == 0
    assert [(c["n"], c["d"], c["k"]) for c in calls] == [expected]
    assert main(["bench", what, "--n", "5000", "--d", "16", "--k", "7"]) == 0
    assert (calls[-1]["n"], calls[-1]["d"], calls[-1]["k"]) == (5000, 16, 7)


def test_bench_al_takes_overrides_before_or_after_its_options(monkeypatch, tmp_path, capsys):
    """argparse alone binds KEY=VALUE only before ``--arms``; both orders must reach the config."""
    import after_ray.bench.al

    calls = []
    monkeypatch.setattr(
        after_ray.bench.al, "run_al_benchmark", lambda config, **kw: calls.append((config, kw))
    )
    before = ["bench", "al", "al.cold_start=random", "--arms", "after,random", "--n-seeds", "2"]
    after = ["bench", "al", "--arms", "after,random", "al.cold_start=random", "finetune.lr=0.5"]
    assert main(before) == 0 and main(after) == 0
    assert [c.al.cold_start for c, _ in calls] == ["random", "random"]
    assert calls[1][0].finetune.lr == 0.5 and calls[0][1]["seeds"] == [0, 1]
    with pytest.raises(SystemExit):
        main(["bench", "al", "--arms", "after,random", "--no-such-option"])
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err
