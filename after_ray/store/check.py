"""``after-ray check``: every inconsistency of a run directory, each with how to fix it.

Read-only and lock-free, so it can inspect a run that another process is using; in that case
a temp file or an unterminated last label line may be a write in progress and is not reported.
Each ``_check_*`` function looks at one file or one relation between files.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from after_ray.errors import RunStateError
from after_ray.store.atomic import staged_leftovers
from after_ray.store.layout import (
    LABELS_FILE,
    LOCK_FILE,
    MANIFEST_FILE,
    STATE_FILE,
    round_metrics_path,
    selection_path,
)
from after_ray.store.run_state import (
    label_identity,
    list_rounds,
    read_json_file,
    read_labels_file,
    read_selection,
    read_state_json,
    temp_files,
)

logger = logging.getLogger(__name__)

# state.json stage-info keys whose string values name files or directories; the check verifies
# that they exist (relative values are relative to the run directory; URIs are not checked).
_PATH_KEY = re.compile(r"^(path|checkpoint|.*_(path|dir|file|checkpoint))$")

# utt_id -> (line number, entry) of its first label line.
FirstLabels = dict[str, tuple[int, dict[str, Any]]]


def check_run_dir(run_dir: str | Path) -> list[str]:
    """Every inconsistency of a run directory, each with how to fix it; [] when clean."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return [f"{run_dir}: no such directory. Fix: check the path"]
    problems: list[str] = []
    in_use = _lock_is_held(run_dir)
    if in_use:
        logger.info("%s is in use by a running process; skipping in-flight write checks", run_dir)
    _check_state_file(run_dir, problems)
    if not in_use:
        _check_leftovers(run_dir, problems)
    first_seen = _check_labels(run_dir, in_use, problems)
    _check_labels_in_manifest(run_dir, first_seen, problems)
    selections = _check_rounds(run_dir, problems)
    _check_selections_against_labels(run_dir, selections, first_seen, problems)
    return problems


def _check_state_file(run_dir: Path, problems: list[str]) -> None:
    """state.json is readable, and every local file it points at exists."""
    state_path = run_dir / STATE_FILE
    if not state_path.exists():
        problems.append(
            f"{state_path}: missing. Fix: this is not a run directory, or the run never "
            "started; start or resume the run on it"
        )
        return
    try:
        state = read_state_json(state_path)
    except RunStateError as exc:
        problems.append(f"{state_path}: {exc}")
        return
    for where, ref in _referenced_paths(state):
        target = Path(ref.removeprefix("file://"))
        if not target.is_absolute():
            target = run_dir / target
        if not target.exists():
            problems.append(
                f"{state_path}: the {where} points at {ref!r}, which does not exist. Fix: "
                "restore it, or re-run that stage/round (a later run re-creates it)"
            )


def _check_leftovers(run_dir: Path, problems: list[str]) -> None:
    """What interrupted atomic writes and directory swaps left behind."""
    for path in temp_files(run_dir):
        problems.append(
            f"{path}: temporary file left by an interrupted write (the file it was meant to "
            "replace is intact). Fix: delete it, or resume the run, which removes it"
        )
    for path in staged_leftovers(run_dir):
        problems.append(
            f"{path}: directory left by an interrupted directory swap. Fix: resume the run, "
            "which puts a moved-aside previous version back and deletes the rest"
        )


def _check_labels(run_dir: Path, in_use: bool, problems: list[str]) -> FirstLabels:
    """labels.jsonl: torn or malformed lines, and utterances labeled twice."""
    labels_path = run_dir / LABELS_FILE
    parsed = read_labels_file(labels_path)
    if parsed.torn_offset is not None and not in_use:
        problems.append(
            f"{labels_path} line {parsed.torn_line}: torn by a crash mid-append "
            f"({parsed.torn_preview!r}). Fix: resume the run, which truncates it and acquires "
            "that label again"
        )
    for number, reason in parsed.bad_lines:
        problems.append(
            f"{labels_path} line {number}: {reason}. Fix: correct or delete the line by hand"
        )
    first_seen: FirstLabels = {}
    for number, entry in parsed.entries:
        utt_id = entry["utt_id"]
        if utt_id not in first_seen:
            first_seen[utt_id] = (number, entry)
            continue
        first_number, first = first_seen[utt_id]
        kind = (
            "an identical duplicate"
            if label_identity(first) == label_identity(entry)
            else f"a conflicting label ({entry['label']!r} vs {first['label']!r})"
        )
        problems.append(
            f"{labels_path} line {number}: {utt_id!r} is labeled again, {kind} of line "
            f"{first_number}. Fix: delete the wrong line"
        )
    return first_seen


