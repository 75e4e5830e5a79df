"""Human labeling round trip: export a round, import the filled CSV or a Label Studio export."""

from __future__ import annotations

import csv
import json
import pickle
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from after_ray.errors import LabelImportError, RunStateError
from after_ray.pipeline.labeling import export_batch, import_labels
from after_ray.store.layout import LABELS_FILE
from after_ray.store.run_state import RunState

CLASSES = ["neutral", "happy", "angry", "sad"]
IDS = ["corpus/s1/a", "corpus/s1/b", "corpus/s2/c", "corpus/s2/d"]


@pytest.fixture
def corpus_root(tmp_path) -> Path:
    root = tmp_path / "corpus"
    for utt_id in IDS:
        path = root / (utt_id.split("/", 1)[1] + ".wav")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"RIFF")
    return root


@pytest.fixture
def state(tmp_path):
    with RunState.open(tmp_path / "run") as run_state:
        run_state.record_selection(1, IDS, [0.9, 0.8, 0.7, 0.6], "entropy")
        yield run_state


def _rows(corpus_root: Path) -> list[dict]:
    return [
        {"utt_id": u, "path": str(corpus_root / (u.split("/", 1)[1] + ".wav")), "duration_s": 2.5}
        for u in IDS
    ]


def _log_bytes(state: RunState) -> bytes:
    path = state.run_dir / LABELS_FILE
    return path.read_bytes() if path.exists() else b""


def _fill_csv(csv_path: Path, labels: dict[str, str], out: Path) -> Path:
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["utt_id", "path", "duration_s", "label"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "label": labels.get(row["utt_id"], "")})
    return out


def _write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _ls_task(utt_id: str, *choices: str, cancelled: int | None = None) -> dict:
    annotations = [
        {
            "id": k,
            "completed_by": k,
            "was_cancelled": k == cancelled,
            "result": [
                {
                    "from_name": "emotion",
                    "to_name": "audio",
                    "type": "choices",
                    "value": {"choices": [choice]},
                }
            ],
        }
        for k, choice in enumerate(choices, start=1)
    ]
    return {"id": 100 + IDS.index(utt_id), "data": {"utt_id": utt_id}, "annotations": annotations}


def test_export_writes_csv_tasks_and_config(state, corpus_root, tmp_path):
    csv_path, tasks_path = export_batch(state, 1, _rows(corpus_root), CLASSES, tmp_path / "out")
    with open(csv_path, newline="") as handle:
        reader = csv.reader(handle)
        assert next(reader) == ["utt_id", "path", "duration_s", "label"]
        body = list(reader)
    assert [r[0] for r in body] == IDS and all(r[3] == "" for r in body)
    tasks = json.loads(tasks_path.read_text())
    assert [t["data"]["utt_id"] for t in tasks] == IDS
    assert tasks[0]["data"]["audio"] == str(corpus_root / "s1" / "a.wav")
    config = ET.parse(tmp_path / "out" / "round_001_label_studio_config.xml").getroot()
    choices = config.find("Choices")
    assert choices.get("name") == "emotion" and choices.get("choice") == "single"
    assert choices.get("toName") == config.find("Audio").get("name") == "audio"
    assert [c.get("value") for c in choices.findall("Choice")] == CLASSES
    # Export by directory path (no lock needed) gives the same files.
    csv2, _ = export_batch(state.run_dir, 1, _rows(corpus_root), CLASSES, tmp_path / "out2")
    assert csv2.read_bytes() == csv_path.read_bytes()


def test_export_refuses_items_outside_the_selection(state, corpus_root, tmp_path):
    rows = _rows(corpus_root) + [{"utt_id": "corpus/x", "path": "x.wav", "duration_s": 1.0}]
    with pytest.raises(RunStateError, match="not in round 1"):
        export_batch(state, 1, rows, CLASSES, tmp_path / "out")
    with pytest.raises(RunStateError, match="no selection"):
        export_batch(state, 2, rows[:1], CLASSES, tmp_path / "out")


