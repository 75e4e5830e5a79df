"""`after-ray sweep`: axis parsing, a 2 x 2 Ray Tune sweep aggregated over seeds, and a sweep
whose driver is SIGKILLed mid-way and then resumed without recomputing finished work.

The sweeps use a corpus even smaller than tests/integration/test_runner.py's (6 speakers x 3 utterances
per emotion, 48 in the pool), 2 rounds (25% then 50%), one epoch per round and random cold start.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tiny_run import TINY, synth_corpus

from after_ray.config.sections import config_from_dict, load_config
from after_ray.errors import ConfigError, RunStateError

REPO = Path(__file__).resolve().parents[2]

# The shared tiny run, cheaper: TAPT 4 steps, 1 epoch, random cold start, two rounds.
BASE = copy.deepcopy(TINY)
BASE["run"] = {"name": "base", "seed": 0}
BASE["tapt"].update(steps=4, warmup_steps=1)
BASE["finetune"]["epochs"] = 1
BASE["al"].update(cold_start="random", mc_dropout_samples=0)
BASE["al"]["budget"]["max_total"] = 0.5
BASE["ray"]["scoring_batch_size"] = 32


def base_dict(tmp: Path, corpus_root: Path) -> dict:
    data = copy.deepcopy(BASE)
    data["run"]["output_dir"] = str(tmp / "runs")
    data["corpus"]["root"] = str(corpus_root)
    return data


def metrics_file(run_dir: Path, round_index: int) -> Path:
    return run_dir / "rounds" / f"round_{round_index:03d}" / "metrics.json"


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory):
    return synth_corpus(tmp_path_factory.mktemp("sweep-corpus") / "synth")


# ------------------------------------------------------------------------------ no Ray needed
def test_parse_axes_reads_yaml_scalars_and_lists():
    from after_ray.experiments.sweep.plan import parse_axes

    axes = parse_axes(
        [
            "al.strategy=after,random",
            "run.seed=0,1",
            "corpus.classes=[a, b],[c,d]",
            "x.y='a,b',true",
        ]
    )
    assert axes == {
        "al.strategy": ["after", "random"],
        "run.seed": [0, 1],
        "corpus.classes": [["a", "b"], ["c", "d"]],
        "x.y": ["a,b", True],
    }


@pytest.mark.parametrize(
    ("texts", "message"),
    [
        (["al.strategy"], "'al.strategy': expected KEY=V1,V2"),
        (["=after"], "is not a dotted key"),
        (["al..strategy=after"], "is not a dotted key"),
        (["run.seed=0,,1"], "'run.seed': empty value"),
        (["run.seed=0,0"], "'run.seed': value 0 is listed twice"),
        (["run.seed=0", "run.seed=1"], "'run.seed' is given twice"),
        (["run.seed=[0"], "'run.seed': value '[0' is not valid YAML"),
    ],
)
def test_parse_axes_rejects_bad_syntax_naming_the_axis(texts, message):
    from after_ray.experiments.sweep.plan import parse_axes

    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        parse_axes(texts)


@pytest.mark.parametrize(
    ("axes", "message"),
    [
        ({"al.strateg": ["after"]}, r"axis 'al.strateg'.*unknown key \(did you mean 'al.strategy'"),
        ({"run.seed": ["zero"]}, r"axis 'run.seed', value 'zero'.*expected an integer"),
        ({"al.strategy": ["after", "nope"]}, r"axis 'al.strategy', value 'nope': unknown selec"),
        ({"al.budget": [3]}, r"axis 'al.budget', value 3.*expected a mapping"),
        ({"run.name": ["a"]}, r"axis 'run.name': the sweep sets run.name"),
        ({"al.oracle.kind": ["human"]}, r"axis 'al.oracle.kind'.*simulated oracle"),
        ({}, "at least one axis"),
    ],
)
def test_validate_axes_names_the_bad_axis(axes, message):
    from after_ray.experiments.sweep.plan import validate_axes

    with pytest.raises(ConfigError, match=message):
        validate_axes(load_config(), axes)


def test_spec_file_cli_axes_and_trial_names(tmp_path):
    from after_ray.experiments.sweep.plan import SweepSpec, plan_trials, sweep_spec_from_cli
    from after_ray.experiments.sweep.resources import default_max_concurrent

    spec_file = tmp_path / "sweep.yaml"
    spec_file.write_text(
        yaml.safe_dump({"axes": {"al.strategy": ["after", "random"], "run.seed": [0]}})
    )
    spec = sweep_spec_from_cli(str(spec_file), ["run.seed=0,1"], trial_cpus=1)
    assert spec.axes == {"al.strategy": ["after", "random"], "run.seed": [0, 1]}
    base = config_from_dict({"run": {"output_dir": str(tmp_path / "runs")}})
    plans = plan_trials(base, spec, name="grid", local_training=True)
    names = [p.name for p in plans]
    assert names == [
        "strategy=after,seed=0",
        "strategy=after,seed=1",
        "strategy=random,seed=0",
        "strategy=random,seed=1",
    ]
    last = plans[-1].config
    assert (last.al.strategy, last.run.seed, last.ray.num_workers) == ("random", 1, 0)
    assert last.run_dir == (tmp_path / "runs" / "grid" / "strategy=random,seed=1").resolve()
    # local training: a trial peaks at its own CPU + one scoring actor (or one decode task)
    assert default_max_concurrent(plans, spec, {"CPU": 4.0}) == 2
    assert default_max_concurrent(plans, spec, {"CPU": 3.0}) == 1
    with pytest.raises(ConfigError, match="unknown key"):
        SweepSpec.from_dict({"axes": {"run.seed": [0]}, "max_concurrent": 2})
    with pytest.raises(ConfigError, match="max_concurrent_trials"):
        sweep_spec_from_cli(None, ["run.seed=0"], max_concurrent_trials=0)


def test_trials_get_the_drivers_paths_not_their_trial_directories(tmp_path, monkeypatch):
    """Tune starts trials in their own directories: relative paths are pinned in the driver,
    so a trial reads the corpus (and probe cache) the shared stages built, not a new one."""
    from after_ray.experiments.sweep.plan import SweepSpec, plan_trials

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    base = config_from_dict(
        {
            "run": {"output_dir": "runs", "storage_path": "ray_store"},
            "corpus": {"name": "synth", "root": "data/synth"},
            "backbone": {"name_or_path": "ckpt"},
        }
    )
    preset = config_from_dict({"corpus": {"name": "synth"}})
    spec = SweepSpec(axes={"run.seed": [0]})
    (plan,) = plan_trials(base, spec, name="s", local_training=True)
    assert plan.config.corpus.root == str(tmp_path / "data" / "synth")
    assert plan.config.backbone.name_or_path == str(tmp_path / "ckpt")
    assert plan.config.run.storage_path == str(tmp_path / "ray_store")
    (default,) = plan_trials(preset, spec, name="s", local_training=True)
    assert default.config.corpus.root == str(tmp_path / "data" / "synth")  # the synth default
    assert default.config.backbone.name_or_path == "tiny"  # a preset name is not a path


def test_combination_errors_name_the_trial_and_a_human_oracle_is_refused(tmp_path):
    from after_ray.experiments.sweep.plan import SweepSpec, plan_trials, validate_axes

    base = config_from_dict({"run": {"output_dir": str(tmp_path)}})
    spec = SweepSpec(axes={"al.strategy": ["random"], "al.strategy_params": [{}, {"nope": 1}]})
    with pytest.raises(ConfigError, match=r"sweep trial 'strategy=random,strategy_params=.*nope"):
        plan_trials(base, spec, name="s", local_training=True)
    human = config_from_dict({"al": {"oracle": {"kind": "human"}}})
    with pytest.raises(ConfigError, match="sweep base config: al.oracle.kind"):
        validate_axes(human, {"run.seed": [0, 1]})


def test_report_groups_keep_non_seed_axes_apart_and_a_changed_resume_is_refused(tmp_path):
    """Axes that run_info.json does not record (finetune.lr) are written into it, so the report
    does not average two learning rates as if they were seeds."""
    from after_ray.experiments.sweep.driver import _record_or_check_sweep, _tag_run_info
    from after_ray.experiments.sweep.plan import SweepSpec, plan_trials
    from after_ray.report.aggregate import aggregate
    from after_ray.report.load import load_run

    base = config_from_dict({"run": {"output_dir": str(tmp_path)}})
    spec = SweepSpec(axes={"finetune.lr": [1e-4, 1e-3], "run.seed": [0, 1]})
    plans = plan_trials(base, spec, name="lr", local_training=True)
    for i, plan in enumerate(plans):  # what the runner writes, without running it
        (plan.run_dir / "rounds" / "round_000").mkdir(parents=True)
        info = {"kind": "al", "name": plan.name, "strategy": "after", "seed": plan.config.run.seed}
        (plan.run_dir / "run_info.json").write_text(json.dumps(info))
        metrics = {"round": 0, "labeled_fraction": 0.1, "test": {"ua": 0.1 * i, "wa": 0.1}}
        (plan.run_dir / "rounds" / "round_000" / "metrics.json").write_text(json.dumps(metrics))
        _tag_run_info(plan)
    groups = aggregate([load_run(p.run_dir) for p in plans])
    assert sorted((g.label, g.seeds) for g in groups) == [
        ("after, finetune.lr=0.0001", [0, 1]),
        ("after, finetune.lr=0.001", [0, 1]),
    ]

    sweep_dir = tmp_path / "lr"
    _record_or_check_sweep(sweep_dir, "lr", plans, resume=True)
    _record_or_check_sweep(sweep_dir, "lr", plans, resume=True)  # same grid: accepted
    other = plan_trials(
        config_from_dict({"run": {"output_dir": str(tmp_path)}, "finetune": {"epochs": 3}}),
        spec,
        name="lr",
        local_training=True,
    )
    with pytest.raises(RunStateError, match="was started with a different config"):
        _record_or_check_sweep(sweep_dir, "lr", other, resume=True)
    fewer = plan_trials(base, SweepSpec(axes={"run.seed": [0]}), name="lr", local_training=True)
    with pytest.raises(RunStateError, match="was started with trials"):
        _record_or_check_sweep(sweep_dir, "lr", fewer, resume=True)


def test_a_failed_trial_is_one_readable_line_without_the_remote_traceback():
    """What Ray hands over for a failed trial (a RayTaskError around the trial's exception, or
    an ActorDiedError when its process is gone) becomes the line the summary, the report and
    Tune's log show."""
    import logging

    from ray.exceptions import ActorDiedError, RayTaskError

    from after_ray.experiments.sweep.driver import _error_text, _one_line_trial_errors

    def wrapped(cause: BaseException) -> BaseException:
        remote = "Traceback (most recent call last):\n  File ...\n" + repr(cause)
        error = RayTaskError("train", remote, cause, proctitle="t", pid=1, ip="127.0.0.1")
        return error.as_instanceof_cause()

    config = ConfigError("invalid configuration:\n  - al.budget.initial: is 0 items\n  - b: x")
    assert _error_text(wrapped(config)) == "al.budget.initial: is 0 items; b: x"
    assert _error_text(wrapped(RunStateError("run dir locked"))) == "run dir locked"
    assert _error_text(wrapped(ValueError("bad\nshape"))) == "ValueError: bad; shape"
    assert _error_text(ActorDiedError()).startswith("its process died (killed by a signal")
    assert _error_text(KeyError("x")) == "KeyError: 'x'"

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__()
            self.records: list[logging.LogRecord] = []

        def emit(self, record):
            self.records.append(record)

    logger = logging.getLogger("ray.tune.execution.tune_controller")
    keep = Keep()
    logger.addHandler(keep)
    try:
        with _one_line_trial_errors():
            logger.error("Trial task failed for trial seed=0", exc_info=wrapped(config))
        logger.error("Trial task failed for trial seed=1", exc_info=ValueError("kept"))
    finally:
        logger.removeHandler(keep)
    first, after = keep.records
    assert first.exc_info is None
    assert first.getMessage().startswith(
        "Trial task failed for trial seed=0: al.budget.initial: is 0 items; b: x (a failed "
        "trial is retried once, then reported; traceback: error.txt"
    )
    assert after.exc_info is not None  # outside a sweep, Tune's logging is left alone