def _check_labels_in_manifest(run_dir: Path, first_seen: FirstLabels, problems: list[str]) -> None:
    """Every labeled utterance is in the manifest (when there is one)."""
    manifest_path = run_dir / MANIFEST_FILE
    if not manifest_path.exists():
        return
    try:
        manifest_ids = set(pq.read_table(manifest_path, columns=["utt_id"])["utt_id"].to_pylist())
    except (OSError, pa.ArrowException, KeyError) as exc:
        problems.append(f"{manifest_path}: cannot be read ({exc}). Fix: re-run `after-ray prepare`")
        return
    labels_path = run_dir / LABELS_FILE
    for utt_id, (number, _entry) in first_seen.items():
        if utt_id not in manifest_ids:
            problems.append(
                f"{labels_path} line {number}: {utt_id!r} is not in {manifest_path}. "
                "Fix: the manifest was rebuilt with different ids; rebuild it from the "
                "same corpus and config, or delete the line"
            )


def _check_rounds(run_dir: Path, problems: list[str]) -> dict[int, list[str]]:
    """Each round's selection and metrics are readable, with no utt_id picked twice; returns
    the selections read."""
    selections: dict[int, list[str]] = {}
    for r in list_rounds(run_dir):
        try:
            ids = read_selection(run_dir, r)
        except RunStateError as exc:
            problems.append(str(exc))
            continue
        if ids is not None:
            selections[r] = ids
            dupes = [u for u, n in Counter(ids).items() if n > 1]
            if dupes:
                problems.append(
                    f"{selection_path(run_dir, r)}: repeats utt_ids {dupes[:5]}. Fix: remove "
                    "the round directory and re-run the round"
                )
        try:
            read_json_file(round_metrics_path(run_dir, r))
        except RunStateError as exc:
            problems.append(str(exc))
    return selections


def _check_selections_against_labels(
    run_dir: Path,
    selections: dict[int, list[str]],
    first_seen: FirstLabels,
    problems: list[str],
) -> None:
    """No round selects an item labeled before it; every label is in its round's selection."""
    labeled_in = {u: e["round"] for u, (_n, e) in first_seen.items()}
    for r, ids in sorted(selections.items()):
        earlier = [u for u in ids if labeled_in.get(u, r) < r]
        if earlier:
            problems.append(
                f"{selection_path(run_dir, r)}: {len(earlier)} selected items were already "
                f"labeled in an earlier round, e.g. {earlier[:5]}. Fix: the strategy must "
                "exclude labeled items; remove this round's directory and re-run the round"
            )
    labels_path = run_dir / LABELS_FILE
    selection_sets = {r: set(ids) for r, ids in selections.items()}
    for utt_id, (number, entry) in first_seen.items():
        if utt_id not in selection_sets.get(entry["round"], set()):
            problems.append(
                f"{labels_path} line {number}: {utt_id!r} is labeled in round {entry['round']} "
                "but that round's selection does not contain it. Fix: the selection file was "
                "removed or replaced; restore it, or delete the label line"
            )


def _lock_is_held(run_dir: Path) -> bool:
    lock_path = run_dir / LOCK_FILE
    if not lock_path.exists():
        return False
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:
        return False
    try:
        # A shared probe: it fails only while someone holds the exclusive run lock.
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _referenced_paths(state: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(where in state.json, path) for every local file state.json points at."""
    refs = []
    for round_key, ref in sorted(state.get("checkpoints", {}).items()):
        refs.append((f"checkpoint of round {round_key}", ref))
    for stage, info in state.get("stages", {}).items():
        for key, value in (info or {}).items():
            if isinstance(value, str) and _PATH_KEY.match(key):
                refs.append((f"stage {stage!r} {key}", value))
    return [(where, ref) for where, ref in refs if ref and "://" not in ref]
