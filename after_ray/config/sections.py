"""The one typed configuration that drives every stage: corpus, audio, backbone, TAPT, fine-tuning,
active learning, Ray resources and where the run is written.

Load it with ``load_config(path, overrides)``: YAML first, then dotted command-line overrides such
as ``al.budget.max_fraction=0.2`` (the value is parsed as YAML, so ``true``, ``3`` and ``[a, b]``
work). Unknown keys, wrong types and impossible values raise ``ConfigError`` naming every bad key
and how to fix it; the CLI prints that and exits with code 2.

Stage-specific sections are defined next to the code that uses them (``AudioConfig`` in
``audio.py``, ``BackboneConfig``/``TaptConfig`` in ``models/settings.py``, ``FinetuneConfig`` in
``training/finetune_settings.py``); none of those modules imports torch or Ray, so reading a config
stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from after_ray.config import schema as config_schema
from after_ray.config.audio import AudioConfig
from after_ray.config.backbone import BackboneConfig, TaptConfig
from after_ray.config.finetune import FinetuneConfig
from after_ray.config.overrides import parse_yaml_value, read_yaml_file, split_dotted
from after_ray.errors import ConfigError

# Neutral-heavy, angry/sad rare: the shape of natural SER corpora (IEMOCAP's improvised sessions,
# MSP-Podcast), where a class-balanced pool would make random sampling look better than it is.
NATURAL_CLASS_PRIORS: dict[str, float] = {
    "neutral": 0.45,
    "happy": 0.25,
    "angry": 0.15,
    "sad": 0.15,
}

CORPUS_NAMES = (
    "synth",
    "iemocap",
    "savee",
    "ravdess",
    "cremad",
    "emodb",
    "msp_podcast",
    "csv",
    "folders",
    "merged",
)


@dataclass
class RunSection:
    """Where and under which name a run is written, and its seed."""

    name: str = "demo"
    # The run directory is <output_dir>/<name>; every stage reads and writes there.
    output_dir: str = "runs"
    seed: int = 0
    # Ray Train/Tune storage (checkpoints, trial state). None = <run dir>/ray. On a multi-node
    # cluster this must be shared storage (s3://..., gs://..., or an NFS path).
    storage_path: str | None = None

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def validate(self) -> list[str]:
        problems = []
        if not self.name or "/" in self.name or self.name in {".", ".."}:
            problems.append(
                f"run.name: {self.name!r} is not a usable directory name "
                "(use letters, digits, '-' and '_')"
            )
        return problems


@dataclass
class SplitConfig:
    """Speaker-independent evaluation splits, deterministic from the seed.

    ``speaker``: shuffle the speakers with the seed and hold out ``test_fraction`` of them for
    test and ``val_fraction`` for validation (rounded, at least one speaker each).
    ``loso``: leave one session out: the ``test_session`` is the test set; validation speakers
    are drawn from the other sessions. ``predefined``: use the corpus's own ``split`` column
    (MSP-Podcast); rows without one go to train.
    """

    method: Literal["speaker", "loso", "predefined"] = "speaker"
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    test_session: str | None = None
    seed: int = 0

    def validate(self) -> list[str]:
        problems = []
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                problems.append(f"corpus.split.{name}: must be between 0 and 1, got {value}")
        if self.val_fraction + self.test_fraction >= 1.0:
            problems.append(
                "corpus.split: val_fraction + test_fraction must leave speakers for training "
                f"(got {self.val_fraction} + {self.test_fraction})"
            )
        if self.method == "loso" and not self.test_session:
            problems.append(
                "corpus.split.test_session: required when method is 'loso' (e.g. Session2)"
            )
        return problems


@dataclass
class SynthConfig:
    """Size and difficulty of the synthesized demo corpus (see corpora/synth.py)."""

    n_speakers: int = 24
    utterances_per_emotion: int = 10
    separation: float = 1.3
    snr_db_min: float = 5.0
    snr_db_max: float = 30.0
    seed: int = 0
    # Natural-corpus shape by default; {} = balanced, with utterances_per_emotion files of every
    # emotion per speaker.
    class_priors: dict[str, float] = field(default_factory=lambda: dict(NATURAL_CLASS_PRIORS))
    utterances_per_speaker: int = 40  # with class_priors; split over the emotions by the priors
    duplicate_fraction: float = 0.10  # near-duplicate re-readings of a file in the pool
    low_quality_fraction: float = 0.10  # SNR -5..5 dB, half of them telephone-band

    def validate(self) -> list[str]:
        problems = []
        if self.n_speakers < 3:
            problems.append(
                f"corpus.synth.n_speakers: need at least 3 (train/val/test), got {self.n_speakers}"
            )
        if self.utterances_per_emotion < 1:
            problems.append("corpus.synth.utterances_per_emotion: must be at least 1")
        if self.separation <= 0:
            problems.append("corpus.synth.separation: must be positive")
        if self.snr_db_min > self.snr_db_max:
            problems.append("corpus.synth: snr_db_min must not exceed snr_db_max")
        for name in ("duplicate_fraction", "low_quality_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"corpus.synth.{name}: must be between 0 and 1")
        if self.class_priors and self.utterances_per_speaker < len(self.class_priors):
            problems.append(
                "corpus.synth.utterances_per_speaker: must be at least the number of emotions"
            )
        return problems


@dataclass
class CorpusPart:
    """One corpus of a merged set (``corpus.name: merged``)."""

    name: str = ""
    root: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    label_map: str | dict[str, str | None] | None = "four_class"


@dataclass
class CorpusConfig:
    """Which corpus, where it is on disk, how labels map to classes and how it is split."""

    name: str = "synth"
    # Corpus root directory. For synth: where the demo corpus is built (default data/synth).
    root: str | None = None
    # Loader options, e.g. {include_song: false} for RAVDESS.
    options: dict[str, Any] = field(default_factory=dict)
    # A preset name ("four_class") or an explicit {source_label: class or null} mapping.
    label_map: str | dict[str, str | None] | None = None
    # Class order (the classifier's output order). None = sorted labels found in the corpus.
    classes: list[str] | None = None
    parts: list[CorpusPart] = field(default_factory=list)
    split: SplitConfig = field(default_factory=SplitConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)

    def resolved_root(self) -> Path:
        if self.root:
            return Path(self.root).expanduser()
        if self.name == "synth":
            return Path("data") / "synth"
        raise ConfigError(f"corpus.root: required for corpus '{self.name}'")

    def validate(self) -> list[str]:
        problems = []
        if self.name not in CORPUS_NAMES:
            problems.append(
                f"corpus.name: unknown corpus {self.name!r}; choose one of {', '.join(CORPUS_NAMES)}"
            )
        elif self.name == "merged":
            if not self.parts:
                problems.append("corpus.parts: a merged corpus needs at least one part")
            for i, part in enumerate(self.parts):
                if part.name not in CORPUS_NAMES or part.name in {"merged", "synth"}:
                    problems.append(f"corpus.parts[{i}].name: unknown corpus {part.name!r}")
                if not part.root or not Path(part.root).expanduser().exists():
                    problems.append(
                        f"corpus.parts[{i}].root: directory {part.root!r} does not exist "
                        "(point it at the corpus on disk)"
                    )
        elif self.name != "synth":
            if not self.root:
                problems.append(
                    f"corpus.root: required for corpus '{self.name}' "
                    "(the directory where the corpus is on disk)"
                )
            elif not Path(self.root).expanduser().exists():
                problems.append(
                    f"corpus.root: directory {self.root!r} does not exist "
                    f"(point it at the {self.name} corpus on disk)"
                )
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            problems.append("corpus.classes: contains duplicates")
        if self.classes is not None and len(self.classes) < 2:
            problems.append("corpus.classes: need at least two classes")
        return problems


@dataclass
class BudgetConfig:
    """How many labels are bought: at the cold start, per round, and in total.

    ``unit`` says what the numbers mean: ``fraction`` of the training pool, a ``count`` of
    utterances, or annotator-``seconds`` (audio duration x votes per item). The default is the
    paper's schedule shape: 10% to start (5% is near chance for the tiny model), 5% steps, stop at 20%.
    """

    unit: Literal["fraction", "count", "seconds"] = "fraction"
    initial: float = 0.10
    per_round: float = 0.05
    max_total: float = 0.20

    def validate(self) -> list[str]:
        problems = []
        for name in ("initial", "per_round", "max_total"):
            value = getattr(self, name)
            if value <= 0:
                problems.append(f"al.budget.{name}: must be positive, got {value}")
            if self.unit == "fraction" and value > 1:
                problems.append(
                    f"al.budget.{name}: a fraction of the pool must be at most 1, got {value}"
                )
            if self.unit == "count" and float(value) != int(value):
                problems.append(f"al.budget.{name}: a count must be a whole number, got {value}")
        if self.initial > self.max_total:
            problems.append(
                f"al.budget.initial ({self.initial}) exceeds al.budget.max_total ({self.max_total})"
            )
        return problems


@dataclass
class OracleConfig:
    """Where labels come from: simulated from the manifest, or people via label export/import."""

    kind: Literal["simulated", "human"] = "simulated"
    # Simulated annotators per item, drawn from the item's vote distribution (None = use the
    # manifest's hard label).
    votes_per_item: int | None = None
    # Probability that a simulated annotator answers a uniformly random other class.
    label_noise: float = 0.0
    seed: int = 0

    def validate(self) -> list[str]:
        problems = []
        if not 0.0 <= self.label_noise < 1.0:
            problems.append(f"al.oracle.label_noise: must be in [0, 1), got {self.label_noise}")
        if self.votes_per_item is not None and self.votes_per_item < 1:
            problems.append("al.oracle.votes_per_item: must be at least 1 (or null)")
        return problems


@dataclass
class ALConfig:
    """The active-learning loop: cold start, selection strategy, budget and oracle."""

    # "after": margin pre-filter, then k-center on speaker-normalised embeddings (issue 13).
    strategy: str = "after"
    strategy_params: dict[str, Any] = field(default_factory=dict)
    # Random labels to start. Every clustering cold start measured lost to it on the demo corpus
    # at 10% of the pool (`after-ray bench al`, 5 seeds, README): coreset by 1.4 AULC points
    # (k-center draws low-SNR outliers), after_init clusters voices (30 of 68 picks neutral),
    # typiclust ties. "coreset", "after_init", "typiclust" and "alps" stay selectable.
    cold_start: str = "random"
    cold_start_params: dict[str, Any] = field(default_factory=dict)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    oracle: OracleConfig = field(default_factory=OracleConfig)
    # Monte-Carlo dropout samples per utterance when scoring (BALD needs them).
    mc_dropout_samples: int = 10

    def validate(self) -> list[str]:
        # Imported here: the strategy registry is the one list of names; it is numpy-only, so
        # loading a config still imports no torch, Ray or audio stack.
        from after_ray.al.strategies import strategy_params

        problems = []
        if self.mc_dropout_samples < 0:
            problems.append("al.mc_dropout_samples: must be >= 0")
        # Names are checked at load, so a typo fails `after-ray run` before TAPT and a whole
        # round. Parameters are checked with the name they go with when a run or a sweep trial
        # starts: a sweep may set al.strategy and al.strategy_params on two axes.
        for key, name in (("al.strategy", self.strategy), ("al.cold_start", self.cold_start)):
            try:
                strategy_params(name)
            except ConfigError as exc:
                problems.append(f"{key}: {exc}")
        return problems


@dataclass
class RayConfig:
    """Ray resources. The defaults run on one laptop; a cluster config raises workers and GPUs."""

    # None: start a local Ray (or join the cluster a `ray job submit` job runs in).
    address: str | None = None
    # Ray Train workers for TAPT and fine-tuning (0 = run the loop in the driver process).
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    gpus_per_worker: float = 1.0
    # Actors scoring the pool (Ray Data map_batches actor pool).
    scoring_actors: int = 1
    scoring_batch_size: int = 16
    # With ray.num_workers 0 (training in the driver), sets of at most this many utterances are
    # scored in the driver with the same actor code instead of a Ray Data actor pool, whose
    # start-up (~10-20 s on 2 cores) was most of a demo round's scoring time. 0 = never.
    in_process_scoring_max_rows: int = 2000
    # Restarts of a Train worker group after a worker failure.
    max_failures: int = 1
    # A Train worker whose share of the audio is below this is decoded once and kept in memory
    # (per-epoch crops cut in process); above it, each epoch streams through Ray Data.
    in_memory_audio_max_hours: float = 2.0
    # Local Ray only: object store size (MiB). None = Ray's default (30% of RAM).
    object_store_memory_mb: int | None = None
    num_cpus: int | None = None

    def validate(self) -> list[str]:
        problems = []
        if self.num_workers < 0:
            problems.append("ray.num_workers: must be >= 0 (0 runs the loop in the driver)")
        if self.cpus_per_worker < 1:
            problems.append("ray.cpus_per_worker: must be >= 1")
        if self.scoring_actors < 1:
            problems.append("ray.scoring_actors: must be >= 1")
        if self.scoring_batch_size < 1:
            problems.append("ray.scoring_batch_size: must be >= 1")
        if self.in_process_scoring_max_rows < 0:
            problems.append("ray.in_process_scoring_max_rows: must be >= 0 (0 = never)")
        if self.max_failures < 0:
            problems.append("ray.max_failures: must be >= 0")
        return problems


@dataclass
class Config:
    """The whole pipeline's configuration."""

    run: RunSection = field(default_factory=RunSection)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    tapt: TaptConfig = field(default_factory=TaptConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    al: ALConfig = field(default_factory=ALConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    @property
    def run_dir(self) -> Path:
        return self.run.run_dir

    def to_dict(self) -> dict[str, Any]:
        return config_schema.to_dict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"al.budget.max_total=0.2"`` -> (["al", "budget", "max_total"], 0.2)."""
    where = f"override {text!r}"
    key, raw = split_dotted(
        text,
        where=where,
        expected="expected KEY=VALUE with a dotted key, e.g. al.budget.max_total=0.2",
        bad_key="the key {key!r} is not a dotted path like a.b.c",
    )
    return key.split("."), parse_yaml_value(raw, where=where)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(path[: i + 1])
                raise ConfigError(f"override {text!r}: {where} is a value, not a section with keys")
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    data = read_yaml_file(path, what="config file", how_to_pass="--config path/to/file.yaml")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(Path(path))!r}: the top level must be a mapping of sections "
            f"(run, corpus, audio, ...), got {type(data).__name__}"
        )
    return data


def config_from_dict(data: dict[str, Any]) -> Config:
    """The user's mapping -> Config; the backbone's training recipe fills the keys not set."""
    from after_ray.config.recipes import apply_recipe

    if isinstance(data, dict):
        data = apply_recipe(data)
    return config_schema.build(Config, data)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """YAML file (or the built-in defaults when ``path`` is None) + dotted overrides -> Config."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides or []))
    return config_from_dict(data)
