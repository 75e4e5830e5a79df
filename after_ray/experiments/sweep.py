"""`after-ray sweep`: a grid of AL runs (strategies x seeds x any config key) as Ray Tune trials.

What a sweep is
    A base :class:`~after_ray.config.sections.Config` plus a :class:`SweepSpec` whose ``axes`` map dotted
    config keys to lists of values, e.g. ``{"al.strategy": ["after", "random"], "run.seed": [0,
    1]}``. Every combination is one trial, and every trial is one ordinary, resumable AL run
    (``run_active_learning``) in ``<run.output_dir>/<sweep name>/<trial name>``, where the trial
    name is built from the overrides (``strategy=after,seed=0``). Afterwards the runs are
    aggregated by ``after_ray.report.render.write_report`` into ``<sweep dir>/report``: mean and std over
    seeds at every labeled fraction, AULC, time, the table and the learning curves with bands.

Layout of ``<run.output_dir>/<sweep name>/``::

    sweep.json        the trials and their full configs (a resume with other configs is refused)
    <trial name>/     one AL run directory per trial (run_info.json, rounds/, state.json, ...)
    _tapt             symlink to <run.output_dir>/_tapt: sweeps share TAPT models with plain runs
    tune/<name>/      Ray Tune's experiment (default storage; trial dirs with progress.csv,
                      result.json and TensorBoard event files: ``tensorboard --logdir`` on it)
    report/           report.md, report.json and the PNGs

How the pieces fit (Ray 2.60, Train V2: ``Tuner(TorchTrainer)`` is not supported, so each trial
is a Tune trainable that drives its own Ray Train runs; a *class* trainable, :class:`SweepTrial`,
because Train V2 refuses its API in a process that holds a Tune function-trainable session,
which is where the training loop runs in local mode; see the class docstring):

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
import copy
import dataclasses
import hashlib
import itertools
import json
import logging
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from ray import tune
from ray.tune.result import DONE

from after_ray import faults
from after_ray.config.sections import Config, apply_overrides, config_from_dict
from after_ray.errors import AfterRayError, ConfigError, RunStateError
from after_ray.store.atomic import atomic_write_json

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
REPORT_DIR = "report"
TUNE_DIR = "tune"
TAPT_LINK = "_tapt"
FEATURES_LINK = "_features"
RUN_INFO_FILE = "run_info.json"
# Axes averaged over in the report (all other axes tell report groups apart).
SEED_AXES = ("run.seed",)
# Keys a sweep sets itself for every trial.
RESERVED_AXES = ("run.name", "run.output_dir")
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
SPEC_KEYS = (
    "axes", "max_concurrent_trials", "trial_cpus", "trial_gpus", "local_training", "arms",
)  # fmt: skip
# The pseudo-axis that names an arm (a bundle of overrides, see SweepSpec.arms).
ARM_AXIS = "arm"
# In an arm's overrides: the kind of run the trial is ("al", or "full_data" for the reference).
ARM_KIND_KEY = "kind"
RUN_KINDS = ("al", "full_data")
# Tune retries a failed trial this many times (a lost node, a killed process); a trial that fails
# once more is reported as failed and the sweep goes on with the others.
MAX_TRIAL_FAILURES = 1
_RETRIES_TEXT = "once" if MAX_TRIAL_FAILURES == 1 else f"{MAX_TRIAL_FAILURES} times"
# Where Tune logs each trial failure, with the remote traceback (see _one_line_trial_errors).
TUNE_CONTROLLER_LOGGER = "ray.tune.execution.tune_controller"
# Tune's per-trial file with every failure's full traceback.
TUNE_ERROR_FILE = "error.txt"
POLL_SECONDS = 2.0
# How long a trial waits, after a round's metrics appear, for the run to end (is it the last?).
FINAL_GRACE_S = 3.0
_NAME_MAX = 120
_UNSAFE = re.compile(r"[^A-Za-z0-9._,=+-]+")


# ----------------------------------------------------------------------------- the spec
@dataclass
class SweepSpec:
    """What to sweep and how much of the cluster a trial takes.

    ``axes``: dotted config key -> values; the sweep is the grid of all combinations, in the
    order given (the last axis varies fastest). ``run.seed`` is the seed axis: the report averages
    over it, and every other axis separates report groups.

    ``max_concurrent_trials``: None = :func:`default_max_concurrent` (what the cluster holds
    without the Tune + Data/Train deadlock).

    ``trial_cpus``: CPUs reserved for a trial's own process. None = ``ray.cpus_per_worker`` when
    the trial trains in its own process (that is the torch thread count of the loop), else 1.
    ``trial_gpus``: GPUs reserved for a trial's own process (default 0: on GPU clusters the
    trial's Ray Train workers and scoring actors take the GPUs, not the trial itself).

    ``local_training``: run fine-tuning and TAPT in the trial process (``ray.num_workers=0``).
    None = yes on a single machine without GPUs (``ray.use_gpu`` false), no otherwise. An axis
    on ``ray.num_workers`` always wins.

    ``arms``: optional named bundles of overrides that vary *together* (an AL strategy with its
    own cold start and parameters: ``{"random": {"al.strategy": "random", "al.cold_start":
    "random"}}``); the grid is then arms x axes, the trial names start with ``arm=<name>``, and
    run_info.json records the arm. ``kind: full_data`` in an arm makes its trials the full-data
    reference (one round on the whole pool).
    """

    axes: dict[str, list[Any]] = field(default_factory=dict)
    arms: dict[str, dict[str, Any]] | None = None
    max_concurrent_trials: int | None = None
    trial_cpus: float | None = None
    trial_gpus: float = 0.0
    local_training: bool | None = None

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "sweep spec") -> SweepSpec:
        if not isinstance(data, dict):
            raise ConfigError(
                f"{where}: expected a mapping with 'axes' (and optionally "
                f"{', '.join(SPEC_KEYS[1:])}), got {type(data).__name__}"
            )
        unknown = sorted(set(data) - set(SPEC_KEYS))
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {unknown}; valid keys: {', '.join(SPEC_KEYS)}"
            )
        axes = data.get("axes") or {}
        if not isinstance(axes, dict):
            raise ConfigError(
                f"{where}: 'axes' must map dotted config keys to lists of values, e.g. "
                "{al.strategy: [after, random], run.seed: [0, 1]}"
            )
        spec = cls(
            axes={str(k): _as_values(k, v) for k, v in axes.items()},
            max_concurrent_trials=data.get("max_concurrent_trials"),
            trial_cpus=data.get("trial_cpus"),
            trial_gpus=data.get("trial_gpus") or 0.0,
            local_training=data.get("local_training"),
            arms=data.get("arms"),
        )
        spec.check_resources(where)
        spec.check_arms(where)
        return spec

    def check_arms(self, where: str = "sweep spec") -> None:
        if self.arms is None:
            return
        if not isinstance(self.arms, dict) or not self.arms:
            raise ConfigError(f"{where}: 'arms' must map arm names to mappings of overrides")
        for arm, overrides in self.arms.items():
            if not isinstance(overrides, dict):
                raise ConfigError(
                    f"{where}: arm {arm!r} must be a mapping of dotted keys to values"
                )
            kind = overrides.get(ARM_KIND_KEY, "al")
            if kind not in RUN_KINDS:
                raise ConfigError(
                    f"{where}: arm {arm!r} has kind {kind!r}; valid kinds: {', '.join(RUN_KINDS)}"
                )
        if ARM_AXIS in self.axes:
            raise ConfigError(f"{where}: {ARM_AXIS!r} is set by 'arms', not an axis")

    def check_resources(self, where: str = "sweep spec") -> None:
        problems = []
        n = self.max_concurrent_trials
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            problems.append(f"max_concurrent_trials must be a whole number >= 1, got {n!r}")
        if self.trial_cpus is not None and not _number(self.trial_cpus, positive=True):
            problems.append(f"trial_cpus must be a positive number, got {self.trial_cpus!r}")
        if not _number(self.trial_gpus, positive=False):
            problems.append(f"trial_gpus must be a number >= 0, got {self.trial_gpus!r}")
        if self.local_training is not None and not isinstance(self.local_training, bool):
            problems.append(
                f"local_training must be true, false or null, not {self.local_training!r}"
            )
        if problems:
            raise ConfigError(f"{where}: " + "; ".join(problems))

    def combinations(self) -> list[dict[str, Any]]:
        """The grid: one {axis: value} dict per trial (``arm`` first when there are arms)."""
        axes = {ARM_AXIS: list(self.arms)} if self.arms else {}
        axes.update(self.axes)
        keys = list(axes)
        return [dict(zip(keys, values, strict=True)) for values in
                itertools.product(*(axes[k] for k in keys))]  # fmt: skip

    def arm_overrides(self, combo: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """The config overrides of a grid point (its arm's, then its axes') and its run kind."""
        arm = dict((self.arms or {}).get(combo.get(ARM_AXIS), {}))
        kind = arm.pop(ARM_KIND_KEY, "al")
        return {**arm, **{k: v for k, v in combo.items() if k != ARM_AXIS}}, kind


def _number(value: Any, *, positive: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return value > 0 if positive else value >= 0


def _as_values(key: Any, values: Any) -> list[Any]:
    if not isinstance(values, list):
        values = [values]  # a single value is a one-point axis
    if not values:
        raise ConfigError(f"sweep axis {key!r}: needs at least one value")
    seen = set()
    for value in values:
        marker = json.dumps(value, sort_keys=True, default=str)
        if marker in seen:
            raise ConfigError(f"sweep axis {key!r}: value {value!r} is listed twice")
        seen.add(marker)
    return values


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets and quotes: ``a,[1, 2],'x,y'`` -> 3 pieces."""
    pieces, depth, quote, current = [], 0, None, []
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            pieces.append("".join(current))
            current = []
            continue
        current.append(char)
    pieces.append("".join(current))
    return pieces