def test_filled_csv_imports_partially_and_idempotently(state, corpus_root, tmp_path):
    csv_path, _ = export_batch(state, 1, _rows(corpus_root), CLASSES, tmp_path / "out")
    filled = _fill_csv(
        csv_path, {IDS[0]: "Happy", IDS[1]: " sad ", IDS[3]: "ANGRY"}, tmp_path / "f.csv"
    )
    written = import_labels(state, 1, filled, CLASSES, None, corpus_root=corpus_root)
    assert {w["utt_id"]: w["label"] for w in written} == {
        IDS[0]: "happy",
        IDS[1]: "sad",
        IDS[3]: "angry",
    }
    assert {w["source"] for w in written} == {"human"}
    assert state.pending_ids(1) == [IDS[2]]
    before = _log_bytes(state)
    assert import_labels(state, 1, filled, CLASSES, None, corpus_root=corpus_root) == []
    assert _log_bytes(state) == before
    # The last one arrives later in a second file.
    rest = _write_csv(tmp_path / "rest.csv", f"utt_id,label\n{IDS[2]},neutral\n")
    import_labels(state, 1, rest, CLASSES, None)
    assert state.round_status(1).phase == "labeled"


def test_label_studio_export_with_several_annotations_gives_votes(state, tmp_path):
    export = [
        _ls_task(IDS[0], "happy", "happy", "angry"),
        _ls_task(IDS[1], "sad"),
        _ls_task(IDS[2], "angry", "Neutral", "neutral", cancelled=1),
        {"id": 9, "data": {"utt_id": IDS[3]}, "annotations": []},
    ]
    path = tmp_path / "project-1.json"
    path.write_text(json.dumps(export))
    written = {w["utt_id"]: w for w in import_labels(state, 1, path, CLASSES, None)}
    assert written[IDS[0]]["label"] == "happy"
    assert written[IDS[0]]["votes"] == ["happy", "happy", "angry"]
    assert written[IDS[0]]["annotator"] == "1,2,3"
    assert (written[IDS[1]]["label"], written[IDS[1]]["votes"]) == ("sad", None)
    # The cancelled annotation does not count.
    assert written[IDS[2]]["votes"] == ["neutral", "neutral"]
    assert state.pending_ids(1) == [IDS[3]]


def test_identical_duplicates_merge(state, tmp_path):
    path = _write_csv(
        tmp_path / "dup.csv", f"utt_id,label\n{IDS[0]},happy\n{IDS[0]},HAPPY\n{IDS[1]},sad\n"
    )
    written = import_labels(state, 1, path, CLASSES, None)
    assert [w["utt_id"] for w in written] == [IDS[0], IDS[1]]


INVALID_FILES = {
    "unknown id": (
        "x.csv",
        f"utt_id,label\n{IDS[0]},happy\ncorpus/zz,sad\n",
        "line 3",
        "not one of the items selected",
    ),
    "label outside the set": ("x.csv", f"utt_id,label\n{IDS[0]},hapy\n", "line 2", "'hapy'"),
    "conflicting duplicate": (
        "x.csv",
        f"utt_id,label\n{IDS[0]},happy\n{IDS[1]},sad\n{IDS[0]},angry\n",
        "line 4",
        "'happy' at line 2",
    ),
    "path escapes the corpus": (
        "x.csv",
        f"utt_id,path,label\n{IDS[0]},../../etc/passwd,happy\n",
        "line 2",
        "outside the corpus root",
    ),
    "wrong header": ("x.csv", f"id,emotion\n{IDS[0]},happy\n", "line 1", "wrong header"),
    "ragged row": ("x.csv", f"utt_id,label\n{IDS[0]},happy,extra\n", "line 2", "3 fields"),
    "not json": ("x.json", '[{"data": {"utt_id": "a"}, ', "line 1", "not valid JSON"),
    "json not a task list": (
        "x.json",
        '{"utt_id": "a", "emotion": "happy"}',
        "top level",
        "list of Label Studio tasks",
    ),
    "task without utt_id": (
        "x.json",
        '[{"data": {"audio": "a.wav"}, "annotations": []}]',
        "task #1",
        "no data.utt_id",
    ),
    "several choices": (
        "x.json",
        json.dumps(
            [
                {
                    "data": {"utt_id": IDS[0]},
                    "annotations": [{"result": [{"value": {"choices": ["happy", "sad"]}}]}],
                }
            ]
        ),
        "task #1 annotation 1",
        "several classes",
    ),
    "choice outside the set": (
        "x.json",
        json.dumps([_ls_task(IDS[0], "bored")]),
        "task #1 (id 100) annotation 1",
        "'bored'",
    ),
}


