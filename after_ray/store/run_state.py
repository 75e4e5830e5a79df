"""``RunState``: everything a run has bought or decided, in a directory that survives any crash.

Layout of a run directory (every file is written atomically, see ``after_ray.store.atomic``; the only
file ever appended to is ``labels.jsonl``)::

    run.lock                       flock'ed while a process holds the run; pid/host/start inside
    state.json                     schema version, experiment identity, stages done, checkpoint
                                   references per round, stage timings
    labels.jsonl                   append-only: one JSON line per acquired label (never rewritten)
    manifest.parquet               the pool (written by the prepare stage, read by ``check``)
    rounds/round_000/selection.parquet   round 0 = cold start; utt_id, rank, score, strategy
    rounds/round_000/metrics.json        evaluation of the model trained after that round
    rounds/round_001/...

What a round has reached is derived from these files, not stored as flags: *selected* when its
selection exists, *labeled* when every selected item has a line in ``labels.jsonl``, *trained*
when a checkpoint reference is recorded, *evaluated* when ``metrics.json`` exists. The "labeled
in round r" map (baal's ``labelled`` array, keyed by utt_id) is the ``round`` field of the label
lines.

Rules that keep acquired work safe:

* One process at a time: ``RunState.open`` takes a non-blocking ``fcntl.flock`` on ``run.lock``.
  The OS drops it when the holder dies, even on SIGKILL, so a crash never blocks a resume.
* A round's selection is written once. Writing the same ids again is a no-op (a resumed run
  replays its last step); writing different ids raises instead of replacing what was selected.
* A label is written once. Re-appending an identical entry is a no-op; a different label for an
  already labeled item raises. Each append is one ``write`` + ``fsync``; a crash mid-append can
  only leave a torn last line without its newline, which ``open`` truncates away (and logs): the
  caller was never told that label was stored, so a resumed run acquires it again.

``check_run_dir`` reads a run directory without taking the lock and lists every inconsistency
with a fix (``after-ray check RUN_DIR``).
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import logging
import math
import os
import socket
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from after_ray.errors import RunStateError
from after_ray.faults import failpoint
from after_ray.store.atomic import (
    atomic_write_json,
    atomic_write_parquet,
    fsync_dir,
    is_temp_file,
    recover_staged_leftovers,
    to_jsonable,
    write_failure,
)
from after_ray.store.layout import (
    LABELS_FILE,
    LOCK_FILE,
    METRICS_FILE,
    ROUND_DIR_NAME,
    ROUNDS_DIR,
    STATE_FILE,
    round_dir,
    selection_path,
)

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1

SELECTION_SCHEMA = pa.schema(
    [
        pa.field("utt_id", pa.string(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),  # 1 = picked first
        pa.field("score", pa.float64()),  # null where the strategy has no score (random)
        pa.field("strategy", pa.string(), nullable=False),
    ]
)
SELECTION_META_KEY = b"after_ray.selection"

# The fields that make two label entries "the same label" (the time of writing does not).
LABEL_IDENTITY = ("utt_id", "label", "votes", "round", "source", "annotator")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- labels.jsonl


@dataclass
class LabelsFile:
    """What ``labels.jsonl`` holds, parsed without changing it."""

    entries: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # (line no, entry)
    bad_lines: list[tuple[int, str]] = field(default_factory=list)  # (line no, reason)
    torn_offset: int | None = None  # byte offset where a torn (unterminated) last line starts
    torn_line: int | None = None
    torn_preview: str = ""


def validate_label_entry(entry: Any) -> str | None:
    """The reason ``entry`` is not a well-formed label line, or None."""
    if not isinstance(entry, dict):
        return "not a JSON object"
    for key in ("utt_id", "label", "source"):
        if not isinstance(entry.get(key), str) or not entry.get(key):
            return f"field {key!r} is missing or not a non-empty string"
    if not isinstance(entry.get("round"), int) or isinstance(entry.get("round"), bool):
        return "field 'round' is missing or not an integer"
    votes = entry.get("votes")
    if votes is not None and not (
        isinstance(votes, list) and all(isinstance(v, str) for v in votes)
    ):
        return "field 'votes' must be null or a list of strings"
    annotator = entry.get("annotator")
    if annotator is not None and not isinstance(annotator, str):
        return "field 'annotator' must be null or a string"
    return None


def read_labels_file(path: str | Path) -> LabelsFile:
    out = LabelsFile()
    path = Path(path)
    if not path.exists():
        return out
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # everything after the last newline is an unfinished append
    lines = data[:end].split(b"\n")[:-1] if end else []
    if end < len(data):
        out.torn_offset = end
        out.torn_line = len(lines) + 1
        out.torn_preview = data[end : end + 80].decode("utf-8", "replace")
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            out.bad_lines.append((number, "empty line"))
            continue
        try:
            entry = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            out.bad_lines.append((number, f"not valid JSON ({exc})"))
            continue
        reason = validate_label_entry(entry)
        if reason:
            out.bad_lines.append((number, reason))
        else:
            out.entries.append((number, entry))
    return out


def label_identity(entry: Mapping[str, Any]) -> tuple:
    votes = entry.get("votes")
    return tuple(
        tuple(votes) if key == "votes" and votes is not None else entry.get(key)
        for key in LABEL_IDENTITY
    )


# --------------------------------------------------------------------------- selections


def read_selection_table(run_dir: str | Path, round_index: int) -> pa.Table | None:
    """The round's selection table sorted by rank, or None when the round has none."""
    path = selection_path(run_dir, round_index)
    if not path.exists():
        return None
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise RunStateError(
            f"selection of round {round_index} at {str(path)!r} cannot be read ({exc}); it was "
            "written atomically, so it was changed by something else: restore it from a backup "
            "or remove the round directory and re-run that round"
        ) from exc
    missing = [name for name in SELECTION_SCHEMA.names if name not in table.column_names]
    if missing:
        raise RunStateError(
            f"selection of round {round_index} at {str(path)!r} lacks columns {missing}: it was "
            "not written by after-ray; remove the round directory and re-run that round"
        )
    return table.sort_by("rank")


