"""`after-ray bench al`: arms x seeds planned as one sweep (arms vary together, a full-data arm
per seed), and the demo's check against the committed report."""

from __future__ import annotations

import copy
import json

import pytest

from after_ray.config.sections import config_from_dict
from after_ray.errors import ConfigError


def _base(tmp_path, **al):
    return config_from_dict(
        {
            "run": {"name": "b", "output_dir": str(tmp_path / "runs")},
            "al": {"strategy": "after", "cold_start": "after_init", **al},
        }
    )


def test_arms_vary_together_and_every_seed_gets_a_full_data_reference(tmp_path):
    from after_ray.bench.al import bench_arms
    from after_ray.experiments.sweep.plan import SweepSpec, plan_trials

    base = _base(tmp_path, strategy_params={"prefilter_factor": 3.0})
    spec = SweepSpec(
        axes={"run.seed": [0, 1]}, arms=bench_arms(base, ["after", "random", "entropy"])
    )
    plans = {p.name: p for p in plan_trials(base, spec, name="bench", local_training=True)}
    assert sorted(plans) == sorted(
        f"arm={a},seed={s}" for a in ("after", "random", "entropy", "full_data") for s in (0, 1)
    )
    after = plans["arm=after,seed=1"].config.al
    assert (after.strategy, after.cold_start, after.strategy_params) == (
        "after",
        "after_init",
        {"prefilter_factor": 3.0},
    )  # the configured pipeline as it is
    rnd = plans["arm=random,seed=0"].config.al
    assert (rnd.strategy, rnd.cold_start, rnd.strategy_params) == ("random", "random", {})
    ent = plans["arm=entropy,seed=0"].config.al
    assert (ent.strategy, ent.cold_start) == ("entropy", "random")
    full = plans["arm=full_data,seed=1"]
    assert full.kind == "full_data" and plans["arm=random,seed=1"].kind == "al"
    budget = full.config.al.budget
    assert (budget.initial, budget.per_round, budget.max_total) == (1.0, 1.0, 1.0)
    assert full.config.run.seed == 1
    assert {p.config.run_dir.parent for p in plans.values()} == {
        (tmp_path / "runs" / "bench").resolve()
    }


def test_bench_arms_refuse_unknown_strategies_and_a_missing_baseline(tmp_path):
    from after_ray.bench.al import bench_arms

    base = _base(tmp_path)
    with pytest.raises(ConfigError, match="unknown strategies.*'entorpy'"):
        bench_arms(base, ["after", "random", "entorpy"])
    with pytest.raises(ConfigError, match="must include 'random'"):
        bench_arms(base, ["after", "entropy"])


def test_compare_outcomes_finds_every_changed_metric_and_selection():
    from after_ray.report.render import compare_outcomes

    report = {
        "runs": [
            {
                "name": "demo-s0-after",
                "rounds": [
                    {"round": 0, "n_labeled": 10, "labeled_fraction": 0.1, "ua": 0.5, "wa": 0.6,
                     "macro_f1": 0.4, "val_ua": 0.5, "confusion": [[1, 0], [0, 1]],
                     "selected_class_counts": {"a": 5, "b": 5}, "cumulative_wall_s": 3.0},
                ],
                "selection_counts": {"0": {"a": 5, "b": 5}},
                "total_seconds": 3.0,
            }
        ]
    }  # fmt: skip
    same = copy.deepcopy(report)
    same["runs"][0]["rounds"][0]["cumulative_wall_s"] = 99.0  # times may differ
    same["runs"][0]["total_seconds"] = 99.0
    assert compare_outcomes(report, same) == []
    changed = copy.deepcopy(report)
    changed["runs"][0]["rounds"][0]["ua"] = 0.5000001
    changed["runs"][0]["selection_counts"] = {"0": {"a": 6, "b": 4}}
    problems = compare_outcomes(report, json.loads(json.dumps(changed)))
    assert problems == [
        "run demo-s0-after: selections differ",
        "run demo-s0-after round 0: ua differ",
    ]
    assert compare_outcomes(report, {"runs": []}) == ["run demo-s0-after missing"]