@pytest.mark.parametrize("case", sorted(INVALID_FILES))
def test_invalid_files_raise_and_leave_state_unchanged(case, state, corpus_root, tmp_path):
    name, text, where, reason = INVALID_FILES[case]
    # A valid label already in the log: it must survive byte for byte.
    state.append_labels(1, [{"utt_id": IDS[3], "label": "sad", "source": "human"}])
    before = _log_bytes(state)
    path = _write_csv(tmp_path / name, text)
    with pytest.raises(LabelImportError) as info:
        import_labels(state, 1, path, CLASSES, None, corpus_root=corpus_root)
    message = str(info.value)
    assert where in message and reason in message and "Fix:" in message, message
    assert "nothing was imported" in message
    assert _log_bytes(state) == before
    assert state.labeled_ids() == [IDS[3]]


def test_binary_file_is_refused_without_unpickling(state, tmp_path):
    path = tmp_path / "labels.pkl"
    path.write_bytes(pickle.dumps({"utt_id": IDS[0], "label": "happy"}))
    with pytest.raises(LabelImportError, match="binary"):
        import_labels(state, 1, path, CLASSES, None)
    latin = tmp_path / "latin.csv"
    latin.write_bytes(f"utt_id,label\n{IDS[0]},h\xe9\n".encode("latin-1"))
    with pytest.raises(LabelImportError, match="UTF-8"):
        import_labels(state, 1, latin, CLASSES, None)
    assert _log_bytes(state) == b""


def test_conflict_with_a_stored_label_is_refused(state, tmp_path):
    import_labels(
        state, 1, _write_csv(tmp_path / "a.csv", f"utt_id,label\n{IDS[0]},happy\n"), CLASSES, None
    )
    before = _log_bytes(state)
    second = _write_csv(tmp_path / "b.csv", f"utt_id,label\n{IDS[1]},sad\n{IDS[0]},angry\n")
    with pytest.raises(LabelImportError, match="already labeled 'happy'"):
        import_labels(state, 1, second, CLASSES, None)
    assert _log_bytes(state) == before  # not even the valid row for IDS[1]


def test_every_problem_is_listed_at_once(state, corpus_root, tmp_path):
    path = _write_csv(
        tmp_path / "many.csv",
        "utt_id,path,label\n"
        f"{IDS[0]},s1/a.wav,hapy\n"
        f"corpus/nope,s1/b.wav,sad\n"
        f"{IDS[2]},/etc/passwd,angry\n",
    )
    with pytest.raises(LabelImportError) as info:
        import_labels(state, 1, path, CLASSES, None, corpus_root=corpus_root)
    message = str(info.value)
    assert "3 problem(s)" in message
    assert all(f"line {n}" in message for n in (2, 3, 4))


def test_expected_ids_restrict_what_a_file_may_label(state, tmp_path):
    path = _write_csv(tmp_path / "x.csv", f"utt_id,label\n{IDS[0]},happy\n{IDS[1]},sad\n")
    with pytest.raises(LabelImportError, match="line 3"):
        import_labels(state, 1, path, CLASSES, [IDS[0]])
    with pytest.raises(LabelImportError, match="round 7 has no selection"):
        import_labels(state, 7, path, CLASSES, None)