def read_selection(run_dir: str | Path, round_index: int) -> list[str] | None:
    table = read_selection_table(run_dir, round_index)
    return None if table is None else table.column("utt_id").to_pylist()


def selection_meta(table: pa.Table) -> dict[str, Any]:
    raw = (table.schema.metadata or {}).get(SELECTION_META_KEY)
    return json.loads(raw) if raw else {}


def list_rounds(run_dir: str | Path) -> list[int]:
    """Round numbers that have a directory, ascending."""
    rounds_dir = Path(run_dir) / ROUNDS_DIR
    if not rounds_dir.is_dir():
        return []
    found = []
    for child in rounds_dir.iterdir():
        match = ROUND_DIR_NAME.match(child.name)
        if match and child.is_dir():
            found.append(int(match.group(1)))
    return sorted(found)


# --------------------------------------------------------------------------- run state


@dataclass(frozen=True)
class RoundStatus:
    """How far a round got, derived from the files of the run directory."""

    round: int
    n_selected: int
    n_labeled: int  # selected items that have a label
    trained: bool
    evaluated: bool

    @property
    def selected(self) -> bool:
        return self.n_selected > 0

    @property
    def labeled(self) -> bool:
        return self.selected and self.n_labeled == self.n_selected

    @property
    def phase(self) -> str:
        """The last phase reached in order: none, selected, labeled, trained, evaluated."""
        if not self.selected:
            return "none"
        if not self.labeled:
            return "selected"
        if not self.trained:
            return "labeled"
        return "evaluated" if self.evaluated else "trained"


