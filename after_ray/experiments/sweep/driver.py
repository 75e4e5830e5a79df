"""`after-ray sweep`: a grid of AL runs (strategies x seeds x any config key) as Ray Tune trials.

What a sweep is
    A base :class:`~after_ray.config.sections.Config` plus a :class:`SweepSpec` whose ``axes`` map dotted
    config keys to lists of values, e.g. ``{"al.strategy": ["after", "random"], "run.seed": [0,
    1]}``. Every combination is one trial, and every trial is one ordinary, resumable AL run
    (``run_active_learning``) in ``<run.output_dir>/<sweep name>/<trial name>``, where the trial
    name is built from the overrides (``strategy=after,seed=0``). Afterwards the runs are
    aggregated by ``after_ray.report.render.write_report`` into ``<sweep dir>/report``: mean
    and std over seeds at every labeled fraction, AULC, time, the table and the learning curves
    with bands.

Layout of ``<run.output_dir>/<sweep name>/``::

    sweep.json        the trials and their full configs (a resume with other configs is refused)
    <trial name>/     one AL run directory per trial (run_info.json, rounds/, state.json, ...)
    _tapt             symlink to <run.output_dir>/_tapt: sweeps share TAPT models with plain runs
    tune/<name>/      Ray Tune's experiment (default storage; trial dirs with progress.csv,
                      result.json and TensorBoard event files: ``tensorboard --logdir`` on it)
    report/           report.md, report.json and the PNGs

How the pieces fit (Ray 2.60, Train V2: ``Tuner(TorchTrainer)`` is not supported, so each trial
is a Tune trainable that drives its own Ray Train runs; a *class* trainable,
:class:`~after_ray.experiments.sweep.trial.SweepTrial`, because Train V2 refuses its API in a
process that holds a Tune function-trainable session, which is where the training loop runs in
local mode; see the class docstring):

* **Shared stages first, in the driver.** TAPT depends only on the pool audio and the TAPT /
  backbone / audio settings, and the runner caches it under ``_tapt/<content key>``. Before the
  Tuner starts, the driver runs ``run_tapt_only`` (prepare + TAPT) once for the first trial of
  every distinct (corpus, audio, backbone, tapt) setting, so concurrent trials never compute or
  write the same TAPT model (or build the same synthesized corpus) at once: they all find it in
  the cache. TAPT's time is therefore recorded in that first trial's run only. A corpus or TAPT
  failure there stops the sweep before any trial starts.
* **Live per-round metrics.** A trial runs ``run_active_learning`` in a background thread and
  polls its run directory; each ``rounds/round_NNN/metrics.json`` (written atomically by the
  runner) becomes one Tune iteration (``step()``), in round order, as soon as it appears, so
  Tune's results table, ``progress.csv``, ``result.json`` and the TensorBoard event files in each
  trial directory show the learning curve while the sweep runs, without any hook in the runner.
  Tune keeps these metrics whether or not a checkpoint comes with them (only Ray Train V2's
  ``train.report`` drops metrics without a checkpoint; checked for Tune function trainables
  too). A tiny checkpoint (the next round to report) is saved after every round anyway, so a
  retried or restored trial reports only the new rounds. (Tune restores the checkpoint its last
  experiment snapshot knew; a round finished just before a crash may be reported twice.)
* **Resume.** ``run_sweep(..., resume=True)`` restores Tune's experiment when it exists
  (``Tuner.restore(resume_unfinished=True, resume_errored=True)``); finished trials are not run
  again, and an unfinished trial reruns ``run_active_learning`` on its run directory, which
  continues at the first unfinished step.
* **Failed trials.** A trial whose process dies (SIGKILL, OOM, a lost node) or whose run raises
  is retried once (``FailureConfig(max_failures=1)``), resuming its run directory the same way;
  the failpoints of crash tests reach the trial process with the trainable (``faults``). A trial
  that fails again is reported, not fatal: the other trials finish, ``SweepResult.errors`` and
  the summary give one readable line per failed trial (its traceback stays in Tune's
  ``error.txt``), the report lists it under "Failed trials", and ``after-ray sweep`` exits 1.
* **Resources and the Tune + Data/Train deadlock** (docs/ray-2.60.md §6.4). A trial reserves
  ``trial_cpus`` (and ``trial_gpus``) for its own process. Inside it, Ray Data (decode tasks,
  the scoring actor pool) and Ray Train workers need *more* resources, outside the trial's
  reservation. If the running trials held every CPU, their scoring actors and decode tasks could
  never start and the sweep would hang. So ``max_concurrent_trials`` defaults to what the
  cluster can hold at every trial's peak (see :func:`default_max_concurrent`), and on a single
  machine without GPUs trials train in their own process (``ray.num_workers=0``, Ray Train local
  mode) unless ``local_training`` says otherwise. On a multi-node or GPU cluster trials keep the
  base config's Train workers; the GPU bound then comes from the Train workers and the scoring
  actors, as in docs/ray-2.60.md §3.3. Raising ``max_concurrent_trials`` above the default can
  deadlock.

Storage: trial run directories are written by whichever node runs the trial and read by the
driver for the report, so on a multi-node cluster ``run.output_dir`` must be shared storage (NFS),
and ``storage_path`` too (or ``s3://...``).

Errors meant for the user raise ``ConfigError`` (bad axis, key or value, naming the axis; a
combination naming the trial), all before Ray starts, or ``RunStateError`` (a resume whose trials
differ from the stored ones, or ``resume=False`` on an existing sweep).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune

from after_ray.config.sections import Config
from after_ray.errors import AfterRayError, ConfigError, RunStateError
from after_ray.experiments.sweep.plan import (
    SEED_AXES,
    SweepSpec,
    TrialPlan,
    check_sweep_name,
    plan_trials,
    problems_text,
)
from after_ray.experiments.sweep.resources import (
    default_max_concurrent,
    resolve_local_training,
    trial_resources,
)
from after_ray.experiments.sweep.trial import sweep_trainable, trial_name_of
from after_ray.store.atomic import atomic_write_json
from after_ray.store.layout import RUN_INFO_FILE, round_metrics_path

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
REPORT_DIR = "report"
TUNE_DIR = "tune"
TAPT_LINK = "_tapt"
FEATURES_LINK = "_features"
# Axes whose value run_info.json already records (under this field); the report groups on
# run_info.json, so the driver writes every other non-seed axis into it (see _tag_run_info).
RECORDED_IN_RUN_INFO = {
    "al.strategy": "strategy",
    "al.cold_start": "cold_start",
    "run.seed": "seed",
    "corpus.name": "corpus",
    "backbone.name_or_path": "backbone",
    "tapt.enabled": "tapt",
}
# Tune retries a failed trial this many times (a lost node, a killed process); a trial that fails
# once more is reported as failed and the sweep goes on with the others.
MAX_TRIAL_FAILURES = 1
_RETRIES_TEXT = "once" if MAX_TRIAL_FAILURES == 1 else f"{MAX_TRIAL_FAILURES} times"
# Where Tune logs each trial failure, with the remote traceback (see _one_line_trial_errors).
TUNE_CONTROLLER_LOGGER = "ray.tune.execution.tune_controller"
# Tune's per-trial file with every failure's full traceback.
TUNE_ERROR_FILE = "error.txt"


@dataclass
class TrialOutcome:
    """A trial at the end of the sweep. ``error``: one readable line when it failed (after Tune's
    retry); ``error_file``: Tune's file with the full traceback of each failure."""

    name: str
    overrides: dict[str, Any]
    run_dir: Path
    error: str | None = None
    last_metrics: dict[str, Any] | None = None
    error_file: Path | None = None


