"""Importing exports made by a real Label Studio 1.23.2 server (tests/fixtures/label_studio_exports/).

The fixtures come from tests/fixtures/label_studio_exports/make_exports.py (see the README there): the
round's tasks and config were written by ``export_batch``, imported into Label Studio, annotated
through its REST API and exported again. Users: admin (id 1), alice (2), bob (3). Tasks:

* u1: admin ``happy``;
* u2: alice and bob agree on ``sad``;
* u3: alice ``angry``, bob ``neutral`` (a tie: the first class in class order wins);
* u4: alice skipped it (a cancelled annotation with an empty result);
* u5: bob ``neutral``, then updated to ``happy``; alice skipped it;
* u6: never submitted, only a draft ``angry`` by admin.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from after_ray.errors import LabelImportError
from after_ray.pipeline.labeling import export_batch, import_labels, label_studio_config
from after_ray.store.layout import LABELS_FILE
from after_ray.store.run_state import RunState

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "label_studio_exports"
VERSION = "1.23.2"
CLASSES = ["neutral", "happy", "angry", "sad"]
IDS = [f"lsfix/s1/u{k}" for k in range(1, 7)]
# Where make_exports.py wrote the WAVs: the paths inside the exports (they need not exist).
CORPUS = "/tmp/after_ray_ls_corpus"

JSON_EXPORT = FIXTURES / f"export_json_ls{VERSION}.json"
JSON_ALL_TASKS = FIXTURES / f"export_json_all_tasks_ls{VERSION}.json"
JSON_SNAPSHOT = FIXTURES / f"export_json_snapshot_users_ls{VERSION}.json"
JSON_MIN = FIXTURES / f"export_json_min_ls{VERSION}.json"
CSV_EXPORT = FIXTURES / f"export_csv_ls{VERSION}.csv"

LABELS = {IDS[0]: "happy", IDS[1]: "sad", IDS[2]: "neutral", IDS[4]: "happy"}
VOTES = {IDS[0]: None, IDS[1]: ["sad", "sad"], IDS[2]: ["angry", "neutral"], IDS[4]: None}
# completed_by is the bare user id in the plain export, {id, email, ...} in the snapshot.
ANNOTATOR_IDS = {IDS[0]: "1", IDS[1]: "2,3", IDS[2]: "2,3", IDS[4]: "3"}
ANNOTATOR_EMAILS = {
    IDS[0]: "admin@example.com",
    IDS[1]: "alice@example.com,bob@example.com",
    IDS[2]: "alice@example.com,bob@example.com",
    IDS[4]: "bob@example.com",
}


@pytest.fixture
def state(tmp_path):
    with RunState.open(tmp_path / "run") as run_state:
        run_state.record_selection(1, IDS, [0.9, 0.8, 0.7, 0.6, 0.5, 0.4], "entropy")
        yield run_state


def _import(state: RunState, path: Path, tmp_path: Path, **kwargs) -> list[dict]:
    # Import a copy: the fixture stays untouched whatever the importer does.
    copy = tmp_path / path.name
    shutil.copyfile(path, copy)
    return import_labels(state, 1, copy, CLASSES, **kwargs)


def _log_bytes(state: RunState) -> bytes:
    path = state.run_dir / LABELS_FILE
    return path.read_bytes() if path.exists() else b""


def test_fixtures_are_from_the_server_and_match_todays_export(tmp_path):
    """Label Studio kept our task data verbatim, and our export still writes those files."""
    tasks = json.loads((FIXTURES / "round_001_label_studio_tasks.json").read_text())
    exported = json.loads(JSON_ALL_TASKS.read_text())
    assert [t["data"] for t in exported] == [t["data"] for t in tasks]
    assert [t["data"]["utt_id"] for t in exported] == IDS
    # The default JSON export leaves out tasks without any annotation (u6: a draft only).
    assert [t["data"]["utt_id"] for t in json.loads(JSON_EXPORT.read_text())] == IDS[:5]
    assert (FIXTURES / "round_001_label_studio_config.xml").read_text() == label_studio_config(
        CLASSES
    )
    # export_batch today writes the same tasks for the same rows (else regenerate the fixtures).
    rows = [
        {
            "utt_id": t["data"]["utt_id"],
            "path": t["data"]["path"],
            "duration_s": t["data"]["duration_s"],
        }
        for t in tasks
    ]
    with RunState.open(tmp_path / "run") as run_state:
        run_state.record_selection(1, IDS, [0.5] * 6, "entropy")
        _, tasks_path = export_batch(run_state, 1, rows, CLASSES, tmp_path / "out")
    assert json.loads(tasks_path.read_text()) == tasks


@pytest.mark.parametrize(
    ("export", "annotators"),
    [
        (JSON_EXPORT, ANNOTATOR_IDS),
        (JSON_ALL_TASKS, ANNOTATOR_IDS),
        (JSON_SNAPSHOT, ANNOTATOR_EMAILS),
    ],
    ids=["json", "json_all_tasks", "json_snapshot_users"],
)
def test_real_json_export_imports_exactly_the_annotations(state, tmp_path, export, annotators):
    written = _import(state, export, tmp_path, corpus_root=CORPUS)
    assert [w["utt_id"] for w in written] == [IDS[0], IDS[1], IDS[2], IDS[4]]
    assert {w["utt_id"]: w["label"] for w in written} == LABELS
    # Agreement keeps both votes; the disagreement ties angry/neutral, and ties go to the first
    # class in class order (neutral); a cancelled annotation is no vote (u5 has one vote).
    assert {w["utt_id"]: w["votes"] for w in written} == VOTES
    assert {w["utt_id"]: w["annotator"] for w in written} == annotators
    assert {(w["round"], w["source"]) for w in written} == {(1, "human")}
    stored = state.labels()
    assert {u: stored[u]["label"] for u in stored} == LABELS
    # Skipped only (u4) and never submitted (u6, its draft is not a label) stay pending.
    assert state.pending_ids(1) == [IDS[3], IDS[5]]
    # Importing the same export again writes nothing.
    log = _log_bytes(state)
    assert _import(state, export, tmp_path) == []
    assert _log_bytes(state) == log


def test_default_then_all_tasks_export_do_not_conflict(state, tmp_path):
    assert len(_import(state, JSON_EXPORT, tmp_path)) == 4
    assert _import(state, JSON_ALL_TASKS, tmp_path) == []
    assert state.pending_ids(1) == [IDS[3], IDS[5]]


def test_real_export_paths_are_checked_against_the_corpus_root(state, tmp_path):
    before = _log_bytes(state)
    with pytest.raises(LabelImportError) as caught:
        _import(state, JSON_EXPORT, tmp_path, corpus_root=tmp_path / "elsewhere")
    message = str(caught.value)
    # Every task of the export names its path (data.path and data.audio, a plain path).
    assert message.count("resolves outside the corpus root") == 10
    assert "nothing was imported" in message
    assert _log_bytes(state) == before and state.labels() == {}


@pytest.mark.parametrize(
    ("export", "where", "what"),
    [
        (JSON_MIN, "top level", "Label Studio's JSON-MIN export"),
        (CSV_EXPORT, "line 1", "Label Studio's CSV export"),
    ],
    ids=["json_min", "csv"],
)
def test_json_min_and_csv_exports_are_refused_clearly(state, tmp_path, export, where, what):
    before = _log_bytes(state)
    with pytest.raises(LabelImportError) as caught:
        _import(state, export, tmp_path)
    message = str(caught.value)
    assert "1 problem(s)" in message and f"{where}: this is {what}" in message
    assert "as 'JSON'" in message and "nothing was imported" in message
    assert _log_bytes(state) == before and state.labels() == {}
    assert state.pending_ids(1) == IDS
