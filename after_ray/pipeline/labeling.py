"""The human oracle: export a round's selection for annotators, import what they return.

Export (:func:`export_batch`) writes three files for round r into ``out_dir``:

* ``round_{r:03d}_to_label.csv``: ``utt_id,path,duration_s,label`` with an empty label column
  to fill in a spreadsheet;
* ``round_{r:03d}_label_studio_tasks.json``: Label Studio import tasks
  ``[{"data": {"audio": ..., "utt_id": ..., ...}}]``;
* ``round_{r:03d}_label_studio_config.xml``: the matching labeling interface (one single-choice
  ``Choices`` named ``emotion`` over the audio, one ``Choice`` per class).

Import (:func:`import_labels`) takes either the filled CSV or a Label Studio JSON export (tasks
with ``annotations[].result[].value.choices``; several annotations of one task become that
item's ``votes`` and the majority becomes its label; Label Studio's JSON-MIN and CSV exports are
recognized and refused, pointing to the JSON export). The whole file is validated before the run
state is touched: any problem raises ``LabelImportError`` listing every problem with its line (CSV)
or task number (JSON) and the fix, and nothing is written. Items left without a label are fine
(a partial import); they stay pending and are logged. Files are parsed as text (csv / json)
only: nothing is ever unpickled or evaluated.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from after_ray.al.oracle import majority_label
from after_ray.errors import LabelImportError, RunStateError
from after_ray.store.atomic import atomic_write_json, atomic_write_text
from after_ray.store.layout import round_dir_name
from after_ray.store.run_state import RunState, label_identity, read_selection

logger = logging.getLogger(__name__)

CSV_COLUMNS = ("utt_id", "path", "duration_s", "label")
OPTIONAL_CSV_COLUMNS = ("path", "duration_s", "annotator")
CHOICES_NAME = "emotion"
SOURCE = "human"
# A label file is a few MB even for 100k items; anything far larger is the wrong file.
MAX_FILE_BYTES = 256 * 1024**2


# --------------------------------------------------------------------------- export


def label_studio_config(class_names: Sequence[str]) -> str:
    """Label Studio labeling-interface XML: single choice among the classes for one audio."""
    choices = "\n".join(f"    <Choice value={quoteattr(name)}/>" for name in class_names)
    return (
        "<View>\n"
        '  <Audio name="audio" value="$audio"/>\n'
        f'  <Choices name="{CHOICES_NAME}" toName="audio" choice="single" required="true">\n'
        f"{choices}\n"
        "  </Choices>\n"
        "</View>\n"
    )


def export_paths(out_dir: str | Path, round_index: int) -> tuple[Path, Path, Path]:
    """(csv, Label Studio tasks json, Label Studio config xml) for the round."""
    stem = Path(out_dir) / round_dir_name(round_index)
    return (
        stem.with_name(f"{stem.name}_to_label.csv"),
        stem.with_name(f"{stem.name}_label_studio_tasks.json"),
        stem.with_name(f"{stem.name}_label_studio_config.xml"),
    )


def export_batch(
    run_state_or_dir: RunState | str | Path,
    round: int,
    rows: Iterable[Mapping[str, Any]],
    class_names: Sequence[str],
    out_dir: str | Path,
    *,
    audio_url: Callable[[Mapping[str, Any]], str] | None = None,
) -> tuple[Path, Path]:
    """Write the files annotators need for ``rows`` (utt_id, path, duration_s) of ``round``.

    Every row must belong to the round's recorded selection. ``audio_url(row)`` maps a row to
    the URL Label Studio should load (default: the file path, for Label Studio's local-files
    storage). Returns (csv_path, label_studio_tasks_path); the config XML sits next to them.
    """
    rows = [dict(r) for r in rows]
    if isinstance(run_state_or_dir, RunState):
        selected = run_state_or_dir.selection(round)
        run_dir = run_state_or_dir.run_dir
    else:
        run_dir = Path(run_state_or_dir)
        selected = read_selection(run_dir, round)
    if selected is None:
        raise RunStateError(
            f"round {round} of {str(run_dir)!r} has no selection yet: run the round's selection "
            "before exporting it for labeling"
        )
    selected_set = set(selected)
    outside = [r.get("utt_id") for r in rows if r.get("utt_id") not in selected_set]
    if outside:
        raise RunStateError(
            f"{len(outside)} rows to export are not in round {round}'s selection, e.g. "
            f"{outside[:5]}: export only the round's selected items"
        )
    csv_path, tasks_path, config_path = export_paths(out_dir, round)

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        duration = row.get("duration_s")
        writer.writerow(
            [row["utt_id"], row.get("path", ""), "" if duration is None else duration, ""]
        )
    atomic_write_text(csv_path, buffer.getvalue(), what=f"the round {round} labeling sheet")

    tasks = []
    for row in rows:
        data = {
            "audio": audio_url(row) if audio_url else row.get("path", ""),
            "utt_id": row["utt_id"],
            "path": row.get("path", ""),
            "duration_s": row.get("duration_s"),
            "round": round,
        }
        tasks.append({"data": data})
    atomic_write_json(tasks_path, tasks, what=f"the round {round} Label Studio tasks")
    atomic_write_text(
        config_path, label_studio_config(class_names), what="the Label Studio labeling config"
    )
    return csv_path, tasks_path


# --------------------------------------------------------------------------- import


@dataclass
class _Answer:
    """What one CSV row or Label Studio task says about one item."""

    where: str  # "line 4" / "task #3 (id 17)"
    utt_id: str
    label: str | None  # canonical class name, None when left empty
    votes: list[str] | None = None
    annotator: str | None = None
    paths: list[str] = field(default_factory=list)


class _Problems(list):
    def add(self, where: str, problem: str, fix: str) -> None:
        self.append(f"{where}: {problem}. Fix: {fix}")


def _canonical(raw: str, class_names: Sequence[str]) -> str | None:
    wanted = raw.strip().casefold()
    for name in class_names:
        if name.casefold() == wanted:
            return name
    return None


def _read_text(path: Path, problems: _Problems) -> str | None:
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            problems.add(
                str(path),
                f"the file is {size / 1024**2:.0f} MB, far larger than a label file",
                "check that this is the exported label file",
            )
            return None
        data = path.read_bytes()
    except OSError as exc:
        problems.add(str(path), f"cannot be read ({exc.strerror or exc})", "check the path")
        return None
    if b"\x00" in data:
        problems.add(
            str(path),
            "this is a binary file, not CSV or JSON text",
            "import the CSV you filled in or Label Studio's JSON export",
        )
        return None
    try:
        return data.decode("utf-8-sig")  # -sig: spreadsheets often prepend a BOM
    except UnicodeDecodeError as exc:
        problems.add(
            str(path),
            f"not UTF-8 text (byte {exc.start})",
            "save the file as UTF-8 CSV (spreadsheet: 'CSV UTF-8') or export JSON again",
        )
        return None


def _parse_csv(text: str, class_names: Sequence[str], problems: _Problems) -> list[_Answer]:
    first_line = text.split("\n", 1)[0]
    delimiter = ";" if "," not in first_line and ";" in first_line else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        problems.add("line 1", "the file is empty", "export the round again and fill it in")
        return []
    except csv.Error as exc:
        problems.add("line 1", f"malformed CSV ({exc})", "save the sheet as CSV again")
        return []
    columns = [h.strip().casefold() for h in header]
    missing = [c for c in ("utt_id", "label") if c not in columns]
    if "label" in missing and CHOICES_NAME in columns and "annotation_id" in columns:
        problems.add(
            "line 1",
            f"this is Label Studio's CSV export (one row per annotation, the choice in column "
            f"{CHOICES_NAME!r}), not the labeling sheet",
            "export the project from Label Studio as 'JSON' (not CSV or JSON-MIN) and import "
            "that file, or fill the label column of the exported round_XXX_to_label.csv",
        )
        return []
    dupes = sorted({c for c in columns if columns.count(c) > 1})
    if missing or dupes:
        found = ", ".join(repr(c) for c in header)
        what = f"missing columns {missing}" if missing else f"repeated columns {dupes}"
        problems.add(
            "line 1",
            f"wrong header ({what}; found {found})",
            f"keep the exported header {','.join(CSV_COLUMNS)}",
        )
        return []
    unknown = [h for h in columns if h not in (*CSV_COLUMNS, *OPTIONAL_CSV_COLUMNS)]
    if unknown:
        logger.info("ignoring extra columns %s in the label file", unknown)
    answers = []
    try:
        for record in reader:
            where = f"line {reader.line_num}"
            if not any(cell.strip() for cell in record):
                continue
            if len(record) != len(columns):
                problems.add(
                    where,
                    f"{len(record)} fields where the header has {len(columns)}",
                    "quote fields that contain the delimiter, or fix the row",
                )
                continue
            cells = {name: value.strip() for name, value in zip(columns, record, strict=True)}
            utt_id = cells["utt_id"]
            if not utt_id:
                problems.add(where, "empty utt_id", "restore the exported utt_id of this row")
                continue
            label = None
            if cells["label"]:
                label = _canonical(cells["label"], class_names)
                if label is None:
                    problems.add(
                        where,
                        f"label {cells['label']!r} of {utt_id!r} is not one of {list(class_names)}",
                        "use one of these class names (case does not matter)",
                    )
                    continue
            answers.append(
                _Answer(
                    where,
                    utt_id,
                    label,
                    annotator=cells.get("annotator") or None,
                    paths=[cells["path"]] if cells.get("path") else [],
                )
            )
    except csv.Error as exc:
        problems.add(
            f"line {reader.line_num}", f"malformed CSV ({exc})", "save the sheet as CSV again"
        )
    return answers


def _annotator_name(annotation: Mapping[str, Any]) -> str | None:
    who = annotation.get("completed_by")
    if isinstance(who, Mapping):
        who = who.get("email") or who.get("id")
    return None if who is None else str(who)


def _parse_label_studio(
    text: str, class_names: Sequence[str], problems: _Problems
) -> list[_Answer]:
    tasks = _load_tasks(text, problems)
    if tasks is None:
        return []
    answers = []
    for number, task in enumerate(tasks, start=1):
        answer = _task_answer(number, task, class_names, problems)
        if answer is not None:
            answers.append(answer)
    return answers


def _load_tasks(text: str, problems: _Problems) -> list[Any] | None:
    """The export's list of tasks, or None (with the problem recorded)."""
    try:
        tasks = json.loads(text)
    except json.JSONDecodeError as exc:
        problems.add(
            f"line {exc.lineno} column {exc.colno}",
            f"not valid JSON ({exc.msg})",
            "export the project from Label Studio again (Export > JSON)",
        )
        return None
    except (ValueError, RecursionError) as exc:
        # Valid JSON syntax that Python refuses: nesting deeper than the recursion limit, or an
        # integer beyond str->int's digit limit. Neither comes from Label Studio.
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        problems.add(
            "top level",
            f"cannot be read as Label Studio JSON ({reason})",
            "export the project from Label Studio again (Export > JSON)",
        )
        return None
    if not isinstance(tasks, list):
        problems.add(
            "top level",
            f"expected a list of Label Studio tasks, found a JSON {type(tasks).__name__}",
            "use Label Studio's 'JSON' export (not JSON-MIN or CSV)",
        )
        return None
    if tasks and all(isinstance(t, dict) and "data" not in t and "utt_id" in t for t in tasks):
        problems.add(
            "top level",
            "this is Label Studio's JSON-MIN export (one flat row per annotation, without the "
            "tasks' data and annotations)",
            "export the project from Label Studio as 'JSON' (not JSON-MIN or CSV) and import "
            "that file",
        )
        return None
    return tasks