@dataclass
class SweepResult:
    """What a sweep produced: where everything is, and which trials failed."""

    name: str
    sweep_dir: Path
    experiment_path: str
    report_path: Path | None
    trials: list[TrialOutcome]
    max_concurrent_trials: int
    restored: bool = False

    @property
    def run_dirs(self) -> list[Path]:
        return [t.run_dir for t in self.trials]

    @property
    def n_trials(self) -> int:
        return len(self.trials)

    @property
    def errors(self) -> dict[str, str]:
        return {t.name: t.error for t in self.trials if t.error}

    @property
    def n_errors(self) -> int:
        return len(self.errors)

    def summary_lines(self) -> list[str]:
        """One line per trial (its last round, or its error), then where the results are."""
        lines = [f"sweep {self.name}: {self.n_trials} trials, {self.n_errors} failed"]
        for trial in self.trials:
            metrics = trial.last_metrics or {}
            ua = (metrics.get("test") or {}).get("ua")
            if trial.error:
                status = f"FAILED: {trial.error}"
            elif ua is None:
                status = "no round evaluated"
            else:
                status = (
                    f"test UA {ua:.3f} at {metrics.get('labeled_fraction', 0):.0%} labeled "
                    f"(round {metrics.get('round')})"
                )
            lines.append(f"  {trial.name}: {status}")
            if trial.error and trial.error_file:
                lines.append(f"    traceback: {trial.error_file}")
        lines.append(f"runs: {self.sweep_dir}")
        lines.append(f"report: {self.report_path or '(no run to report)'}")
        lines.append(f"Tune results / TensorBoard: tensorboard --logdir {self.experiment_path}")
        return lines