def parse_axes(texts: list[str]) -> dict[str, list[Any]]:
    """CLI axes -> {key: values}: ``["al.strategy=after,random", "run.seed=0,1"]``.

    Values are split on top-level commas and each is parsed as a YAML scalar (``0`` is an int,
    ``true`` a bool, ``[a, b]`` a list, ``'a,b'`` a string with a comma). Only the syntax is
    checked here; :func:`validate_axes` checks the keys and values against a config.
    """
    axes: dict[str, list[Any]] = {}
    for text in texts:
        if "=" not in text:
            raise ConfigError(
                f"sweep axis {text!r}: expected KEY=V1,V2,... with a dotted config key, "
                "e.g. al.strategy=after,random"
            )
        key, raw = (part.strip() for part in text.split("=", 1))
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"sweep axis {text!r}: {key!r} is not a dotted key like al.strategy")
        if key in axes:
            raise ConfigError(f"sweep axis {key!r} is given twice; list all its values in one")
        values = []
        for piece in _split_top_level(raw):
            if not piece.strip():
                raise ConfigError(
                    f"sweep axis {key!r}: empty value in {raw!r} (values are comma-separated)"
                )
            try:
                values.append(yaml.safe_load(piece))
            except yaml.YAMLError as exc:
                raise ConfigError(
                    f"sweep axis {key!r}: value {piece!r} is not valid YAML ({exc})"
                ) from None
        axes[key] = _as_values(key, values)
    return axes


