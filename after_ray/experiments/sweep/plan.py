"""The plan of a sweep: :class:`SweepSpec` (axes, arms, resources), axis parsing and checks, and
:func:`plan_trials`, every trial's name, overrides and full config (its run directory is
``<run.output_dir>/<sweep name>/<trial name>``, see :func:`trial_names`). Nothing here needs Ray.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from after_ray.config.overrides import parse_yaml_value, read_yaml_file, split_dotted
from after_ray.config.sections import Config, apply_overrides, config_from_dict
from after_ray.errors import ConfigError

# Axes averaged over in the report (all other axes tell report groups apart).
SEED_AXES = ("run.seed",)
# Keys a sweep sets itself for every trial.
RESERVED_AXES = ("run.name", "run.output_dir")
SPEC_KEYS = (
    "axes", "max_concurrent_trials", "trial_cpus", "trial_gpus", "local_training", "arms",
)  # fmt: skip
# The pseudo-axis that names an arm (a bundle of overrides, see SweepSpec.arms).
ARM_AXIS = "arm"
# In an arm's overrides: the kind of run the trial is ("al", or "full_data" for the reference).
ARM_KIND_KEY = "kind"
RUN_KINDS = ("al", "full_data")
_NAME_MAX = 120
_UNSAFE = re.compile(r"[^A-Za-z0-9._,=+-]+")


# ----------------------------------------------------------------------------- the spec
@dataclass
class SweepSpec:
    """What to sweep and how much of the cluster a trial takes.

    ``axes``: dotted config key -> values; the sweep is the grid of all combinations, in the
    order given (the last axis varies fastest). ``run.seed`` is the seed axis: the report averages
    over it, and every other axis separates report groups.

    ``max_concurrent_trials``: None = :func:`.resources.default_max_concurrent` (what the cluster
    holds without the Tune + Data/Train deadlock).

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
        key, raw = split_dotted(
            text,
            where=f"sweep axis {text!r}",
            expected="expected KEY=V1,V2,... with a dotted config key, e.g. al.strategy=after,random",
            bad_key="{key!r} is not a dotted key like al.strategy",
        )
        raw = raw.strip()
        if key in axes:
            raise ConfigError(f"sweep axis {key!r} is given twice; list all its values in one")
        values = []
        for piece in _split_top_level(raw):
            if not piece.strip():
                raise ConfigError(
                    f"sweep axis {key!r}: empty value in {raw!r} (values are comma-separated)"
                )
            values.append(
                parse_yaml_value(piece, where=f"sweep axis {key!r}", what=f"value {piece!r}")
            )
        axes[key] = _as_values(key, values)
    return axes


def load_sweep_spec(path: str | Path) -> SweepSpec:
    """A sweep spec from YAML: ``axes: {al.strategy: [after, random], run.seed: [0, 1]}`` plus
    optional ``max_concurrent_trials``, ``trial_cpus``, ``trial_gpus``, ``local_training``."""
    data = read_yaml_file(path, what="sweep spec", how_to_pass="--spec path/to/sweep.yaml")
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
                    f"{problems_text(exc).removeprefix(f'{key}: ')}"
                ) from None


def problems_text(exc: ConfigError) -> str:
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
            raise ConfigError(f"sweep trial {trial_name!r}: {problems_text(exc)}") from None
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


def check_sweep_name(name: str) -> None:
    if not name or _UNSAFE.search(name) or name in {".", ".."} or name.startswith("_"):
        raise ConfigError(
            f"sweep name {name!r}: use letters, digits, '.', '-', '_' (not starting with '_'); "
            "it names the directory <run.output_dir>/<name>"
        )


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