def _stored_view(config: Config) -> dict[str, Any]:
    # Ray resources may change between a run and its resume (another cluster); nothing else may.
    data = config.to_dict()
    data.pop("ray", None)
    return data


def _record_or_check_sweep(
    sweep_dir: Path, name: str, plans: list[TrialPlan], resume: bool
) -> None:
    path = sweep_dir / SWEEP_FILE
    current = {p.name: {"overrides": p.overrides, "config": _stored_view(p.config)} for p in plans}
    if path.is_file() and resume:
        stored = json.loads(path.read_text()).get("trials", {})
        if list(stored) != list(current):
            raise RunStateError(
                f"sweep {name!r} in {sweep_dir} was started with trials {list(stored)}, not "
                f"{list(current)}: give this grid another --name, or pass the original axes"
            )
        for trial, entry in current.items():
            if json.loads(json.dumps(entry, default=str)) != stored[trial]:
                raise RunStateError(
                    f"sweep {name!r}: trial {trial!r} was started with a different config "
                    f"(see {path}); resume it with the original config, or use another --name"
                )
    atomic_write_json(path, {"name": name, "trials": current}, what="the sweep description")


def _link_tapt_cache(base: Config, sweep_dir: Path) -> None:
    """Trials write TAPT under <sweep dir>/_tapt (and head-mode features under _features); point
    them at <output_dir>/_tapt and _features so a sweep reuses what plain runs in the same
    output directory computed (and vice versa)."""
    for name in (TAPT_LINK, FEATURES_LINK):
        link = sweep_dir / name
        if link.exists() or link.is_symlink():
            continue
        target = (Path(base.run.output_dir) / name).resolve()
        target.mkdir(parents=True, exist_ok=True)
        try:
            link.symlink_to(target, target_is_directory=True)
        except OSError as exc:  # e.g. a filesystem without symlinks: then kept per sweep
            log.warning("cannot link %s -> %s (%s); %s is kept per sweep", link, target, exc, name)


def _shared_stage_key(config: Config) -> str:
    payload = {
        s: dataclasses.asdict(getattr(config, s)) for s in ("corpus", "audio", "backbone", "tapt")
    }
    payload["head_features"] = (config.finetune.mode, config.finetune.pooling)
    return json.dumps(payload, sort_keys=True, default=str)


def run_shared_stages(plans: list[TrialPlan]) -> None:
    """Prepare + TAPT once per distinct (corpus, audio, backbone, tapt) setting, in the driver,
    before any trial starts: trials then find the corpus built and TAPT in the runner's cache."""
    from after_ray.pipeline.runner import run_shared_stages_only

    firsts: dict[str, TrialPlan] = {}
    for plan in plans:
        firsts.setdefault(_shared_stage_key(plan.config), plan)
    for plan in firsts.values():
        log.info("sweep: shared stages (prepare, TAPT, feature pass) in %s", plan.run_dir)
        run_shared_stages_only(plan.config)


def _tag_run_info(plan: TrialPlan) -> None:
    """Record the non-seed axes that run_info.json lacks (e.g. ``finetune.lr``) in it, so the
    report, which groups runs on run_info.json, does not average different settings as seeds."""
    path = plan.run_dir / RUN_INFO_FILE
    extra = {
        k: v
        for k, v in plan.overrides.items()
        if k not in SEED_AXES and k not in RECORDED_IN_RUN_INFO
    }
    if not extra or not path.is_file():
        return
    info = json.loads(path.read_text())
    if all(info.get(k) == v for k, v in extra.items()):
        return
    info.update(extra)
    atomic_write_json(path, info, what="the run description")


def _last_metrics(run_dir: Path) -> dict[str, Any] | None:
    from after_ray.store.run_state import list_rounds

    for round_index in reversed(list_rounds(run_dir) if run_dir.is_dir() else []):
        path = round_metrics_path(run_dir, round_index)
        if path.is_file():
            return json.loads(path.read_text())
    return None