def load_sweep_spec(path: str | Path) -> SweepSpec:
    """A sweep spec from YAML: ``axes: {al.strategy: [after, random], run.seed: [0, 1]}`` plus
    optional ``max_concurrent_trials``, ``trial_cpus``, ``trial_gpus``, ``local_training``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep spec {str(path)!r} not found (pass --spec path/to/sweep.yaml)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"sweep spec {str(path)!r} is not valid YAML: {exc}") from None
    return SweepSpec.from_dict(data or {}, where=f"sweep spec {str(path)!r}")


def _override_text(key: str, value: Any) -> str:
    # JSON is YAML, and apply_overrides parses the value as YAML: the value round-trips exactly.
    return f"{key}={json.dumps(value)}"


def validate_axes(base: Config, axes: dict[str, list[Any]]) -> None:
    """Apply every axis value alone to ``base``; a bad key or value raises ConfigError naming it.

    Checks that depend on several axes together (a strategy and its ``strategy_params``) run on
    every combination in :func:`plan_trials`, naming the trial.
    """
    if not axes:
        raise ConfigError(
            "a sweep needs at least one axis, e.g. --axis al.strategy=after,random "
            "--axis run.seed=0,1"
        )
    if "al.oracle.kind" not in axes:
        try:
            _check_oracle(base)
        except ConfigError as exc:
            raise ConfigError(f"sweep base config: {exc}") from None
    base_dict = base.to_dict()
    for key, values in axes.items():
        if key in RESERVED_AXES:
            raise ConfigError(
                f"sweep axis {key!r}: the sweep sets run.name and run.output_dir for each trial "
                "(runs go to <run.output_dir>/<sweep name>/<trial name>); sweep other keys"
            )
        for value in values:
            try:
                config = config_from_dict(
                    apply_overrides(copy.deepcopy(base_dict), [_override_text(key, value)])
                )
                _check_oracle(config)
                if key in ("al.strategy", "al.cold_start"):
                    from after_ray.al.strategies import strategy_params

                    strategy_params(value)  # the name exists (its parameters: per trial)
            except ConfigError as exc:
                raise ConfigError(
                    # The axis already names the key; a problem of that key is not named twice.
                    f"sweep axis {key!r}, value {value!r}: "
                    f"{_problems_text(exc).removeprefix(f'{key}: ')}"
                ) from None


def _problems_text(exc: ConfigError) -> str:
    """A config error's problems on one line ("invalid configuration:\n  - a\n  - b" -> "a; b")."""
    lines = [line.strip().removeprefix("- ") for line in str(exc).splitlines()]
    if lines and lines[0] == "invalid configuration:":
        lines = lines[1:]
    return "; ".join(line for line in lines if line)


