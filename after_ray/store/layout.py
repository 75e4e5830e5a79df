"""Every name inside a run directory, in one place.

A run directory (``run.output_dir/run.name``) holds::

    run.lock            the writer's lock (``RunState``)
    config.yaml         the resolved configuration of the run
    run_info.json       what the run is (kind, strategy, seed, sweep cell), for reports
    state.json          stages done, their info and timings, round status (``RunState``)
    labels.jsonl        every label bought, appended (the only appended file)
    manifest.parquet    the prepared corpus (``prepare``) and its quarantine table
    quarantine.parquet
    embed_model/        the model the cold start embeds with
    scores/             the scoring cache (``store.score_cache``)
    labeling/           batches exported for human annotators
    ray/                Ray Train / Tune storage when ``run.storage_path`` is not set
    rounds/round_NNN/   per round: selection.parquet, metrics.json, model/

The names are part of the on-disk contract: an old run directory must still resume, so they
never change; code builds paths with the helpers here instead of spelling a name again.
"""

from __future__ import annotations

import re
from pathlib import Path

LOCK_FILE = "run.lock"
CONFIG_FILE = "config.yaml"
RUN_INFO_FILE = "run_info.json"
STATE_FILE = "state.json"
LABELS_FILE = "labels.jsonl"
MANIFEST_FILE = "manifest.parquet"
QUARANTINE_FILE = "quarantine.parquet"
EMBED_MODEL_DIR = "embed_model"
SCORES_DIR = "scores"
LABELING_DIR = "labeling"
RAY_STORAGE_DIR = "ray"
ROUNDS_DIR = "rounds"
SELECTION_FILE = "selection.parquet"
METRICS_FILE = "metrics.json"
ROUND_MODEL_DIR = "model"
ROUND_DIR_NAME = re.compile(r"^round_(\d{3,})$")


def round_dir_name(round_index: int) -> str:
    return f"round_{round_index:03d}"


def round_dir(run_dir: str | Path, round_index: int) -> Path:
    return Path(run_dir) / ROUNDS_DIR / round_dir_name(round_index)


def round_model_dir(run_dir: str | Path, round_index: int) -> Path:
    """Where round ``round_index``'s fine-tuned classifier is saved."""
    return round_dir(run_dir, round_index) / ROUND_MODEL_DIR


def round_metrics_path(run_dir: str | Path, round_index: int) -> Path:
    return round_dir(run_dir, round_index) / METRICS_FILE


def selection_path(run_dir: str | Path, round_index: int) -> Path:
    return round_dir(run_dir, round_index) / SELECTION_FILE


def manifest_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / MANIFEST_FILE