def _task_answer(
    number: int, task: Any, class_names: Sequence[str], problems: _Problems
) -> _Answer | None:
    """What task ``number`` (1-based) says, or None when it has a problem (recorded)."""
    task_id = task.get("id") if isinstance(task, dict) else None
    where = f"task #{number}" + (f" (id {task_id})" if task_id is not None else "")
    data = task.get("data") if isinstance(task, dict) else None
    if not isinstance(data, dict) or not isinstance(data.get("utt_id"), str):
        problems.add(
            where,
            "no data.utt_id",
            "import the tasks written by `after-ray label export` so every task keeps its "
            "utt_id, and use Label Studio's 'JSON' export",
        )
        return None
    utt_id = data["utt_id"].strip()
    annotations = task.get("annotations") or []
    if not isinstance(annotations, list):
        problems.add(where, "'annotations' is not a list", "export the project again")
        return None
    votes: list[str] = []
    annotators: list[str] = []
    bad = False
    for k, annotation in enumerate(annotations, start=1):
        try:
            vote = _annotation_vote(annotation, utt_id, class_names)
        except _Rejected as rejected:
            # Keep going: the import lists every problem of the file at once.
            problems.add(f"{where} annotation {k}", rejected.problem, rejected.fix)
            bad = True
            continue
        if vote is not None:
            label, name = vote
            votes.append(label)
            if name:
                annotators.append(name)
    if bad:
        return None
    return _Answer(
        where,
        utt_id,
        majority_label(votes, class_names, prefer=None) if votes else None,
        votes=votes if len(votes) > 1 else None,
        annotator=",".join(annotators) or None,
        paths=_task_paths(data),
    )