class RunState:
    """Exclusive, crash-safe access to one run directory. Use :meth:`open`, then close it."""

    def __init__(self, run_dir: Path, lock_fd: int) -> None:
        # Private: RunState.open takes the lock and loads the files.
        self.run_dir = run_dir
        self._lock_fd: int | None = lock_fd
        self._state: dict[str, Any] = {}
        self._labels: dict[str, dict[str, Any]] = {}
        self._selections: dict[int, list[str]] = {}

    # ---------------------------------------------------------------- open / close

    @classmethod
    def open(cls, run_dir: str | Path, *, create: bool = True) -> RunState:
        """Lock ``run_dir`` for this process and load its state (start-or-resume).

        Raises RunStateError when another process (or another ``RunState`` of this process)
        holds the run, when ``create`` is False and there is no run there, or when a file is
        damaged beyond the torn last label line that is repaired here.
        """
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            if not create:
                raise RunStateError(
                    f"run directory {str(run_dir)!r} does not exist: check the path, or start "
                    "the run first"
                )
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise RunStateError(
                    f"cannot create run directory {str(run_dir)!r}: {exc.strerror or exc}"
                ) from exc
        elif not create and not (run_dir / STATE_FILE).exists():
            raise RunStateError(
                f"{str(run_dir)!r} is not a run directory (no {STATE_FILE}): check the path"
            )
        state = cls(run_dir, _acquire_lock(run_dir))
        try:
            state._load()
        except BaseException:
            state.close()
            raise
        return state

    def close(self) -> None:
        """Release the lock. Everything was already written; nothing is flushed here."""
        if self._lock_fd is None:
            return
        fd, self._lock_fd = self._lock_fd, None
        try:
            os.ftruncate(fd, 0)  # the info is stale once released
        except OSError:
            pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    @property
    def closed(self) -> bool:
        return self._lock_fd is None

    def __enter__(self) -> RunState:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A forgotten close must not keep the run locked for the rest of the process.
        try:
            self.close()
        except Exception:  # during interpreter shutdown modules may already be gone
            pass

    def __repr__(self) -> str:
        return f"RunState({str(self.run_dir)!r}{', closed' if self.closed else ''})"

    def _require_open(self) -> None:
        if self._lock_fd is None:
            raise RunStateError(
                f"the RunState of {str(self.run_dir)!r} is closed: open it again to write"
            )

    def _load(self) -> None:
        state_path = self.run_dir / STATE_FILE
        if state_path.exists():
            self._state = read_state_json(state_path)
        else:
            self._commit_state(
                {
                    "schema_version": SCHEMA_VERSION,
                    "created": now_iso(),
                    "experiment": None,
                    "stages": {},
                    "checkpoints": {},
                    "timings": [],
                }
            )
        self._remove_temp_files()
        self._load_labels()

    def _remove_temp_files(self) -> None:
        # We hold the lock, so no writer of this run is alive: these are leftovers of a killed
        # one, and the files they were meant to replace are intact.
        for path in temp_files(self.run_dir):
            logger.info("removing %s, left by an interrupted write", path)
            with contextlib.suppress(OSError):
                path.unlink()
        for path in recover_staged_leftovers(self.run_dir):
            logger.info("restored %s, moved aside by an interrupted directory swap", path)

    def _load_labels(self) -> None:
        path = self.run_dir / LABELS_FILE
        parsed = read_labels_file(path)
        if parsed.torn_offset is not None:
            logger.warning(
                "%s: line %d was cut off by a crash mid-append (%r); removing it. The caller "
                "was never told this label was stored, so the run acquires it again.",
                path,
                parsed.torn_line,
                parsed.torn_preview,
            )
            try:
                with open(path, "r+b") as handle:
                    handle.truncate(parsed.torn_offset)
                    handle.flush()
                    os.fsync(handle.fileno())
            except OSError as exc:
                raise write_failure(path, "the repaired label log", exc) from exc
        if parsed.bad_lines:
            details = "; ".join(f"line {n}: {reason}" for n, reason in parsed.bad_lines[:10])
            raise RunStateError(
                f"{str(path)!r} has damaged lines ({details}). Only the last line can be torn "
                "by a crash, so this file was edited: fix or delete those lines by hand "
                f"(`after-ray check {self.run_dir}` lists every problem)"
            )
        labels: dict[str, dict[str, Any]] = {}
        for number, entry in parsed.entries:
            previous = labels.get(entry["utt_id"])
            if previous is None:
                labels[entry["utt_id"]] = entry
            elif label_identity(previous) == label_identity(entry):
                logger.warning("%s line %d repeats an identical label; ignoring it", path, number)
            else:
                raise RunStateError(
                    f"{str(path)!r} line {number} labels {entry['utt_id']!r} as "
                    f"{entry['label']!r} but an earlier line says {previous['label']!r}: delete "
                    "the wrong line by hand, then resume"
                )
        self._labels = labels

    def _commit_state(self, new_state: dict[str, Any]) -> None:
        """Write ``new_state`` to state.json, then adopt it. Callers change a copy: when the
        write fails (disk full) the object keeps matching the file, so a later successful write
        cannot persist a change whose caller was told it failed."""
        atomic_write_json(self.run_dir / STATE_FILE, new_state, what="the run state")
        self._state = new_state

    def _changed_state(self) -> dict[str, Any]:
        return copy.deepcopy(self._state)

    # ---------------------------------------------------------------- experiment & stages

    def ensure_experiment(self, identity: Mapping[str, Any]) -> None:
        """Bind the run to the fields that define its experiment (corpus, split, strategy,
        seed, budget...). The first call stores them; later calls raise if any differs, so a
        resume with a changed config cannot mix two experiments in one directory."""
        self._require_open()
        identity = to_jsonable(dict(identity))
        stored = self._state.get("experiment")
        if stored is None:
            new_state = self._changed_state()
            new_state["experiment"] = identity
            self._commit_state(new_state)
            return
        changed = sorted(
            key for key in set(stored) | set(identity) if stored.get(key) != identity.get(key)
        )
        if changed:
            details = ", ".join(
                f"{key}: run has {stored.get(key)!r}, now {identity.get(key)!r}" for key in changed
            )
            raise RunStateError(
                f"run directory {str(self.run_dir)!r} belongs to a different experiment "
                f"({details}); use the original settings to resume it, or a new run.name"
            )

    def experiment(self) -> dict[str, Any] | None:
        return self._state.get("experiment")

    def mark_stage_done(self, name: str, info: Mapping[str, Any] | None = None) -> None:
        """Record that a stage finished, with what later stages need from it (paths, sizes).

        Keys named ``path``/``checkpoint`` or ending in ``_path``, ``_dir``, ``_file`` or
        ``_checkpoint`` are treated as files that must exist (``check_run_dir`` verifies them).
        """
        self._require_open()
        if name in self._state["stages"]:
            logger.info("stage %r was already done; recording the new result", name)
        entry = to_jsonable(dict(info or {}))
        entry["done_at"] = now_iso()
        new_state = self._changed_state()
        new_state["stages"][name] = entry
        self._commit_state(new_state)

    def stage_info(self, name: str) -> dict[str, Any] | None:
        entry = self._state["stages"].get(name)
        return None if entry is None else dict(entry)

    def stages_done(self) -> list[str]:
        return list(self._state["stages"])

    # ---------------------------------------------------------------- selections

    def round_dir(self, round_index: int) -> Path:
        return round_dir(self.run_dir, round_index)

    def rounds(self) -> list[int]:
        return list_rounds(self.run_dir)

    def record_selection(
        self,
        round_index: int,
        utt_ids: Sequence[str],
        scores: Sequence[float | None] | None = None,
        strategy: str = "",
        extra: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write round ``round_index``'s selection (in pick order) once.

        Idempotent: the same ids in the same order with the same strategy is a no-op (a
        resumed run replays the step; the first scores are kept). Anything else for a round
        that already has a selection raises RunStateError, as does selecting an item that is
        already labeled.
        """
        self._require_open()
        _check_round_index(round_index)
        ids = [str(u) for u in utt_ids]
        if not ids:
            raise ValueError(f"round {round_index}: an empty selection cannot be recorded")
        if len(set(ids)) != len(ids):
            dupes = [u for u, n in Counter(ids).items() if n > 1][:5]
            raise ValueError(f"round {round_index}: the selection repeats utt_ids {dupes}")
        if not strategy:
            raise ValueError("record_selection needs the strategy's name")
        score_list = _clean_scores(scores, len(ids), round_index)

        existing = self.selection(round_index)
        if existing is not None:
            info = self.selection_info(round_index) or {}
            if existing == ids and info.get("strategy") == strategy:
                old = self.selection_table(round_index).column("score").to_pylist()
                if not _same_scores(old, score_list):
                    logger.warning(
                        "round %d: re-recorded the same selection with different scores; "
                        "keeping the first ones",
                        round_index,
                    )
                return selection_path(self.run_dir, round_index)
            raise RunStateError(
                f"round {round_index} already has a selection ({len(existing)} items by "
                f"{info.get('strategy')!r}) that differs from the new one ({len(ids)} items by "
                f"{strategy!r}); a recorded selection is never replaced. Resume from it, or "
                f"remove {str(self.round_dir(round_index))!r} by hand if it was never labeled"
            )
        labeled = [u for u in ids if u in self._labels]
        if labeled:
            rounds = sorted({self._labels[u]["round"] for u in labeled})
            raise RunStateError(
                f"round {round_index}: the selection contains {len(labeled)} items that are "
                f"already labeled (in rounds {rounds}), e.g. {labeled[:5]}; the strategy must "
                "exclude labeled items"
            )
        meta = {
            "round": round_index,
            "strategy": strategy,
            "extra": to_jsonable(dict(extra or {})),
            "created": now_iso(),
        }
        table = pa.table(
            {
                "utt_id": ids,
                "rank": list(range(1, len(ids) + 1)),
                "score": score_list,
                "strategy": [strategy] * len(ids),
            },
            schema=SELECTION_SCHEMA,
        ).replace_schema_metadata({SELECTION_META_KEY: json.dumps(meta, sort_keys=True)})
        path = selection_path(self.run_dir, round_index)
        atomic_write_parquet(table, path, what=f"the selection of round {round_index}")
        # Make the new round directory (and rounds/, the first time) durable too.
        fsync_dir(path.parent.parent)
        fsync_dir(self.run_dir)
        self._selections[round_index] = ids
        return path

    def selection(self, round_index: int) -> list[str] | None:
        """The utt_ids selected in the round, in pick order, or None."""
        if round_index not in self._selections:
            ids = read_selection(self.run_dir, round_index)
            if ids is None:
                return None
            self._selections[round_index] = ids
        return list(self._selections[round_index])

    def selection_table(self, round_index: int) -> pa.Table | None:
        return read_selection_table(self.run_dir, round_index)

    def selection_info(self, round_index: int) -> dict[str, Any] | None:
        """``{"round", "strategy", "extra", "created"}`` of the round's selection, or None."""
        table = self.selection_table(round_index)
        return None if table is None else selection_meta(table)

    def selected_ids(self) -> set[str]:
        """Every utt_id selected in any round (labeled or still pending)."""
        out: set[str] = set()
        for r in self.rounds():
            out.update(self.selection(r) or [])
        return out

    # ---------------------------------------------------------------- labels

    def append_labels(self, round_index: int, rows: Iterable[Mapping[str, Any]]) -> list[dict]:
        """Append labels acquired for round ``round_index``; returns the entries written.

        Each row needs ``utt_id``, ``label``, ``source``; ``votes`` and ``annotator`` are
        optional. Every utt_id must be in the round's selection. Rows identical to a stored
        label are skipped (idempotent resume); a different label for a labeled item raises
        RunStateError and nothing of the batch is written.
        """
        self._require_open()
        _check_round_index(round_index)
        selected = self.selection(round_index)
        if selected is None:
            raise RunStateError(
                f"round {round_index} has no selection: record it before appending its labels"
            )
        selected_set = set(selected)
        new: dict[str, dict[str, Any]] = {}
        time_now = now_iso()
        for row in rows:
            entry = _label_entry(row, round_index, time_now)
            utt_id = entry["utt_id"]
            if utt_id not in selected_set:
                raise RunStateError(
                    f"round {round_index}: {utt_id!r} is not in this round's selection; only "
                    "selected items can be labeled"
                )
            stored = self._labels.get(utt_id) or new.get(utt_id)
            if stored is None:
                new[utt_id] = entry
            elif label_identity(stored) != label_identity(entry):
                raise RunStateError(
                    f"{utt_id!r} is already labeled {stored['label']!r} (round "
                    f"{stored['round']}, source {stored['source']!r}); refusing to add "
                    f"{entry['label']!r} (round {round_index}, source {entry['source']!r}). "
                    "Labels are never replaced"
                )
        if not new:
            return []
        payload = "".join(
            json.dumps(entry, sort_keys=True, ensure_ascii=False, separators=(",", ":")) + "\n"
            for entry in new.values()
        ).encode("utf-8")
        path = self.run_dir / LABELS_FILE
        created = not path.exists()
        size_before = 0 if created else path.stat().st_size
        try:
            with open(path, "ab") as handle:
                # Crash tests: a power cut in the middle of the batch's write.
                failpoint(
                    "label_append",
                    lambda: (handle.write(payload[: len(payload) // 2]), handle.flush()),
                )
                # One write call for the batch: a crash can tear only its last line.
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            # A short write (disk full) may have stored some whole lines of the batch: the
            # caller is told none was stored, so cut them off again, or a retry would log them
            # twice. Truncating frees space, so it works on a full disk.
            _cut_back(path, size_before, created)
            raise write_failure(path, f"{len(new)} labels", exc) from exc
        if created:
            fsync_dir(self.run_dir)
        self._labels.update(new)
        return [dict(e) for e in new.values()]

    def labels(self) -> dict[str, dict[str, Any]]:
        """utt_id -> label entry (utt_id, label, votes, round, source, annotator, time)."""
        return {u: dict(e) for u, e in self._labels.items()}

    def labeled_ids(self, round: int | None = None) -> list[str]:
        """Labeled utt_ids in acquisition order, optionally only those of one round."""
        if round is None:
            return list(self._labels)
        return [u for u, e in self._labels.items() if e["round"] == round]

    def labeled_round(self) -> dict[str, int]:
        """utt_id -> the round in which it was labeled (the learning-curve x-axis)."""
        return {u: e["round"] for u, e in self._labels.items()}

    def pending_ids(self, round_index: int) -> list[str]:
        """Items selected in the round that have no label yet (in pick order)."""
        return [u for u in self.selection(round_index) or [] if u not in self._labels]

    # ---------------------------------------------------------------- metrics, checkpoints, timing

    def record_metrics(self, round_index: int, metrics: Mapping[str, Any]) -> Path:
        """Write the evaluation of the model trained in the round (replaced on re-evaluation:
        metrics are recomputed from a checkpoint, not acquired)."""
        self._require_open()
        _check_round_index(round_index)
        path = self.round_dir(round_index) / METRICS_FILE
        return atomic_write_json(path, dict(metrics), what=f"the metrics of round {round_index}")

    def metrics(self, round_index: int) -> dict[str, Any] | None:
        return read_json_file(self.round_dir(round_index) / METRICS_FILE)

    def record_checkpoint(self, round_index: int, ref: str) -> None:
        """Point the round at its trained model (a path, relative to the run dir or absolute,
        or a URI such as ``s3://...``)."""
        self._require_open()
        _check_round_index(round_index)
        new_state = self._changed_state()
        new_state["checkpoints"][str(round_index)] = str(ref)
        self._commit_state(new_state)

    def checkpoint(self, round_index: int) -> str | None:
        return self._state["checkpoints"].get(str(round_index))

    def record_timing(self, round_index: int | None, stage: str, seconds: float) -> None:
        """Add one measured duration (wall-clock seconds) of a stage, per round or run-wide."""
        self._require_open()
        if round_index is not None:
            _check_round_index(round_index)
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"timing of {stage!r}: seconds must be finite and >= 0, got {seconds}")
        new_state = self._changed_state()
        new_state["timings"].append(
            {"round": round_index, "stage": stage, "seconds": float(seconds), "at": now_iso()}
        )
        self._commit_state(new_state)

    @contextlib.contextmanager
    def timed(self, stage: str, round_index: int | None = None) -> Iterator[None]:
        """Time the block and record it if it finishes (a failed attempt is not counted)."""
        start = time.perf_counter()
        yield
        self.record_timing(round_index, stage, time.perf_counter() - start)

    def timings(self) -> list[dict[str, Any]]:
        return [dict(t) for t in self._state["timings"]]

    # ---------------------------------------------------------------- status

    def round_status(self, round_index: int) -> RoundStatus:
        selected = self.selection(round_index) or []
        return RoundStatus(
            round=round_index,
            n_selected=len(selected),
            n_labeled=sum(1 for u in selected if u in self._labels),
            trained=self.checkpoint(round_index) is not None,
            evaluated=(self.round_dir(round_index) / METRICS_FILE).exists(),
        )


# --------------------------------------------------------------------------- helpers


def _check_round_index(round_index: int) -> None:
    if not isinstance(round_index, int) or isinstance(round_index, bool) or round_index < 0:
        raise ValueError(f"round must be an integer >= 0, got {round_index!r}")


def _clean_scores(
    scores: Sequence[float | None] | None, n: int, round_index: int
) -> list[float | None]:
    if scores is None:
        return [None] * n
    values = [None if s is None else float(s) for s in scores]
    if len(values) != n:
        raise ValueError(f"round {round_index}: {len(values)} scores for {n} selected utt_ids")
    return [v if v is not None and math.isfinite(v) else None for v in values]


def _same_scores(a: Sequence[float | None], b: Sequence[float | None]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if (x is None) != (y is None):
            return False
        if x is not None and not math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9):
            return False
    return True


def _label_entry(row: Mapping[str, Any], round_index: int, time_now: str) -> dict[str, Any]:
    if row.get("round") is not None and row.get("round") != round_index:
        raise ValueError(
            f"label row for {row.get('utt_id')!r} says round {row.get('round')}, "
            f"appended to round {round_index}"
        )
    votes = row.get("votes")
    entry = {
        "utt_id": row.get("utt_id"),
        "label": row.get("label"),
        "votes": None if votes is None else [str(v) for v in votes],
        "round": round_index,
        "source": row.get("source"),
        "annotator": row.get("annotator"),
        "time": time_now,
    }
    reason = validate_label_entry(entry)
    if reason:
        raise ValueError(f"label row {dict(row)!r}: {reason}")
    return entry


def read_json_file(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunStateError(
            f"{str(path)!r} cannot be read ({exc}); it is written atomically, so it was changed "
            "by something else: restore it or delete it and re-run the step that writes it"
        ) from exc


def read_state_json(path: Path) -> dict[str, Any]:
    state = read_json_file(path)
    if not isinstance(state, dict) or not isinstance(state.get("schema_version"), int):
        raise RunStateError(
            f"{str(path)!r} is not an after-ray run state (no schema_version): check the path"
        )
    if state["schema_version"] > SCHEMA_VERSION:
        raise RunStateError(
            f"{str(path)!r} has schema version {state['schema_version']}, newer than this "
            f"after-ray understands ({SCHEMA_VERSION}): upgrade after-ray to resume this run"
        )
    for key, default in (
        ("stages", {}),
        ("checkpoints", {}),
        ("timings", []),
        ("experiment", None),
    ):
        state.setdefault(key, default)
    return state


def _cut_back(path: Path, size: int, created: bool) -> None:
    """Undo a failed append: ``path`` back to ``size`` bytes (removed if it was just created)."""
    try:
        if created:
            path.unlink(missing_ok=True)
        else:
            os.truncate(path, size)
    except OSError as exc:
        # Left as it is: the next open removes a torn last line; whole lines of the failed
        # batch would remain, and ``after-ray check`` lists them as labels nobody confirmed.
        logger.error("could not undo a failed append to %s (%s)", path, exc)


def _acquire_lock(run_dir: Path) -> int:
    lock_path = run_dir / LOCK_FILE
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise RunStateError(
            f"cannot create the lock file {str(lock_path)!r}: {exc.strerror or exc}; the run "
            "directory must be writable"
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_lock_info(fd)
        os.close(fd)
        raise RunStateError(_lock_message(run_dir, holder)) from None
    except OSError as exc:
        os.close(fd)
        raise RunStateError(
            f"cannot lock {str(lock_path)!r}: {exc.strerror or exc}; the filesystem must "
            "support flock (on NFS, mount with lock support)"
        ) from exc
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": now_iso()}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    except OSError as exc:
        # The holder info only improves the "in use" message; the flock is what protects the
        # run. A full disk must not keep a run from being opened (or leak the locked fd).
        logger.warning("could not record the lock holder in %s (%s)", run_dir / LOCK_FILE, exc)
    return fd


def _read_lock_info(fd: int) -> dict[str, Any]:
    try:
        raw = os.pread(fd, 4096, 0)
        info = json.loads(raw.decode("utf-8")) if raw.strip() else {}
        return info if isinstance(info, dict) else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}


def _lock_message(run_dir: Path, holder: Mapping[str, Any]) -> str:
    pid, host, since = holder.get("pid"), holder.get("host"), holder.get("since")
    if pid is None:
        who = "another process (it has not written its pid yet)"
    else:
        who = f"pid {pid} on host {host} since {since}"
        if pid == os.getpid() and host == socket.gethostname():
            who += " (this very process: close the other RunState of this directory first)"
    return (
        f"run directory {str(run_dir)!r} is in use by {who}; wait for it to finish or, if that "
        "process is dead, run again: the lock is released by the operating system when its "
        f"holder exits. If it persists on a network filesystem, check with `ps -p {pid}` on "
        f"host {host} and delete {LOCK_FILE} only when no process uses the run"
    )


def temp_files(run_dir: Path) -> list[Path]:
    """Leftover atomic-write temp files in the run dir and its round directories."""
    places = [run_dir] + [round_dir(run_dir, r) for r in list_rounds(run_dir)]
    found = []
    for place in places:
        if place.is_dir():
            found.extend(p for p in sorted(place.iterdir()) if p.is_file() and is_temp_file(p.name))
    return found