# ------------------------------------------------------------------------------- Ray sweeps
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_2x2_sweep_aggregates_seeds_and_logs_to_tune(ray_session, corpus_root, tmp_path):
    from ray import tune

    from after_ray.experiments.sweep.driver import run_sweep
    from after_ray.experiments.sweep.plan import SweepSpec

    base = config_from_dict(base_dict(tmp_path, corpus_root))
    spec = SweepSpec(axes={"al.strategy": ["after", "random"], "run.seed": [0, 1]})
    result = run_sweep(base, spec, name="grid")

    assert result.n_trials == 4 and result.errors == {}
    assert result.max_concurrent_trials == 2  # 4 CPUs, 2 at a trial's peak
    for trial in result.trials:
        info = json.loads((trial.run_dir / "run_info.json").read_text())
        assert (info["strategy"], info["seed"]) == (
            trial.overrides["al.strategy"],
            trial.overrides["run.seed"],
        )
        assert trial.last_metrics["labeled_fraction"] == pytest.approx(0.5)
    # TAPT ran once, in the driver, and every trial used that model
    tapt_dirs = [p for p in (result.sweep_dir / "_tapt").iterdir() if p.is_dir()]
    assert len(tapt_dirs) == 1
    for trial in result.trials:
        state = json.loads((trial.run_dir / "state.json").read_text())
        assert Path(state["stages"]["tapt"]["backbone_dir"]).resolve() == tapt_dirs[0].resolve()

    report = result.report_path.read_text()
    for strategy in ("after", "random"):
        assert any(line.startswith(f"| {strategy} | 2 (0, 1) |") for line in report.splitlines()), (
            report
        )
    assert (result.report_path.parent / "learning_curves.png").stat().st_size > 0
    summary = result.summary_lines()
    assert summary[0] == "sweep grid: 4 trials, 0 failed"
    assert all("at 50% labeled (round 1)" in line for line in summary[1:5])

    analysis = tune.ExperimentAnalysis(result.experiment_path)  # read back from storage
    assert sorted(t.status for t in analysis.trials) == ["TERMINATED"] * 4
    assert sorted(t.config["trial"]["name"] for t in analysis.trials) == sorted(
        t.name for t in result.trials
    )
    for trial in analysis.trials:
        rows = analysis.trial_dataframes[trial.trial_id]  # one Tune iteration per AL round
        assert list(rows["round"]) == [0, 1]
        run_dir = Path(rows["run_dir"].iloc[0])
        expected = [json.loads(metrics_file(run_dir, r).read_text())["test"]["ua"] for r in (0, 1)]
        assert list(rows["test_ua"]) == pytest.approx(expected)
        assert list(Path(trial.path).glob("events.out.tfevents.*"))  # TensorBoard event files