def run_sweep(
    base_config: Config,
    spec: SweepSpec,
    *,
    name: str,
    storage_path: str | None = None,
    resume: bool = True,
) -> SweepResult:
    """Run (or resume) the grid ``spec`` over ``base_config`` as Ray Tune trials; see the module
    docstring. ``storage_path``: Tune's storage (default ``<output_dir>/<name>/tune``; shared
    storage on a multi-node cluster). ``resume=False`` refuses to touch an existing experiment."""
    import ray

    plans, local = _plan_on_the_cluster(base_config, spec, name)
    sweep_dir = (Path(base_config.run.output_dir) / name).resolve()
    storage = storage_path or str(sweep_dir / TUNE_DIR)
    experiment_path = f"{storage.rstrip('/')}/{name}"
    can_restore = _open_sweep_dir(
        base_config,
        plans,
        name=name,
        sweep_dir=sweep_dir,
        experiment_path=experiment_path,
        resume=resume,
    )

    max_concurrent = spec.max_concurrent_trials or default_max_concurrent(
        plans, spec, ray.cluster_resources()
    )
    resources = trial_resources(plans, spec)
    cpus = resources["cpu"]
    print(
        f"sweep {name}: {len(plans)} trials, at most {max_concurrent} at once "
        f"({cpus:g} CPU{'' if cpus == 1 else 's'} each, "
        f"{'training in the trial process' if local else 'Ray Train workers per trial'}); "
        f"Tune experiment: {experiment_path}",
        flush=True,
    )
    run_shared_stages(plans)

    trainable = sweep_trainable(plans, resources)
    if can_restore:
        print(f"sweep {name}: restoring the interrupted Tune experiment", flush=True)
        tuner = tune.Tuner.restore(
            experiment_path, trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        tuner = _new_tuner(
            trainable, plans, name=name, storage=storage, max_concurrent=max_concurrent
        )
    with _one_line_trial_errors():
        results = tuner.fit()

    trials = _trial_outcomes(plans, results)
    return SweepResult(
        name=name,
        sweep_dir=sweep_dir,
        experiment_path=experiment_path,
        report_path=_write_sweep_report(plans, trials, sweep_dir, name=name, spec=spec),
        trials=trials,
        max_concurrent_trials=max_concurrent,
        restored=can_restore,
    )


def _plan_on_the_cluster(
    base_config: Config, spec: SweepSpec, name: str
) -> tuple[list[TrialPlan], bool]:
    """Check the name, resources and every trial's config before Ray starts, start (or join)
    Ray, then plan the trials for this cluster; returns them and whether they train in their
    own process."""
    from after_ray.distributed.session import ensure_ray

    check_sweep_name(name)
    spec.check_resources()
    # Every config problem is reported before Ray starts (plan_trials runs again once the
    # cluster is known, to decide where training runs).
    plan_trials(base_config, spec, name=name, local_training=bool(spec.local_training))
    ensure_ray(base_config.ray)
    local = resolve_local_training(base_config, spec)
    return plan_trials(base_config, spec, name=name, local_training=local), local


def _open_sweep_dir(
    base_config: Config,
    plans: list[TrialPlan],
    *,
    name: str,
    sweep_dir: Path,
    experiment_path: str,
    resume: bool,
) -> bool:
    """Refuse to touch an existing experiment without ``resume``, record the trials (or check a
    resume against them) and link the shared caches; returns whether Tune's experiment can be
    restored."""
    can_restore = tune.Tuner.can_restore(experiment_path)
    if can_restore and not resume:
        raise RunStateError(
            f"sweep {name!r} already exists in {experiment_path}: resume it (drop --no-resume), "
            "or give the new sweep another --name"
        )
    sweep_dir.mkdir(parents=True, exist_ok=True)
    _record_or_check_sweep(sweep_dir, name, plans, resume)
    _link_tapt_cache(base_config, sweep_dir)
    return can_restore


def _new_tuner(
    trainable: Any, plans: list[TrialPlan], *, name: str, storage: str, max_concurrent: int
) -> tune.Tuner:
    """A Tune experiment of one trial per plan: retried once, checkpointed every round, logged
    to TensorBoard."""
    from ray.tune.logger import TBXLoggerCallback

    grid = [{"name": p.name, "overrides": p.overrides} for p in plans]
    return tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(grid)},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=max_concurrent,
            trial_name_creator=trial_name_of,
            trial_dirname_creator=trial_name_of,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=MAX_TRIAL_FAILURES),
            # After every round: the round Tune has, so a retried or restored trial
            # reports only new rounds (its AL run resumes from its own run directory). All
            # are kept (a few bytes each): num_to_keep would force an experiment snapshot
            # at every round.
            checkpoint_config=tune.CheckpointConfig(checkpoint_frequency=1),
            # Tune adds it by default when tensorboardX is installed, unless
            # TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1; asked for explicitly so it is always there.
            callbacks=[TBXLoggerCallback()],
            verbose=1,
        ),
    )


