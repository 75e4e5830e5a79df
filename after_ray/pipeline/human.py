"""The human oracle from the command line: `after-ray label export|import RUN_DIR`.

A run configured with ``al.oracle.kind: human`` stops after each selection and writes the batch
for annotators; `label import` validates the answers (nothing is written when any row is wrong)
and appends them to the run's labels; `after-ray run` then continues.
"""

from __future__ import annotations

from pathlib import Path

from after_ray.config.sections import load_config
from after_ray.data import manifest
from after_ray.errors import RunStateError
from after_ray.pipeline.labeling import export_batch, import_labels
from after_ray.store import layout
from after_ray.store.run_state import RunState


def _waiting_round(state: RunState, round_index: int | None) -> int:
    if round_index is not None:
        return round_index
    for r in reversed(state.rounds()):
        if state.pending_ids(r):
            return r
    raise RunStateError(
        f"no round of {state.run_dir} is waiting for labels; pass --round to choose one"
    )


def _context(run_dir: Path):
    config = load_config(run_dir / layout.CONFIG_FILE)
    table = manifest.read_manifest(layout.manifest_path(run_dir))
    return config, table, manifest.class_names_of(table, config.corpus.classes)


def export_pending(run_dir: Path, *, round_index: int | None = None) -> tuple[Path, Path]:
    config, table, class_names = _context(run_dir)
    rows = {r["utt_id"]: r for r in table.to_pylist()}
    with RunState.open(run_dir, create=False) as state:
        r = _waiting_round(state, round_index)
        pending = [rows[u] for u in state.pending_ids(r)]
        return export_batch(state, r, pending, class_names, run_dir / layout.LABELING_DIR)


def import_answers(run_dir: Path, file: Path, *, round_index: int | None = None) -> list[dict]:
    config, table, class_names = _context(run_dir)
    root = config.corpus.root if config.corpus.name != "merged" else None
    with RunState.open(run_dir, create=False) as state:
        r = _waiting_round(state, round_index)
        return import_labels(
            state, r, file, class_names, expected_ids=state.selection(r), corpus_root=root
        )