def _sweep_driver_code(config_file: Path) -> str:
    return (
        "from after_ray.config.sections import load_config\n"
        "from after_ray.experiments.sweep.driver import run_sweep\n"
        "from after_ray.experiments.sweep.plan import SweepSpec\n"
        f"base = load_config({str(config_file)!r})\n"
        "spec = SweepSpec(axes={'run.seed': [0, 1]})\n"
        "run_sweep(base, spec, name='killed')\n"
    )


def _timings(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "state.json").read_text())["timings"]


def _wait_until_unlocked(run_dirs: list[Path], timeout: float = 60.0) -> None:
    """Ray kills a dead driver's trial workers within seconds; their run locks go with them."""
    import fcntl

    deadline = time.monotonic() + timeout
    for run_dir in run_dirs:
        while True:
            with (run_dir / "run.lock").open("a") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(handle, fcntl.LOCK_UN)
                    break
                except BlockingIOError:
                    pass
            assert time.monotonic() < deadline, f"{run_dir} is still locked by a dead sweep"
            time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_a_killed_sweep_resumes_without_recomputing(ray_session, corpus_root, tmp_path):
    """A 2 x 1 sweep (two trials at once) loses its driver process to SIGKILL once both trials
    have evaluated their first round; ``run_sweep(resume=True)`` restores the Tune experiment,
    finishes both trials from their run directories and recomputes nothing that was done."""
    from after_ray.experiments.sweep.driver import run_sweep
    from after_ray.experiments.sweep.plan import SweepSpec

    data = base_dict(tmp_path, corpus_root)
    data["tapt"]["enabled"] = False
    data["al"]["strategy"] = "random"  # no pool scoring: the cheapest AL run
    config_file = tmp_path / "base.yaml"
    config_file.write_text(yaml.safe_dump(data))
    sweep_dir = tmp_path / "runs" / "killed"
    run_dirs = [sweep_dir / "seed=0", sweep_dir / "seed=1"]

    # The driver joins the session's Ray, as a `ray job submit` driver joins its cluster: when it
    # dies, Ray kills its trials (and frees their CPUs) while the cluster lives on.
    address = ray_session.get_runtime_context().gcs_address
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env["RAY_ADDRESS"] = address
    log_path = tmp_path / "driver.log"
    with log_path.open("w") as log:
        driver = subprocess.Popen(
            [sys.executable, "-c", _sweep_driver_code(config_file)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and driver.poll() is None:
            if all(metrics_file(d, 0).is_file() for d in run_dirs):
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"sweep did not reach the kill point:\n{log_path.read_text()}")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver (and anything it forked)
        driver.wait()
    _wait_until_unlocked(run_dirs)  # nothing writes the runs any more
    evaluated = [
        metrics_file(d, r) for d in run_dirs for r in (0, 1) if metrics_file(d, r).is_file()
    ]
    assert any(not metrics_file(d, 1).is_file() for d in run_dirs)  # a trial was cut short
    before = {path: path.stat().st_mtime_ns for path in evaluated}
    timings_before = {d: _timings(d) for d in run_dirs}

    base = load_config(config_file)
    spec = SweepSpec(axes={"run.seed": [0, 1]})
    with pytest.raises(RunStateError, match="already exists"):
        run_sweep(base, spec, name="killed", resume=False)
    result = run_sweep(base, spec, name="killed", resume=True)

    assert result.restored and result.n_trials == 2 and result.errors == {}
    assert all(metrics_file(d, 1).is_file() for d in run_dirs)
    assert {path: path.stat().st_mtime_ns for path in before} == before  # nothing recomputed
    for run_dir in run_dirs:
        timings = _timings(run_dir)
        assert timings[: len(timings_before[run_dir])] == timings_before[run_dir]
        done_before = {(t["stage"], t.get("round")) for t in timings_before[run_dir]}
        redone = [
            t
            for t in timings[len(timings_before[run_dir]) :]
            if (t["stage"], t.get("round")) in done_before
        ]
        assert redone == [], redone  # no finished stage ran again
    report = result.report_path.read_text()
    assert "| random | 2 (0, 1) |" in report


# ------------------------------------------------------------------------- trial failures
def _failure_sweep_base(tmp_path: Path, corpus_root: Path) -> dict:
    """The cheapest AL run: no TAPT, random selection (no pool scoring), 2 rounds."""
    data = base_dict(tmp_path, corpus_root)
    data["tapt"]["enabled"] = False
    data["al"]["strategy"] = "random"
    return data


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_trial_killed_once_is_retried_and_a_failing_trial_is_reported(
    ray_session, corpus_root, tmp_path, monkeypatch, capfd, caplog
):
    """``after-ray sweep`` over 2 x 2 trials, with two kinds of worker failure:

    * killed once: the twins ``initial=0.25,log_every=10|11`` (``tapt.log_every`` changes
      nothing with TAPT off) run at once, and the first to reach round 1's selection is
      SIGKILLed there (a failpoint shipped into the trial process, armed once). Tune retries it
      (FailureConfig(max_failures=1)), its AL run resumes from its run directory, and it ends
      TERMINATED with exactly its twin's selections, labels and metrics;
    * always failing: ``al.budget.initial=0.001`` of a 48-item pool is 0 items, a ConfigError
      raised inside the trial (only the trial knows the pool size), on the retry too. Those
      trials are reported: the sweep returns, the other trials finish, ``SweepResult.errors``
      names them with the ConfigError's message, the summary and the report say they failed,
      and the command exits 1 without a traceback.
    """
    from ray import tune
    from tiny_run import outcome

    from after_ray import cli, faults
    from after_ray.experiments.sweep import driver as sweep
    from after_ray.experiments.sweep.driver import TUNE_CONTROLLER_LOGGER

    config_file = tmp_path / "base.yaml"
    config_file.write_text(yaml.safe_dump(_failure_sweep_base(tmp_path, corpus_root)))
    marker = tmp_path / "trial-killed"
    monkeypatch.setenv(faults.ENV, "select:1")
    monkeypatch.setenv(faults.ONCE_ENV, str(marker))
    results = []
    run_sweep = sweep.run_sweep
    monkeypatch.setattr(
        sweep, "run_sweep", lambda *a, **k: results.append(run_sweep(*a, **k)) or results[-1]
    )

    code = cli.main(
        [
            "sweep", "--config", str(config_file), "--name", "failures",
            "--axis", "al.budget.initial=0.25,0.001", "--axis", "tapt.log_every=10,11",
        ]
    )  # fmt: skip
    out, err = capfd.readouterr()
    (result,) = results

    # killed once, retried, as if never killed
    assert marker.is_file(), "no trial reached round 1's selection: nothing was killed"
    twins = ["initial=0.25,log_every=10", "initial=0.25,log_every=11"]
    run_dirs = {t.name: t.run_dir for t in result.trials}
    twin_a, twin_b = (outcome(run_dirs[name]) for name in twins)
    assert sorted(twin_a["selections"]) == [0, 1]
    assert twin_a == twin_b
    analysis = tune.ExperimentAnalysis(result.experiment_path)
    by_name = {t.config["trial"]["name"]: t for t in analysis.trials}
    assert [by_name[name].status for name in twins] == ["TERMINATED"] * 2
    assert sorted(by_name[name].run_metadata.num_failures for name in twins) == [0, 1]
    for name in twins:
        rows = analysis.trial_dataframes[by_name[name].trial_id]
        assert set(rows["round"]) == {0, 1}  # the retried trial reported round 1 too
        last = json.loads(metrics_file(run_dirs[name], 1).read_text())["test"]["ua"]
        assert rows["test_ua"].iloc[-1] == pytest.approx(last)

    # always failing: reported, and the rest of the sweep finished
    failing = ["initial=0.001,log_every=10", "initial=0.001,log_every=11"]
    reason = (
        "al.budget.initial: 0.001 of a pool of 48 items is 0 items; raise it (or use unit: count)"
    )
    assert result.errors == {name: reason for name in failing}
    assert [by_name[name].status for name in failing] == ["ERROR"] * 2
    assert [by_name[name].run_metadata.num_failures for name in failing] == [2, 2]
    assert code == 1
    assert "Traceback" not in out + err
    assert "sweep failures: 4 trials, 2 failed" in out
    assert f"  {failing[0]}: FAILED: {reason}" in out
    assert f"  {twins[0]}: test UA" in out and f"  {twins[1]}: test UA" in out
    # Tune's own log record of each failure: the reason, without the remote traceback
    failures = [r for r in caplog.records if r.name == TUNE_CONTROLLER_LOGGER]
    assert all(r.exc_info is None for r in failures)
    messages = [r.getMessage() for r in failures]
    assert sum(f"Trial task failed for trial {failing[0]}: {reason}" in m for m in messages) == 2
    assert sum("its process died (killed by a signal" in m for m in messages) == 1
    report = result.report_path.read_text()
    assert "## Failed trials" in report
    assert f"- **{failing[0]}** (no round evaluated): {reason}" in report
    failed = json.loads((result.report_path.parent / "report.json").read_text())["failed_trials"]
    assert sorted(f["name"] for f in failed) == failing
    assert all(Path(f["error_file"]).is_file() for f in failed)