def _trial_outcomes(plans: list[TrialPlan], results: Any) -> list[TrialOutcome]:
    """Every trial at the end of the sweep, in plan order; the non-seed axes are recorded in each
    run_info.json first (see _tag_run_info)."""
    errors: dict[str, tuple[str, Path | None]] = {}
    for result in results:
        if result.error is not None:
            trial = (result.config or {}).get("trial", {}).get("name", str(result.path))
            error_file = Path(result.path) / TUNE_ERROR_FILE if result.path else None
            errors[trial] = (_error_text(result.error), error_file)
    trials = []
    for plan in plans:
        _tag_run_info(plan)
        error, error_file = errors.get(plan.name, (None, None))
        trials.append(
            TrialOutcome(
                name=plan.name,
                overrides=plan.overrides,
                run_dir=plan.run_dir,
                error=error,
                last_metrics=_last_metrics(plan.run_dir),
                error_file=error_file if error_file and error_file.is_file() else None,
            )
        )
    return trials


def _write_sweep_report(
    plans: list[TrialPlan],
    trials: list[TrialOutcome],
    sweep_dir: Path,
    *,
    name: str,
    spec: SweepSpec,
) -> Path | None:
    """The sweep's report over every run that got as far as describing itself (None when none
    did), with the failed trials listed."""
    from after_ray.report.render import write_report

    reportable = [p.run_dir for p in plans if (p.run_dir / RUN_INFO_FILE).is_file()]
    if not reportable:
        return None
    return write_report(
        reportable,
        sweep_dir / REPORT_DIR,
        title=f"Sweep {name}: {_axes_text(spec)}",
        failed_trials=_failed_trials(trials),
        trial_retries=MAX_TRIAL_FAILURES,
    )


def _error_text(error: BaseException) -> str:
    """One readable line for a trial's error.

    Ray hands a trial's error over wrapped, its text a remote traceback: a ``RayTaskError``
    around the exception raised in the trial (its ``cause``), or a ``RayActorError`` when the
    trial's process itself is gone (SIGKILL, the OOM killer, a crash in native code), whose text
    is a page about worker exit codes. The line is the AL run's own message for our errors (a
    ConfigError says what to fix), ``Type: message`` for any other exception, and "its process
    died" for a lost process.
    """
    from ray.exceptions import RayActorError, RayTaskError

    if isinstance(error, RayActorError) and not error.actor_init_failed:
        return "its process died (killed by a signal, out of memory, or a crash in native code)"
    if isinstance(error, RayTaskError) and isinstance(error.cause, BaseException):
        error = error.cause
    if isinstance(error, RayTaskError | RayActorError):  # no cause: the traceback's last line
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        return lines[-1] if lines else type(error).__name__
    if isinstance(error, ConfigError):
        text = problems_text(error)
    else:
        text = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
    if isinstance(error, AfterRayError):
        return text or type(error).__name__
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class _OneLineTrialError(logging.Filter):
    """Tune logs each trial failure as "Trial task failed for trial X" with the remote traceback
    attached: pages of Ray internals on the console (where ``after-ray`` promises no tracebacks)
    for what is often a one-line configuration problem. This keeps the line, adds the readable
    reason, and drops the traceback, which Tune keeps in the trial's error.txt."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and str(record.msg).startswith("Trial task failed for trial"):
            error = record.exc_info[1]
            reason = _error_text(error) if error is not None else "unknown error"
            record.msg = (
                f"{record.getMessage()}: {reason} (a failed trial is retried {_RETRIES_TEXT}, "
                f"then reported; traceback: {TUNE_ERROR_FILE} in the trial's Tune directory)"
            )
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


@contextlib.contextmanager
def _one_line_trial_errors() -> Iterator[None]:
    logger = logging.getLogger(TUNE_CONTROLLER_LOGGER)
    one_line = _OneLineTrialError()
    logger.addFilter(one_line)
    try:
        yield
    finally:
        logger.removeFilter(one_line)


def _failed_trials(trials: list[TrialOutcome]) -> list[dict[str, Any]]:
    """The failed trials as the report lists them (under "Failed trials", after the summary):
    without it, a failed trial's curve just stops early (or, with no evaluated round, is
    missing) with no explanation."""
    return [
        {
            "name": trial.name,
            "error": trial.error,
            "last_round": (trial.last_metrics or {}).get("round"),
            "error_file": str(trial.error_file) if trial.error_file else None,
        }
        for trial in trials
        if trial.error
    ]


def _axes_text(spec: SweepSpec) -> str:
    return " x ".join(f"{k} ({len(v)})" for k, v in spec.axes.items())