def _check_oracle(config: Config) -> None:
    if config.al.oracle.kind != "simulated":
        raise ConfigError(
            "al.oracle.kind: a sweep needs the simulated oracle (a human oracle stops every "
            "trial to wait for labels); run human-labelled experiments with `after-ray run`"
        )


def _pin_relative_paths(config: Config) -> None:
    """Make the config's relative paths absolute, against the driver's working directory.

    Tune starts each trial in its own trial directory (``RAY_CHDIR_TO_TRIAL_DIR``), where a
    relative ``corpus.root: data/synth`` would name a different, empty directory: the trial
    would build (synth) or miss the corpus, miss the probe cache the shared stages filled and
    probe every file again, on Ray Data tasks that cannot start while the trials hold every CPU.
    """
    corpus = config.corpus
    if corpus.name != "merged":
        corpus.root = str(corpus.resolved_root().resolve())
    for part in corpus.parts:
        if part.root:
            part.root = str(Path(part.root).expanduser().resolve())
    from after_ray.models.backbones import is_preset

    local_backbone = Path(config.backbone.name_or_path).expanduser()
    if not is_preset(config.backbone.name_or_path) and local_backbone.is_dir():
        config.backbone.name_or_path = str(local_backbone.resolve())
    storage = config.run.storage_path
    if storage and "://" not in storage:
        config.run.storage_path = str(Path(storage).expanduser().resolve())


def _check_trial_config(config: Config) -> None:
    """What a config alone does not check but a trial would fail on, hours in."""
    from after_ray.al.strategies import get_strategy

    get_strategy(config.al.strategy, **config.al.strategy_params)
    get_strategy(config.al.cold_start, **config.al.cold_start_params)
    _check_oracle(config)


# ----------------------------------------------------------------------------- the trials
@dataclass
class TrialPlan:
    """One grid point: its readable name, its overrides and its full config."""

    name: str
    overrides: dict[str, Any]
    config: Config
    kind: str = "al"

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir


def _short_keys(keys: list[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that no other key ends with."""
    short = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            candidate = ".".join(parts[-n:])
            if not any(o != key and (o == candidate or o.endswith("." + candidate)) for o in keys):
                break
        short[key] = candidate
    return short


def _value_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def trial_names(combinations: list[dict[str, Any]]) -> list[str]:
    """Readable, stable, filesystem-safe names such as ``strategy=after,seed=0``.

    The shortest unambiguous suffix of each key names it; characters other than letters, digits
    and ``. _ , = + -`` become ``_``. A name that would collide with another one after that, or is
    longer than 120 characters, gets a short hash of its overrides.
    """
    if not combinations:
        return []
    short = _short_keys(list(combinations[0]))
    names = []
    for combo in combinations:
        text = ",".join(f"{short[k]}={_value_text(v)}" for k, v in combo.items())
        names.append(_UNSAFE.sub("_", text).strip("._") or "trial")
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    out = []
    for name, combo in zip(names, combinations, strict=True):
        if counts[name] > 1 or len(name) > _NAME_MAX:
            digest = hashlib.sha256(
                json.dumps(combo, sort_keys=True, default=str).encode()
            ).hexdigest()[:8]
            name = f"{name[: _NAME_MAX - 9]}-{digest}"
        out.append(name)
    return out


def _single_node() -> bool:
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive")) <= 1


def resolve_local_training(base: Config, spec: SweepSpec) -> bool:
    if spec.local_training is not None:
        return spec.local_training
    return not base.ray.use_gpu and _single_node()


def plan_trials(
    base: Config, spec: SweepSpec, *, name: str, local_training: bool
) -> list[TrialPlan]:
    """Every trial's config: base + overrides, named runs under ``<output_dir>/<name>``."""
    validate_axes(base, spec.axes)
    combos = spec.combinations()
    sweep_dir = (Path(base.run.output_dir) / name).resolve()
    plans = []
    for trial_name, combo in zip(trial_names(combos), combos, strict=True):
        overrides, kind = spec.arm_overrides(combo)
        if kind == "full_data":
            overrides = {**overrides, **FULL_DATA_OVERRIDES}
        texts = [_override_text(k, v) for k, v in overrides.items()]
        texts += [_override_text("run.name", trial_name),
                  _override_text("run.output_dir", str(sweep_dir))]  # fmt: skip
        if local_training and "ray.num_workers" not in combo:
            texts.append("ray.num_workers=0")
        try:
            config = config_from_dict(apply_overrides(base.to_dict(), texts))
            _pin_relative_paths(config)
            _check_trial_config(config)
        except ConfigError as exc:
            raise ConfigError(f"sweep trial {trial_name!r}: {_problems_text(exc)}") from None
        if config.ray.use_gpu and config.ray.num_workers == 0 and spec.trial_gpus == 0:
            raise ConfigError(
                f"sweep trial {trial_name!r}: ray.use_gpu with ray.num_workers=0 would train in "
                "the trial process, which holds no GPU; set ray.num_workers >= 1 (the trial's "
                "Ray Train workers take the GPUs) or reserve trial_gpus for the trial"
            )
        plans.append(TrialPlan(trial_name, combo, config, kind))
    return plans


# The full-data reference as overrides (runner.full_data_config, without its run-name suffix).
FULL_DATA_OVERRIDES = {
    "al.cold_start": "random",
    "al.budget.unit": "fraction",
    "al.budget.initial": 1.0,
    "al.budget.per_round": 1.0,
    "al.budget.max_total": 1.0,
}


# ------------------------------------------------------------------------------ resources
def trial_cpus(spec: SweepSpec, config: Config) -> float:
    if spec.trial_cpus is not None:
        return float(spec.trial_cpus)
    return float(config.ray.cpus_per_worker) if config.ray.num_workers == 0 else 1.0


def trial_peak(spec: SweepSpec, config: Config) -> tuple[float, float]:
    """(CPUs, GPUs) a trial holds at its peak, its own reservation included.

    Beyond its own process a trial needs, one stage at a time (they never overlap):

    * training: its Ray Train workers (``num_workers x cpus/gpus_per_worker``; none in local
      mode, where the loop runs in the trial process) plus one CPU for the Ray Data decode tasks
      that feed them;
    * scoring: its scoring actors (one CPU, and one GPU with ``use_gpu``, per actor; see
      ``scoring.score_rows``). Ray Data fuses the audio decoding into the actors
      (``ActorPoolMapOperator[MapBatches(decode_batch)->MapBatches(ScoringActor)]``), so
      scoring needs no decode tasks beside them.

    If every running trial has its peak available, none can wait for another: that is the
    invariant :func:`default_max_concurrent` keeps.
    """
    ray_cfg = config.ray
    train_cpus = ray_cfg.num_workers * ray_cfg.cpus_per_worker + 1
    train_gpus = ray_cfg.num_workers * ray_cfg.gpus_per_worker if ray_cfg.use_gpu else 0.0
    score_cpus = float(ray_cfg.scoring_actors)
    score_gpus = float(ray_cfg.scoring_actors) if ray_cfg.use_gpu else 0.0
    cpus = trial_cpus(spec, config) + max(train_cpus, score_cpus)
    gpus = float(spec.trial_gpus) + max(train_gpus, score_gpus)
    return cpus, gpus


def default_max_concurrent(
    plans: list[TrialPlan], spec: SweepSpec, cluster: dict[str, float]
) -> int:
    """How many trials the cluster holds at once without the Tune + Data/Train deadlock.

    ``cluster CPUs // peak CPUs per trial``, and with GPUs also ``cluster GPUs // peak GPUs per
    trial`` (:func:`trial_peak`); at least 1 and at most the number of trials. Tune reserves only
    the trial's own ``trial_cpus``; the rest of its peak is left unreserved on purpose, for the
    actors, workers and tasks the trial starts, which Ray schedules outside the trial's own
    reservation. With the defaults (local training, one scoring actor, one CPU per trial) a trial
    peaks at 2 CPUs: 4 CPUs run 2 trials at once.
    """
    peaks = [trial_peak(spec, plan.config) for plan in plans]
    peak_cpus = max(p[0] for p in peaks)
    peak_gpus = max(p[1] for p in peaks)
    limit = int(cluster.get("CPU", 1.0) // peak_cpus)
    if peak_gpus > 0:
        limit = min(limit, int(cluster.get("GPU", 0.0) // peak_gpus))
    return max(1, min(limit, len(plans)))


# ------------------------------------------------------------------------ the Tune trial
def _round_metrics_path(run_dir: Path, round_index: int) -> Path:
    from after_ray.store.layout import METRICS_FILE, ROUNDS_DIR, round_dir_name

    return run_dir / ROUNDS_DIR / round_dir_name(round_index) / METRICS_FILE


def _tune_row(metrics: dict[str, Any], round_index: int, trial: str, run_dir: Path) -> dict:
    """What Tune shows for a round (numbers only are plotted in TensorBoard)."""
    test = metrics.get("test") or {}
    row = {
        "round": round_index,
        "labeled_fraction": metrics.get("labeled_fraction"),
        "n_labeled": metrics.get("n_labeled"),
        "test_ua": test.get("ua"),
        "test_wa": test.get("wa"),
        "test_macro_f1": test.get("macro_f1"),
        "wall_s": metrics.get("cumulative_wall_s"),
        "trial": trial,
        "run_dir": str(run_dir),
    }
    return {k: v for k, v in row.items() if v is not None}


class SweepTrial(tune.Trainable):
    """One sweep trial: an AL run whose rounds are Tune iterations.

    Why a class trainable and not a function trainable: in a Tune *function* trainable the
    process holds a Tune session, and Ray Train V2 then refuses its own API
    (``ray.train.get_context`` raises "deprecated when running in a function passed to Ray
    Tune", ray#49454) in that process; with ``ray.num_workers=0`` the training loop runs in the
    trial's process (Train local mode), so every fine-tune would fail. A class trainable has no
    such session. Each ``step()`` returns one round; checkpoints record the last round Tune has.
    """

    def setup(
        self,
        config: dict[str, Any],
        trial_configs: dict[str, dict[str, Any]],
        failpoints: dict[str, str] | None = None,
        trial_kinds: dict[str, str] | None = None,
    ) -> None:
        # The trial process does not inherit the driver's environment: the failpoints of a
        # crash test come with the trainable (faults.snapshot() in the driver).
        faults.install(failpoints)
        self.trial = config["trial"]["name"]
        self.al_config = config_from_dict(copy.deepcopy(trial_configs[self.trial]))
        self.kind = (trial_kinds or {}).get(self.trial, "al")
        self.run_dir = self.al_config.run_dir
        self.next_round = 0
        self.last_row: dict[str, Any] = {}
        self.outcome: dict[str, Any] = {}
        self.worker: threading.Thread | None = None

    def _start(self) -> None:
        from after_ray.pipeline.runner import run_active_learning

        def run() -> None:
            try:
                self.outcome["result"] = run_active_learning(self.al_config, kind=self.kind)
            except BaseException as exc:  # noqa: BLE001 - re-raised by step() in Tune's thread
                self.outcome["error"] = exc

        self.worker = threading.Thread(target=run, name=f"al-{self.trial}", daemon=True)
        self.worker.start()

    def _check_ended(self) -> None:
        """Raise the AL run's error, or RunStateError when it stopped without finishing."""
        if "error" in self.outcome:
            raise self.outcome["error"]
        result = self.outcome["result"]
        if not result.finished:
            raise RunStateError(
                f"sweep trial {self.trial!r}: the run in {self.run_dir} stopped before its last "
                f"round (waiting for labels of round {result.waiting_for_labels})"
            )

    def step(self) -> dict[str, Any]:
        """Wait for the next round's metrics.json (written atomically by the runner) or the end
        of the run. The run is done when its thread has ended and no round is left unreported;
        the last round is marked done at once when the thread ends within FINAL_GRACE_S of it."""
        if self.worker is None:
            self._start()
        assert self.worker is not None
        while True:
            ended = not self.worker.is_alive()  # read first, so a last round is never missed
            path = _round_metrics_path(self.run_dir, self.next_round)
            if path.is_file():
                row = _tune_row(json.loads(path.read_text()), self.next_round, self.trial,
                                self.run_dir)  # fmt: skip
                self.next_round += 1
                if not ended:
                    self.worker.join(timeout=FINAL_GRACE_S)
                    ended = not self.worker.is_alive()
                last = ended and not _round_metrics_path(self.run_dir, self.next_round).is_file()
                if last and "error" not in self.outcome and self.outcome["result"].finished:
                    row[DONE] = True  # (after an error the next step raises it)
                self.last_row = row
                return row
            if ended:
                self._check_ended()
                # Every round was reported before (a restored trial of a finished run, or a
                # last round whose thread ended late): repeat the last row to end the trial.
                return {**self.last_row, DONE: True}
            self.worker.join(timeout=POLL_SECONDS)

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        state = {"next_round": self.next_round, "last_row": self.last_row}
        (Path(checkpoint_dir) / "reported.json").write_text(json.dumps(state))

    def load_checkpoint(self, checkpoint: str) -> None:
        state = json.loads((Path(checkpoint) / "reported.json").read_text())
        self.next_round = int(state["next_round"])
        self.last_row = dict(state.get("last_row") or {})


def trial_name_of(trial) -> str:
    """Tune trial name / directory name: the readable trial name."""
    return str(trial.config["trial"]["name"])


# ------------------------------------------------------------------------------ the driver
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


def _check_name(name: str) -> None:
    if not name or _UNSAFE.search(name) or name in {".", ".."} or name.startswith("_"):
        raise ConfigError(
            f"sweep name {name!r}: use letters, digits, '.', '-', '_' (not starting with '_'); "
            "it names the directory <run.output_dir>/<name>"
        )


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
        path = _round_metrics_path(run_dir, round_index)
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
    from ray.tune.logger import TBXLoggerCallback

    from after_ray.distributed.session import ensure_ray
    from after_ray.report.render import write_report

    _check_name(name)
    spec.check_resources()
    # Every config problem is reported before Ray starts (plan_trials runs again once the
    # cluster is known, to decide where training runs).
    plan_trials(base_config, spec, name=name, local_training=bool(spec.local_training))
    ensure_ray(base_config.ray)
    local = resolve_local_training(base_config, spec)
    plans = plan_trials(base_config, spec, name=name, local_training=local)
    sweep_dir = (Path(base_config.run.output_dir) / name).resolve()
    storage = storage_path or str(sweep_dir / TUNE_DIR)
    experiment_path = f"{storage.rstrip('/')}/{name}"
    can_restore = tune.Tuner.can_restore(experiment_path)
    if can_restore and not resume:
        raise RunStateError(
            f"sweep {name!r} already exists in {experiment_path}: resume it (drop --no-resume), "
            "or give the new sweep another --name"
        )
    sweep_dir.mkdir(parents=True, exist_ok=True)
    _record_or_check_sweep(sweep_dir, name, plans, resume)
    _link_tapt_cache(base_config, sweep_dir)

    cluster = ray.cluster_resources()
    max_concurrent = spec.max_concurrent_trials or default_max_concurrent(plans, spec, cluster)
    cpus = max(trial_cpus(spec, p.config) for p in plans)
    resources = {"cpu": cpus, "gpu": float(spec.trial_gpus)}
    print(
        f"sweep {name}: {len(plans)} trials, at most {max_concurrent} at once "
        f"({cpus:g} CPU{'' if cpus == 1 else 's'} each, "
        f"{'training in the trial process' if local else 'Ray Train workers per trial'}); "
        f"Tune experiment: {experiment_path}",
        flush=True,
    )
    run_shared_stages(plans)

    trial_configs = {p.name: p.config.to_dict() for p in plans}
    trainable = tune.with_resources(
        tune.with_parameters(
            SweepTrial,
            trial_configs=trial_configs,
            failpoints=faults.snapshot(),
            trial_kinds={p.name: p.kind for p in plans},
        ),
        resources,
    )
    if can_restore:
        print(f"sweep {name}: restoring the interrupted Tune experiment", flush=True)
        tuner = tune.Tuner.restore(
            experiment_path, trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        grid = [{"name": p.name, "overrides": p.overrides} for p in plans]
        tuner = tune.Tuner(
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
    with _one_line_trial_errors():
        results = tuner.fit()

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
    report_path = None
    reportable = [p.run_dir for p in plans if (p.run_dir / RUN_INFO_FILE).is_file()]
    if reportable:
        report_path = write_report(
            reportable,
            sweep_dir / REPORT_DIR,
            title=f"Sweep {name}: {_axes_text(spec)}",
            failed_trials=_failed_trials(trials),
            trial_retries=MAX_TRIAL_FAILURES,
        )
    return SweepResult(
        name=name,
        sweep_dir=sweep_dir,
        experiment_path=experiment_path,
        report_path=report_path,
        trials=trials,
        max_concurrent_trials=max_concurrent,
        restored=can_restore,
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
        text = _problems_text(error)
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


def sweep_spec_from_cli(
    spec_path: str | None,
    axes: list[str],
    *,
    max_concurrent_trials: int | None = None,
    trial_cpus: float | None = None,
    trial_gpus: float | None = None,
) -> SweepSpec:
    """A spec from an optional YAML file plus ``--axis`` options (an axis given on the command
    line replaces the file's axis of the same key) and resource options (which win)."""
    spec = load_sweep_spec(spec_path) if spec_path else SweepSpec()
    spec.axes.update(parse_axes(axes))
    if max_concurrent_trials is not None:
        spec.max_concurrent_trials = max_concurrent_trials
    if trial_cpus is not None:
        spec.trial_cpus = trial_cpus
    if trial_gpus is not None:
        spec.trial_gpus = trial_gpus
    spec.check_resources("sweep options")
    return spec


def default_sweep_name(spec: SweepSpec) -> str:
    """``sweep-<axis short names>``: stable for a given set of axes."""
    short = _short_keys(list(spec.axes))
    return _UNSAFE.sub("_", "sweep-" + "-".join(short[k] for k in spec.axes))


__all__ = [
    "SweepResult",
    "SweepSpec",
    "TrialOutcome",
    "TrialPlan",
    "default_max_concurrent",
    "default_sweep_name",
    "load_sweep_spec",
    "parse_axes",
    "plan_trials",
    "run_sweep",
    "sweep_spec_from_cli",
    "SweepTrial",
    "trial_names",
    "validate_axes",
]