class _Rejected(Exception):
    """An annotation that cannot be counted: what is wrong with it and the fix."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix


def _annotation_vote(
    annotation: Any, utt_id: str, class_names: Sequence[str]
) -> tuple[str, str | None] | None:
    """(class, annotator name) of one annotation; None when it says nothing (cancelled, or
    skipped with no choice). Raises ``_Rejected`` for one that cannot be counted."""
    if not isinstance(annotation, dict) or annotation.get("was_cancelled"):
        return None
    results = annotation.get("result") or []
    if not isinstance(results, list):
        raise _Rejected(
            f"'result' is a {type(results).__name__}, not a list",
            "export the project again with Label Studio's 'JSON' export",
        )
    chosen: list[str] = []
    for result in results:
        value = result.get("value") if isinstance(result, dict) else None
        if isinstance(value, dict) and isinstance(value.get("choices"), list):
            chosen.extend(str(c) for c in value["choices"])
    if not chosen:
        return None  # an empty (skipped) annotation says nothing
    if len(chosen) > 1:
        raise _Rejected(
            f"several classes chosen ({chosen}) for {utt_id!r}",
            'use the exported labeling config (choice="single") and re-annotate it',
        )
    label = _canonical(chosen[0], class_names)
    if label is None:
        raise _Rejected(
            f"choice {chosen[0]!r} for {utt_id!r} is not one of {list(class_names)}",
            "use the exported labeling config, whose choices are the class names",
        )
    name = _annotator_name(annotation)
    if name is not None and not _storable(name):
        raise _Rejected(
            f"the annotator name {name!r} is not valid Unicode text",
            "export the project from Label Studio again",
        )
    return label, name


def _task_paths(data: dict[str, Any]) -> list[str]:
    """The filesystem paths a task names (``path``, and ``audio`` when it is a plain path)."""
    paths = [data["path"]] if isinstance(data.get("path"), str) and data["path"] else []
    audio = data.get("audio")
    # Label Studio URLs (http://..., /data/local-files/?d=..., /data/upload/...) are not
    # filesystem paths; a plain path given as audio is checked like `path`.
    if isinstance(audio, str) and audio and "://" not in audio and not audio.startswith("/data/"):
        paths.append(audio)
    return paths


def _storable(text: str) -> bool:
    """False for text that cannot be written as UTF-8 (lone surrogates from JSON escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _path_problem(path: str, corpus_root: Path) -> str | None:
    """Why ``path`` is not a file path inside ``corpus_root`` (symlinks resolved), or None."""
    if "\x00" in path or not _storable(path):
        return f"path {path!r} contains a NUL byte or invalid Unicode"
    candidate = Path(path)
    if not candidate.is_absolute():
        candidate = corpus_root / candidate
    try:
        inside = candidate.resolve().is_relative_to(corpus_root.resolve())
    except (OSError, RuntimeError, ValueError) as exc:  # RuntimeError: a symlink loop
        return f"path {path!r} cannot be resolved ({exc})"
    if not inside:
        return f"path {path!r} resolves outside the corpus root {str(corpus_root)!r}"
    return None


def _is_json(path: Path, text: str) -> bool:
    if path.suffix.lower() == ".json":
        return True
    if path.suffix.lower() in {".csv", ".txt", ".tsv"}:
        return False
    return text.lstrip()[:1] in ("[", "{")


def import_labels(
    state: RunState,
    round: int,
    file: str | Path,
    class_names: Sequence[str],
    expected_ids: Iterable[str] | None = None,
    corpus_root: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Validate a returned label file completely, then append its labels to the run.

    ``expected_ids``: the utt_ids this file may label (default: the round's selection).
    ``corpus_root``: when given, every path in the file must resolve inside it.
    Returns the label entries written (identical re-imports write nothing). Raises
    LabelImportError listing every problem, with the run state unchanged.
    """
    path = Path(file)
    problems = _Problems()
    selected = state.selection(round)
    if selected is None:
        raise LabelImportError(
            f"{path}: round {round} has no selection in {str(state.run_dir)!r}, so there is "
            "nothing to label for it. Fix: check the round number"
        )
    # Only items of this round's selection can be labeled for it, whatever the caller expects.
    expected = set(selected) if expected_ids is None else set(expected_ids) & set(selected)

    answers: list[_Answer] = []
    text = _read_text(path, problems)
    if text is not None:
        parse = _parse_label_studio if _is_json(path, text) else _parse_csv
        answers = parse(text, class_names, problems)

    root = Path(corpus_root) if corpus_root is not None else None
    stored = state.labels()
    merged = _merge_answers(answers, expected, round, root, problems)
    rows = _new_label_rows(merged, stored, round, problems)
    if problems:
        listing = "\n  - ".join(problems)
        raise LabelImportError(
            f"{path}: {len(problems)} problem(s); nothing was imported and the run state is "
            f"unchanged:\n  - {listing}"
        )
    written = state.append_labels(round, rows)
    still_missing = state.pending_ids(round)
    if still_missing:
        logger.warning(
            "round %d: %d of %d selected items still have no label (e.g. %s); import them "
            "when they are done",
            round,
            len(still_missing),
            len(selected),
            still_missing[:5],
        )
    return written


def _merge_answers(
    answers: list[_Answer],
    expected: set[str],
    round: int,
    root: Path | None,
    problems: _Problems,
) -> dict[str, _Answer]:
    """The labeled answers by utt_id, in file order; identical duplicates merge into the first.

    Records answers for items outside ``expected``, paths outside ``root`` and contradicting
    duplicates as problems.
    """
    merged: dict[str, _Answer] = {}
    for answer in answers:
        if answer.utt_id not in expected:
            problems.add(
                answer.where,
                f"{answer.utt_id!r} is not one of the items selected for round {round}",
                "remove the row, or import it with the round it was exported for",
            )
            continue
        if root is not None:
            for p in answer.paths:
                reason = _path_problem(p, root)
                if reason:
                    problems.add(
                        answer.where,
                        f"{reason} (item {answer.utt_id!r})",
                        "restore the exported path (files must stay inside the corpus)",
                    )
        if answer.label is None:
            continue
        previous = merged.get(answer.utt_id)
        if previous is not None:
            if (previous.label, previous.votes) != (answer.label, answer.votes):
                problems.add(
                    answer.where,
                    f"{answer.utt_id!r} is labeled {answer.label!r} here but "
                    f"{previous.label!r} at {previous.where}",
                    "keep one of the two rows",
                )
            continue  # identical duplicates merge into the first
        merged[answer.utt_id] = answer
    return merged


def _new_label_rows(
    merged: dict[str, _Answer],
    stored: Mapping[str, Mapping[str, Any]],
    round: int,
    problems: _Problems,
) -> list[dict[str, Any]]:
    """The label entries to append for ``merged``; an item already labeled otherwise in
    ``stored`` is a problem, since labels are never replaced."""
    rows = []
    for utt_id, answer in merged.items():
        row = {
            "utt_id": utt_id,
            "label": answer.label,
            "votes": answer.votes,
            "round": round,
            "source": SOURCE,
            "annotator": answer.annotator,
        }
        old = stored.get(utt_id)
        if old is not None and label_identity(old) != label_identity(row):
            problems.add(
                answer.where,
                f"{utt_id!r} is already labeled {old['label']!r} (round {old['round']}, "
                f"source {old['source']!r}); the file says {answer.label!r}"
                + ("" if old["label"] != answer.label else " with different votes/annotator"),
                "labels are never replaced: remove the row (or fix it to the stored label)",
            )
            continue
        rows.append(row)
    return rows
